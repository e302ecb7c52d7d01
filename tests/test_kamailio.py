"""callguard inside Kamailio (KEMI, app_python3), end to end over loopback.

Real Kamailio from the shipped ``config/kamailio/kamailio.cfg`` (two workers), the decider
process, SIPp as the caller and SIPp as the trunk.  The verdicts Kamailio gives are compared
with the verdicts of an in-process :class:`Guard` built from the same YAML for the same calls.
"""

from __future__ import annotations

import os
import shutil
import site
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

import callguard
from callguard import config as config_mod
from callguard.guard import Guard
from callguard.kamailio import protocol as proto
from callguard.kamailio.daemon import control, reload_and_wait

ROOT = Path(__file__).resolve().parent.parent
KAMAILIO = "/usr/sbin/kamailio"
APP_PYTHON3 = Path("/usr/lib/x86_64-linux-gnu/kamailio/modules/app_python3.so")
SIPP = shutil.which("sipp")
SIPP_DIR = Path(__file__).resolve().parent / "sipp"

pytestmark = [
    pytest.mark.kamailio,
    pytest.mark.e2e,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not (os.path.exists(KAMAILIO) and APP_PYTHON3.exists()),
                       reason="Debian kamailio with kamailio-python3-modules (app_python3) is not installed"),
    pytest.mark.skipif(SIPP is None, reason="sipp (Debian sip-tester) is not installed"),
]

CLEAN = "13912345678"
BURST_CALLER = "13700001111"
BURST_CALLS = 24
LIMIT = 10   # the shipped per-minute limit


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None,
             log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)   # polling another process's readiness; there is no event to wait on
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def options_ok(port: int) -> bool:
    """The proxy answers an OPTIONS (Kamailio: once a worker runs the Python script)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.3)
        lport = s.getsockname()[1]
        msg = (f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n"
               f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch=z9hG4bK{time.time_ns()}\r\n"
               f"From: <sip:probe@127.0.0.1>;tag=1\r\nTo: <sip:127.0.0.1:{port}>\r\n"
               f"Call-ID: probe{time.time_ns()}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
        s.sendto(msg.encode(), ("127.0.0.1", port))
        try:
            data = s.recv(65535)
        except TimeoutError:
            return False
        return data.startswith(b"SIP/2.0 ")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Stack:
    """Decider + Kamailio + a SIPp trunk, in one temporary folder."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.kport = free_udp_port()
        self.uas_port = free_udp_port()
        self.socket = str(tmp / "decider.sock")
        lists = tmp / "lists"
        shutil.copytree(ROOT / "config" / "lists", lists)
        self.blocklist = lists / "blocklist.csv"
        text = (ROOT / "config" / "callguard.yaml").read_text()
        text = text.replace("udp:127.0.0.1:5080", f"udp:127.0.0.1:{self.uas_port}")
        text = text.replace("/var/tmp/callguard/", f"{tmp}/")
        self.config = tmp / "callguard.yaml"
        self.config.write_text(text)
        self.config_text = text
        self.procs: list[subprocess.Popen[bytes]] = []
        self.uas_log = tmp / "uas.log"
        self.kam_log = tmp / "kamailio.log"
        self.decider_log = tmp / "decider.log"

    def start_uas(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(callguard.__file__).resolve().parent.parent)
        self.env = env
        self.uas = subprocess.Popen(
            [SIPP, "-sf", str(SIPP_DIR / "kamailio_uas.xml"), "-i", "127.0.0.1", "-p", str(self.uas_port),
             "-nostdin", "-trace_logs", "-log_file", str(self.uas_log), "-trace_msg", "-message_file",
             str(self.tmp / "uas.msg")],
            cwd=self.tmp, stdout=subprocess.DEVNULL, stderr=open(self.tmp / "uas.err", "wb"))
        self.procs.append(self.uas)

    def start(self) -> None:
        self.start_uas()
        self.start_decider()
        env = self.env
        pypath = ":".join([env["PYTHONPATH"], *site.getsitepackages()])
        cmd = [KAMAILIO, "-f", str(ROOT / "config" / "kamailio" / "kamailio.cfg"), "-DD", "-E", "-x", "tlsf",
               "-m", "64", "-M", "16",
               "-A", f"CG_LISTEN=udp:127.0.0.1:{self.kport}", "-A", "CG_CHILDREN=2",
               "-A", f'CG_KEMI_SCRIPT="{ROOT / "config" / "kamailio" / "callguard_kemi.py"}"',
               "-A", f'CG_CONFIG="{self.config}"', "-A", f'CG_SOCKET="{self.socket}"',
               "-A", f'CG_PYTHONPATH="{pypath}"', "-A", f'CG_CTL="unix:{self.tmp / "kamailio_ctl"}"',
               "-A", "CG_DEBUG=2", "-Y", str(self.tmp)]
        self.kamailio = subprocess.Popen(cmd, cwd=self.tmp, env=env, stdout=subprocess.DEVNULL,
                                         stderr=open(self.kam_log, "wb"))
        self.procs.append(self.kamailio)
        wait_for(lambda: options_ok(self.kport), 30, "Kamailio to answer OPTIONS", self.kamailio, self.kam_log)

    def start_native(self) -> None:
        """Kamailio with the native anchor script, its tables exported from the same lists."""
        self.start_uas()
        db = self.tmp / "db"
        subprocess.run([sys.executable, "-m", "callguard.kamailio.native_lists", "--config", str(self.config),
                        "--out", str(db)], env=self.env, check=True, capture_output=True)
        cmd = [KAMAILIO, "-f", str(ROOT / "config" / "kamailio" / "kamailio-native.cfg"), "-DD", "-E", "-x", "tlsf",
               "-m", "64", "-M", "16", "-A", f"CG_LISTEN=udp:127.0.0.1:{self.kport}", "-A", "CG_CHILDREN=2",
               "-A", f'CG_TRUNK="sip:127.0.0.1:{self.uas_port}"', "-A", f'CG_DBURL="text://{db}"',
               "-A", "CG_RATE_WINDOW=86400",   # a fixed window: keep the burst away from its edge
               "-A", f'CG_CTL="unix:{self.tmp / "kamailio_ctl"}"', "-A", "CG_DEBUG=2", "-Y", str(self.tmp)]
        self.kamailio = subprocess.Popen(cmd, cwd=self.tmp, stdout=subprocess.DEVNULL, stderr=open(self.kam_log, "wb"))
        self.procs.append(self.kamailio)
        wait_for(lambda: options_ok(self.kport), 30, "native Kamailio to answer OPTIONS", self.kamailio, self.kam_log)

    def start_decider(self) -> None:
        self.decider = subprocess.Popen(
            [sys.executable, "-m", "callguard.kamailio.daemon", "--config", str(self.config), "--socket", self.socket],
            cwd=self.tmp, env=self.env, stdout=subprocess.DEVNULL, stderr=open(self.decider_log, "ab"))
        self.procs.append(self.decider)

        def up() -> bool:
            try:
                return bool(control(self.socket, proto.OP_PING, timeout=0.3))
            except OSError:
                return False

        wait_for(up, 30, "the decider to answer PING", self.decider, self.decider_log)

    def close(self) -> None:
        for p in reversed(self.procs):
            stop(p)

    def calls(self, rows: list[tuple[str, str]], name: str, concurrency: int = 1, rate: int = 50) -> list[list[str]]:
        """Run one SIPp caller over the rows; return its RESULT lines (call-id, caller, callee, code, reason)."""
        inf = self.tmp / f"{name}.csv"
        inf.write_text("SEQUENTIAL\n" + "".join(f"{a};{b};\n" for a, b in rows))
        logf = self.tmp / f"{name}.log"
        proc = subprocess.run(
            [SIPP, f"127.0.0.1:{self.kport}", "-sf", str(SIPP_DIR / "kamailio_uac.xml"), "-inf", str(inf),
             "-i", "127.0.0.1", "-p", str(free_udp_port()), "-m", str(len(rows)),
             "-l", str(concurrency), "-r", str(rate), "-nostdin",
             "-trace_logs", "-log_file", str(logf), "-timeout", "40", "-timeout_error",
             "-trace_msg", "-message_file", str(self.tmp / f"{name}.msg")],
            cwd=self.tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
        results = [line.split(";", 5) for line in logf.read_text().splitlines() if line.startswith("RESULT;")]
        assert len(results) == len(rows), (proc.returncode, proc.stderr.decode(errors="replace")[-2000:],
                                           self.kam_log.read_text(errors="replace")[-3000:])
        return results

    def trunk_call_ids(self) -> set[str]:
        if not self.uas_log.exists():
            return set()
        return {line.split(";")[1] for line in self.uas_log.read_text().splitlines() if line.startswith("TRUNK;")}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = Stack(tmp_path_factory.mktemp("kamailio"))
    try:
        st.start()
        yield st
    finally:
        st.close()
    log = st.kam_log.read_text(errors="replace")
    assert "SystemError" not in log and "Traceback" not in log, log[-3000:]


def expected_codes(config: Path, rows: list[tuple[str, str]]) -> list[int]:
    """The same calls through an in-process Guard from the same YAML: 0 (forward) or the reject code."""
    guard = Guard(config_mod.load(config))
    return [guard.check(a, b, source="127.0.0.1").code for a, b in rows]


MIX = [
    ("13800138000", "02150001234"),     # banned caller -> 403
    ("95555", "13912345678"),           # 95 filed inbound-only -> 403
    ("039196123", "13912345678"),       # 96 (area 0391) filed inbound-only -> 403
    ("95999", "13912345678"),           # 95 with no filing -> 403
    ("13800138000", "110"),             # emergency from a banned caller -> forwarded
    (CLEAN, "02150001234"),             # clean -> forwarded, answered
    ("anonymous", "02150001234"),       # hidden caller ID -> 433
    ("+8613912345679", "tel:+86-21-5000-1234"),  # clean, international forms -> forwarded
]


def test_call_mix_matches_guard(stack: Stack) -> None:
    by_row = stack.calls(MIX, "mix")
    assert [(r[2], r[3]) for r in by_row] == [(a, b) for a, b in MIX]
    codes = [int(r[4]) for r in by_row]
    want = [c or 200 for c in expected_codes(stack.config, MIX)]
    assert codes == want
    assert codes == [403, 403, 403, 403, 200, 200, 433, 200]
    # Rejections carry the rule's reason in a Reason header.
    assert 'Reason: SIP;cause=403;text="banned: Forbidden - caller number banned"' in by_row[0][5]
    assert "filed inbound-only" in by_row[1][5] and "filed inbound-only" in by_row[2][5]
    assert "not filed" in by_row[3][5]
    # Exactly the allowed calls reached the trunk.
    forwarded = {r[1] for r in by_row if r[4] == "200"}
    wait_for(lambda: forwarded <= stack.trunk_call_ids(), 10, "the trunk to log the forwarded INVITEs")
    assert not ({r[1] for r in by_row if r[4] != "200"} & stack.trunk_call_ids())


def test_burst_counted_exactly_across_workers(stack: Stack) -> None:
    before = control(stack.socket, proto.OP_STATS)
    rows = [(BURST_CALLER, f"0215000{i:04d}") for i in range(BURST_CALLS)]
    results = stack.calls(rows, "burst", concurrency=BURST_CALLS, rate=200)
    codes = Counter(int(r[4]) for r in results)
    want = Counter(c or 200 for c in expected_codes(stack.config, rows))
    assert want == Counter({200: LIMIT, 603: BURST_CALLS - LIMIT})
    assert codes == want
    forwarded = {r[1] for r in results if r[4] == "200"}
    wait_for(lambda: forwarded <= stack.trunk_call_ids(), 10, "the trunk to log the forwarded INVITEs")
    after = control(stack.socket, proto.OP_STATS)
    # Both Kamailio workers asked the one decider (each worker has its own socket address).
    assert after["peers"] >= 2, after
    assert after["counters"].get("rule:high_frequency", 0) - before["counters"].get("rule:high_frequency", 0) \
        == BURST_CALLS - LIMIT


def test_reload_new_list_and_broken_config_keeps_old(stack: Stack) -> None:
    newly_banned = "13911112222"
    assert stack.calls([(newly_banned, "02150001234")], "before_reload")[0][4] == "200"
    original = stack.blocklist.read_text()
    try:
        stack.blocklist.write_text(original + f"{newly_banned},exact,manual,test entry,2026-01-01,,,\n")
        result = reload_and_wait(stack.socket)
        assert result["ok"], result
        assert stack.calls([(newly_banned, "02150001235")], "after_reload")[0][4] == "403"

        # A broken config is refused: the decider keeps the old config and lists, and says why.
        stack.config.write_text(stack.config_text + "\nrate_limits: 12\n")
        result = reload_and_wait(stack.socket)
        assert not result["ok"] and "rate_limits" in result["error"], result
        res = stack.calls([(newly_banned, "02150001236"), ("13912340000", "02150001237")], "broken_reload")
        assert [r[4] for r in res] == ["403", "200"]
    finally:
        stack.blocklist.write_text(original)
        stack.config.write_text(stack.config_text)

    # The watched files: the restore above is picked up without a command (mtime check once a second).
    def restored() -> bool:
        st = control(stack.socket, proto.OP_STATS)
        return not st["reloading"] and st["last_reload_error"] == "" and st["counters"].get("reloads", 0) >= 2

    wait_for(restored, 15, "the decider to notice the restored files")
    assert stack.calls([(newly_banned, "02150001238")], "after_restore")[0][4] == "200"


def test_decider_down_fails_open_then_recovers(stack: Stack) -> None:
    stop(stack.decider)
    res = stack.calls([("13800138000", "02150001239")], "decider_down")
    assert res[0][4] == "200"   # failed open: the banned caller passes while nothing can decide
    assert "decider unavailable" in stack.kam_log.read_text(errors="replace")
    stack.start_decider()
    res = stack.calls([("13800138000", "02150001240")], "decider_back")
    assert res[0][4] == "403"


def test_native_anchor_same_codes(tmp_path: Path) -> None:
    """kamailio-native.cfg (the benchmark anchor) gives the same codes on the mix and the burst."""
    st = Stack(tmp_path)
    try:
        st.start_native()
        results = st.calls(MIX, "native_mix")
        assert [int(r[4]) for r in results] == [c or 200 for c in expected_codes(st.config, MIX)]
        burst = [("13700002222", f"0215100{i:04d}") for i in range(14)]
        results = st.calls(burst, "native_burst", concurrency=len(burst), rate=200)
        assert Counter(int(r[4]) for r in results) == Counter({200: LIMIT, 603: len(burst) - LIMIT})
        assert any('Reason: SIP;cause=603;text="' in r[5] for r in results)
    finally:
        st.close()


def test_same_responses_as_callguard_serve(stack: Stack, tmp_path: Path) -> None:
    """`callguard serve` and Kamailio+callguard answer the same call mix with the same codes and reasons."""
    try:
        from callguard.sip.server import serve_main  # noqa: F401
    except ImportError:
        pytest.skip("callguard serve is not available in this tree")
    st = Stack(tmp_path)
    try:
        st.start_uas()
        serve = subprocess.Popen([sys.executable, "-m", "callguard", "serve", "--config", str(st.config),
                                  "--listen", f"udp:127.0.0.1:{st.kport}"],
                                 cwd=st.tmp, env=st.env, stdout=subprocess.DEVNULL, stderr=open(st.kam_log, "wb"))
        st.procs.append(serve)
        wait_for(lambda: options_ok(st.kport), 30, "callguard serve to answer", serve, st.kam_log)
        rows = MIX + [("13700003333", f"0215200{i:04d}") for i in range(12)]
        served = st.calls(rows, "serve")
        kam = stack.calls(rows, "same_as_serve")
        assert [r[4] for r in served] == [r[4] for r in kam]
        assert [r[5] for r in served] == [r[5] for r in kam]
        assert [r[4] for r in kam][len(MIX):] == ["200"] * LIMIT + ["603"] * 2
    finally:
        st.close()
