"""The KEMI routing class for Kamailio's ``app_python3``.

Kamailio calls :meth:`CallguardKemi.ksr_request_route` for every request.  Initial INVITEs
are screened by the same core and YAML config as ``callguard serve``: a rejected call gets
``sl_send_reply`` with the verdict's code and reason and a ``Reason`` header; an allowed
call is relayed statefully (``t_relay``) to the trunk the config routes the callee to.

The verdict comes from the decider process (``socket`` set: exact counts across all
workers, see :mod:`callguard.kamailio.daemon`) or from a guard inside this worker
(``socket`` empty: *embedded* mode, only correct with ``children=1``, since every worker
would count on its own).

For every INVITE it relays after a verdict, the plug-in arms ``ksr_onreply_route`` and
``ksr_failure_route`` on the transaction: a 2xx final response (answered) or a negative
one (failed, including tm's own timeout) is reported to the decider, and so is every BYE
of a dialog passing through (record-route keeps BYEs on this path).  A report is one
datagram that is never answered; when it cannot be sent it is counted in
:attr:`CallguardKemi.outcomes_lost`, and the call goes on as if nothing happened.

Nothing here lets a Python exception escape into Kamailio: an exception left set breaks
the next call into the interpreter.  Any fault fails open (the call is relayed), is
counted in :attr:`CallguardKemi.faults` and logged with ``KSR.err``.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from .. import config as config_mod
from ..config import Config, parse_address
from ..numbers import is_emergency
from ..settings import compile_settings, resolve_source
from .client import DeciderClient, DeciderUnavailable
from .protocol import (
    FLAG_FAILED_OPEN,
    FLAG_HIDE_REASON,
    OUTCOME_ANSWERED,
    OUTCOME_ENDED,
    OUTCOME_FAILED,
    CheckReply,
    CheckRequest,
    Outcome,
)
from .routing import pick_trunk, trunk_uri

FAULT_LOG_INTERVAL = 10.0   # seconds between repeated fault log lines (the count is in every line)
LOST_LOG_INTERVAL = 60.0    # seconds between log lines about lost outcome reports
MAX_FORWARDS = 70


@dataclass(frozen=True)
class PluginSettings:
    """What ``kamailio.cfg`` tells the plug-in (through ``#!define`` values read with ``$def``)."""

    config: str
    socket: str = ""
    timeout_ms: float = 100.0
    max_forwards: int = MAX_FORWARDS
    record_route: bool | None = None   # None: follow sip.record_route in the YAML


def parse_switch(text: str) -> bool | None:
    """A cfg switch: ``1/yes/true/on`` -> True, ``0/no/false/off`` -> False, empty or ``auto`` -> None.

    Raises:
        ValueError: anything else.
    """
    t = text.strip().lower()
    if t in ("", "auto"):
        return None
    if t in ("1", "yes", "true", "on"):
        return True
    if t in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"expected 1/0, yes/no, true/false, on/off or auto (got {text!r})")


class LocalDecider:
    """Embedded mode: the decision made inside this worker (one worker only, see the module doc)."""

    def __init__(self, config_path: str) -> None:
        from .daemon import Decider  # imports the lists machinery only when it is used

        self.decider = Decider(config_path, background_reload=False)

    def check(self, req: CheckRequest) -> CheckReply:
        now = time.time()
        self.decider.poll(now)   # at most one stat() round per second; a reload runs here, in this worker
        return self.decider.decide(req, now)

    def outcome(self, kind: int, code: int, when: float, call_id: str) -> bool:
        self.decider.outcome(Outcome(kind, code, when, call_id), time.time())
        return True


# Control characters (C0 and DEL) removed from reason text: str.translate, no per-character Python.
_CONTROLS = {i: None for i in (*range(0x20), 0x7F)}
REPLY_CACHE_MAX = 1024   # distinct (code, rule, reason, flags) replies kept; a handful in practice


def _quote(text: str) -> str:
    """A reason phrase made safe for a quoted-string in a header."""
    return text.translate(_CONTROLS).replace("\\", "\\\\").replace('"', '\\"')


def _phrase(text: str) -> str:
    """A reason phrase for the status line: printable, no CR/LF."""
    return text.translate(_CONTROLS)


def _trunk_addresses(cfg: Config) -> frozenset[tuple[str, int]]:
    """The trunks' (host, port), the hosts as configured and as resolved once at start."""
    out: set[tuple[str, int]] = set()
    for t in cfg.trunks:
        _, host, port = parse_address(t.address)
        out.add((host, port))
        try:
            out.update((str(a[4][0]), port) for a in socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM))
        except OSError:
            pass    # a name that does not resolve now: compared as written
    return frozenset(out)


class CallguardKemi:
    """The routing class ``mod_init`` hands to Kamailio.

    Args:
        ksr: the ``KSR`` module Kamailio provides to the script.
        settings: the plug-in settings.
    """

    def __init__(self, ksr: Any, settings: PluginSettings) -> None:
        self.K = ksr
        self.settings = settings
        # The worker keeps its own copy of the config only for what it needs without the decider:
        # the trunk for a call that fails open, record-route and hide_reason.
        self.config: Config = config_mod.load(settings.config)
        self.decider: Any
        if settings.socket:
            self.decider = DeciderClient(settings.socket, settings.timeout_ms / 1000.0)
        else:
            self.decider = LocalDecider(settings.config)
        self.record_route = self.config.sip.record_route if settings.record_route is None else settings.record_route
        # What this worker decides on its own when no verdict comes (the decider down, a fault):
        # only a trusted source or an emergency call fails open, never an open relay (as serve).
        self._sources = compile_settings(self.config)
        self._emergency = frozenset(self.config.emergency_numbers)
        self._trunk_addresses = _trunk_addresses(self.config)
        self._trunk_hosts = frozenset(host for host, _ in self._trunk_addresses)   # sources: any port
        self._trust: dict[str, int] = {}
        self.faults = 0
        self.decisions = 0
        self.outcomes_lost = 0
        self._last_fault_log = 0.0
        self._last_lost_log = 0.0
        self._decider_down = False
        # The KSR functions of the per-call path, looked up once (each lookup is two attribute
        # reads on a C module per call otherwise).
        pv, tm = ksr.pv, ksr.tm
        self._gete = pv.gete
        self._get = pv.get
        self._maxfwd = ksr.maxfwd.process_maxfwd
        self._has_totag = ksr.siputils.has_totag
        self._t_check_trans = tm.t_check_trans
        self._t_relay = tm.t_relay
        self._t_on_reply = tm.t_on_reply
        self._t_on_failure = tm.t_on_failure
        self._sl_send_reply = ksr.sl.sl_send_reply
        self._append_to_reply = ksr.hdr.append_to_reply
        self._setdsturi = ksr.setdsturi
        self._record_route = ksr.rr.record_route
        # Rejection replies by (code, rule, reason, flags): the Reason header and status phrase
        # are built once, not per call.
        self._replies: dict[tuple[int, str, str, int], tuple[str, str]] = {}

    # ------------------------------------------------------------ Kamailio's entry points
    def child_init(self, rank: int) -> int:
        return 0

    def ksr_request_route(self, msg: Any) -> int:
        """Every request from the network."""
        try:
            self._route()
        except Exception as exc:  # noqa: BLE001 - nothing may escape into Kamailio; fail open
            self._fault("request_route", exc)
            self._relay_fail_open()
        return 1

    def ksr_reply_route(self, msg: Any) -> int:
        """Every reply, when the cfg leaves ``kemi.reply_route_callback`` on; tm does the work."""
        return 1

    def ksr_onreply_route(self, msg: Any) -> int:
        """A reply to an INVITE this plug-in relayed after a verdict (armed with ``t_on_reply``).

        A 2xx is the answer; negative finals are reported from :meth:`ksr_failure_route`, which
        also sees tm's own timeouts.  A retransmitted 200 is reported again; the decider knows.
        """
        try:
            code = self._get("$rs")
            if code is not None and 200 <= int(code) < 300:
                self._report(OUTCOME_ANSWERED, int(code), self._text("$ci"))
        except Exception as exc:  # noqa: BLE001 - nothing may escape into Kamailio
            self._fault("onreply_route", exc)
        return 1

    def ksr_onsend_route(self, msg: Any) -> int:
        """Every message Kamailio sends, when the cfg leaves ``kemi.onsend_route_callback`` on."""
        return 1

    def ksr_failure_route(self, msg: Any) -> int:
        """The INVITE relayed after a verdict ended negatively (trunk's reply or tm's timeout); tm relays it."""
        try:
            code = self._get("$T_reply_code")
            self._report(OUTCOME_FAILED, int(code) if code is not None else 0, self._text("$ci"))
        except Exception as exc:  # noqa: BLE001 - nothing may escape into Kamailio
            self._fault("failure_route", exc)
        return 1

    def ksr_branch_route(self, msg: Any) -> int:
        return 1

    # ------------------------------------------------------------ routing
    def _route(self) -> None:
        if self._maxfwd(self.settings.max_forwards) < 0:
            self._sl_send_reply(483, "Too Many Hops")
            return
        method = self._gete("$rm")
        if method == "INVITE":
            if self._has_totag() > 0:
                self._in_dialog(method)
            # A retransmission of an INVITE already relayed is answered by tm, not screened again.
            elif self._t_check_trans() < 0:
                self._screen()
            return
        if method == "CANCEL":
            if self._t_check_trans() > 0:
                self._t_relay()
            else:
                self._sl_send_reply(481, "Call/Transaction Does Not Exist")   # RFC 3261 §9.2
            return
        if self._has_totag() > 0:
            self._in_dialog(method)
            return
        if method == "ACK":
            if self._t_check_trans() > 0:
                self._t_relay()
            return   # an ACK without a transaction or dialog goes nowhere
        K = self.K
        if method == "OPTIONS" and K.is_myself_ruri():
            self._sl_send_reply(200, "OK")
            return
        self._append_to_reply("Allow: INVITE, ACK, CANCEL, BYE, OPTIONS\r\n")
        self._sl_send_reply(405, "Method Not Allowed")

    def _in_dialog(self, method: str) -> None:
        K = self.K
        # In-dialog requests are not screened: from a source that is neither trusted nor a trunk
        # (the caller of an emergency call) they go to a trunk only, as serve relays them.  Without
        # this, an INVITE with any To-tag was relayed unscreened to whatever its Request-URI or
        # Route named, from anywhere.
        source = self._text("$si")
        vouched = self._source_index(source) >= 0 or source in self._trunk_hosts
        if K.rr.loose_route() > 0:
            if not vouched and not self._toward_trunk():
                self._refuse_relay()
                return
            if method == "BYE":
                # Reported before relaying, whichever side hangs up; a retransmitted BYE changes nothing.
                self._report(OUTCOME_ENDED, 0, self._text("$ci"))
            self._t_relay()
            return
        if method == "ACK":
            found = self._t_check_trans()
            if found > 0:
                self._t_relay()   # the ACK of a transaction this proxy relayed
            elif found < 0 and not K.is_myself_ruri() and (vouched or self._toward_trunk()):
                K.forward()   # ACK for a 2xx sent to the callee's Contact: end to end, stateless
            # found == 0: the ACK of a negative final response tm relayed, absorbed by tm (hop by hop).
            # An ACK addressed to this proxy without a route set goes nowhere: forwarding it would
            # send it back here until Max-Forwards runs out.
            return
        if K.is_myself_ruri():
            # Without Record-Route the peer should have sent this to the Contact; follow the
            # request URI's callee to the trunk so the dialog still ends cleanly.
            self._setdsturi(trunk_uri(pick_trunk(self.config, "")))
        elif not vouched and not self._toward_trunk():
            self._refuse_relay()
            return
        if method == "BYE":
            self._report(OUTCOME_ENDED, 0, self._text("$ci"))
        if self._t_relay() < 0:
            K.sl.sl_reply_error()

    def _screen(self) -> None:
        text = self._text
        call_id = text("$ci")
        req = CheckRequest(text("$fu"), text("$ru"), text("$si"), text("$ai"),
                           f'{call_id}|{text("$cs")}|{text("$via0(branch)")}', call_id)
        try:
            reply = self.decider.check(req)
        except DeciderUnavailable as exc:
            if not self._decider_down:
                self._decider_down = True
                self.K.err(f"callguard: decider unavailable, calls from trusted sources and emergency calls "
                           f"fail open: {exc}\n")
            self._fault("decider", exc, log=False)
            self._fail_open(req.source, req.callee, self._fallback_trunk(req))
            return
        if self._decider_down:
            self._decider_down = False
            self.K.info("callguard: decider answers again\n")
        self.decisions += 1
        code = reply.code
        if reply.flags & FLAG_FAILED_OPEN:
            self._fault("decision", RuntimeError(reply.reason), log=False)
        if code:
            self._reject(code, reply.rule, reply.reason, reply.flags & FLAG_HIDE_REASON)
            return
        self._relay(reply.trunk or self._fallback_trunk(req), track=True)

    def _reject(self, code: int, rule: str, reason: str, hide: int) -> None:
        """The rejection reply: its Reason header (unless hidden) and status phrase, stateless."""
        texts = self._replies.get((code, rule, reason, hide))
        if texts is None:
            texts = self._reply_texts(code, rule, reason, hide)
        header, phrase = texts
        if header:
            self._append_to_reply(header)
        self._sl_send_reply(code, phrase)

    def _reply_texts(self, code: int, rule: str, reason: str, hide: int) -> tuple[str, str]:
        """The Reason header (empty when hidden) and status phrase of a rejection, remembered."""
        # The same Reason header as `callguard serve`: the rule id, then the reason text.
        header = "" if hide else f'Reason: SIP;cause={code};text="{_quote(f"{rule}: {reason}")}"\r\n'
        texts = (header, _phrase(reason) or "Rejected")
        if len(self._replies) >= REPLY_CACHE_MAX:
            self._replies.clear()
        self._replies[(code, rule, reason, hide)] = texts
        return texts

    def _relay(self, trunk: str, track: bool) -> None:
        """Relay the INVITE statefully; ``track`` arms the routes that report its outcome."""
        self._setdsturi(trunk_uri(trunk))
        if self.record_route:
            self._record_route()
        if track:
            self._t_on_reply("ksr_onreply_route")
            self._t_on_failure("ksr_failure_route")
        if self._t_relay() < 0:
            self.K.sl.sl_reply_error()

    def _report(self, kind: int, code: int, call_id: str) -> None:
        """Send one outcome to the decider; a lost report is counted (and logged now and then), never raised."""
        if not call_id:
            return
        if self.decider.outcome(kind, code, time.time(), call_id):
            return
        self.outcomes_lost += 1
        now = time.monotonic()
        if self.outcomes_lost == 1 or now - self._last_lost_log >= LOST_LOG_INTERVAL:
            self._last_lost_log = now
            self.K.warn(f"callguard: outcome reports lost (pid {os.getpid()}, {self.outcomes_lost} so far): "
                        f"the decider is unreachable; records and scores miss those outcomes\n")

    def _fallback_trunk(self, req: CheckRequest) -> str:
        """The trunk when no verdict came back: route on the callee's digits as they are."""
        user = req.callee.split(":", 1)[-1].split("@", 1)[0].lstrip("+")
        return pick_trunk(self.config, user)

    def _relay_fail_open(self) -> None:
        """After an unexpected fault: an initial INVITE fails open (see _fail_open); never raise."""
        try:
            K = self.K
            if K.pv.gete("$rm") == "INVITE" and K.siputils.has_totag() < 0:
                self._fail_open(self._text("$si"), self._text("$ru"), pick_trunk(self.config, ""))
        except Exception as exc:  # noqa: BLE001 - the last line of defence: count, log, stop
            self._fault("fail_open_relay", exc)

    def _fail_open(self, source: str, callee: str, trunk: str) -> None:
        """No verdict: relay an emergency call or one from a trusted source; refuse the rest as
        ``untrusted_source`` would (that rule needs no lists, no counts: the worker can say it)."""
        if is_emergency(callee, self._emergency) or self._source_index(source) >= 0:
            self._relay(trunk, track=False)
            return
        rule = self.config.rules["untrusted_source"]
        self._reject(rule.code, "untrusted_source", rule.reason, FLAG_HIDE_REASON if self.config.sip.hide_reason else 0)

    def _source_index(self, source: str) -> int:
        """resolve_source of the worker's config (-1: untrusted), cached until the worker restarts."""
        idx = self._trust.get(source)
        if idx is None:
            idx = resolve_source(self._sources, source)
            if len(self._trust) > 4096:
                self._trust.clear()
            self._trust[source] = idx
        return idx

    def _toward_trunk(self) -> bool:
        """Whether the request goes to a trunk (its destination URI, else its Request-URI)."""
        host, port = (self._text("$dd"), self._text("$dp")) if self._text("$du") else \
            (self._text("$rd"), self._text("$rp"))
        try:
            number = int(port) if port else 5060
        except ValueError:
            return False
        return (host.strip("[]"), number) in self._trunk_addresses

    def _refuse_relay(self) -> None:
        self._sl_send_reply(403, "Forbidden - not a dialog of this source")

    def _text(self, spec: str) -> str:
        """A pseudo-variable as text.  app_python3 raises UnicodeDecodeError for one that is not
        UTF-8, which failed the call open whatever its caller: then read it hex-encoded and keep
        the bytes as surrogates, as serve's parser does."""
        try:
            return self._gete(spec)     # type: ignore[no-any-return]
        except UnicodeDecodeError:
            raw = self._gete(f"$({spec[1:]}{{s.encode.hexa}})")
            return bytes.fromhex(str(raw)).decode("utf-8", "surrogateescape")

    def _fault(self, where: str, exc: BaseException, log: bool = True) -> None:
        """Count a fault; log it at most once per FAULT_LOG_INTERVAL (the count tells how many).

        ``log=False`` for faults whose state change is logged elsewhere (decider down/up).
        """
        self.faults += 1
        now = time.monotonic()
        if log and (self.faults == 1 or now - self._last_fault_log >= FAULT_LOG_INTERVAL):
            self._last_fault_log = now
            try:
                self.K.err(f"callguard: fault in {where} (pid {os.getpid()}, {self.faults} faults so far), "
                           f"call fails open: {exc!r}\n")
            except Exception:  # noqa: BLE001 - logging must not raise into Kamailio either
                pass


def make_handler(ksr: Any, settings: PluginSettings) -> CallguardKemi:
    """Build the routing class for ``mod_init`` (raises on a broken config: Kamailio refuses to start)."""
    handler = CallguardKemi(ksr, settings)
    mode = f"decider at {settings.socket}" if settings.socket else "embedded guard (use children=1)"
    ksr.info(f"callguard: screening with {mode}, config {settings.config}\n")
    return handler
