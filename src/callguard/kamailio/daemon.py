"""The decider: one process holding one :class:`~callguard.Guard` for every Kamailio worker.

Kamailio runs several worker processes, each with its own Python interpreter.  A
rate limit counted inside each worker would be multiplied by the number of workers,
and every worker would hold its own copy of the lists.  Instead every worker asks
this process over a Unix datagram socket (see :mod:`callguard.kamailio.protocol`).
The decider handles one datagram at a time, so a caller's attempts are counted once
and exactly, whichever worker took the INVITE; the lists live in memory once; a
reload happens in one place.  Workers that get no answer in time let the call
through (fail open) and count it.

With ``records.enabled`` the decider stores every decision as a call record (SPEC §6),
one per INVITE transaction: a retransmission gets its first verdict again and no new
record.  Workers report what became of the calls the decider let through (answered,
failed, ended: one-way OUTCOME datagrams); the decider fills in the records' final
code, answer and end times and feeds answered/unanswered and the call's duration into
the caller's score (:meth:`Guard.observe`), as ``callguard serve`` does.

Start it with ``callguard decider --config FILE --socket PATH`` or
``python -m callguard.kamailio.daemon --config FILE --socket PATH``.
``--reload`` / ``--stats`` / ``--ping`` with ``--socket`` talk to a running decider.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .. import config as config_mod
from ..config import Config
from ..errors import CallguardError, ListsBeingWritten
from ..guard import RELOAD_RETRY_REASON, RELOAD_TRIES, Guard, lists_being_written, load_lists_settled
from ..lists import Lists
from ..log import QueuedStream, get_logger
from ..log import configure as configure_logging
from ..osthread import set_os_thread_name
from ..records import RecordStore
from ..signals import hangups_held, hold_hangups
from ..state import restore_snapshot, write_snapshot
from . import protocol as proto
from .protocol import CheckReply, CheckRequest, Outcome
from .routing import IdentityPolicy, pick_trunk


def _get_log() -> Any:
    return get_logger("callguard.decider")


log = _get_log()

TX_TTL = 32.0            # seconds a transaction's verdict is kept for its retransmissions (64*T1)
TX_MAX = 200_000         # bound on remembered transactions (a flood must not grow memory without end)
WATCH_INTERVAL = 1.0     # seconds between checks of the config and list files' mtimes
MAX_PEERS = 4096         # worker addresses counted one by one in --stats; the rest together
SOCKET_BUFFER = 4 * 1024 * 1024
PENDING_TTL = 300.0      # seconds a let-through call waits for its final response (tm's fr_inv_timer is 60)
DIALOG_LINGER = 12 * 3600.0   # answered calls whose BYE never came are forgotten after this (as serve)
CALLS_MAX = 500_000      # bound on tracked calls of each kind
RECORDS_FLUSH_INTERVAL = 1.0   # seconds between two writes of the call records
CLOCK_SKEW = 300.0       # a worker's timestamp further than this from ours is replaced by ours


def _mtimes(cfg: Config, config_path: str) -> tuple[tuple[float, int], ...]:
    """(mtime, size) of the config file and every list file it names ((0, 0) unnamed, -1 missing)."""
    out = []
    for path in (config_path, cfg.lists.blocklist, cfg.lists.service_numbers, cfg.lists.allowlist):
        try:
            st = os.stat(path) if path else None
            out.append((st.st_mtime, st.st_size) if st is not None else (0.0, 0))
        except OSError:
            out.append((-1.0, -1))
    return tuple(out)


class Decider:
    """One guard, its reload logic and the per-transaction verdict cache.

    Used by the decider process and, in embedded mode, inside a single Kamailio worker.

    Args:
        config_path: the YAML config.
        background_reload: load a changed config and lists in a thread and swap them in
            between decisions (the decider process); ``False`` reloads in the caller's
            thread (embedded mode, where no Python thread runs between calls).
        records: where decisions and outcomes are stored; None stores nothing.  The decider
            closes it in :meth:`close`.
    """

    def __init__(self, config_path: str, background_reload: bool = True, records: RecordStore | None = None) -> None:
        self.config_path = str(Path(config_path).resolve())
        cfg = config_mod.load(self.config_path)
        self.guard = Guard(cfg)
        self.identity = IdentityPolicy(cfg)
        self._mtimes = _mtimes(cfg, self.config_path)
        self._failed_mtimes: tuple[tuple[float, int], ...] | None = None
        self._settling: tuple[tuple[float, int], ...] | None = None   # changed stamps seen at the last look
        self._next_watch = 0.0
        self._background = background_reload
        self._loading: threading.Thread | None = None
        self._pending_reload: tuple[Config, Lists, tuple[tuple[float, int], ...]] | None = None
        self._lock = threading.Lock()
        # txkey -> (expires, *verdict fields): a plain tuple of strings and numbers, which the
        # cyclic GC stops tracking, so 200k remembered transactions cost full collections nothing.
        self._tx: dict[tuple[str, ...], tuple[Any, ...]] = {}
        self.records = records
        # Calls let through, by Call-ID: waiting for the final response (expires, caller, source),
        # then answered and waiting for the BYE (expires, caller, source, answered_at).  Each dict
        # is filled in time order with one TTL, so the oldest entries are at the front.
        self._pending: dict[str, tuple[float, str, str]] = {}
        self._dialogs: dict[str, tuple[float, str, str, float]] = {}
        self.generation = 1
        # Rejections are logged one line each only at info or debug (a lookup, not a call, per decision).
        self.log_decisions = cfg.logging.level in ("debug", "info")
        self.stats: Counter[str] = Counter()
        self.last_reload_error = ""
        self.started = time.time()

    @property
    def config(self) -> Config:
        return self.guard.config

    # ------------------------------------------------------------ decisions
    def decide(self, req: CheckRequest, now: float) -> CheckReply:
        """The verdict for one INVITE; a retransmission gets its first verdict again and is not counted.

        Call :meth:`poll` before (the server does between datagrams) to pick up reloads.
        """
        tx = self._tx
        # A retransmission repeats the whole request: the transaction key alone (Call-ID, CSeq,
        # branch) let a banned caller reuse an allowed call's key once Kamailio's transaction had
        # gone, and be answered with its verdict, uncounted.
        txkey = (req.txkey, req.source, req.caller, req.callee, req.identity) if req.txkey else None
        if txkey is not None:
            hit = tx.get(txkey)
            if hit is not None and hit[0] > now:
                self.stats["retransmissions"] += 1
                return CheckReply(*hit[1:])
        caller = req.caller
        callee = req.callee
        t0 = time.perf_counter()
        try:
            caller = self.identity.caller(req.source, req.caller, req.identity)
            faults = self.guard.faults
            v = self.guard.check(caller, req.callee, source=req.source or None, now=now)
            caller, callee = v.caller, v.callee
            flags = proto.FLAG_HIDE_REASON if self.guard.config.sip.hide_reason else 0
            if self.guard.faults != faults:
                flags |= proto.FLAG_FAILED_OPEN
                self.stats["faults"] += 1
                log.error("decision_failed_open", error=repr(self.guard.last_fault), caller=req.caller,
                          callee=req.callee)
            if v.code == 0 and "untrusted_source" in v.shadowed:
                # Never an open relay, whatever the rule modes say (as `callguard serve`).
                reply = CheckReply(403, "untrusted_source", flags, float(v.score), "Forbidden - untrusted source", "")
            else:
                trunk = pick_trunk(self.guard.config, v.callee) if v.code == 0 else ""
                reply = CheckReply(v.code, v.rule, flags, float(v.score), v.reason, trunk)
            self.stats["rule:" + v.rule] += 1
            if v.code and self.log_decisions:
                log.info("call_rejected", caller=v.caller, callee=v.callee, source=req.source, rule=v.rule,
                         code=v.code, score=round(float(v.score), 3), txkey=req.txkey)
        except Exception as exc:  # noqa: BLE001 - a fault must never block a call: fail open, count, log
            self.stats["faults"] += 1
            log.error("decision_failed_open", error=repr(exc), caller=req.caller, callee=req.callee)
            reply = CheckReply(0, "allow", proto.FLAG_FAILED_OPEN, 0.0, "internal fault: failed open",
                               self.guard.config.trunks[0].address)
        latency_us = int((time.perf_counter() - t0) * 1e6)
        if txkey is not None:
            self._remember(txkey, reply, now)
        call_id = req.call_id
        if self.records is not None:
            # A row in RECORD_FIELDS order: cheaper to build here and to turn into insert parameters
            # in the writer than a dict.
            self.records.add_many([(now, call_id, req.source, caller, callee, reply.rule,
                                    "reject" if reply.code else "allow", reply.code, reply.score, latency_us)])
        if reply.code == 0 and call_id:
            self._track(call_id, caller, req.source, now)
        return reply

    # ------------------------------------------------------------ outcomes
    def _track(self, call_id: str, caller: str, source: str, now: float) -> None:
        """Remember a call let through until its final response comes back."""
        pending = self._pending
        while pending:
            first = next(iter(pending))
            if pending[first][0] > now and len(pending) < CALLS_MAX:
                break
            del pending[first]
            self.stats["outcomes_never_came"] += 1
        pending.pop(call_id, None)   # re-inserted at the back: the order stays the expiry order
        pending[call_id] = (now + PENDING_TTL, caller, source)

    def outcome(self, o: Outcome, now: float) -> None:
        """What became of a call: update its record and feed the caller's score.

        A repeated report (a retransmitted 200 OK or BYE) changes nothing.  A fault is counted
        and logged, never raised: outcomes are scoring input only.
        """
        try:
            self._outcome(o, now)
        except Exception as exc:  # noqa: BLE001 - an outcome must never stop the decider
            self.stats["faults"] += 1
            log.error("outcome_failed", error=repr(exc), call_id=o.call_id, kind=o.kind)

    def _outcome(self, o: Outcome, now: float) -> None:
        when = o.time if abs(o.time - now) < CLOCK_SKEW else now
        call_id = o.call_id
        records = self.records
        if o.kind == proto.OUTCOME_ANSWERED:
            if call_id in self._dialogs:
                self.stats["outcomes_repeated"] += 1
                return
            call = self._pending.pop(call_id, None)
            self.stats["outcomes_answered"] += 1
            if call is not None:
                dialogs = self._dialogs
                while dialogs:
                    first = next(iter(dialogs))
                    if dialogs[first][0] > now and len(dialogs) < CALLS_MAX:
                        break
                    del dialogs[first]
                dialogs[call_id] = (now + DIALOG_LINGER, call[1], call[2], when)
            if records is not None:
                records.outcome(call_id, final_code=o.code, answered_at=when)
        elif o.kind == proto.OUTCOME_FAILED:
            call = self._pending.pop(call_id, None)
            self.stats["outcomes_failed"] += 1
            if call is not None:
                self.guard.observe(call[1], False, 0.0, call[2] or None, when)
            if records is not None:
                records.outcome(call_id, final_code=o.code)
        elif o.kind == proto.OUTCOME_ENDED:
            dialog = self._dialogs.pop(call_id, None)
            if dialog is None:
                # A repeated BYE, or the dialog began before this decider started: nothing to score.
                self.stats["outcomes_unknown_dialog"] += 1
                return
            self.stats["outcomes_ended"] += 1
            self.guard.observe(dialog[1], True, max(0.0, when - dialog[3]), dialog[2] or None, when)
            if records is not None:
                records.outcome(call_id, ended_at=when)

    def close(self) -> None:
        """Write the queued records and close the store (the decider stops)."""
        if self.records is not None:
            self.records.close()

    def _remember(self, txkey: tuple[str, ...], reply: CheckReply, now: float) -> None:
        tx = self._tx
        # Entries are inserted in time order with one TTL, so the oldest are at the front.
        while tx:
            first = next(iter(tx))
            if tx[first][0] > now and len(tx) < TX_MAX:
                break
            del tx[first]
        tx[txkey] = (now + TX_TTL, *reply)

    # ------------------------------------------------------------ reload
    def request_reload(self) -> None:
        """Reload the config and lists now (SIGHUP, the RELOAD command)."""
        self._start_reload(force=True)

    def _watch(self) -> None:
        """Start a reload when a watched file changed (and did not already fail in this state),
        once it has stayed as it is for a watch interval and its last line is finished: the
        watcher read a list in the middle of being written (header and half the rows, bans lost)."""
        current = _mtimes(self.guard.config, self.config_path)
        if current == self._mtimes or current == self._failed_mtimes:
            self._settling = None
            return
        if current != self._settling:
            self._settling = current    # changed since the last look: give the writer an interval
            return
        if lists_being_written(self.guard.config):
            return
        self._settling = None
        self._start_reload(force=False)

    def _start_reload(self, force: bool) -> None:
        if self._loading is not None and self._loading.is_alive():
            return
        if self._background:
            self._loading = threading.Thread(target=self._load, name="callguard-reload", daemon=True)
            self._loading.start()
        else:
            self._load()
            if self._pending_reload is not None:
                self._apply_pending()

    def _load(self) -> None:
        """Load the config and lists (the slow part); a bad file keeps the old ones and logs why."""
        set_os_thread_name("cg-reload")
        try:
            for attempt in range(1, RELOAD_TRIES + 1):
                cfg = config_mod.load(self.config_path)
                mtimes = _mtimes(cfg, self.config_path)
                last = attempt == RELOAD_TRIES or not self._background   # no sleeping in a Kamailio worker
                try:
                    lists = load_lists_settled(cfg, wait=not last)
                    break
                except ListsBeingWritten:
                    if last:
                        raise
                log.warning("reload_retry", config=self.config_path, attempt=attempt, reason=RELOAD_RETRY_REASON)
                time.sleep(1.0)
        except (CallguardError, OSError, ValueError) as exc:
            with self._lock:
                self._failed_mtimes = _mtimes(self.guard.config, self.config_path)
                self.last_reload_error = str(exc)
                self.stats["reload_failed"] += 1
            log.error("reload_failed_keeping_old_config", config=self.config_path, error=str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - an unexpected fault keeps the old lists, like a bad file
            with self._lock:
                self._failed_mtimes = _mtimes(self.guard.config, self.config_path)
                self.last_reload_error = repr(exc)
                self.stats["reload_failed"] += 1
            log.error("reload_failed_keeping_old_config", config=self.config_path, error=repr(exc))
            return
        with self._lock:
            self._pending_reload = (cfg, lists, mtimes)

    def _apply_pending(self) -> None:
        with self._lock:
            pending, self._pending_reload = self._pending_reload, None
        if pending is None:
            return
        cfg, lists, mtimes = pending
        try:
            self.guard = self.guard.with_config(cfg, lists)   # keeps the rate-limit counts
        except Exception as exc:  # noqa: BLE001 - keep deciding with the old guard
            self.stats["reload_failed"] += 1
            self.last_reload_error = repr(exc)
            self._failed_mtimes = mtimes
            log.error("reload_failed_keeping_old_config", config=self.config_path, error=repr(exc))
            return
        self.identity = IdentityPolicy(cfg)
        self.log_decisions = cfg.logging.level in ("debug", "info")
        self._mtimes = mtimes
        self._failed_mtimes = None
        # self._tx is kept: a retransmission after a reload is still the same attempt, with the same verdict.
        self.generation += 1
        self.last_reload_error = ""
        self.stats["reloads"] += 1
        for p in self.guard.problems[:20]:
            log.warning("list_row_skipped", problem=str(p))
        lists = self.guard.lists
        log.info("reloaded", config=self.config_path, generation=self.generation,
                 blocklist=len(lists.blocklist), filings=len(lists.filings), allowlist=len(lists.allowlist),
                 broken_rows=len(lists.problems), blocklist_problems=len(self.guard.problems))

    def poll(self, now: float) -> None:
        """Housekeeping between datagrams: swap in a finished reload, watch the files."""
        if self._pending_reload is not None:
            self._apply_pending()
        if now >= self._next_watch:
            self._next_watch = now + WATCH_INTERVAL
            self._watch()

    def snapshot_stats(self) -> dict[str, Any]:
        """Counters for the STATS command."""
        store = self.records
        records: dict[str, Any] = {"enabled": store is not None}
        if store is not None:
            records.update(path=store.path, written=store.written, dropped=store.dropped, pending=store.pending)
        with self._lock:
            loading = self._loading is not None and self._loading.is_alive()
            return {"generation": self.generation, "config": self.config_path, "pid": os.getpid(),
                    "implementation": self.guard.implementation, "uptime": round(time.time() - self.started, 3),
                    "reloading": loading or self._pending_reload is not None,
                    "last_reload_error": self.last_reload_error, "counters": dict(self.stats),
                    "calls_pending": len(self._pending), "dialogs": len(self._dialogs), "records": records}


# ---------------------------------------------------------------- the server
class DeciderServer:
    """The Unix datagram server around a :class:`Decider`."""

    def __init__(self, decider: Decider, path: str, mode: int = 0o660) -> None:
        self.decider = decider
        self.path = path
        self.peers: Counter[str] = Counter()
        self._running = True
        self._reload_requested = False
        _remove_stale_socket(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:  # pragma: no cover - capped by net.core.*mem_max; the default still works
                pass
        self.sock.bind(path)
        os.chmod(path, mode)
        # A blocking socket with a kernel receive timeout (SO_RCVTIMEO) for the housekeeping tick:
        # one recvfrom() per datagram, where a Python socket timeout adds a poll() to each.
        secs = int(WATCH_INTERVAL)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                             struct.pack("ll", secs, int((WATCH_INTERVAL - secs) * 1e6)))

    def stop(self, *_: Any) -> None:
        self._running = False

    def hangup(self, *_: Any) -> None:
        self._reload_requested = True

    def serve_forever(self) -> None:
        """Answer datagrams until :meth:`stop`; one at a time, which is what makes the counts exact."""
        sock = self.sock
        decider = self.decider
        recv = sock.recvfrom
        send = sock.sendto
        log.info("decider_listening", socket=self.path, config=decider.config_path, pid=os.getpid(),
                 implementation=decider.guard.implementation)
        try:
            while self._running:
                try:
                    data, addr = recv(proto.MAX_DATAGRAM)
                except (BlockingIOError, TimeoutError):   # the receive timeout: a housekeeping tick
                    data = b""
                    addr = None
                now = time.time()
                if self._reload_requested:
                    self._reload_requested = False
                    decider.request_reload()
                decider.poll(now)
                if not data:
                    continue
                try:
                    out = self.handle(data, addr, now)
                except proto.ProtocolError as exc:
                    decider.stats["protocol_errors"] += 1
                    out = proto.header(proto.OP_ERROR, 0) + str(exc).encode()
                if out and addr:
                    try:
                        send(out, socket.MSG_DONTWAIT, addr)   # a worker that stopped reading never blocks us
                    except OSError:  # the worker went away; nothing to answer
                        decider.stats["send_errors"] += 1
        finally:
            self.close()

    def handle(self, data: bytes, addr: Any, now: float) -> bytes:
        """One request datagram in, one reply datagram out."""
        version, op, rid = proto.parse_header(data)
        if version not in proto.VERSIONS:
            self.decider.stats["protocol_errors"] += 1
            return proto.header(proto.OP_ERROR, rid) + f"protocol version {version} not supported; " \
                f"this decider speaks {proto.VERSION}".encode()
        if op == proto.OP_CHECK:
            peer = str(addr)
            if peer in self.peers or len(self.peers) < MAX_PEERS:
                self.peers[peer] += 1
            else:
                self.peers["(others)"] += 1     # a sender per datagram must not grow this without bound
            r = self.decider.decide(proto.decode_check(data, version), now)
            # The reply carries the request's version: a version 1 worker checks it.
            return proto.header_v(version, op, rid) + proto.encode_reply_body(r.code, r.rule, r.flags, r.score,
                                                                              r.reason, r.trunk)
        if op == proto.OP_OUTCOME:
            try:
                self.decider.outcome(proto.decode_outcome(data), now)
            except proto.ProtocolError:
                self.decider.stats["protocol_errors"] += 1   # one-way: nobody to tell
            return b""
        if op == proto.OP_PING:
            return proto.encode_json(op, rid, {"version": proto.VERSION, "generation": self.decider.generation})
        if op == proto.OP_STATS:
            body = self.decider.snapshot_stats()
            body["peers"] = len(self.peers)
            body["checks_per_peer"] = sorted(self.peers.values(), reverse=True)[:64]
            return proto.encode_json(op, rid, body)
        if op == proto.OP_RELOAD:
            self.decider.request_reload()
            return proto.encode_json(op, rid, {"reloading": True, "generation": self.decider.generation})
        return proto.header(proto.OP_ERROR, rid) + f"unknown operation {op}".encode()

    def close(self) -> None:
        self.sock.close()
        try:
            if stat.S_ISSOCK(os.stat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead decider; refuse to start beside a live one."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise CallguardError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)   # nobody listens: a leftover
        return
    finally:
        probe.close()
    raise CallguardError(f"another decider is already listening on {path}")


# ---------------------------------------------------------------- control client
_ids = itertools.count(1)


def control(path: str, op: int, timeout: float = 2.0) -> Any:
    """Send one control command (PING, STATS, RELOAD) to a decider and return its JSON answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind("")   # Linux autobind: an abstract address the decider can answer to
        sock.settimeout(timeout)
        rid = next(_ids)
        sock.sendto(proto.header(op, rid), path)
        deadline = time.monotonic() + timeout
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            data = sock.recv(proto.MAX_DATAGRAM)
            version, rop, got = proto.parse_header(data)
            if got != rid:
                continue
            if rop == proto.OP_ERROR:
                raise CallguardError(data[proto.HEADER_SIZE:].decode("utf-8", "replace"))
            return proto.decode_json(data)
    finally:
        sock.close()


def reload_and_wait(path: str, timeout: float = 60.0) -> dict[str, Any]:
    """Ask a decider to reload and wait until it has swapped in the new lists or refused them."""
    before = control(path, proto.OP_STATS)
    failed_before = before["counters"].get("reload_failed", 0)
    control(path, proto.OP_RELOAD)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = control(path, proto.OP_STATS)
        if now["generation"] > before["generation"]:
            return {"ok": True, "generation": now["generation"]}
        if now["counters"].get("reload_failed", 0) > failed_before:
            return {"ok": False, "error": now["last_reload_error"], "generation": now["generation"]}
        time.sleep(0.05)   # polling a remote process's state; there is no event to wait on
    return {"ok": False, "error": "timed out waiting for the reload", "generation": before["generation"]}


# ---------------------------------------------------------------- entry points
def open_records(cfg: Config) -> RecordStore | None:
    """The call-record store of ``records`` in the config, or None when disabled or unusable.

    A store that cannot be opened is logged, and the decider decides without records: calls
    must keep flowing.
    """
    if not cfg.records.enabled:
        return None
    try:
        # One writer transaction a second, as `callguard serve`: bigger batches cost less per record.
        return RecordStore(cfg.records.path, cfg.records.retention_days,
                           partition_minutes=cfg.records.partition_minutes, flush_interval=RECORDS_FLUSH_INTERVAL)
    except CallguardError as exc:
        log.error("records_failed", path=cfg.records.path, error=str(exc))
        return None


def decider_main(args: argparse.Namespace) -> int:
    """Run the decider in the foreground (``callguard decider``).

    ``args.config`` and ``args.socket`` are required; ``args.socket_mode`` (octal string,
    default ``660``) is optional.  SIGHUP reloads, SIGTERM/SIGINT stop; on stop the queued
    call records are written before the process exits.  Returns the exit status.
    """
    config_path = getattr(args, "config", None) or config_mod.default_config_path()
    hold_hangups()      # a SIGHUP while the lists load is a reload once up, not the end (exit 129)
    try:
        cfg = config_mod.load(config_path)
    except CallguardError as exc:
        sys.stderr.write(f"callguard decider: {exc}\n")
        return 2
    # Log lines leave through a thread of their own: a stalled reader of stderr never stalls decisions.
    log_stream = QueuedStream(sys.stderr)
    configure_logging(cfg.logging.level, cfg.logging.format, log_stream)
    try:
        return _run_decider(args, config_path)
    finally:
        log_stream.close()


def _run_decider(args: argparse.Namespace, config_path: str) -> int:
    global log
    log = _get_log()   # bound after configure, so it renders as configured
    try:
        decider = Decider(config_path)
    except CallguardError as exc:
        sys.stderr.write(f"callguard decider: {exc}\n")
        return 2
    # The rate-limit counts of the last clean stop, as callguard serve keeps them (read before the
    # socket opens: no worker waits for it).
    restore_snapshot(decider.guard, decider.config.records.state_path, log)
    try:
        server = DeciderServer(decider, args.socket, int(str(getattr(args, "socket_mode", None) or "660"), 8))
    except (CallguardError, OSError) as exc:
        sys.stderr.write(f"callguard decider: cannot listen on {args.socket}: {exc}\n")
        return 2
    # The config, lists and modules loaded so far live as long as the process: kept out of the
    # cyclic collector's full passes, which then walk only what the calls left behind.
    gc.collect()
    gc.freeze()
    # Opened once the socket is ours: a second decider refused above never touches the store.
    # The store keeps its path across reloads (a changed records.path needs a restart).
    decider.records = open_records(decider.config)
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)
    signal.signal(signal.SIGHUP, server.hangup)
    if hangups_held():
        log.info("reload_after_start", reason="SIGHUP while starting")
        server.hangup()
    try:
        server.serve_forever()
    finally:
        decider.close()
        state = decider.config.records.state_path
        if state:
            try:
                write_snapshot(state, decider.guard)
                log.info("snapshot_written", path=state)
            except Exception as exc:  # noqa: BLE001 - the decider still stops; said loudly
                log.error("snapshot_failed", path=state, error=repr(exc))
    log.info("decider_stopped", counters=dict(decider.stats),
             records_written=decider.records.written if decider.records is not None else 0)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="callguard decider",
                                description="Decision service for Kamailio workers (Unix datagram socket).")
    p.add_argument("--config", help="YAML config (default: $CALLGUARD_CONFIG or config/callguard.yaml)")
    p.add_argument("--socket", required=True, help="Unix datagram socket path, e.g. /run/callguard/decider.sock")
    p.add_argument("--socket-mode", default="660", help="permissions of the socket file, octal (default 660)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--reload", action="store_true", help="ask the running decider to reload, wait, report")
    g.add_argument("--stats", action="store_true", help="print the running decider's counters as JSON")
    g.add_argument("--ping", action="store_true", help="exit 0 when a decider answers on --socket")
    return p


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """``callguard decider``: serve, or with --reload/--stats/--ping talk to a running decider."""
    try:
        if args.reload:
            result = reload_and_wait(args.socket)
            print(json.dumps(result))
            return 0 if result["ok"] else 1
        if args.stats:
            print(json.dumps(control(args.socket, proto.OP_STATS), indent=2))
            return 0
        if args.ping:
            print(json.dumps(control(args.socket, proto.OP_PING)))
            return 0
    except (OSError, CallguardError) as exc:
        sys.stderr.write(f"callguard decider: {args.socket}: {exc}\n")
        return 2
    return decider_main(args)


if __name__ == "__main__":
    sys.exit(main())
