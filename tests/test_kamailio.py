"""callguard inside Kamailio (KEMI, app_python3), end to end over loopback.

Real Kamailio from the shipped ``config/kamailio/kamailio.cfg`` (two workers), the decider
process, SIPp as the caller and SIPp as the trunk.  The verdicts Kamailio gives are compared
with the verdicts of an in-process :class:`Guard` built from the same YAML for the same calls.
The decider's call records are read back from its SQLite file with :class:`RecordStore`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import callguard
from callguard import config as config_mod
from callguard.guard import Guard
from callguard.kamailio import protocol as proto
from callguard.kamailio.daemon import Decider, DeciderServer, control, reload_and_wait
from callguard.records import RecordStore

ROOT = Path(__file__).resolve().parent.parent
KAMAILIO = "/usr/sbin/kamailio"
APP_PYTHON3 = Path("/usr/lib/x86_64-linux-gnu/kamailio/modules/app_python3.so")
SIPP_PATH = shutil.which("sipp")
SIPP = SIPP_PATH or "sipp"
SIPP_DIR = Path(__file__).resolve().parent / "sipp"

pytestmark = [
    pytest.mark.kamailio,
    pytest.mark.e2e,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not (os.path.exists(KAMAILIO) and APP_PYTHON3.exists()),
                       reason="Debian kamailio with kamailio-python3-modules (app_python3) is not installed"),
    pytest.mark.skipif(SIPP_PATH is None, reason="sipp (Debian sip-tester) is not installed"),
]

CLEAN = "13912345678"
BURST_CALLER = "13700001111"
BURST_CALLS = 24
LIMIT = 10   # the shipped per-minute limit


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None,
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

    def __init__(self, tmp: Path, per_minute: int | None = None) -> None:
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
        if per_minute is not None:
            text = text.replace("window: 60, max_calls: 10}", f"window: 60, max_calls: {per_minute}}}")
        assert f"{tmp}/records.sqlite3" in text
        self.records_path = tmp / "records.sqlite3"
        self.config = tmp / "callguard.yaml"
        self.config.write_text(text)
        self.config_text = text
        self.procs: list[subprocess.Popen[bytes]] = []
        self.uas_log = tmp / "uas.log"
        self.kam_log = tmp / "kamailio.log"
        self.decider_log = tmp / "decider.log"
        self.env = dict(os.environ, PYTHONPATH=str(Path(callguard.__file__).resolve().parent.parent))

    def start_uas(self) -> None:
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
    log = stack.kam_log.read_text(errors="replace")
    assert "decider unavailable" in log
    assert "outcome reports lost" in log   # the BYE's report had nowhere to go: counted, the call went on
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


# ---------------------------------------------------------------- call records and outcomes
def records_of(path: Path, caller: str) -> list[dict[str, object]]:
    """Every stored record of one (normalised) caller, oldest first."""
    if not path.exists():
        return []
    store = RecordStore(str(path), 30)
    try:
        return list(reversed(store.query(caller=caller, limit=0)))
    finally:
        store.close()


def sipp_bye_via(msg_file: Path, call_id: str) -> list[str]:
    """The top Via of every BYE of ``call_id`` that SIPp (the trunk) received."""
    text = msg_file.read_text(errors="replace") if msg_file.exists() else ""
    out = []
    for block in re.split(r"\n-{10,}[^\n]*\n", text):
        body = block[block.find("BYE "):] if "BYE " in block else ""
        if body.startswith("BYE ") and f"Call-ID: {call_id}" in body:
            m = re.search(r"^Via: ([^\r\n]*)", body, re.M)
            out.append(m.group(1) if m else "")
    return out


def test_records_with_outcomes_and_bye_relayed(stack: Stack) -> None:
    caller = "13912340101"
    before = control(stack.socket, proto.OP_STATS)["counters"]
    res = stack.calls([(caller, "02150001301"), ("13800138000", "02150001302")], "records")
    assert [r[4] for r in res] == ["200", "403"]
    answered_id, rejected_id = res[0][1], res[1][1]

    def complete() -> bool:
        recs = records_of(stack.records_path, caller)
        rejected = [r for r in records_of(stack.records_path, "13800138000") if r["call_id"] == rejected_id]
        return bool(recs) and recs[-1]["ended_at"] is not None and bool(rejected)

    wait_for(complete, 10, "both records, the answered one with its end time", log=stack.decider_log)
    recs = records_of(stack.records_path, caller)
    assert len(recs) == 1
    rec = recs[0]
    assert (rec["call_id"], rec["source"], rec["callee"], rec["rule"], rec["verdict"], rec["code"]) == \
        (answered_id, "127.0.0.1", "02150001301", "allow", "allow", 0)
    assert rec["final_code"] == 200
    assert isinstance(rec["answered_at"], float) and isinstance(rec["ended_at"], float)
    assert rec["time"] <= rec["answered_at"] <= rec["ended_at"]   # type: ignore[operator]
    banned = [r for r in records_of(stack.records_path, "13800138000") if r["call_id"] == rejected_id]
    assert [(r["rule"], r["verdict"], r["code"], r["final_code"], r["answered_at"]) for r in banned] == \
        [("banned", "reject", 403, None, None)]
    # The BYE came through Kamailio (record-route): its top Via at the trunk is Kamailio's.
    vias = sipp_bye_via(stack.tmp / "uas.msg", answered_id)
    assert vias and all(f"127.0.0.1:{stack.kport};branch=" in v for v in vias), vias
    after = control(stack.socket, proto.OP_STATS)
    counters = after["counters"]
    for key in ("outcomes_answered", "outcomes_ended"):
        assert counters.get(key, 0) > before.get(key, 0), (key, counters)
    assert after["records"]["enabled"] and after["records"]["dropped"] == 0, after["records"]


class RawUac:
    """A caller on a plain UDP socket: sends exactly the bytes it is told to, retransmissions included."""

    def __init__(self, kport: int, host: str = "127.0.0.1") -> None:
        self.kport = kport
        self.host = host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()

    def request(self, method: str, ruri: str, caller: str, callee: str, call_id: str, cseq: int, branch: str,
                to_tag: str = "", routes: tuple[str, ...] = ()) -> bytes:
        lines = [f"{method} {ruri} SIP/2.0", f"Via: SIP/2.0/UDP {self.host}:{self.port};branch={branch}",
                 f"From: <sip:{caller}@127.0.0.1>;tag=raw{cseq}{call_id[-4:]}",
                 f"To: <sip:{callee}@127.0.0.1:{self.kport}>" + (f";tag={to_tag}" if to_tag else ""),
                 f"Call-ID: {call_id}", f"CSeq: {cseq} {method.replace('ACK', 'ACK')}",
                 *(f"Route: {r}" for r in routes),
                 f"Contact: <sip:{caller}@{self.host}:{self.port}>", "Max-Forwards: 70", "Content-Length: 0", "", ""]
        return "\r\n".join(lines).encode()

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, ("127.0.0.1", self.kport))

    def responses(self, call_id: str, method: str, until: int, timeout: float = 10.0) -> list[bytes]:
        """Responses to ``method`` of ``call_id`` until ``until`` final responses arrived."""
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while sum(1 for r in got if status(r) >= 200) < until:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {until} final responses to {method} {call_id}: {got!r}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            if data.startswith(b"SIP/2.0 ") and f"Call-ID: {call_id}".encode() in data \
                    and re.search(rf"^CSeq: \d+ {method}\r$".encode(), data, re.M):
                got.append(data)
        return got


def status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


def header_values(resp: bytes, name: str) -> list[str]:
    return [m.decode() for m in re.findall(rf"^{name}: *([^\r\n]*)".encode(), resp, re.M | re.I)]


def test_retransmitted_invite_same_verdict_counted_once(tmp_path: Path) -> None:
    """Limit 1 call/min: an INVITE sent twice (same branch) is one attempt, one record, one verdict."""
    st = Stack(tmp_path, per_minute=1)
    uac = RawUac(0)
    try:
        st.start()
        uac.kport = st.kport
        caller, callee = "13912340202", "02150001401"
        before = control(st.socket, proto.OP_STATS)["counters"]
        # Call A: both copies at once, so the two workers may each take one.
        invite = uac.request("INVITE", f"sip:{callee}@127.0.0.1:{st.kport}", caller, callee, "retx-a", 1,
                             "z9hG4bKretxa1")
        uac.send(invite)
        uac.send(invite)
        finals = [r for r in uac.responses("retx-a", "INVITE", 1) if status(r) >= 200]
        ok = finals[0]
        assert status(ok) == 200, ok
        to_tag = re.search(rb"^To:[^\r\n]*;tag=([^;\s\r]+)", ok, re.M | re.I).group(1).decode()  # type: ignore[union-attr]
        contact = re.search(r"<([^>]+)>", header_values(ok, "Contact")[0]).group(1)  # type: ignore[union-attr]
        routes = tuple(reversed([v.strip() for h in header_values(ok, "Record-Route") for v in h.split(",")]))
        assert routes and f"127.0.0.1:{st.kport}" in routes[0], routes   # Kamailio record-routed the call
        uac.send(uac.request("ACK", contact, caller, callee, "retx-a", 1, "z9hG4bKretxa2", to_tag, routes))
        uac.send(uac.request("BYE", contact, caller, callee, "retx-a", 2, "z9hG4bKretxa3", to_tag, routes))
        bye = uac.responses("retx-a", "BYE", 1)
        assert status(bye[-1]) == 200   # the trunk answered the BYE Kamailio relayed
        assert all(status(r) in (100, 200) for r in finals), finals   # the copy did not trip the limit

        def ended() -> bool:
            recs = records_of(st.records_path, caller)
            return bool(recs) and recs[0]["ended_at"] is not None

        wait_for(ended, 10, "call A's record to be complete", log=st.decider_log)
        assert len(records_of(st.records_path, caller)) == 1

        # Call B from the same caller: over the limit.  Its copy reaches the decider (the reject is
        # stateless) and gets the same verdict from the transaction cache, without counting again.
        invite_b = uac.request("INVITE", f"sip:{callee}@127.0.0.1:{st.kport}", caller, callee, "retx-b", 1,
                               "z9hG4bKretxb1")
        uac.send(invite_b)
        first = uac.responses("retx-b", "INVITE", 1)
        uac.send(invite_b)
        second = uac.responses("retx-b", "INVITE", 1)
        assert [status(first[-1]), status(second[-1])] == [603, 603]

        def two_records() -> bool:
            return len(records_of(st.records_path, caller)) >= 2

        wait_for(two_records, 10, "call B's record", log=st.decider_log)
        after = control(st.socket, proto.OP_STATS)["counters"]
        recs = records_of(st.records_path, caller)
        assert [(r["call_id"], r["rule"], r["code"], r["final_code"]) for r in recs] == \
            [("retx-a", "allow", 0, 200), ("retx-b", "high_frequency", 603, None)]
        assert after.get("rule:high_frequency", 0) - before.get("rule:high_frequency", 0) == 1
        assert after.get("retransmissions", 0) - before.get("retransmissions", 0) >= 1
    finally:
        uac.close()
        st.close()


class FakeDecider:
    """A decider that answers every CHECK with a reply the plug-in cannot use."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.path = path
        self.checks = 0
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while self.running:
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            version, op, rid = proto.parse_header(data)
            if op != proto.OP_CHECK:
                continue   # outcomes are one-way
            self.checks += 1
            head = proto.header_v(version, op, rid)
            if self.checks == 1:
                # Well-formed, but the trunk is not an address: routing raises inside the plug-in.
                out = head + proto.encode_reply_body(0, "allow", 0, 0.0, "", "udp:no-port-here")
            else:
                out = head + b"\x00\x01"   # truncated: not a verdict at all
            self.sock.sendto(out, addr)

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()
        os.unlink(self.path)


def test_fault_inside_plugin_fails_open_and_kamailio_keeps_working(stack: Stack) -> None:
    stop(stack.decider)
    fake = FakeDecider(stack.socket)
    try:
        res = stack.calls([("13800138000", "02150001501"), ("13800138000", "02150001502")], "fault")
        assert fake.checks == 2
    finally:
        fake.close()
    # Both calls of a banned caller were forwarded and answered: the faults failed open.
    assert [r[4] for r in res] == ["200", "200"]
    log = stack.kam_log.read_text(errors="replace")
    assert "fault in request_route" in log and "no-port-here" in log
    assert "malformed reply" in log
    stack.start_decider()
    # Kamailio keeps working: the next call is screened again.
    assert stack.calls([("13800138000", "02150001503")], "after_fault")[0][4] == "403"


# ---------------------------------------------------------------- protocol compatibility (in process)
def test_version_1_worker_and_failed_outcome(tmp_path: Path) -> None:
    """A version 1 CHECK (no Call-ID) is still answered, in version 1, and its record keyed by Call-ID;
    a failed call's outcome fills in its final code."""
    st = Stack(tmp_path)   # only for its config; nothing is started
    store = RecordStore(str(st.records_path), 30)
    decider = Decider(str(st.config), background_reload=False, records=store)
    server = DeciderServer(decider, str(tmp_path / "d.sock"))
    try:
        req = proto.CheckRequest("sip:13912340303@gw", "sip:02150001601@gw", "127.0.0.1", "", "v1call|1|z9hG4bKv1")
        data = proto.encode_check(7, req, version=1)
        reply = server.handle(data, None, time.time())
        assert proto.parse_header(reply) == (1, proto.OP_CHECK, 7)
        assert proto.decode_reply(reply).code == 0
        assert server.handle(proto.encode_outcome(proto.OUTCOME_FAILED, 486, time.time(), "v1call"), None,
                             time.time()) == b""
        store.flush()
        recs = store.query(caller="13912340303", limit=0)
        assert [(r["call_id"], r["rule"], r["final_code"], r["answered_at"]) for r in recs] == \
            [("v1call", "allow", 486, None)]
        assert decider.stats["outcomes_failed"] == 1
        # Unanswered calls reach the caller's score once there are enough of them (score.min_outcomes = 5).
        now = time.time()
        for i in range(5):
            server.handle(proto.encode_check(i, proto.CheckRequest("13912340404", f"0215000170{i}", "127.0.0.1", "",
                                                                   f"u{i}|1|z9hG4bKu{i}", f"u{i}")), None, now)
            server.handle(proto.encode_outcome(proto.OUTCOME_FAILED, 480, now, f"u{i}"), None, now)
        v = decider.guard.check("13912340404", "02150001799", source="127.0.0.1", now=now)
        assert dict(v.features).get("unanswered", 0.0) > 0.0, v.features
        # Version 3 is refused with a message, not misread.
        err = server.handle(proto.header_v(3, proto.OP_CHECK, 9), None, time.time())
        assert proto.parse_header(err)[1] == proto.OP_ERROR and b"version 3" in err
    finally:
        server.close()
        decider.close()


def test_decider_keeps_rate_limits_across_a_clean_restart(tmp_path: Path) -> None:
    """SIGTERM writes the snapshot (records.state_path), the next decider reads it before its
    socket opens: a caller over its limit stays over it."""
    from callguard.kamailio.client import DeciderClient

    st = Stack(tmp_path, per_minute=2)
    caller = "13912340909"

    def ask(n: int) -> int:
        client = DeciderClient(st.socket, timeout=2.0)
        try:
            req = proto.CheckRequest(caller, f"0215000{n:04d}", "127.0.0.1", "", f"r{n}|1|z9hG4bKr{n}", f"r{n}")
            return client.check(req).code
        finally:
            client.close()

    st.start_decider()
    try:
        assert [ask(n) for n in range(3)] == [0, 0, 603]      # two allowed, the third over the limit
    finally:
        stop(st.decider)
    assert st.decider.returncode == 0
    assert json.loads((tmp_path / "state.json").read_text())["tracks"][0]
    st.start_decider()
    try:
        assert ask(3) == 603
        assert "snapshot_restored" in st.decider_log.read_text()
    finally:
        stop(st.decider)


def test_client_falls_back_to_a_version_1_decider(tmp_path: Path) -> None:
    """A version 2 worker beside a decider that speaks only version 1: the refused CHECK is asked
    again in version 1; outcomes, which version 1 lacks, are counted as lost instead of sent."""
    from callguard.kamailio.client import DeciderClient

    path = str(tmp_path / "old.sock")
    old = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    old.bind(path)
    old.settimeout(5)
    seen: list[int] = []

    def serve_v1() -> None:
        for _ in range(2):
            data, addr = old.recvfrom(65535)
            version, op, rid = proto.parse_header(data)
            seen.append(version)
            if version != 1:
                old.sendto(proto.header_v(1, proto.OP_ERROR, rid) + b"protocol version 2 not supported", addr)
            else:
                old.sendto(proto.header_v(1, op, rid) + proto.encode_reply_body(403, "banned", 0, 1.0, "No", ""),
                           addr)

    t = threading.Thread(target=serve_v1, daemon=True)
    t.start()
    client = DeciderClient(path, timeout=2.0)
    try:
        reply = client.check(proto.CheckRequest("a", "b", "127.0.0.1", "", "c|1|z9hG4bK1", "c"))
        t.join(5)
        assert seen == [2, 1] and client.version == 1
        assert (reply.code, reply.rule, reply.reason) == (403, "banned", "No")
        assert client.outcome(proto.OUTCOME_ENDED, 0, time.time(), "c") is False
        assert client.outcome_failures == 1
    finally:
        client.close()
        old.close()


def kamailio_stat(st: Stack, name: str) -> int:
    """One Kamailio counter, read over its ctl socket with kamcmd."""
    out = subprocess.run(["kamcmd", "-s", f"unix:{st.tmp / 'kamailio_ctl'}", "stats.get_statistics", "all"],
                         capture_output=True, text=True, timeout=10).stdout
    m = re.search(rf"^{re.escape(name)} = (\d+)$", out, re.M)
    return int(m.group(1)) if m else -1


@pytest.mark.skipif(shutil.which("kamcmd") is None, reason="kamcmd is not installed")
def test_ack_of_a_relayed_failure_is_absorbed(tmp_path: Path) -> None:
    """The caller's ACK of a negative final response the trunk gave is absorbed by the transaction
    (hop by hop), never forwarded: its request URI is Kamailio itself, so forwarding it statelessly
    would send it round Kamailio until Max-Forwards runs out."""
    st = Stack(tmp_path)
    trunk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    trunk.bind(("127.0.0.1", st.uas_port))
    trunk.settimeout(10)

    def no_sipp_trunk() -> None:   # this test is the trunk: it answers 486
        st.env = dict(os.environ)
        st.env["PYTHONPATH"] = str(Path(callguard.__file__).resolve().parent.parent)

    st.start_uas = no_sipp_trunk   # type: ignore[method-assign]
    uac = RawUac(0)
    try:
        st.start()
        uac.kport = st.kport
        call_id = f"ackloop{time.time_ns()}@test"
        ruri = f"sip:02150001901@127.0.0.1:{st.kport}"
        uac.send(uac.request("INVITE", ruri, "13912340909", "02150001901", call_id, 1, "z9hG4bKackloop1"))
        invite, addr = trunk.recvfrom(65535)
        while not invite.startswith(b"INVITE "):
            invite, addr = trunk.recvfrom(65535)
        head = [ln for ln in invite.split(b"\r\n") if re.match(rb"(Via|From|To|Call-ID|CSeq|Record-Route):", ln, re.I)]
        head = [ln + b";tag=trunk486" if ln.lower().startswith(b"to:") else ln for ln in head]
        trunk.sendto(b"\r\n".join([b"SIP/2.0 486 Busy Here", *head, b"Content-Length: 0", b"", b""]), addr)
        final = [r for r in uac.responses(call_id, "INVITE", 1) if status(r) >= 200][0]
        assert status(final) == 486
        to_tag = re.search(rb"^To:.*;tag=([^;\r\n]+)", final, re.M | re.I)
        assert to_tag is not None
        uac.send(uac.request("ACK", ruri, "13912340909", "02150001901", call_id, 1, "z9hG4bKackloop1",
                             to_tag=to_tag.group(1).decode()))
        wait_for(lambda: kamailio_stat(st, "core:rcv_requests_ack") >= 1, 10, "Kamailio to take the ACK",
                 log=st.kam_log)
        # Both workers answer an OPTIONS after it: the ACK was handled, a loop would have run by now.
        for _ in range(4):
            assert options_ok(st.kport)
        assert kamailio_stat(st, "core:rcv_requests_ack") == 1
        assert kamailio_stat(st, "core:fwd_requests") == 0   # stateless forwards: none (tm relayed the INVITE)
    finally:
        uac.close()
        trunk.close()
        st.close()


def test_what_no_verdict_covers_is_never_an_open_relay(tmp_path: Path) -> None:
    """127.0.0.1 trusted, 127.0.0.2 not.  A field that is not UTF-8 is screened like serve screens it
    (it failed open, relayed whatever the caller); an INVITE with a To-tag from an untrusted source
    goes to a trunk only; with the decider down only trusted sources and emergency calls fail open;
    a CANCEL that matches nothing gets 481."""
    st = Stack(tmp_path)
    st.config_text = st.config_text.replace("networks: [127.0.0.0/8]", "networks: [127.0.0.1/32]")
    st.config.write_text(st.config_text)
    trunk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    trunk.bind(("127.0.0.1", st.uas_port))
    elsewhere = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # a loopback target that is no trunk
    elsewhere.bind(("127.0.0.1", 0))
    st.start_uas = lambda: None   # type: ignore[method-assign]   # this test is the trunk
    trusted, untrusted = RawUac(0), RawUac(0, host="127.0.0.2")

    def invites_at(sock: socket.socket, wait: float) -> list[bytes]:
        got = []
        sock.settimeout(wait)
        try:
            while True:
                data = sock.recv(65535)
                if data.startswith(b"INVITE "):
                    got.append(data)
                    sock.settimeout(0.2)
        except TimeoutError:
            return got

    def final(uac: RawUac, call_id: str, method: str = "INVITE") -> bytes:
        return [r for r in uac.responses(call_id, method, 1) if status(r) >= 200][0]

    try:
        st.start()
        trusted.kport = untrusted.kport = st.kport
        ruri = f"sip:02150001234@127.0.0.1:{st.kport}"
        # a banned caller with a byte that is not UTF-8 in its From: screened, 403 banned
        msg = trusted.request("INVITE", ruri, "13800138000", "02150001234", "nonutf8@test", 1, "z9hG4bKnu1")
        trusted.send(msg.replace(b"@127.0.0.1>;tag=", b"@127.0.0.1;x=\xff>;tag=", 1))
        reply = final(trusted, "nonutf8@test")
        assert status(reply) == 403 and "banned" in header_values(reply, "Reason")[0]
        # an INVITE with a To-tag from the untrusted source, to a loopback port that is no trunk
        target = f"sip:02150001234@127.0.0.1:{elsewhere.getsockname()[1]}"
        untrusted.send(untrusted.request("INVITE", target, "13912340001", "02150001234", "totag@test", 1,
                                         "z9hG4bKtt1", to_tag="forged"))
        assert status(final(untrusted, "totag@test")) == 403
        untrusted.send(untrusted.request("INVITE", target, "13912340001", "02150001234", "route@test", 1,
                                         "z9hG4bKtt2", to_tag="forged", routes=(f"<sip:127.0.0.1:{st.kport};lr>",)))
        assert status(final(untrusted, "route@test")) == 403
        # a CANCEL of nothing
        trusted.send(trusted.request("CANCEL", ruri, "13912340002", "02150001234", "cancel@test", 1, "z9hG4bKc1"))
        assert status(final(trusted, "cancel@test", "CANCEL")) == 481
        # the decider down: untrusted refused, untrusted emergency and trusted relayed
        stop(st.decider)
        untrusted.send(untrusted.request("INVITE", ruri, "13912340003", "02150001234", "down1@test", 1, "z9hG4bKd1"))
        refused = final(untrusted, "down1@test")
        assert status(refused) == 403 and "untrusted_source" in header_values(refused, "Reason")[0]
        untrusted.send(untrusted.request("INVITE", f"sip:110@127.0.0.1:{st.kport}", "13912340003", "110",
                                         "down2@test", 1, "z9hG4bKd2"))
        trusted.send(trusted.request("INVITE", ruri, "13912340004", "02150001234", "down3@test", 1, "z9hG4bKd3"))
        relayed = invites_at(trunk, 10)
        deadline = time.monotonic() + 10
        while len(relayed) < 2 and time.monotonic() < deadline:
            relayed += invites_at(trunk, 1)
        ids = sorted(header_values(r, "Call-ID")[0] for r in relayed)
        assert ids == ["down2@test", "down3@test"], ids
        assert invites_at(elsewhere, 0.3) == []
        assert not any(b"nonutf8@test" in r or b"totag@test" in r for r in relayed)
    finally:
        trusted.close()
        untrusted.close()
        trunk.close()
        elsewhere.close()
        st.close()


def test_long_fields_stay_apart_and_a_reused_transaction_key_is_screened(tmp_path: Path) -> None:
    """Fields past the wire's 4 KiB keep a digest of the whole: INVITEs whose Call-IDs share their
    first 4 KiB are different calls (each counted, each recorded).  And a cached verdict answers
    only the very same request: another caller reusing an allowed call's Call-ID, CSeq and branch
    is screened (Kamailio's transaction is gone after a few seconds, the decider's cache is not)."""
    st = Stack(tmp_path, per_minute=2)   # only for its config; nothing is started
    a, b = "L" * 5000 + "-a", "L" * 5000 + "-b"
    raw_a = proto.encode_check(1, proto.CheckRequest("13912340001", "02150001234", "127.0.0.1", "", a + "|1|z", a))
    raw_b = proto.encode_check(2, proto.CheckRequest("13912340001", "02150001234", "127.0.0.1", "", b + "|1|z", b))
    got_a, got_b = proto.decode_check(raw_a), proto.decode_check(raw_b)
    assert got_a.call_id != got_b.call_id and got_a.txkey != got_b.txkey
    assert len(got_a.call_id.encode()) == proto.MAX_FIELD and got_a.call_id.startswith("L" * 4000)
    decider = Decider(str(st.config), background_reload=False)
    try:
        now = time.time()
        # the requests as the decider gets them off the wire: Call-IDs sharing 5000 characters
        sent = [proto.CheckRequest("13912340001", "02150001234", "127.0.0.1", "", f"{a}{i}|1|z", f"{a}{i}")
                for i in range(4)]
        codes = [decider.decide(proto.decode_check(proto.encode_check(i, req)), now).code
                 for i, req in enumerate(sent)]
        assert codes == [0, 0, 603, 603]        # per_minute 2: the third is over, none taken for a retransmission
        key = "reused@x|1|z9hG4bKreused"
        assert decider.decide(proto.CheckRequest("13912349999", "02150001234", "127.0.0.1", "", key, "reused@x"),
                              now).code == 0
        banned = decider.decide(proto.CheckRequest("13800138000", "02150001234", "127.0.0.1", "", key, "reused@x"),
                                now)
        assert (banned.code, banned.rule) == (403, "banned")
        again = decider.decide(proto.CheckRequest("13912349999", "02150001234", "127.0.0.1", "", key, "reused@x"),
                               now)
        assert again.code == 0 and decider.stats["retransmissions"] == 1     # the same request: its verdict
    finally:
        decider.close()


def test_the_decider_does_not_reload_a_list_still_being_written(tmp_path: Path) -> None:
    """The file watcher reloads a changed list only once it has stayed as it is for a watch interval
    and its last line is finished: it swapped in a blocklist caught half written, bans lost."""
    st = Stack(tmp_path)   # only for its config; nothing is started
    decider = Decider(str(st.config), background_reload=True)

    def settle(now: float) -> float:
        for _ in range(4):
            now += 1.1
            decider.poll(now)
            if decider._loading is not None:
                decider._loading.join(30)
            decider.poll(now)
        return now

    def rule(caller: str, now: float) -> str:
        return decider.decide(proto.CheckRequest(caller, "02150001234", "127.0.0.1", "", "", ""), now).rule

    try:
        now = time.time()
        assert rule("13800138000", now) == "banned"
        full = st.blocklist.read_text()
        generation = decider.generation
        st.blocklist.write_text(full + "13700137001,exact,regulator,new ban,,,,\n13700137002,exact,regu")
        now = settle(now)
        assert decider.generation == generation                 # not swapped in: still being written
        assert rule("13800138000", now) == "banned"
        with open(st.blocklist, "a") as f:
            f.write("lator,new ban,,,,\n")
        now = settle(now)
        assert decider.generation == generation + 1
        assert [rule(n, now) for n in ("13800138000", "13700137001", "13700137002")] == ["banned"] * 3
    finally:
        decider.close()
