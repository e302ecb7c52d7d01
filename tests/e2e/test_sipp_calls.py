"""SIPp on both sides of ``callguard serve``: SIPp UAC callers, a SIPp UAS as the trunk."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from .helpers import (
    AREA_96,
    FILED_95,
    INBOUND_95,
    INBOUND_96,
    ProxyProcess,
    RawUac,
    Sipp,
    free_udp_port,
    header,
    make_config,
    options_ping,
    status_of,
    wait_until,
    write_inject,
)

pytestmark = pytest.mark.e2e

BURST_N = 5  # rate limit of the module's proxy: max_calls per 60 s window, per caller


@dataclass
class SippEnv:
    proxy: ProxyProcess
    sipp: Sipp
    trunk_port: int


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, sipp: Sipp,
        sipp_trunk: tuple[subprocess.Popen[bytes], int],
        proxy_starter: Callable[..., ProxyProcess]) -> SippEnv:
    port = free_udp_port()
    cfg = make_config(tmp_path_factory.mktemp("sipp-proxy"), listen_port=port, trunk_port=sipp_trunk[1],
                      record_route=True, max_calls=BURST_N, window=60)
    return SippEnv(proxy_starter(cfg, port), sipp, sipp_trunk[1])


def test_inbound_only_service_numbers_get_403(env: SippEnv) -> None:
    inj = write_inject(env.sipp.workdir / "svc.csv",
                       [(INBOUND_95, "13900000011"), (AREA_96 + INBOUND_96, "13900000012")])
    res = env.sipp.run_uac("uac_reject.xml", env.proxy.port, calls=2, rate=20, limit=1, inject=inj,
                           timeout=20, name="svc403")
    assert res.stat("SuccessfulCall(C)") == 2 and res.stat("FailedCall(C)") == 0, res.describe()

    # the rejection names the rule in the Reason header
    uac = RawUac(env.proxy.port)
    try:
        resp = uac.call(INBOUND_95, "13900000013")
        assert status_of(resp) == 403, resp
        assert "outbound_prohibited" in " ".join(header(resp, "Reason")), resp
        resp96 = uac.call(f"0391-{INBOUND_96}", "13900000014")
        assert status_of(resp96) == 403, resp96
    finally:
        uac.close()

    # contrast: a 95 number filed for outbound calls goes through and is answered
    inj_ok = write_inject(env.sipp.workdir / "svc-ok.csv", [(FILED_95, "13900000015")])
    ok = env.sipp.run_uac("uac_call.xml", env.proxy.port, calls=1, rate=10, inject=inj_ok, timeout=20,
                          name="svc-ok")
    assert ok.stat("SuccessfulCall(C)") == 1 and ok.stat("FailedCall(C)") == 0, ok.describe()


def test_burst_from_one_caller_trips_high_frequency(env: SippEnv) -> None:
    extra = 4
    inj = write_inject(env.sipp.workdir / "burst.csv", [("13512340000", "13900000021")])
    # -l 1: one call at a time, so the order of attempts is the order of calls
    res = env.sipp.run_uac("uac_burst.xml", env.proxy.port, calls=BURST_N + extra, rate=50, limit=1,
                           inject=inj, timeout=30, name="burst")
    assert res.stat("SuccessfulCall(C)") == BURST_N + extra and res.stat("FailedCall(C)") == 0, res.describe()
    answered = res.count("_BYE_Sent")
    declined = res.count("_603_Recv")
    assert (answered, declined) == (BURST_N, extra), res.describe()
    # the decisions are logged per call with the rule (SPEC section 6), a batch of them at a time
    def logged() -> list[object]:
        return [e.get("rule") for e in env.proxy.logs()
                if e.get("event") == "decision" and e.get("caller") == "13512340000"]
    rules = wait_until(lambda: len(logged()) >= BURST_N + extra and logged(), 10, "every decision logged")
    assert rules.count("high_frequency") == extra and rules.count("allow") == BURST_N, rules


def test_clean_call_mix_is_forwarded_and_answered(env: SippEnv) -> None:
    rows = []
    for i in range(12):
        rows.append((f"135{i:08d}", f"139{i:08d}"))              # mobile
        rows.append((f"+86136{i:08d}", f"0371{60000000 + i}"))   # E.164 mobile to a fixed line
        rows.append((f"0371{61000000 + i}", f"137{i:08d}"))      # fixed line with area code
    # the unified outbound platform is allowlisted: more calls than the rate limit still pass
    rows += [("10085", f"138{i:08d}") for i in range(BURST_N + 3)]
    inj = write_inject(env.sipp.workdir / "mix.csv", rows)
    res = env.sipp.run_uac("uac_call.xml", env.proxy.port, calls=len(rows), rate=50, limit=20, inject=inj,
                           timeout=40, name="mix")
    assert res.stat("SuccessfulCall(C)") == len(rows), res.describe()
    assert res.stat("FailedCall(C)") == 0, res.describe()
    resp = options_ping(env.proxy.port, 2.0)
    assert resp is not None and status_of(resp) == 200
