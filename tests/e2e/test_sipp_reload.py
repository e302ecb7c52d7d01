"""SIGHUP reload of ``callguard serve`` under SIPp load."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from .helpers import (
    RELOAD_BANNED,
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
    write_lists,
)

pytestmark = pytest.mark.e2e

RATE = 200       # calls per second
SECONDS = 3


@dataclass
class ReloadEnv:
    proxy: ProxyProcess
    sipp: Sipp
    folder: Path
    config: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, sipp: Sipp,
        sipp_trunk: tuple[subprocess.Popen[bytes], int],
        proxy_starter: Callable[..., ProxyProcess]) -> ReloadEnv:
    port = free_udp_port()
    folder = tmp_path_factory.mktemp("reload-proxy")
    cfg = make_config(folder, listen_port=port, trunk_port=sipp_trunk[1], record_route=True, max_calls=5,
                      window=60)
    return ReloadEnv(proxy_starter(cfg, port), sipp, folder, cfg)


def _events(proxy: ProxyProcess, name: str) -> list[dict[str, object]]:
    return [e for e in proxy.logs() if e.get("event") == name]


def _load_decisions(proxy: ProxyProcess) -> int:
    return sum(1 for e in proxy.logs() if e.get("event") == "decision" and str(e.get("caller", "")).startswith("137"))


def test_sighup_under_load_drops_no_call_and_applies_new_list(env: ReloadEnv) -> None:
    uac = RawUac(env.proxy.port)
    try:
        before = uac.call(RELOAD_BANNED, "13900000031")
        # not banned yet: forwarded and answered by the trunk (then hung up below)
        assert status_of(before) == 200, before
        _hang_up(uac, before)

        calls = RATE * SECONDS
        inj = write_inject(env.sipp.workdir / "load.csv", [(f"137{i:08d}", f"139{i:08d}") for i in range(calls)])
        run = env.sipp.start_uac("uac_call.xml", env.proxy.port, calls=calls, rate=RATE, limit=400, inject=inj,
                                 timeout=60, name="reload-load")
        # wait until the load is flowing through the proxy (decisions logged for the load's callers)
        wait_until(lambda: _load_decisions(env.proxy) >= RATE // 2, 15, "load reaching the proxy")
        reloads_before = len(_events(env.proxy, "reloaded"))
        write_lists(env.folder / "lists", extra_banned=[RELOAD_BANNED])
        assert run.running(), "SIPp finished before the reload could be sent"
        env.proxy.reload()
        wait_until(lambda: len(_events(env.proxy, "reloaded")) > reloads_before, 10, "the reloaded log event")
        res = run.wait()
        assert res.stat("SuccessfulCall(C)") == calls, res.describe()
        assert res.stat("FailedCall(C)") == 0, res.describe()

        after = uac.call(RELOAD_BANNED, "13900000032")
        assert status_of(after) == 403, after
        assert "banned" in " ".join(header(after, "Reason")), after
        assert env.proxy.alive()
    finally:
        uac.close()


def test_invalid_config_on_sighup_keeps_the_running_config(env: ReloadEnv) -> None:
    good = env.config.read_text(encoding="utf-8")
    env.config.write_text(good.replace("max_calls: 5", "max_calls: -3"), encoding="utf-8")
    try:
        failed_before = len(_events(env.proxy, "reload_failed"))
        env.proxy.reload()
        failed = wait_until(lambda: _events(env.proxy, "reload_failed")[failed_before:], 10,
                            "the refused reload to be logged")
        error = str(failed[0].get("error", ""))
        assert "max_calls" in error and str(env.config) in error, f"error names neither key nor file: {error}"
        assert env.proxy.alive()
        resp = options_ping(env.proxy.port, 2.0)
        assert resp is not None and status_of(resp) == 200
        uac = RawUac(env.proxy.port)
        try:
            still = uac.call(RELOAD_BANNED, "13900000033")
            assert status_of(still) == 403, still  # the lists loaded before are still in force
        finally:
            uac.close()
    finally:
        env.config.write_text(good, encoding="utf-8")


def _hang_up(uac: RawUac, ok: str) -> None:
    """ACK the 200 and send BYE along the route set, so the trunk's call ends cleanly."""
    call_id = header(ok, "Call-ID", "i")[0]
    frm = header(ok, "From", "f")[0]
    to = header(ok, "To", "t")[0]
    contact = header(ok, "Contact", "m")[0]
    target = re.search(r"<([^>]+)>", contact)
    ruri = target.group(1) if target else contact.split(";")[0]
    routes = list(reversed(header(ok, "Record-Route")))
    route_lines = [f"Route: {r}" for r in routes]
    for method, cseq in (("ACK", 1), ("BYE", 2)):
        lines = [
            f"{method} {ruri} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{uac.port};branch=z9hG4bK{method.lower()}{abs(hash(call_id)) % 10**9};rport",
            "Max-Forwards: 70",
            f"From: {frm}",
            f"To: {to}",
            f"Call-ID: {call_id}",
            f"CSeq: {cseq} {method}",
            *route_lines,
            "Content-Length: 0",
            "",
            "",
        ]
        data = "\r\n".join(lines).encode()
        if routes:
            uac.send(data)  # the first Route is the proxy itself (loose routing)
        else:
            m = re.search(r"@?([\d.]+):(\d+)", ruri)
            assert m, ruri
            uac.sock.sendto(data, (m.group(1), int(m.group(2))))
    uac.final(call_id, 5.0, method="BYE")
