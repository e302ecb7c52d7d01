"""Fixtures of the end-to-end tests: ``callguard serve`` as a subprocess between real SIP peers.

Every test module writes its own config (free ports, small CSV lists, records and state in a
temporary folder) and starts its own proxy; teardown sends SIGTERM and asserts exit code 0.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .helpers import SIPP, ProxyProcess, Sipp, start_proxy, stop_process


@pytest.fixture(scope="module")
def proxy_starter() -> Iterator[Callable[..., ProxyProcess]]:
    """Start proxies for a module; stop them all at the end and check they exited cleanly."""
    started: list[ProxyProcess] = []

    def start(config_path: Path, port: int, **kw: object) -> ProxyProcess:
        pp = start_proxy(config_path, port, **kw)  # type: ignore[arg-type]
        started.append(pp)
        return pp

    yield start
    problems = []
    for pp in started:
        code = pp.stop()
        if code != 0:
            problems.append(f"{pp.config_path}: exit code {code}\n{pp.log_text(40)}")
    assert not problems, "callguard serve did not exit 0 on SIGTERM:\n" + "\n".join(problems)


@pytest.fixture(scope="module")
def sipp(tmp_path_factory: pytest.TempPathFactory) -> Sipp:
    if not Path(SIPP).exists():
        pytest.fail(f"SIPp not found at {SIPP} (Debian package sip-tester)")
    return Sipp(tmp_path_factory.mktemp("sipp"))


@pytest.fixture(scope="module")
def sipp_trunk(sipp: Sipp) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A SIPp UAS answering every INVITE 200 on a free loopback port: the trunk."""
    proc, port = sipp.start_uas("uas_answer.xml")
    yield proc, port
    stop_process(proc)
