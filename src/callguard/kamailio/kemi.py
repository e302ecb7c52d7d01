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
import time
from dataclasses import dataclass
from typing import Any

from .. import config as config_mod
from ..config import Config
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
                self._report(OUTCOME_ANSWERED, int(code), self._gete("$ci"))
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
            self._report(OUTCOME_FAILED, int(code) if code is not None else 0, self._gete("$ci"))
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
        if method == "BYE":
            # Reported before relaying, whichever side hangs up; a retransmitted BYE changes nothing.
            self._report(OUTCOME_ENDED, 0, self._gete("$ci"))
        if K.rr.loose_route() > 0:
            self._t_relay()
            return
        if method == "ACK":
            found = self._t_check_trans()
            if found > 0:
                self._t_relay()
            elif found < 0 and not K.is_myself_ruri():
                K.forward()   # ACK for a 2xx sent to the callee's Contact: end to end, stateless
            # found == 0: the ACK of a negative final response tm relayed, absorbed by tm (hop by hop).
            # An ACK addressed to this proxy without a route set goes nowhere: forwarding it would
            # send it back here until Max-Forwards runs out.
            return
        if K.is_myself_ruri():
            # Without Record-Route the peer should have sent this to the Contact; follow the
            # request URI's callee to the trunk so the dialog still ends cleanly.
            self._setdsturi(trunk_uri(pick_trunk(self.config, "")))
        if self._t_relay() < 0:
            K.sl.sl_reply_error()

    def _screen(self) -> None:
        gete = self._gete
        call_id = gete("$ci")
        req = CheckRequest(gete("$fu"), gete("$ru"), gete("$si"), gete("$ai"),
                           f'{call_id}|{gete("$cs")}|{gete("$via0(branch)")}', call_id)
        try:
            reply = self.decider.check(req)
        except DeciderUnavailable as exc:
            if not self._decider_down:
                self._decider_down = True
                self.K.err(f"callguard: decider unavailable, calls fail open: {exc}\n")
            self._fault("decider", exc, log=False)
            self._relay(self._fallback_trunk(req), track=False)
            return
        if self._decider_down:
            self._decider_down = False
            self.K.info("callguard: decider answers again\n")
        self.decisions += 1
        code = reply.code
        if reply.flags & FLAG_FAILED_OPEN:
            self._fault("decision", RuntimeError(reply.reason), log=False)
        if code:
            key = (code, reply.rule, reply.reason, reply.flags & FLAG_HIDE_REASON)
            texts = self._replies.get(key)
            if texts is None:
                texts = self._reply_texts(*key)
            header, phrase = texts
            if header:
                self._append_to_reply(header)
            self._sl_send_reply(code, phrase)
            return
        self._relay(reply.trunk or self._fallback_trunk(req), track=True)

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
        """After an unexpected fault: relay an initial INVITE to the default trunk; never raise."""
        try:
            K = self.K
            if K.pv.gete("$rm") == "INVITE" and K.siputils.has_totag() < 0:
                self._relay(pick_trunk(self.config, ""), track=False)
        except Exception as exc:  # noqa: BLE001 - the last line of defence: count, log, stop
            self._fault("fail_open_relay", exc)

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
