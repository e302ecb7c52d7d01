"""Real PJSIP user agents on both sides of ``callguard serve``.

A pjsua2 caller calls through the proxy to a pjsua2 callee that acts as the trunk. Both are
separate processes (one pjsua2 Endpoint per process) driven over JSON lines. The module runs
twice: with Record-Route on (in-dialog requests pass through the proxy) and off (they go
end to end).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from .helpers import (
    BANNED,
    PjsuaPeer,
    ProxyProcess,
    free_udp_port,
    header,
    make_config,
    method_of,
    options_ping,
    status_of,
    vias,
    wait_until,
)

pytestmark = pytest.mark.e2e

CALLEE = "13900000001"


@dataclass
class PjEnv:
    proxy: ProxyProcess
    caller: PjsuaPeer
    callee: PjsuaPeer
    record_route: bool

    def target(self, callee: str = CALLEE) -> str:
        return f"sip:{callee}@127.0.0.1:{self.proxy.port}"


@pytest.fixture(scope="module", params=[True, False], ids=["record-route", "no-record-route"])
def pj(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
       proxy_starter: Callable[..., ProxyProcess]) -> Iterator[PjEnv]:
    record_route = bool(request.param)
    callee = PjsuaPeer(answer="auto")
    caller = PjsuaPeer(answer="auto")
    try:
        port = free_udp_port()
        cfg = make_config(tmp_path_factory.mktemp("pjsua"), listen_port=port, trunk_port=callee.port,
                          record_route=record_route)
        proxy = proxy_starter(cfg, port)
        yield PjEnv(proxy, caller, callee, record_route)
    finally:
        # calls are destroyed before libDestroy inside the workers; both must exit cleanly
        codes = (caller.close(), callee.close())
    assert codes == (0, 0), f"pjsua workers exited with {codes}"


def _proxy_via(v: str, port: int) -> bool:
    return f"127.0.0.1:{port}" in v and "branch=z9hG4bK" in v


def test_answered_call_through_proxy_then_caller_hangs_up(pj: PjEnv) -> None:
    caller_uri = "sip:13911110001@127.0.0.1"
    call = pj.caller.call(pj.target(), caller_uri)
    ok = pj.caller.state(call, "CONFIRMED", timeout=10)
    assert ok["code"] == 200

    # the callee saw the INVITE with the proxy's Via on top of the caller's
    inc = pj.callee.wait_event(lambda e: e.get("event") == "incoming" and "13911110001" in e.get("msg", ""),
                               5, "INVITE at the callee")
    invite = inc["msg"]
    vs = vias(invite)
    assert len(vs) >= 2, invite
    assert _proxy_via(vs[0], pj.proxy.port), f"top Via is not the proxy's: {vs}"
    assert f"127.0.0.1:{pj.caller.port}" in vs[1], f"caller's Via not kept under the proxy's: {vs}"
    max_fwd = header(invite, "Max-Forwards")
    assert max_fwd and int(max_fwd[0]) < 70, f"Max-Forwards not decremented: {max_fwd}"
    rr = header(invite, "Record-Route")
    if pj.record_route:
        assert rr and any(f"127.0.0.1:{pj.proxy.port}" in r and ";lr" in r for r in rr), rr
    else:
        assert not rr, f"Record-Route inserted although record_route is off: {rr}"
    callee_call = int(inc["call"])
    pj.callee.state(callee_call, "CONFIRMED", timeout=5)

    pj.caller.send(cmd="hangup", call=call)
    pj.caller.state(call, "DISCONNECTED", timeout=10)
    pj.callee.state(callee_call, "DISCONNECTED", timeout=10)

    bye = pj.callee.wait_event(lambda e: e.get("event") == "tsx" and e.get("call") == callee_call
                               and e.get("method") == "BYE" and e.get("msg"), 5, "BYE at the callee")
    bye_vias = vias(bye["msg"])
    if pj.record_route:
        assert _proxy_via(bye_vias[0], pj.proxy.port), f"BYE did not pass the proxy: {bye_vias}"
    else:
        assert f"127.0.0.1:{pj.caller.port}" in bye_vias[0] and len(bye_vias) == 1, \
            f"BYE should go end to end without Record-Route: {bye_vias}"


def test_banned_caller_gets_403_with_reason(pj: PjEnv) -> None:
    call = pj.caller.call(pj.target(), f"sip:{BANNED}@127.0.0.1")
    end = pj.caller.state(call, "DISCONNECTED", timeout=10)
    assert end["code"] == 403, end
    # the 403 itself, as received, carries the Reason header naming the rule
    final = pj.caller.wait_event(
        lambda e: e.get("call") == call and e.get("msg", "").startswith("SIP/2.0 403"), 5, "the 403 message")
    reason = " ".join(header(final["msg"], "Reason"))
    assert "banned" in reason.lower(), f"no Reason naming the rule in:\n{final['msg']}"
    call_id = header(final["msg"], "Call-ID", "i")[0]
    assert not pj.callee.incoming(call_id), "a banned caller's INVITE reached the callee"
    assert not pj.callee.find(lambda e: e.get("event") == "incoming" and BANNED in e.get("msg", ""))


def test_cancel_before_answer(pj: PjEnv) -> None:
    pj.callee.set_mode("ring")
    try:
        call = pj.caller.call(pj.target(), "sip:13911110002@127.0.0.1")
        pj.caller.state(call, "EARLY", timeout=10)
        inc = pj.callee.wait_event(lambda e: e.get("event") == "incoming" and "13911110002" in e.get("msg", ""),
                                   5, "INVITE at the callee")
        callee_call = int(inc["call"])
        pj.caller.send(cmd="hangup", call=call)  # before answer: CANCEL
        end = pj.caller.state(call, "DISCONNECTED", timeout=10)
        assert end["code"] == 487, end
        cancel = pj.callee.wait_event(lambda e: e.get("event") == "tsx" and e.get("call") == callee_call
                                      and e.get("method") == "CANCEL" and e.get("msg"), 10, "CANCEL at callee")
        assert method_of(cancel["msg"]) == "CANCEL"
        assert _proxy_via(vias(cancel["msg"])[0], pj.proxy.port), "CANCEL did not come from the proxy"
        done = pj.callee.state(callee_call, "DISCONNECTED", timeout=10)
        assert done["code"] == 487, done
    finally:
        pj.callee.set_mode("auto")


def test_proxy_still_answers_after_calls(pj: PjEnv) -> None:
    resp = options_ping(pj.proxy.port, 2.0)
    assert resp is not None and status_of(resp) == 200
    assert pj.proxy.alive()



def test_logs_are_json_lines_with_the_decision(pj: PjEnv) -> None:
    lines = [ln for ln in pj.proxy.log_lines if ln.strip()]
    bad = [ln for ln in lines if not ln.lstrip().startswith("{")]
    assert not bad, f"log lines that are not JSON objects: {bad[:5]}"
    decisions = [e for e in pj.proxy.logs() if e.get("event") == "decision"]
    # logged a batch at a time: wait for the banned caller's
    banned = wait_until(lambda: [e for e in pj.proxy.logs() if e.get("event") == "decision"
                                 and e.get("caller") == BANNED], 10, "the banned caller's decision logged")
    assert banned and banned[0].get("rule") == "banned" and banned[0].get("call_id"), decisions[-5:]
    assert all(k in banned[0] for k in ("caller", "callee", "rule", "call_id")), banned[0]
    assert any(k.startswith("latency") for k in banned[0]), banned[0]
