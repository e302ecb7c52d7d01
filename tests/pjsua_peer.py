"""A real SIP user agent (PJSIP through ``pjsua2``) driven by line-based JSON.

One process holds one pjsua2 ``Endpoint`` (the library allows one per process), so the
end-to-end tests start a caller and a callee as two of these workers.

Protocol: the test writes one JSON command per line on stdin; the worker writes one JSON
event per line on its original stdout (PJSIP's own console output is sent to stderr so it
can never corrupt the protocol).

Commands::

    {"cmd": "call", "uri": "sip:139...@127.0.0.1:PORT", "from": "sip:138...@127.0.0.1"}
    {"cmd": "hangup", "call": ID}               # CANCEL before answer, BYE after
    {"cmd": "answer", "call": ID, "code": 200}  # callee side, when started with --answer manual
    {"cmd": "mode", "answer": "ring"}            # change how incoming calls are answered
    {"cmd": "quit"}

Events::

    {"event": "ready", "port": P}
    {"event": "called", "call": ID}                        # after a "call" command
    {"event": "incoming", "call": ID, "msg": "INVITE ..."}  # callee side
    {"event": "state", "call": ID, "state": "CONFIRMED", "code": 200, "reason": "OK", "msg": "..."}
    {"event": "tsx", "call": ID, "method": "BYE", "role": "UAS", "state": "TRYING", "msg": "..."}
    {"event": "error", "text": "..."}
    {"event": "bye"}                                        # after "quit", just before exit

``msg`` is the whole received SIP message that caused the event, when there is one.

Run: ``python tests/pjsua_peer.py [--answer auto|ring|manual] [--id sip:USER@127.0.0.1]``.
``auto`` rings then answers 200 at once; ``ring`` sends 180 and waits; ``manual`` sends
nothing until an ``answer`` command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from typing import Any

import pjsua2 as pj

# The protocol channel is a private copy of the original stdout; fd 1 is pointed at stderr so
# that anything PJSIP prints itself lands in the log, not in the protocol.
_OUT = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
os.dup2(2, 1)
_OUT_LOCK = threading.Lock()


def emit(**event: Any) -> None:
    """Write one event line (callbacks run on PJSIP's thread, commands on the main one)."""
    line = json.dumps(event, ensure_ascii=False)
    with _OUT_LOCK:
        _OUT.write(line + "\n")
        _OUT.flush()


def _rx_msg(e: Any) -> str:
    """The whole received message behind a SIP event, or '' when the event has none."""
    try:
        if e.type == pj.EventId.TSX_STATE:
            src = e.body.tsxState.src
            if e.body.tsxState.type == pj.EventId.RX_MSG:
                return str(src.rdata.wholeMsg)
        elif e.type == pj.EventId.RX_MSG:
            return str(e.body.rxMsg.rdata.wholeMsg)
    except Exception:  # noqa: BLE001 - a missing union member only means "no message"
        return ""
    return ""


class PeerCall(pj.Call):
    """A call that reports its state changes as events."""

    def __init__(self, peer: Peer, acc: pj.Account, call_id: int = -1) -> None:
        if call_id == -1:
            pj.Call.__init__(self, acc)
        else:
            pj.Call.__init__(self, acc, call_id)
        self.peer = peer
        self.key = -1

    def onCallState(self, prm: pj.OnCallStateParam) -> None:  # noqa: N802 - PJSUA2 callback name
        ci = self.info
        emit(event="state", call=self.key, state=str(ci.state).split(".")[-1], code=int(ci.lastStatusCode),
             reason=str(ci.lastReason), msg=_rx_msg(prm.e))
        if ci.state == pj.InvState.DISCONNECTED:
            self.peer.ended.add(self.key)

    def onCallTsxState(self, prm: pj.OnCallTsxStateParam) -> None:  # noqa: N802 - PJSUA2 callback name
        e = prm.e
        try:
            tsx = e.body.tsxState.tsx
            emit(event="tsx", call=self.key, method=str(tsx.method), role=str(tsx.role).split(".")[-1],
                 state=str(tsx.state).split(".")[-1], code=int(tsx.statusCode), msg=_rx_msg(e))
        except Exception as exc:  # noqa: BLE001 - never let an exception escape into PJSIP
            emit(event="error", text=f"tsx callback: {exc!r}")


class PeerAccount(pj.Account):
    """The local identity; on the callee side it answers incoming calls per --answer."""

    def __init__(self, peer: Peer) -> None:
        pj.Account.__init__(self)
        self.peer = peer

    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:  # noqa: N802 - PJSUA2 callback name
        call = PeerCall(self.peer, self, prm.callId)
        key = self.peer.keep(call)
        emit(event="incoming", call=key, msg=str(prm.rdata.wholeMsg), src=str(prm.rdata.srcAddress))
        mode = self.peer.answer_mode
        try:
            if mode in ("auto", "ring"):
                op = pj.CallOpParam()
                op.statusCode = pj.StatusCode.RINGING
                call.answer(op)
            if mode == "auto":
                op = pj.CallOpParam()
                op.statusCode = pj.StatusCode.OK
                call.answer(op)
        except Exception as exc:  # noqa: BLE001 - report, never raise into PJSIP
            emit(event="error", text=f"answer: {exc!r}")


class Peer:
    """One endpoint, one UDP transport on 127.0.0.1, accounts made on demand."""

    def __init__(self, answer_mode: str, ident: str) -> None:
        self.answer_mode = answer_mode
        self.calls: dict[int, PeerCall] = {}
        self.ended: set[int] = set()
        self.accounts: dict[str, PeerAccount] = {}
        self._next = 0
        self.ep = pj.Endpoint()
        self.ep.libCreate()
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 1
        cfg.uaConfig.maxCalls = 8
        cfg.logConfig.level = int(os.environ.get("PJSUA_PEER_LOG_LEVEL", "0"))
        cfg.logConfig.consoleLevel = cfg.logConfig.level
        cfg.medConfig.threadCnt = 0
        self.ep.libInit(cfg)
        tcfg = pj.TransportConfig()
        tcfg.boundAddress = "127.0.0.1"
        tcfg.port = 0
        self.tid = self.ep.transportCreate(pj.TransportType.UDP, tcfg)
        self.ep.libStart()
        adm = self.ep.audDevManager
        adm = adm() if callable(adm) else adm
        adm.setNullDev()
        local = str(self.ep.transportGetInfo(self.tid).localName)
        self.port = int(local.rsplit(":", 1)[1])
        self.account(ident or f"sip:peer@127.0.0.1:{self.port}")

    def keep(self, call: PeerCall) -> int:
        key = self._next
        self._next += 1
        call.key = key
        self.calls[key] = call
        return key

    def account(self, ident: str) -> PeerAccount:
        acc = self.accounts.get(ident)
        if acc is None:
            acfg = pj.AccountConfig()
            acfg.idUri = ident
            acfg.sipConfig.transportId = self.tid
            acc = PeerAccount(self)
            acc.create(acfg)
            self.accounts[ident] = acc
        return acc

    def handle(self, cmd: dict[str, Any]) -> bool:
        """Run one command; return False on quit."""
        what = cmd.get("cmd")
        if what == "call":
            ident = cmd.get("from") or next(iter(self.accounts))
            acc = self.account(ident)
            call = PeerCall(self, acc)
            key = self.keep(call)
            op = pj.CallOpParam(True) if _takes_default() else pj.CallOpParam()
            emit(event="called", call=key)
            call.makeCall(cmd["uri"], op)
        elif what == "hangup":
            call = self.calls[int(cmd["call"])]
            op = pj.CallOpParam()
            if "code" in cmd:
                op.statusCode = pj.StatusCode(int(cmd["code"]))
            call.hangup(op)
        elif what == "answer":
            call = self.calls[int(cmd["call"])]
            op = pj.CallOpParam()
            op.statusCode = pj.StatusCode(int(cmd.get("code", 200)))
            call.answer(op)
        elif what == "mode":
            self.answer_mode = str(cmd["answer"])
            emit(event="mode", answer=self.answer_mode)
        elif what == "quit":
            return False
        else:
            emit(event="error", text=f"unknown command {what!r}")
        return True

    def close(self) -> None:
        """Hang up what is left, drop the calls, then destroy the library (in that order)."""
        try:
            self.ep.hangupAllCalls()
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            emit(event="error", text=f"hangupAllCalls: {exc!r}")
        self.calls.clear()
        self.accounts.clear()
        self.ep.libDestroy()


def _takes_default() -> bool:
    try:
        pj.CallOpParam(True)
    except TypeError:
        return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answer", choices=("auto", "ring", "manual"), default="auto")
    ap.add_argument("--id", default="", help="local identity URI (default sip:peer@127.0.0.1:PORT)")
    args = ap.parse_args()
    peer = Peer(args.answer, args.id)
    emit(event="ready", port=peer.port)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            cmd = json.loads(line)
            if not peer.handle(cmd):
                break
        except Exception as exc:  # noqa: BLE001 - a bad command is reported, the peer stays up
            emit(event="error", text=f"{line[:200]}: {exc!r}")
    peer.close()
    emit(event="bye")
    return 0


if __name__ == "__main__":
    sys.exit(main())
