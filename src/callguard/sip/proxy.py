"""The screening proxy: RFC 3261 §16 transaction-stateful forwarding with one decision per INVITE.

What the proxy keeps per call is deliberately small:

* ``stx``  -- server side, keyed by the caller's (Via branch, sent-by): either the bytes of the
  final response we generated (a rejection: retransmissions get the same bytes, the ACK is
  absorbed) or the :class:`Tx` of a forwarded INVITE (retransmissions get the last response,
  CANCEL finds where the INVITE went).
* ``ctx``  -- client side, keyed by the branch of *our* Via: responses are only accepted for
  transactions we created, and are routed back to where the request came from.
* ``dialogs`` -- Call-ID of answered calls, so a BYE passing through (with ``record_route``)
  closes the call record and feeds the caller's answer/short-call ratios.

Our branch is derived deterministically from the incoming branch, its sent-by and the trunk
attempt, followed by a loop hash (Request-URI, Call-ID, CSeq, tags): a CANCEL computes the
same branch as its INVITE, and a request that comes back with our Via and the same loop hash
is a loop (482).  Non-2xx final responses from a trunk are ACKed by the proxy (hop by hop,
like a stateful proxy), and the caller's ACK to them is absorbed.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import ipaddress
import itertools
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..config import Config, parse_address
from ..errors import SipError
from ..numbers import is_emergency
from ..settings import resolve_source

# message.py selects the Cython twin of the parser itself (unless CALLGUARD_NO_EXTENSIONS is set).
from . import message as sipmsg
from .transport import ListenerInfo, local_address_towards

parse_message = sipmsg.parse_message
parse_via = sipmsg.parse_via
parse_uri_user = sipmsg.parse_uri_user
check_request_semantics = sipmsg.check_request_semantics
check_response_semantics = sipmsg.check_response_semantics
response_for_error = sipmsg.response_for_error
response_for_bad_bytes = sipmsg.response_for_bad_bytes
frame_stream = sipmsg.frame_stream

BRANCH_MAGIC = "z9hG4bK"
OUR_MARK = "z9hG4bKcg"          # every branch we create starts with this
T1 = 0.5                        # RFC 3261 Timer T1
TX_LINGER = 32.0                # 64*T1: how long a finished transaction absorbs retransmissions
T4 = 5.0                        # once the ACK to a non-2xx final came: RFC 3261 Timer I
DIALOG_LINGER = 12 * 3600.0     # answered calls without a BYE seen are forgotten after this
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, PRACK, MESSAGE, NOTIFY, REFER, SUBSCRIBE"

_CANON = {
    "call-id": "Call-ID", "cseq": "CSeq", "www-authenticate": "WWW-Authenticate", "mime-version": "MIME-Version",
    "p-asserted-identity": "P-Asserted-Identity", "p-preferred-identity": "P-Preferred-Identity",
    "rack": "RAck", "rseq": "RSeq", "sip-etag": "SIP-ETag", "sip-if-match": "SIP-If-Match",
    "p-charging-vector": "P-Charging-Vector", "p-access-network-info": "P-Access-Network-Info",
}
_URI_RE = re.compile(r"^\s*<?\s*(sips?):(?:([^@>]*)@)?(\[[0-9A-Fa-f:.]+\]|[^:;?>\s]+)(?::(\d+))?([^>]*)")
_TRANSPORT_RE = re.compile(r";\s*transport=(\w+)", re.I)
_RPORT_RE = re.compile(r";\s*rport(?=\s*(?:;|$))", re.I)
_TAG_RE = re.compile(r";\s*tag=", re.I)
_SENT_BY_RE = re.compile(r"^\s*SIP\s*/\s*2\.0\s*/\s*[A-Za-z]+\s+([^\s;,]+)", re.I)
_BRANCH_RE = re.compile(r";\s*branch\s*=\s*([^;\s,]+)", re.I)
_CTRL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_RECEIVED_RE = re.compile(r";\s*received\s*=", re.I)
_RECEIVED_PARAM_RE = re.compile(r";\s*received\s*=\s*[^;\s]*", re.I)
TICK = 0.02                     # resolution of transaction timers (Timer A, trunk timeout, Timer C)
K_RETRANS, K_TRUNK, K_TIMER_C = 0, 1, 2    # K_TIMER_C + n: stage n of Timer C
ROWS_NONE, ROWS_TUPLES, ROWS_PACKED = 0, 1, 2   # FastPath.rows_mode: no call records, tuples, packed rows
TIMER_C_FIRST_STAGE = 4.0       # seconds; see timer_c_stages


def via_branch(via: str) -> str:
    """The branch parameter of one Via value ('' when absent)."""
    b = _BRANCH_RE.search(via)
    return b.group(1) if b is not None else ""


def tx_key(msg: Any) -> tuple[Any, ...]:
    """The server transaction of a request (RFC 3261 §17.2.3): top Via branch and sent-by.

    A CANCEL and the ACK to a non-2xx response carry the INVITE's top Via, so they find its
    transaction.  Requests without an RFC 3261 branch fall back to Call-ID, CSeq and From tag.
    """
    top = msg.vias[0]
    s = _SENT_BY_RE.match(top)
    sent_by = s.group(1).lower() if s else top
    b = _BRANCH_RE.search(top)
    if b is not None and b.group(1).startswith(BRANCH_MAGIC):
        return (b.group(1), sent_by)
    return (msg.call_id, msg.cseq, msg.from_tag, sent_by)


def clean(text: str) -> str:
    """Text safe on one header line (CR, LF and other controls become spaces)."""
    return _CTRL_RE.sub(" ", text) if _CTRL_RE.search(text) else text


def canon(name: str) -> str:
    """A lower-case long header name in its usual spelling (``call-id`` -> ``Call-ID``)."""
    c = _CANON.get(name)
    if c is None:
        c = _CANON[name] = _capitalised(name)
    return c


def _capitalised(name: str) -> str:
    return "-".join(p.capitalize() for p in name.split("-"))


def _h(*parts: str) -> str:
    return hashlib.blake2b("\x00".join(parts).encode("utf-8", "surrogateescape"), digest_size=6).hexdigest()


def tag_digest_py(data: bytes) -> str:
    """12 hex digits of the 64-bit FNV-1a hash of ``data`` (low 48 bits): the pure-Python twin of
    ``_fastpath.tag_digest``, which the To tag of our own responses uses (see ``_respond``)."""
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h & 0xFFFFFFFFFFFF:012x}"


def _tag_digest_impl() -> Callable[[bytes], str]:
    if not os.environ.get("CALLGUARD_NO_EXTENSIONS"):
        try:
            from ._fastpath import tag_digest
            return tag_digest
        except ImportError:
            pass
    return tag_digest_py


tag_digest = _tag_digest_impl()


def split_commas(value: str) -> list[str]:
    """Split a header value on commas outside <> and quotes (Route, Record-Route)."""
    if "," not in value:
        return [value.strip()]
    out: list[str] = []
    depth = 0
    quoted = False
    start = 0
    for i, ch in enumerate(value):
        if ch == '"':
            quoted = not quoted
        elif not quoted:
            if ch == "<":
                depth += 1
            elif ch == ">":
                depth -= 1
            elif ch == "," and depth <= 0:
                out.append(value[start:i].strip())
                start = i + 1
    out.append(value[start:].strip())
    return [x for x in out if x]


def parse_uri_target(uri: str) -> tuple[str | None, str, int | None, str] | None:
    """(user, host, port, transport) of a SIP URI or name-addr; None for anything else (tel:)."""
    m = _URI_RE.match(uri)
    if not m:
        return None
    t = _TRANSPORT_RE.search(m.group(5) or "")
    transport = t.group(1).lower() if t else ("tcp" if m.group(1) == "sips" else "udp")
    return m.group(2), m.group(3).strip("[]"), int(m.group(4)) if m.group(4) else None, transport


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def due_timers_py(q: collections.deque[Any], now: float, out: list[Any]) -> None:
    """Pop the due entries (deadline, seq, tx, attempt, kind) of one timer queue; keep the relevant ones."""
    while q and q[0][0] <= now:
        entry = q.popleft()
        tx = entry[2]
        if not tx.final and tx.attempt == entry[3]:
            out.append(entry)


def timer_c_stages(total: float, first: float = TIMER_C_FIRST_STAGE) -> tuple[float, ...]:
    """Timer C (``total`` seconds) as a chain of fixed delays: ``first``, twice that, and so on, the
    last one what is left (never under half of the one before it).

    A timer entry holds its transaction until the entry is due.  With one 180 s entry, every call
    that had a provisional response stayed in memory three minutes after it ended (at 10k calls/s
    some 1.8 million transactions, gigabytes).  Each stage drops a transaction that has its final by
    then and re-arms the next one for a call still ringing; every delay is fixed, so each stage's
    queue stays in deadline order.
    """
    stages = []
    step, left = first, total
    while left > step * 1.5:
        stages.append(step)
        left -= step
        step *= 2
    stages.append(left)
    return tuple(stages)


class LingerQueuePy:
    """Entries of a transaction table to forget at their deadline, oldest first: the pure-Python
    twin of ``_fastpath.LingerQueue`` (every entry of one queue waits the same time)."""

    __slots__ = ("q",)

    def __init__(self) -> None:
        self.q: collections.deque[tuple[float, Any, Any]] = collections.deque()

    def append(self, deadline: float, key: Any, value: Any) -> None:
        """Queue ``key`` to be forgotten at ``deadline`` if the table still holds ``value`` then."""
        if self.q and deadline < self.q[-1][0]:
            raise ValueError("deadlines must not decrease")
        self.q.append((deadline, key, value))

    def expire(self, now: float, table: dict[Any, Any]) -> int:
        """Forget every entry due by ``now``: removed from ``table`` if it still holds that value."""
        q = self.q
        done = 0
        while q and q[0][0] <= now:
            _, key, value = q.popleft()
            if value is not None and table.get(key) is value:
                del table[key]
            done += 1
        return done

    def release(self, value: Any, max_back: int = 2048) -> bool:
        """Let go of the newest entry holding ``value`` (among the ``max_back`` newest): it keeps its
        deadline but holds and forgets nothing.  False when not found."""
        q = self.q
        for back in range(1, min(max_back, len(q)) + 1):
            deadline, _, held = q[-back]
            if held is value:
                q[-back] = (deadline, None, None)
                return True
        return False

    def __len__(self) -> int:
        return len(self.q)


# The compiled twins (callguard.sip._fastpath), unless CALLGUARD_NO_EXTENSIONS is set.
_due_timers = due_timers_py
LingerQueue: Any = LingerQueuePy
TxTable: Any = dict             # the server transactions: a dict, or the compiled table the fast path probes
if not os.environ.get("CALLGUARD_NO_EXTENSIONS"):
    try:
        from ._fastpath import LingerQueue, TxTable
        from ._fastpath import due_timers as _due_timers
    except ImportError:  # not built: the Python ones serve
        pass


# ---------------------------------------------------------------- helpers that may be missing
class NullMetrics:
    """Stand-in when metrics are disabled: same methods, no effect."""

    def decision(self, rule: str, latency_seconds: float) -> None: ...
    def fast_batch(self, invites: int, acks: int, out: Any, by_rule: Any, latency_counts: Any,
                   latency_sum: float) -> None: ...
    def message_in(self, method: str | int, n: int = 1) -> None: ...
    def message_out(self, method: str | int, n: int = 1) -> None: ...
    def parse_error(self) -> None: ...
    def trunk_state(self, name: str, up: bool) -> None: ...
    def record_written(self, n: int = 1) -> None: ...
    def record_dropped(self, n: int = 1) -> None: ...
    def overload(self) -> None: ...
    def fault(self) -> None: ...
    def tcp_overflow(self) -> None: ...
    def watch_udp_send_drops(self, read: Any) -> None: ...


class NullRecords:
    """Stand-in when call records are disabled."""

    def add(self, record: dict[str, Any]) -> None: ...
    def add_many(self, rows: Sequence[tuple[Any, ...]]) -> None: ...
    packs_rows = False      # the fast path keeps no rows for it at all (ROWS_NONE)
    def add_packed(self, data: bytes, rows: int, tmin: float, tmax: float, odd: bool) -> None: ...
    def outcome(self, call_id: str, final_code: int | None = None, answered_at: float | None = None,
                ended_at: float | None = None) -> None: ...
    def close(self) -> None: ...


class UnwrittenRecords:
    """Stand-in when call records are on but the store could not be opened (a corrupt file, a
    directory, no permission): every record is counted as dropped (``callguard_records_dropped_total``)
    and logged (``records_dropping``, then at most once a minute with the count), instead of the
    decisions vanishing with the dropped counter at 0."""

    packs_rows = True       # the fast path packs its rows as for a store: the count is the point
    LOG_INTERVAL = 60.0

    def __init__(self, path: str, error: str, metrics: Any, log: Any) -> None:
        self.path = path
        self.error = error
        self.metrics = metrics
        self.log = log
        self.dropped = 0
        self._logged_at: float | None = None

    def _drop(self, n: int) -> None:
        if n <= 0:
            return
        self.dropped += n
        self.metrics.record_dropped(n)
        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= self.LOG_INTERVAL:
            self._logged_at = now
            if self.log is not None:
                self.log.error("records_dropping", path=self.path, error=self.error, dropped=self.dropped,
                               reason="the records store could not be opened")

    def add(self, record: dict[str, Any]) -> None:
        self._drop(1)

    def add_many(self, rows: Sequence[tuple[Any, ...]]) -> None:
        self._drop(len(rows))

    def add_packed(self, data: bytes, rows: int, tmin: float, tmax: float, odd: bool) -> None:
        self._drop(rows)

    def outcome(self, call_id: str, final_code: int | None = None, answered_at: float | None = None,
                ended_at: float | None = None) -> None: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- state objects
class TrunkState:
    """A trunk and its health."""

    __slots__ = ("name", "transport", "host", "port", "addr", "prefixes", "keepalive", "up", "ka_pending",
                 "ka_handle", "spec")

    def __init__(self, name: str, spec: str, prefixes: tuple[str, ...], keepalive: float) -> None:
        transport, host, port = parse_address(spec)
        self.spec = spec
        self.name = name
        self.transport = transport
        if not _is_ip(host):
            host = str(socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][4][0])
        self.host = host
        self.port = port
        self.addr = (host, port)
        self.prefixes = prefixes
        self.keepalive = keepalive
        self.up = True
        self.ka_pending: str | None = None
        self.ka_handle: Any = None


class Tx:
    """A forwarded request: the caller side and the current attempt towards the next hop."""

    __slots__ = ("key", "msg", "is_invite", "up_ep", "up_addr", "branch", "out", "out_head", "dest_ep",
                 "dest_addr", "trunk", "candidates", "attempt", "provisional", "final", "cancelled", "interval",
                 "last_resp", "to_tag", "caller", "callee", "source", "started", "branches", "expired_soon",
                 "call_id")

    def __init__(self, key: Any, msg: Any, is_invite: bool, up_ep: Any, up_addr: Any) -> None:
        self.key = key
        self.msg = msg
        self.call_id: str = msg.call_id
        self.is_invite = is_invite
        self.up_ep = up_ep
        self.up_addr = up_addr
        self.branch = ""
        self.out = b""
        self.out_head: list[str] = []
        self.dest_ep: Any = None
        self.dest_addr: Any = None
        self.trunk: TrunkState | None = None
        self.candidates: list[TrunkState] = []
        self.attempt = -1
        self.provisional = False
        self.final = 0
        self.cancelled = False
        self.interval = T1
        self.last_resp: bytes | None = None
        self.to_tag = ""
        self.caller = ""
        self.callee = ""
        self.source = ""
        self.started = 0.0
        self.branches: list[str] = []
        self.expired_soon = False


class Dialog:
    __slots__ = ("caller", "source", "answered_at", "trunk_addr", "up_ep", "up_addr", "dest_ep")

    def __init__(self, caller: str, source: str, answered_at: float, trunk_addr: Any, up_ep: Any, up_addr: Any,
                 dest_ep: Any) -> None:
        self.caller = caller
        self.source = source
        self.answered_at = answered_at
        self.trunk_addr = trunk_addr
        self.up_ep = up_ep
        self.up_addr = up_addr
        self.dest_ep = dest_ep


class _Allowed:
    """The part of a Verdict that forwarding reads, for a call the fast path allowed."""

    __slots__ = ("caller", "callee", "shadowed")
    verdict = "allow"

    def __init__(self, caller: str, callee: str, shadowed: tuple[str, ...]) -> None:
        self.caller = caller
        self.callee = callee
        self.shadowed = shadowed


# The fast path's decision rows: the call-record fields in RecordStore order, then the shadowed rules.
_ROW_FIELDS = ("time", "call_id", "source", "caller", "callee", "rule", "verdict", "code", "score", "latency_us")


# ---------------------------------------------------------------- the proxy
class Proxy:
    """Screens INVITEs and forwards SIP traffic between callers and trunks.

    The transports call :meth:`handle` with each message; the proxy never blocks (records and
    metrics are queued, list reloads run in a worker thread) and never lets an exception out.
    """

    def __init__(self, loop: Any, cfg: Config, guard: Any, *, records: Any = None, metrics: Any = None,
                 log: Any = None) -> None:
        self.loop = loop
        self.guard = guard
        self.records = records or NullRecords()
        self.metrics = metrics or NullMetrics()
        self.log = log
        self.udp: list[Any] = []               # UdpListener endpoints
        self.tcp_infos: list[ListenerInfo] = []
        self.tcp: Any = None                   # TcpManager
        self.stx: Any = TxTable()
        self.ctx: dict[str, Tx] = {}
        self.dialogs: dict[str, Dialog] = {}
        # Each queue in deadline order.  Stateless requests' branches, TX_LINGER after they were sent:
        self.expiry: collections.deque[tuple[float, dict[Any, Any], Any, Any]] = collections.deque()
        # Our own final responses (bytes in stx), T4 after the ACK to one:
        self.expiry_acked: collections.deque[tuple[float, dict[Any, Any], Any, Any]] = collections.deque()
        # One queue per table and linger (C rings when compiled: no tuple per entry for the
        # garbage collector to walk, and an entry can let go of what it holds once ACKed).
        self.resp_linger = LingerQueue()        # stx, TX_LINGER after one of our own final responses
        self.tx_linger = LingerQueue()          # stx, TX_LINGER after a final
        self.branch_linger = LingerQueue()      # ctx, the same
        self.tx_acked = LingerQueue()           # stx, T4 after the ACK to a non-2xx final
        self.branch_acked = LingerQueue()       # ctx, the same
        self.dialog_expiry: collections.deque[tuple[float, str, Dialog]] = collections.deque()
        self.in_flight = 0
        self.draining = False
        # Outcomes held back until the fast paths hand over the decisions they still hold (see outcome);
        # whether any listener has a fast path is known once they are bound (start)
        self._outcomes: list[tuple[str, int | None, float | None, float | None]] = []
        self._hold_outcomes = False
        self.faults = 0
        self.our_hosts: set[tuple[str, int]] = set()
        self.our_ports: set[int] = set()
        self.wildcard = False
        self._sweep_handle: Any = None
        self._tick_handle: Any = None
        # Transaction timers, ticked every TICK seconds instead of a TimerHandle per timer: one FIFO
        # queue per delay (the deadlines of one delay come in order), so adding and firing are O(1).
        # Entries are never cancelled; a stale one (the attempt moved on, a response came) is skipped.
        self.timers: dict[float, collections.deque[tuple[float, int, Tx, int, int]]] = {}
        self._seq = itertools.count()
        self._trust: dict[str, tuple[bool, bool]] = {}
        self._local_for: dict[tuple[int, str], str] = {}
        # Per-decision log lines of fast-path batches: skipped when info is filtered out anyway;
        # in the JSON format written by _write_decisions (one write per batch), else by structlog.
        self._log_decisions = cfg.logging.level in ("debug", "info")
        self._log_json = cfg.logging.format == "json" and not os.environ.get("CALLGUARD_STRUCTLOG_DECISIONS")
        self.log_stream: Any = None     # where batched decision lines go (None: sys.stderr at write time)
        self.apply_config(cfg)

    # ------------------------------------------------------------ configuration
    def trunk_states(self, cfg: Config) -> list[TrunkState]:
        """The trunks of ``cfg``, names resolved (blocking: a reload calls this off the loop), each
        keeping the up/down state it has now."""
        old = {t.spec: t for t in getattr(self, "trunks", [])}
        trunks = []
        for t in cfg.trunks:
            ts = TrunkState(t.name, t.address, t.prefixes, t.keepalive)
            prev = old.get(t.address)
            if prev is not None:
                ts.up = prev.up
            trunks.append(ts)
        return trunks

    def apply_config(self, cfg: Config, guard: Any = None, trunks: list[TrunkState] | None = None) -> None:
        """Take a (re)loaded config; called between two messages, so the swap is atomic.

        What can fail (a trunk name that does not resolve) comes first, or is done before
        (``trunks``): a failed reload changed the guard, the rules and the keepalives and then
        stopped, half applied, while it logged that the old config was kept.
        """
        if trunks is None:
            trunks = self.trunk_states(cfg)
        if guard is not None:
            self.guard = guard
        self.cfg = cfg
        sip = cfg.sip
        self.ua = sip.user_agent
        self._server_line = f"Server: {clean(self.ua)}"
        self.hide_reason = sip.hide_reason
        self.record_route = sip.record_route
        self.max_in_flight = sip.max_in_flight
        self.retry_after = sip.retry_after
        self.trunk_timeout = sip.trunk_timeout
        self.tx_timeout = sip.transaction_timeout
        self.timer_c_stages = timer_c_stages(sip.transaction_timeout)
        self.max_size = sip.max_message_size
        self.emergency = frozenset(cfg.emergency_numbers)
        self._trust = {}
        for t in getattr(self, "trunks", []):
            if t.ka_handle is not None:
                t.ka_handle.cancel()
                t.ka_handle = None
        self.trunks = trunks
        self.trunk_ips = frozenset(t.host for t in trunks)
        if self.tcp is not None:
            self.tcp.configure(sip.max_tcp_connections, sip.max_message_size, sip.tcp_idle_timeout,
                               sip.tcp_partial_timeout, sip.tcp_write_queue_max)

    def start(self) -> None:
        """Start timers (transaction sweep, trunk keepalives); call once listeners are bound."""
        for ep in self.udp:
            self._add_ours(ep.listener)
            fast = getattr(ep, "fast", None)
            if fast is not None:
                self._configure_fast(fast, ep)
        for info in self.tcp_infos:
            self._add_ours(info)
        self._hold_outcomes = bool(self._fast_paths())
        if self._sweep_handle is None:
            self._sweep_handle = self.loop.call_later(1.0, self._sweep)
        if self._tick_handle is None:
            self._tick_handle = self.loop.call_later(TICK, self._tick)
        for t in self.trunks:
            if t.keepalive > 0 and t.ka_handle is None:
                t.ka_handle = self.loop.call_soon(self._keepalive, t)

    def _add_ours(self, info: ListenerInfo) -> None:
        self.our_ports.add(info.port)
        if info.host in ("0.0.0.0", "::"):
            self.wildcard = True
        self.our_hosts.add((info.host, info.port))

    def stop_timers(self) -> None:
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        for t in self.trunks:
            if t.ka_handle is not None:
                t.ka_handle.cancel()
                t.ka_handle = None
        for fast in self._fast_paths():
            self.on_batch(fast)     # the last decisions of the fast path, before the records close
        self._flush_outcomes()

    def is_ours(self, host: str, port: int | None) -> bool:
        """Whether host:port (port None = 5060) is one of our listeners."""
        p = 5060 if port is None else port
        if (host, p) in self.our_hosts:
            return True
        if p in self.our_ports and (self.wildcard or host in ("localhost",)):
            return True
        return False

    def _trust_of(self, ip: str) -> tuple[bool, bool]:
        """(trusted, trust_identity) of a source address; cached until the next reload."""
        r = self._trust.get(ip)
        if r is None:
            idx = resolve_source(self.guard.settings, ip)
            if idx >= 0:
                r = (True, self.cfg.sources[idx].trust_identity)
            else:
                r = (False, False)
            if len(self._trust) > 65536:
                self._trust.clear()
            self._trust[ip] = r
        return r

    # ------------------------------------------------------------ sending
    def _udp_for(self, family: int) -> Any:
        for ep in self.udp:
            if ep.listener.family == family:
                return ep
        return self.udp[0] if self.udp else None

    def _endpoint_to(self, transport: str, host: str, port: int) -> Any:
        """The endpoint that reaches host:port over the given transport (TCP: open or reuse)."""
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        if transport == "tcp" and self.tcp is not None:
            conn = self.tcp.get((host, port))
            if conn is not None:
                return conn
            info = next((i for i in self.tcp_infos if i.family == fam), None)
            if info is None:
                udp = self._udp_for(fam)
                info = udp.listener if udp is not None else ListenerInfo("tcp", host, 0, fam)
            return self.tcp.connect(host, port, info)
        return self._udp_for(fam)

    def _via_host(self, info: ListenerInfo, dest_host: str, dest_port: int) -> str:
        if info.host not in ("0.0.0.0", "::"):
            return info.sent_by
        key = (info.family, dest_host)
        local = self._local_for.get(key)
        if local is None:
            local = self._local_for[key] = local_address_towards(dest_host, dest_port, info.family)
        return f"[{local}]:{info.port}" if ":" in local else f"{local}:{info.port}"

    def _send(self, ep: Any, data: bytes, addr: Any, method: str | int) -> None:
        """Send one message; ``method`` labels the metric (a response: its status code or "response")."""
        if ep is None:
            return
        if ep.kind == "tcp" and ep.closed and not ep.outgoing and data.startswith(b"SIP/2.0 "):
            ep = self._reconnect_for_response(ep, data)
            if ep is None:
                return
        ep.send(data, addr)
        if method == "response":
            try:
                method = int(data[8:11])
            except ValueError:
                pass
        self.metrics.message_out(method)

    def _reconnect_for_response(self, conn: Any, data: bytes) -> Any:
        """The connection a response goes over when the request's own connection has closed.

        RFC 3261 §18.2.2: open one to the address the request came from (its Via's ``received``)
        at the port of the Via's sent-by, 5060 when it names none.  A caller's SBC that dropped
        the connection while the trunk was ringing still gets the final response; without this
        it waited for its Timer B (32 s).  Only the request's own source address is connected to,
        so a Via cannot point the proxy at anyone else.
        """
        if self.tcp is None or not conn.peer:
            return None
        try:
            top = parse_message(data, datagram=False).vias[0]
            port = parse_via(top).port or 5060
        except (SipError, IndexError, ValueError):
            return None
        return self.tcp.connect(conn.peer[0], port, conn.listener)

    def _respond(self, msg: Any, ep: Any, addr: Any, code: int, reason: str, *, to_tag: str | None = None,
                 extra: tuple[Any, ...] = ()) -> bytes:
        if to_tag is None and code >= 200 and not msg.to_tag:
            # the compiled fast path derives the same tag from the same bytes (see its _reject)
            seed = "\x00".join((msg.call_id or "", str(msg.cseq), msg.from_tag or "", msg.vias[0] if msg.vias else ""))
            to_tag = "cg" + tag_digest(seed.encode("utf-8", "surrogateescape"))
        data = self._response(msg, code, reason, to_tag, extra)
        self._send(ep, data, addr, "response")
        return data

    def _response(self, msg: Any, code: int, reason: str, to_tag: str | None = None,
                  extra: tuple[Any, ...] = ()) -> bytes:
        """A response to ``msg`` (RFC 3261 §8.2.6), like ``message.build_response``.

        Values copied from a parsed request cannot hold a line break (the parser unfolded
        them), so only the reason and the extra headers are cleaned.
        """
        to = msg.to_value
        if to_tag is not None and msg.to_tag is None:
            to = f"{to};tag={to_tag}"
        lines = [f"SIP/2.0 {code} {clean(reason)}"]
        for name, value in msg.headers:
            if name == "via":
                lines.append("Via: " + value)
        lines.append(f"From: {msg.from_value}\r\nTo: {to}\r\nCall-ID: {msg.call_id}\r\nCSeq: {msg.cseq} "
                     f"{msg.cseq_method}")
        for name, value in extra:
            lines.append(f"{name}: {clean(value)}")
        lines.append(self._server_line)
        return ("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode("utf-8", "surrogateescape")

    # ------------------------------------------------------------ the compiled fast path
    def _configure_fast(self, fast: Any, ep: Any = None) -> None:
        """Hand the compiled fast path the core, this config's response texts and, for the listener ``ep``,
        what forwarding needs: trunks, our Via, timer queues (at start and reload)."""
        core = getattr(self.guard, "core", None)
        settings = getattr(core, "settings", None)
        configure_forward = getattr(fast, "configure_forward", None)
        if configure_forward is not None:
            configure_forward(None, None, [], "", [], (), 0.0, 0.0)    # until configured again below
        if settings is None or os.environ.get("CALLGUARD_NO_FAST_PATH"):
            fast.configure(None, (), (), (), True, "", 0, None)
            return
        from ..metrics import LATENCY_BUCKETS
        from ..settings import RULE_NAMES

        fast.configure(core, RULE_NAMES, settings.codes, settings.reasons, self.hide_reason, self._server_line,
                       self.max_size, self._trust_identity, LATENCY_BUCKETS)
        fast.rows_mode = self._rows_mode()
        if configure_forward is None or ep is None or os.environ.get("CALLGUARD_NO_FAST_FORWARD"):
            return
        routes = []
        for t in self.trunks:
            via_head = rr = None
            if t.transport == "udp" and self._endpoint_to(t.transport, t.host, t.port) is ep:
                sent_by = self._via_host(ep.listener, t.host, t.port)
                via_head = f"Via: SIP/2.0/UDP {sent_by};branch={OUR_MARK}".encode("utf-8", "surrogateescape")
                rr = f"Record-Route: <sip:{sent_by};lr>\r\n".encode("utf-8", "surrogateescape")
            routes.append((t, t.prefixes, via_head, rr if self.record_route and rr else b"", t.addr))
        canon_exc = [(k.encode(), v.encode()) for k, v in list(_CANON.items()) if v != _capitalised(k)]
        first_c = self.timer_c_stages[0]
        queues = (self._timer_queue(self.trunk_timeout), self._timer_queue(T1), self._timer_queue(first_c))
        configure_forward(self, ep, routes, self.ua, canon_exc, queues, self.trunk_timeout, first_c)

    def _trust_identity(self, ip: str) -> bool:
        return self._trust_of(ip)[1]

    def _rows_mode(self) -> int:
        """How the fast path hands over its decisions' call records (see on_batch)."""
        if self.log is not None and self._log_decisions:
            return ROWS_TUPLES      # the decision log lines are written from the tuples
        if isinstance(self.records, NullRecords):
            return ROWS_NONE
        if getattr(self.records, "packs_rows", False):
            return ROWS_PACKED      # packed in C by the fast path: no tuple, no string per decision
        return ROWS_TUPLES

    def fast_headroom(self) -> int:
        """INVITEs the fast path may still hand over for forwarding (0: draining or at max_in_flight)."""
        if self.draining:
            return 0
        return self.max_in_flight - self.in_flight

    def fast_allowed(self, data: bytes, addr: Any, ep: Any, caller: str, callee: str,
                     shadowed: tuple[str, ...]) -> None:
        """An INVITE the fast path decided to allow: parse it and go on as after ``guard.check``."""
        msg = None
        try:
            msg = parse_message(data, datagram=True)
            self._after_check(msg, tx_key(msg), ep, addr, _Allowed(caller, callee, shadowed))
        except Exception as exc:  # noqa: BLE001 - one bad message must never stop the proxy
            self._fault(exc, msg, ep, addr)

    def outcome(self, call_id: str, final_code: int | None = None, answered_at: float | None = None,
                ended_at: float | None = None) -> None:
        """A call's outcome for its records, never ahead of its decision's record.

        The store applies an outcome to the records of its Call-ID written before it, and the fast
        paths hand their decisions over only every ``bookkeeping_interval``: a trunk's quick 486
        would otherwise reach the store before the record it completes, and be lost.  So while a
        fast path serves, outcomes wait for the next hand-over (``on_batch``).
        """
        if type(self.records) is NullRecords:
            return
        if self._hold_outcomes:
            self._outcomes.append((call_id, final_code, answered_at, ended_at))
        else:
            self.records.outcome(call_id, final_code, answered_at, ended_at)

    def on_batch(self, fast: Any) -> None:
        """After fast-path batches: records, metrics and decision logs of the batches, at once; then
        the outcomes held back (behind every fast path's decisions, as any may hold their records)."""
        self._hand_over_rows(fast)
        if self._outcomes:
            for other in self._fast_paths():
                if other is not fast:
                    self._hand_over_rows(other)
            self._flush_outcomes()
        counts = fast.take_counts()
        if counts is not None:
            self.metrics.fast_batch(*counts)
        if fast.in_codes:
            # the trunks' responses the compiled forward path handled, by status
            for code, n in fast.in_codes.items():
                self.metrics.message_in(code, n)
            fast.in_codes.clear()

    def _flush_outcomes(self) -> None:
        outcomes, self._outcomes = self._outcomes, []
        for o in outcomes:
            try:
                self.records.outcome(*o)
            except Exception as exc:  # noqa: BLE001 - one bad outcome must not cost the others
                self._fault(exc, None, None, None)

    def _hand_over_rows(self, fast: Any) -> None:
        """The call records (and decision log lines) of what ``fast`` decided since it last handed over."""
        packed = fast.take_packed()
        if packed is not None:
            self.records.add_packed(*packed)
        rows = fast.decisions
        if not rows:
            return
        fast.decisions = []
        add_many = getattr(self.records, "add_many", None)
        if add_many is not None:
            add_many(rows)
        else:
            for r in rows:
                self.records.add(dict(zip(_ROW_FIELDS, r)))
        if self.log is not None and self._log_decisions:
            if self._log_json:
                self._write_decisions(rows)
                return
            for r in rows:
                self.log.info("decision", call_id=r[1], caller=r[3], callee=r[4], rule=r[5], code=r[7],
                              score=round(r[8], 4), latency_us=r[9], source=r[2], shadowed=list(r[10]) or None)

    def _write_decisions(self, rows: list[tuple[Any, ...]]) -> None:
        """The batch's ``decision`` log lines, as structlog's JSON renderer writes them, in one write."""
        dumps = json.dumps
        ts = datetime.datetime.fromtimestamp
        utc = datetime.UTC
        out = []
        for r in rows:
            shadowed = list(r[10]) or None
            stamp = ts(r[0], utc).isoformat().replace("+00:00", "Z")
            out.append(dumps({"logger": "callguard.serve", "call_id": r[1], "caller": r[3], "callee": r[4],
                              "rule": r[5], "code": r[7], "score": round(r[8], 4), "latency_us": r[9],
                              "source": r[2], "shadowed": shadowed, "event": "decision", "level": "info",
                              "timestamp": stamp}))
        out.append("")
        stream = self.log_stream or sys.stderr
        try:
            stream.write("\n".join(out))
            stream.flush()
        except (OSError, ValueError):   # a closed or full log sink must not stop the proxy
            pass

    # ------------------------------------------------------------ entry point
    def handle(self, data: bytes, addr: Any, ep: Any) -> None:
        """One message from a transport (a datagram, or a framed TCP message)."""
        msg = None
        try:
            if ep.kind == "udp":
                if len(data) > self.max_size:
                    self.metrics.parse_error()
                    resp = response_for_bad_bytes(data, SipError(513, "Message Too Large"), to_tag="cg0",
                                                  server=self.ua)
                    if resp is not None:
                        self._send(ep, resp, addr, "response")
                    return
                if not data.strip():
                    return  # CRLF keepalive
            try:
                msg = parse_message(data, datagram=ep.kind == "udp")
            except SipError as exc:
                self.metrics.parse_error()
                resp = response_for_bad_bytes(data, exc, to_tag="cg" + _h(repr(data[:256])), server=self.ua)
                if resp is not None:
                    self._send(ep, resp, addr, "response")
                return
            if msg.is_request:
                self.metrics.message_in(msg.method)
                self._on_request(msg, ep, addr)
            else:
                self.metrics.message_in(msg.status)
                self._on_response(msg, ep, addr)
        except Exception as exc:  # noqa: BLE001 - one bad message must never stop the proxy
            self._fault(exc, msg, ep, addr)

    def _fault(self, exc: BaseException, msg: Any, ep: Any, addr: Any) -> None:
        self.faults += 1
        self.metrics.fault()
        if self.log is not None:
            self.log.error("fault", error=repr(exc), call_id=getattr(msg, "call_id", None),
                           method=getattr(msg, "method", None), exc_info=exc)
        # Fail open: an INVITE we have not answered or forwarded yet goes to a trunk unscreened.
        if msg is not None and getattr(msg, "is_request", False) and msg.method == "INVITE":
            try:
                key = tx_key(msg)
                # Only a trusted source (or an emergency call) fails open: never an open relay;
                # while draining, only an emergency call (as _on_invite lets it in).
                emergency = self._is_emergency(self._callee_of(msg))
                allowed = emergency or (self._trust_of(addr[0])[0] and not self.draining)
                if allowed and key not in self.stx:
                    self._forward_invite(msg, key, ep, addr, None)
            except Exception as exc2:  # noqa: BLE001 - nothing more can be done for this message
                if self.log is not None:
                    self.log.error("fail_open_failed", error=repr(exc2))

    # ------------------------------------------------------------ requests
    def _on_request(self, msg: Any, ep: Any, addr: Any) -> None:
        method = msg.method
        ip = addr[0]
        if method == "OPTIONS" and not msg.to_tag and self._addressed_to_us(msg.uri):
            self._respond(msg, ep, addr, 200, "OK", extra=(("Allow", ALLOW), ("Accept", "application/sdp")))
            return
        err = check_request_semantics(msg)
        if err is not None:
            resp = response_for_error(msg, err, to_tag="cg" + _h(msg.call_id, str(msg.cseq)), server=self.ua)
            if resp is not None:
                self._send(ep, resp, addr, "response")
            return
        if msg.max_forwards is not None and msg.max_forwards <= 0:
            if method != "ACK":
                self._respond(msg, ep, addr, 483, "Too Many Hops")
            return
        key = tx_key(msg)
        if method == "INVITE":
            if msg.to_tag:
                prev = self.stx.get(key)
                if prev is not None:
                    self._retransmission(prev, ep, addr)
                    return
                self._in_dialog(msg, key, ep, addr, ip)
                return
            self._on_invite(msg, key, ep, addr, ip)
        elif method == "ACK":
            prev = self.stx.get(key)
            if prev is not None and (type(prev) is bytes or (prev.final >= 300 or not prev.final)):
                # The ACK to a non-2xx final we sent or ACKed ourselves: absorbed, and the
                # transaction is forgotten after Timer I instead of 64*T1 (memory at high rates).
                if type(prev) is bytes or prev.final:
                    self._acked(key, prev)
                return
            if msg.to_tag:
                self._in_dialog(msg, key, ep, addr, ip)
        elif method == "CANCEL":
            self._on_cancel(msg, key, ep, addr)
        elif msg.to_tag:
            self._in_dialog(msg, key, ep, addr, ip)
        elif method == "REGISTER":
            # callguard screens calls in front of trunks; it is no registrar and relays no registrations.
            self._respond(msg, ep, addr, 405, "Method Not Allowed", extra=(("Allow", ALLOW),))
        else:
            self._out_of_dialog(msg, key, ep, addr, ip)

    def _addressed_to_us(self, uri: str) -> bool:
        t = parse_uri_target(uri)
        if t is None:
            return False
        user, host, port, _ = t
        return not user or self.is_ours(host, port)

    def _retransmission(self, prev: Any, ep: Any, addr: Any) -> None:
        if type(prev) is bytes:
            self._send(ep, prev, addr, "response")
        elif prev.last_resp is not None:
            self._send(ep, prev.last_resp, addr, "response")

    # ------------------------------------------------------------ INVITE
    def _caller_of(self, msg: Any, trust_identity: bool) -> str:
        if trust_identity:
            pai = msg.header("p-asserted-identity")
            if pai:
                return str(split_commas(pai)[0])
        return str(msg.from_value)

    def _callee_of(self, msg: Any) -> str:
        # The ';' parameters of a telephone-subscriber user (`110;phone-context=+86`) are not part
        # of the number: kept, they hid an emergency callee from rule 1.
        user = parse_uri_user(msg.uri).split(";", 1)[0]
        return str(user) if user else str(msg.uri)

    def _is_emergency(self, callee: str) -> bool:
        """Whether the core's rule 1 lets this callee through: the same normalisation, so every form
        it knows (``0391 110`` with an area code, ``0086110``, ``+86 110``) passes overload, drain and
        trunks marked down too."""
        return is_emergency(callee, self.emergency)

    def _on_invite(self, msg: Any, key: Any, ep: Any, addr: Any, ip: str) -> None:
        prev = self.stx.get(key)
        if prev is not None:
            self._retransmission(prev, ep, addr)  # the same transaction: not a new attempt
            return
        if self._is_loop(msg):
            resp = self._respond(msg, ep, addr, 482, "Loop Detected")
            self.stx[key] = resp
            self.resp_linger.append(self.loop.time() + TX_LINGER, key, resp)
            return
        now = time.time()
        callee = self._callee_of(msg)
        if (self.draining or self.in_flight >= self.max_in_flight) and not self._is_emergency(callee):
            rule = "shutdown" if self.draining else "overload"
            if not self.draining:
                self.metrics.overload()
            resp = self._respond(msg, ep, addr, 503, "Service Unavailable",
                                 extra=(("Retry-After", str(self.retry_after)),))
            self.stx[key] = resp
            self.resp_linger.append(self.loop.time() + TX_LINGER, key, resp)
            self.records.add({"time": now, "call_id": msg.call_id, "source": ip, "caller": msg.from_value,
                              "callee": callee, "rule": rule, "verdict": "reject", "code": 503, "score": 0.0,
                              "latency_us": 0})
            return
        caller = self._caller_of(msg, self._trust_of(ip)[1])
        guard = self.guard
        faults = guard.faults
        t0 = time.perf_counter()
        v = guard.check(caller, callee, source=ip, now=now)
        latency = time.perf_counter() - t0
        if guard.faults != faults:
            self.faults += 1
            self.metrics.fault()
            if self.log is not None:
                self.log.error("fault", error=repr(guard.last_fault), call_id=msg.call_id, where="guard.check")
        latency_us = int(latency * 1e6)
        self.metrics.decision(v.rule, latency)
        if self.log is not None:
            self.log.info("decision", call_id=msg.call_id, caller=v.caller, callee=v.callee, rule=v.rule,
                          code=v.code, score=round(v.score, 4), latency_us=latency_us, source=ip,
                          shadowed=list(v.shadowed) or None)
        self.records.add({"time": now, "call_id": msg.call_id, "source": ip, "caller": v.caller, "callee": v.callee,
                          "rule": v.rule, "verdict": v.verdict, "code": v.code, "score": v.score,
                          "latency_us": latency_us})
        self._after_check(msg, key, ep, addr, v)

    def _after_check(self, msg: Any, key: Any, ep: Any, addr: Any, v: Any) -> None:
        """Answer or forward an INVITE once decided (``v``: a Verdict, or the fast path's decision)."""
        if v.verdict == "reject":
            extra: tuple[Any, ...] = ()
            if not self.hide_reason:
                text = f"{v.rule}: {v.reason}".replace("\\", "\\\\").replace('"', '\\"')
                extra = (("Reason", f'SIP;cause={v.code};text="{text}"'),)
            resp = self._respond(msg, ep, addr, v.code, v.reason or "Rejected", extra=extra)
            self.stx[key] = resp
            self.resp_linger.append(self.loop.time() + TX_LINGER, key, resp)
            return
        if "untrusted_source" in v.shadowed:
            # Never an open relay, whatever the rule modes say (untrusted_source in shadow mode).
            # Emergency calls decide before untrusted_source (SPEC §3) and pass from anywhere.
            text = "untrusted_source: Forbidden - untrusted source"
            extra = () if self.hide_reason else (("Reason", f'SIP;cause=403;text="{text}"'),)
            resp = self._respond(msg, ep, addr, 403, "Forbidden - untrusted source", extra=extra)
            self.stx[key] = resp
            self.resp_linger.append(self.loop.time() + TX_LINGER, key, resp)
            return
        self._forward_invite(msg, key, ep, addr, v)

    def _is_loop(self, msg: Any) -> bool:
        for v in msg.vias:
            if OUR_MARK in v:
                pv = parse_via(v)
                if pv.branch and pv.branch.startswith(OUR_MARK) and self.is_ours(pv.host, pv.port):
                    if pv.branch.rsplit(".", 1)[-1] == self._loop_hash(msg):
                        return True
        return False

    def _loop_hash(self, msg: Any) -> str:
        return _h(msg.uri, msg.call_id or "", str(msg.cseq), msg.from_tag or "", msg.to_tag or "")

    def _branch(self, key: Any, attempt: int, msg: Any) -> str:
        return f"{OUR_MARK}{_h(*(str(k) for k in key), str(attempt))}.{self._loop_hash(msg)}"

    def _candidates(self, callee_digits: str) -> list[TrunkState]:
        best = -1
        out: list[TrunkState] = []
        for t in self.trunks:
            if t.prefixes:
                n = max((len(p) for p in t.prefixes if callee_digits.startswith(p)), default=-1)
            else:
                n = 0
            if n < 0:
                continue
            if n > best:
                best, out = n, [t]
            elif n == best:
                out.append(t)
        return out

    def _forward_invite(self, msg: Any, key: Any, ep: Any, addr: Any, v: Any) -> None:
        tx = Tx(key, msg, True, ep, addr)
        tx.source = addr[0]
        tx.started = time.time()
        if v is not None:
            tx.caller, tx.callee = v.caller, v.callee
            digits = v.callee
        else:
            tx.caller = str(msg.from_value)
            tx.callee = self._callee_of(msg)
            digits = "".join(ch for ch in tx.callee if ch.isdigit())
        tx.to_tag = "cg" + _h(msg.call_id or "", str(msg.cseq), str(key))
        tx.candidates = self._candidates(digits)
        self.stx[key] = tx
        self.in_flight += 1
        if not tx.candidates:
            self._final_local(tx, 404, "Not Found - no route")
            return
        tx.last_resp = self._response(msg, 100, "Trying")
        self._send(ep, tx.last_resp, addr, "response")
        tx.out_head = self._forward_head(msg, addr)
        self._try_next(tx)

    def _forward_head(self, msg: Any, addr: Any) -> list[str]:
        """The forwarded request minus our Via: request line, the other headers, Max-Forwards - 1."""
        vias = list(msg.vias)
        vias[0] = self._stamp_via(vias[0], addr)
        lines = [f"{msg.method} {msg.uri} SIP/2.0"]
        lines.extend("Via: " + v for v in vias)
        mf_seen = False
        for name, value in msg.headers:
            if name == "via" or name == "content-length":
                continue
            if name == "max-forwards":
                mf_seen = True
                try:
                    value = str(int(value) - 1)
                except ValueError:
                    value = "69"
            lines.append(f"{canon(name)}: {value}")
        if not mf_seen:
            lines.append("Max-Forwards: 70")
        return lines

    @staticmethod
    def _stamp_via(v: str, addr: Any) -> str:
        """RFC 3261 §18.2.1 received and RFC 3581 rport on the caller's top Via."""
        ip, port = addr[0], addr[1]
        if _RECEIVED_RE.search(v):
            # A received the sender wrote is not where it sent from: ours replaces it (§18.2.1
            # has the server's say what the source was; Kamailio replaces it likewise).
            v = _RECEIVED_PARAM_RE.sub("", v)
        if _RPORT_RE.search(v):
            return _RPORT_RE.sub(f";rport={port}", v, count=1) + f";received={ip}"
        if ";rport=" in v.replace(" ", "").lower():
            return v + f";received={ip}"
        m = _SENT_BY_RE.match(v)
        host = m.group(1) if m else ""
        if host.startswith("["):
            host = host[1:host.find("]")]
        else:
            host = host.split(":", 1)[0]
        if host != ip:
            v += f";received={ip}"
        return v

    def _assemble(self, head: list[str], our_via: str, body: bytes, rr: str | None) -> bytes:
        lines = [head[0], "Via: " + our_via]
        if rr:
            lines.append("Record-Route: " + rr)
        lines.extend(head[1:])
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body

    def _our_via(self, dest_ep: Any, transport: str, host: str, port: int, branch: str) -> tuple[str, str]:
        info = dest_ep.listener
        sent_by = self._via_host(info, host, port)
        proto = "TCP" if transport == "tcp" else "UDP"
        via = f"SIP/2.0/{proto} {sent_by};branch={branch}"
        if proto == "UDP":
            via += ";rport"
        return via, sent_by

    def _try_next(self, tx: Tx) -> None:
        """Send the INVITE to the next trunk that is up; 503 to the caller when none is left.

        A trunk marked down by its keepalive is skipped -- except for an emergency call, which is
        not refused because OPTIONS went unanswered: once the trunks up have failed (or when none
        is), it goes to the ones marked down, in route order.  Attempts past the candidates' count
        are that second pass, so the attempt number alone says where the call is.
        """
        n = len(tx.candidates)
        while True:
            tx.attempt += 1
            if tx.attempt < n:
                trunk = tx.candidates[tx.attempt]
                if trunk.up:
                    break
            elif tx.attempt < 2 * n and self._is_emergency(tx.callee):
                trunk = tx.candidates[tx.attempt - n]
                if not trunk.up:
                    break
            else:
                self._final_local(tx, 503, "Service Unavailable - no trunk available")
                return
        tx.provisional = False
        tx.trunk = trunk
        ep = self._endpoint_to(trunk.transport, trunk.host, trunk.port)
        if ep is None:
            self._final_local(tx, 503, "Service Unavailable - no transport")
            return
        branch = self._branch(tx.key, tx.attempt, tx.msg)
        tx.branch = branch
        tx.branches.append(branch)
        via, sent_by = self._our_via(ep, trunk.transport, trunk.host, trunk.port, branch)
        rr = None
        if self.record_route:
            rr = f"<sip:{sent_by};lr" + (";transport=tcp>" if trunk.transport == "tcp" else ">")
        if not tx.out_head:
            # A transaction the compiled path forwarded builds its head when it first fails over.
            tx.out_head = self._forward_head(tx.msg, tx.up_addr)
        tx.out = self._assemble(tx.out_head, via, tx.msg.body, rr)
        tx.dest_ep = ep
        tx.dest_addr = trunk.addr
        self.ctx[branch] = tx
        self._send(ep, tx.out, trunk.addr, "INVITE")
        now = self.loop.time()
        self._timer(self.trunk_timeout, now, tx, K_TRUNK)
        if ep.kind == "udp":
            tx.interval = T1
            self._timer(T1, now, tx, K_RETRANS)

    def _timer_queue(self, delay: float) -> collections.deque[tuple[float, int, Tx, int, int]]:
        q = self.timers.get(delay)
        if q is None:
            q = self.timers[delay] = collections.deque()
        return q

    def _timer(self, delay: float, now: float, tx: Tx, kind: int) -> None:
        """Fire ``kind`` for the current attempt of ``tx`` after ``delay`` seconds (if still relevant then)."""
        self._timer_queue(delay).append((now + delay, next(self._seq), tx, tx.attempt, kind))

    def _tick(self) -> None:
        """Fire the transaction timers that are due."""
        self._tick_handle = self.loop.call_later(TICK, self._tick)
        now = self.loop.time()
        self._forget_due(now)
        for fast in self._fast_paths():
            # what an idle fast path decided since its last bookkeeping (a busy one drains itself)
            if now - fast.kept_since >= fast.bookkeeping_interval:
                fast.kept_since = now
                self.on_batch(fast)
        due: list[tuple[float, int, Tx, int, int]] = []
        queues = 0
        for q in self.timers.values():
            if q and q[0][0] <= now:
                queues += 1
                _due_timers(q, now, due)
        if queues > 1:
            due.sort(key=lambda e: (e[0], e[1]))     # the order of one heap: deadline, then creation
        for _, _, tx, attempt, kind in due:
            if tx.final or tx.attempt != attempt:
                continue
            if kind == K_RETRANS:
                # Timer A: retransmit the INVITE over UDP until a provisional or final response arrives.
                if not tx.provisional:
                    self._send(tx.dest_ep, tx.out, tx.dest_addr, "INVITE")
                    tx.interval *= 2
                    self._timer(tx.interval, now, tx, K_RETRANS)
            elif kind == K_TRUNK:
                if not tx.provisional:
                    self._on_trunk_timeout(tx)
            elif kind - K_TIMER_C + 1 < len(self.timer_c_stages):
                # still ringing at the end of a Timer C stage: on to the next one
                self._timer(self.timer_c_stages[kind - K_TIMER_C + 1], now, tx, kind + 1)
            elif tx.provisional:
                self._on_trunk_timeout(tx)

    def _on_trunk_timeout(self, tx: Tx) -> None:
        try:
            if tx.provisional:
                # Timer C: the call rang too long without a final answer.
                self._send_cancel(tx)
                self._final_local(tx, 408, "Request Timeout")
            elif tx.cancelled:
                self._final_local(tx, 487, "Request Terminated")
            else:
                if self.log is not None:
                    self.log.warning("trunk_timeout", trunk=tx.trunk.name if tx.trunk else None,
                                     call_id=tx.call_id)
                self._try_next(tx)
        except Exception as exc:  # noqa: BLE001 - a timer callback must not die silently
            self._fault(exc, None, None, None)

    def on_unreachable(self, addr: Any) -> None:
        """An ICMP error for a UDP destination: fail over the INVITEs waiting on it, mark a pinged trunk down."""
        dest = (addr[0], addr[1])
        for trunk in self.trunks:
            if trunk.addr == dest and trunk.ka_pending is not None:
                trunk.ka_pending = None
                self._set_trunk(trunk, False)
        for tx in [t for t in self.ctx.values() if t.dest_addr == dest]:
            if tx.is_invite and not tx.final and not tx.provisional and tx.dest_ep is not None \
                    and tx.dest_ep.kind == "udp" and tx.dest_addr == dest:
                if self.log is not None:
                    self.log.warning("trunk_unreachable", trunk=tx.trunk.name if tx.trunk else None,
                                     address=f"{dest[0]}:{dest[1]}", call_id=tx.call_id)
                self._try_next(tx)

    def on_connect_failed(self, addr: tuple[str, int]) -> None:
        """A TCP connection towards a next hop failed: fail over what was waiting on it."""
        for tx in list(self.ctx.values()):
            if tx.is_invite and not tx.final and not tx.provisional and tx.dest_addr == addr:
                self._try_next(tx)

    def _final_local(self, tx: Tx, code: int, reason: str) -> None:
        """A final response we generate for a forwarded INVITE (no trunk, timeout, cancelled)."""
        extra: tuple[Any, ...] = ()
        if code == 503:
            extra = (("Retry-After", str(self.retry_after)),)
        tx.last_resp = self._response(tx.msg, code, reason, tx.to_tag, extra)
        self._send(tx.up_ep, tx.last_resp, tx.up_addr, "response")
        self._finish(tx, code)

    def _finish(self, tx: Tx, code: int) -> None:
        tx.final = code       # makes its pending timers stale
        self.in_flight -= 1
        now = time.time()
        if 200 <= code < 300:
            self.outcome(tx.call_id, code, now)
            d = Dialog(tx.caller, tx.source, now, tx.dest_addr, tx.up_ep, tx.up_addr, tx.dest_ep)
            self.dialogs[tx.call_id] = d
            self.dialog_expiry.append((self.loop.time() + DIALOG_LINGER, tx.call_id, d))
        else:
            self.outcome(tx.call_id, code)
            try:
                self.guard.observe(tx.caller, False, 0.0, tx.source, now)
            except Exception as exc:  # noqa: BLE001 - scoring input only; never fail a call for it
                self._fault(exc, None, None, None)
        deadline = self.loop.time() + TX_LINGER
        self.tx_linger.append(deadline, tx.key, tx)
        for b in tx.branches:
            self.branch_linger.append(deadline, b, tx)

    # ------------------------------------------------------------ CANCEL
    def _on_cancel(self, msg: Any, key: Any, ep: Any, addr: Any) -> None:
        prev = self.stx.get(key)
        if prev is None:
            self._respond(msg, ep, addr, 481, "Call/Transaction Does Not Exist")
            return
        to_tag = None if type(prev) is bytes else prev.to_tag
        self._respond(msg, ep, addr, 200, "OK", to_tag=to_tag)
        if type(prev) is bytes or prev.final or prev.cancelled:
            return
        prev.cancelled = True
        if prev.provisional:
            self._send_cancel(prev)
        # else: sent when the first provisional arrives (RFC 3261 §9.1); 487 on trunk timeout.

    def _send_cancel(self, tx: Tx) -> None:
        m = tx.msg
        via = tx.out.split(b"\r\n", 2)[1].decode("utf-8", "surrogateescape")  # our Via line, as sent
        lines = [f"CANCEL {m.uri} SIP/2.0", via]
        for r in m.header_all("route"):
            lines.append("Route: " + r)
        lines += [f"From: {m.from_value}", f"To: {m.to_value}", f"Call-ID: {m.call_id}", f"CSeq: {m.cseq} CANCEL",
                  "Max-Forwards: 70", f"User-Agent: {self.ua}", "Content-Length: 0"]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
        self._send(tx.dest_ep, data, tx.dest_addr, "CANCEL")

    def _send_ack(self, tx: Tx, resp: Any, ep: Any, addr: Any) -> None:
        """ACK a non-2xx final response hop by hop (RFC 3261 §17.1.1.3)."""
        m = tx.msg
        branch = via_branch(resp.vias[0])
        via = tx.out.split(b"\r\n", 2)[1].decode("utf-8", "surrogateescape")
        if branch != tx.branch:
            via = re.sub(r"branch=[^;\s]+", f"branch={branch}", via)
        lines = [f"ACK {m.uri} SIP/2.0", via]
        for r in m.header_all("route"):
            lines.append("Route: " + r)
        lines += [f"From: {m.from_value}", f"To: {resp.to_value}", f"Call-ID: {m.call_id}", f"CSeq: {m.cseq} ACK",
                  "Max-Forwards: 70", f"User-Agent: {self.ua}", "Content-Length: 0"]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
        self._send(ep, data, addr, "ACK")

    # ------------------------------------------------------------ other requests
    def _routes_after_ours(self, msg: Any) -> list[str]:
        """The Route set, with our own entry on top (loose routing, RFC 3261 16.4) removed."""
        routes: list[str] = []
        for r in msg.header_all("route"):
            routes.extend(split_commas(r))
        if routes:
            t = parse_uri_target(routes[0])
            if t is not None and self.is_ours(t[1], t[2]):
                routes.pop(0)
        return routes

    def _in_dialog(self, msg: Any, key: Any, ep: Any, addr: Any, ip: str) -> None:
        """A request inside a dialog (To tag): routed by Route / Request-URI, never screened.

        From a trusted source or a trunk it goes where it says.  From anywhere else it is relayed
        only when it comes from the caller of a dialog we set up (an emergency call from an
        untrusted source hanging up) and only towards that dialog's trunk: an in-dialog request is
        not screened, so one that named a target of its own would make the proxy an open relay for
        whoever has seen a Call-ID (a re-INVITE to any address, unscreened).
        """
        d = self.dialogs.get(msg.call_id) if msg.call_id else None
        vouched = self._trust_of(ip)[0] or ip in self.trunk_ips
        if not vouched and (d is None or ip != d.up_addr[0]):
            if msg.method != "ACK":
                self._respond(msg, ep, addr, 403, "Forbidden - untrusted source")
            return
        routes = self._routes_after_ours(msg)
        target = None
        if routes:
            target = parse_uri_target(routes[0])
        else:
            t = parse_uri_target(msg.uri)
            if t is not None and not self.is_ours(t[1], t[2]):
                target = t
        dest: tuple[str, str, int] | None = None
        if target is not None and (d is None or _is_ip(target[1])) and (vouched or target[1] in self.trunk_ips):
            dest = (target[3], target[1], target[2] or 5060)
        if dest is None and d is not None:
            # The Request-URI names us (or a host name) and no Route is left: to the other side of the call.
            if ip == d.trunk_addr[0]:
                dest = (d.up_ep.kind, d.up_addr[0], d.up_addr[1])
            else:
                dest = (d.dest_ep.kind if d.dest_ep is not None else "udp", d.trunk_addr[0], d.trunk_addr[1])
        if dest is None:
            if msg.method != "ACK":
                self._respond(msg, ep, addr, 404, "Not Found")
            return
        if msg.method == "BYE" and d is not None:
            now = time.time()
            self.dialogs.pop(msg.call_id, None)
            self.outcome(msg.call_id, ended_at=now)
            try:
                self.guard.observe(d.caller, True, max(0.0, now - d.answered_at), d.source, now)
            except Exception as exc:  # noqa: BLE001 - scoring input only
                self._fault(exc, None, None, None)
        self._relay_request(msg, key, ep, addr, dest, routes_left=routes)

    def _out_of_dialog(self, msg: Any, key: Any, ep: Any, addr: Any, ip: str) -> None:
        """OPTIONS not for us, MESSAGE, ...: relayed for trusted sources only, to a trunk (or by Route)."""
        if not self._trust_of(ip)[0]:
            if msg.method != "ACK":
                self._respond(msg, ep, addr, 403, "Forbidden - untrusted source")
            return
        routes = self._routes_after_ours(msg)
        dest: tuple[str, str, int] | None = None
        if routes:
            t = parse_uri_target(routes[0])
            if t is not None:
                dest = (t[3], t[1], t[2] or 5060)
        if dest is None:
            digits = "".join(ch for ch in self._callee_of(msg) if ch.isdigit())
            for trunk in self._candidates(digits):
                if trunk.up:
                    dest = (trunk.transport, trunk.host, trunk.port)
                    break
        if dest is None:
            self._respond(msg, ep, addr, 503, "Service Unavailable - no trunk available",
                          extra=(("Retry-After", str(self.retry_after)),))
            return
        self._relay_request(msg, key, ep, addr, dest, routes_left=routes)

    def _relay_request(self, msg: Any, key: Any, ep: Any, addr: Any, dest: tuple[str, str, int],
                       routes_left: list[str]) -> None:
        transport, host, port = dest
        if not _is_ip(host):
            # No DNS while running: next hops are IP addresses (trunk names resolve at start and
            # reload). A lookup per message would stall on a dead resolver and lets senders make
            # the proxy query names of their choosing.
            if msg.method != "ACK":
                self._respond(msg, ep, addr, 404, "Not Found - next hop is not an IP address")
            return
        if self._is_loop(msg):
            if msg.method != "ACK":
                self._respond(msg, ep, addr, 482, "Loop Detected")
            return
        out_ep = self._endpoint_to(transport, host, port)
        if out_ep is None:
            return
        branch = self._branch(key, 0, msg)
        our_via, sent_by = self._our_via(out_ep, transport, host, port, branch)
        head = self._forward_head(msg, addr)
        # Route set: drop the entries that named us, keep the rest in order.
        head = [h for h in head if not h.startswith("Route: ")]
        head[1:1] = ["Route: " + r for r in routes_left]
        rr = None
        if self.record_route and msg.method in ("INVITE", "SUBSCRIBE", "REFER") and not msg.to_tag:
            rr = f"<sip:{sent_by};lr" + (";transport=tcp>" if transport == "tcp" else ">")
        data = self._assemble(head, our_via, msg.body, rr)
        if msg.method != "ACK":
            tx = Tx(key, msg, False, ep, addr)
            tx.branch = branch
            tx.dest_ep, tx.dest_addr = out_ep, (host, port)
            self.ctx[branch] = tx
            self._expire(self.ctx, branch, tx, TX_LINGER)
        self._send(out_ep, data, (host, port), msg.method)

    # ------------------------------------------------------------ responses
    def _on_response(self, msg: Any, ep: Any, addr: Any) -> None:
        if not msg.vias:
            return
        top = msg.vias[0]
        if OUR_MARK not in top:
            return  # not a transaction we created: dropped (no open relay of responses)
        branch = via_branch(top)
        if branch.startswith(OUR_MARK + "ka"):
            self._keepalive_answer(branch)
            return
        tx = self.ctx.get(branch)
        if tx is None:
            return
        if msg.cseq_method == "CANCEL":
            return  # our CANCEL was answered hop by hop; the caller got our own 200
        if not tx.is_invite:
            self._relay_response(msg, tx)
            return
        code = msg.status
        if branch != tx.branch:
            # A late answer from a trunk we already failed over from.
            if code >= 300:
                self._send_ack(tx, msg, ep, addr)
            elif 200 <= code < 300 and not tx.final:
                # It answered after all: take the call there and cancel the newer attempt.
                if tx.provisional:
                    self._send_cancel(tx)
                tx.last_resp = self._relay_response(msg, tx)
                self._finish(tx, code)
            return
        if code < 200:
            if not tx.provisional:
                tx.provisional = True
                self._timer(self.timer_c_stages[0], self.loop.time(), tx, K_TIMER_C)
                if tx.cancelled:
                    self._send_cancel(tx)
            if code > 100 and not tx.final:
                tx.last_resp = self._relay_response(msg, tx)
            return
        if code >= 300:
            self._send_ack(tx, msg, ep, addr)
            if tx.final:
                return  # a retransmission of a final we already passed on
            if code == 503 and not tx.cancelled:
                if self.log is not None:
                    self.log.warning("trunk_failover", trunk=tx.trunk.name if tx.trunk else None, code=code,
                                     call_id=tx.call_id)
                self._try_next(tx)      # 503 to the caller when no trunk is left
                return
            tx.last_resp = self._relay_response(msg, tx)
            self._finish(tx, code)
            return
        # 2xx: always relayed (retransmissions too: the ACK is end to end).
        resp = self._relay_response(msg, tx)
        if not tx.final:
            tx.last_resp = resp
            self._finish(tx, code)

    def _relay_response(self, msg: Any, tx: Tx) -> bytes:
        """Pass a response upstream with our Via popped."""
        lines = [f"SIP/2.0 {msg.status} {msg.reason}"]
        lines.extend("Via: " + v for v in msg.vias[1:])
        for name, value in msg.headers:
            if name == "via" or name == "content-length":
                continue
            lines.append(f"{canon(name)}: {value}")
        lines.append(f"Content-Length: {len(msg.body)}")
        data: bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + bytes(msg.body)
        self._send(tx.up_ep, data, tx.up_addr, "response")
        return data

    # ------------------------------------------------------------ trunk keepalive
    def _keepalive(self, trunk: TrunkState) -> None:
        trunk.ka_handle = None
        if trunk.keepalive <= 0:
            return
        try:
            if trunk.ka_pending is not None:
                self._set_trunk(trunk, False)
            ep = self._endpoint_to(trunk.transport, trunk.host, trunk.port)
            if ep is not None:
                branch = f"{OUR_MARK}ka{_h(trunk.name, str(time.time()))}"
                trunk.ka_pending = branch
                via, _ = self._our_via(ep, trunk.transport, trunk.host, trunk.port, branch)
                host = f"[{trunk.host}]" if ":" in trunk.host else trunk.host
                lines = [f"OPTIONS sip:{host}:{trunk.port} SIP/2.0", "Via: " + via, "Max-Forwards: 70",
                         f"From: <sip:callguard@{via.split(' ', 1)[1].split(';')[0]}>;tag={branch[-8:]}",
                         f"To: <sip:{host}:{trunk.port}>", f"Call-ID: {branch}", "CSeq: 1 OPTIONS",
                         f"User-Agent: {self.ua}", "Content-Length: 0"]
                self._send(ep, ("\r\n".join(lines) + "\r\n\r\n").encode(), trunk.addr, "OPTIONS")
                wait = min(self.trunk_timeout, trunk.keepalive)
                self.loop.call_later(wait, self._keepalive_check, trunk, branch)
        finally:
            trunk.ka_handle = self.loop.call_later(trunk.keepalive, self._keepalive, trunk)

    def _keepalive_check(self, trunk: TrunkState, branch: str) -> None:
        if trunk.ka_pending == branch:
            self._set_trunk(trunk, False)

    def _keepalive_answer(self, branch: str) -> None:
        for t in self.trunks:
            if t.ka_pending == branch:
                t.ka_pending = None
                self._set_trunk(t, True)

    def _set_trunk(self, trunk: TrunkState, up: bool) -> None:
        if trunk.up != up:
            trunk.up = up
            self.metrics.trunk_state(trunk.name, up)
            if self.log is not None:
                self.log.warning("trunk_up" if up else "trunk_down", trunk=trunk.name, address=trunk.spec)

    # ------------------------------------------------------------ expiry
    def _expire(self, table: dict[Any, Any], key: Any, value: Any, after: float) -> None:
        self.expiry.append((self.loop.time() + after, table, key, value))

    def _acked(self, key: Any, value: Any) -> None:
        deadline = self.loop.time() + T4
        if type(value) is bytes:
            self.expiry_acked.append((deadline, self.stx, key, value))
            # Its TX_LINGER entry would keep the response and key 27 s past T4: let go of it.
            self.resp_linger.release(value)
            return
        if value.expired_soon:
            return
        self.tx_acked.append(deadline, key, value)
        value.expired_soon = True
        # The TX_LINGER entries would keep the transaction alive 27 s past T4: let go of them.
        self.tx_linger.release(value)
        for b in value.branches:
            self.branch_acked.append(deadline, b, value)
            self.branch_linger.release(value)

    def lingering_acked(self) -> int:
        """Entries ACKed and waiting out T4 before they are forgotten: rejections (ours and the fast
        path's), forwarded transactions and their branches."""
        return len(self.expiry_acked) + len(self.tx_acked) + len(self.branch_acked) \
            + sum(len(f.lingering_acked) for f in self._fast_paths())

    def _fast_paths(self) -> list[Any]:
        return [f for f in (getattr(ep, "fast", None) for ep in self.udp) if f is not None]

    def _forget_due(self, now: float) -> None:
        """Forget finished transactions whose linger is over (every TICK: at 10k calls/s a once-a-second
        sweep stalled the loop for milliseconds, which the slowest answers then waited for)."""
        for fast in self._fast_paths():
            fast.expire(now, self.stx)
        for exp in (self.expiry, self.expiry_acked):
            while exp and exp[0][0] <= now:
                _, table, key, value = exp.popleft()
                if table.get(key) is value:
                    if value is not None and type(value) is not bytes and value.is_invite and not value.final:
                        continue  # still running (its own timers end it)
                    del table[key]
        for txq, table in ((self.resp_linger, self.stx), (self.tx_linger, self.stx), (self.branch_linger, self.ctx),
                           (self.tx_acked, self.stx), (self.branch_acked, self.ctx)):
            txq.expire(now, table)

    def _sweep(self) -> None:
        """Forget stale dialogs (once a second)."""
        self._sweep_handle = self.loop.call_later(1.0, self._sweep)
        now = self.loop.time()
        dexp = self.dialog_expiry
        while dexp and dexp[0][0] <= now:
            _, cid, d = dexp.popleft()
            if self.dialogs.get(cid) is d:
                del self.dialogs[cid]

    def busy(self) -> int:
        """Transactions still waiting for a final response."""
        return self.in_flight

