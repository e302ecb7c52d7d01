"""Real peers for the end-to-end tests: the proxy process, pjsua2 workers, SIPp, UDP sinks.

Everything waits for events with a deadline; nothing sleeps in place of an event.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
SIPP_DIR = ROOT / "tests" / "sipp"
PEER_SCRIPT = ROOT / "tests" / "pjsua_peer.py"
SIPP = shutil.which("sipp") or "/usr/bin/sipp"


# ---------------------------------------------------------------- ports and waiting
def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago (bind port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``pred`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------- SIP text
def header(msg: str, name: str, compact: str | None = None) -> list[str]:
    """All values of a header (case-insensitive, compact form too), in order."""
    head = msg.split("\r\n\r\n", 1)[0].replace("\r\n", "\n")
    # unfold continuation lines
    head = re.sub(r"\n[ \t]+", " ", head)
    names = {name.lower()} | ({compact.lower()} if compact else set())
    out = []
    for line in head.split("\n")[1:]:
        if ":" not in line:
            continue
        n, v = line.split(":", 1)
        if n.strip().lower() in names:
            out.append(v.strip())
    return out


def vias(msg: str) -> list[str]:
    """Every Via value in order, comma-joined values split."""
    out: list[str] = []
    for v in header(msg, "Via", "v"):
        out.extend(p.strip() for p in re.split(r",(?=\s*SIP/)", v))
    return out


def status_of(msg: str) -> int | None:
    m = re.match(r"SIP/2\.0 (\d{3})", msg)
    return int(m.group(1)) if m else None


def method_of(msg: str) -> str | None:
    m = re.match(r"([A-Za-z!%*_+`'~.-]+) \S+ SIP/", msg)
    return m.group(1) if m else None


def build_request(method: str, ruri: str, *, caller: str, callee: str, port: int, call_id: str | None = None,
                  branch: str | None = None, cseq: int = 1, extra: Iterable[str] = (), body: str = "") -> bytes:
    """A plain RFC 3261 request from 127.0.0.1:port."""
    call_id = call_id or f"{uuid.uuid4().hex}@127.0.0.1"
    branch = branch or f"z9hG4bK{uuid.uuid4().hex[:16]}"
    lines = [
        f"{method} {ruri} SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch={branch};rport",
        "Max-Forwards: 70",
        f"From: <sip:{caller}@127.0.0.1>;tag={uuid.uuid4().hex[:8]}",
        f"To: <sip:{callee}@127.0.0.1>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        f"Contact: <sip:{caller}@127.0.0.1:{port}>",
        *extra,
        f"Content-Length: {len(body.encode())}",
        "",
        body,
    ]
    return "\r\n".join(lines).encode()


# ---------------------------------------------------------------- a UDP socket that records
class UdpSink:
    """A UDP socket on 127.0.0.1 that records every datagram (a stand-in trunk or a caller)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self._lock = threading.Lock()
        self._stop = False
        self.sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.received.append((data, addr))

    def messages(self) -> list[str]:
        with self._lock:
            return [d.decode("utf-8", "replace") for d, _ in self.received]

    def clear(self) -> None:
        with self._lock:
            self.received.clear()

    def send(self, data: bytes, port: int) -> None:
        self.sock.sendto(data, ("127.0.0.1", port))

    def close(self) -> None:
        self._stop = True
        self._thread.join(1.0)
        self.sock.close()


class RawUac:
    """A bare UDP user-agent client for single requests (exact control over retransmissions)."""

    def __init__(self, proxy_port: int) -> None:
        self.proxy_port = proxy_port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])

    def invite_bytes(self, caller: str, callee: str) -> tuple[bytes, dict[str, str]]:
        ids = {"call_id": f"{uuid.uuid4().hex}@127.0.0.1", "branch": f"z9hG4bK{uuid.uuid4().hex[:16]}",
               "tag": uuid.uuid4().hex[:8], "caller": caller, "callee": callee}
        data = self._request("INVITE", ids, 1)
        return data, ids

    def _request(self, method: str, ids: dict[str, str], cseq: int, to_tag: str = "") -> bytes:
        to = f"<sip:{ids['callee']}@127.0.0.1>" + (f";tag={to_tag}" if to_tag else "")
        lines = [
            f"{method} sip:{ids['callee']}@127.0.0.1:{self.proxy_port} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch={ids['branch']};rport",
            "Max-Forwards: 70",
            f"From: <sip:{ids['caller']}@127.0.0.1>;tag={ids['tag']}",
            f"To: {to}",
            f"Call-ID: {ids['call_id']}",
            f"CSeq: {cseq} {method}",
            f"Contact: <sip:{ids['caller']}@127.0.0.1:{self.port}>",
            "Content-Length: 0",
            "",
            "",
        ]
        return "\r\n".join(lines).encode()

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, ("127.0.0.1", self.proxy_port))

    def final(self, call_id: str, timeout: float = 5.0, method: str = "INVITE") -> str:
        """Wait for the final response of this Call-ID and CSeq method (provisional ones are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no final response for {call_id} within {timeout}s")
            self.sock.settimeout(left)
            try:
                data, _ = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            text = data.decode("utf-8", "replace")
            code = status_of(text)
            cseq = " ".join(header(text, "CSeq"))
            if code and code >= 200 and call_id in " ".join(header(text, "Call-ID", "i")) and method in cseq:
                return text

    def ack(self, ids: dict[str, str], response: str) -> None:
        """ACK a non-2xx final response (same branch: it belongs to the INVITE transaction)."""
        to_tag = ""
        for t in header(response, "To", "t"):
            m = re.search(r";\s*tag=([^;>\s]+)", t)
            if m:
                to_tag = m.group(1)
        self.send(self._request("ACK", ids, 1, to_tag))

    def call(self, caller: str, callee: str, timeout: float = 5.0) -> str:
        """INVITE, wait for the final response, ACK it if it is an error; return the response."""
        data, ids = self.invite_bytes(caller, callee)
        self.send(data)
        resp = self.final(ids["call_id"], timeout)
        if (status_of(resp) or 0) >= 300:
            self.ack(ids, resp)
        return resp

    def close(self) -> None:
        self.sock.close()


def options_ping(port: int, timeout: float = 0.5) -> str | None:
    """Send one OPTIONS to the proxy at 127.0.0.1:port; return the response text or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(timeout)
        me = s.getsockname()[1]
        s.sendto(build_request("OPTIONS", f"sip:127.0.0.1:{port}", caller="health", callee="proxy", port=me),
                 ("127.0.0.1", port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data, _ = s.recvfrom(65535)
            except (TimeoutError, ConnectionRefusedError):
                return None
            text = data.decode("utf-8", "replace")
            if status_of(text) and (status_of(text) or 0) >= 200:
                return text
    return None


# ---------------------------------------------------------------- the proxy under test
def package_dir() -> Path:
    """Where ``callguard`` is imported from: the installed package if there is one, else ``src``."""
    import importlib.util

    spec = importlib.util.find_spec("callguard")
    if spec is not None and spec.origin:
        return Path(spec.origin).resolve().parent
    return SRC / "callguard"


def serve_command() -> list[str]:
    """``callguard serve`` as ``python -m callguard`` (same interpreter), else the console script."""
    if (package_dir() / "__main__.py").exists():
        return [sys.executable, "-m", "callguard", "serve"]
    script = shutil.which("callguard")
    if script:
        return [script, "serve"]
    return [sys.executable, "-m", "callguard", "serve"]


def serve_env() -> dict[str, str]:
    """Environment for the proxy: the package's folder on PYTHONPATH; the pure-Python core when the
    compiled one is not built there."""
    env = dict(os.environ)
    pkg = package_dir()
    env["PYTHONPATH"] = str(pkg.parent) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if not list(pkg.glob("_core*.so")):
        env["CALLGUARD_NO_EXTENSIONS"] = "1"
    return env


@dataclass
class ProxyProcess:
    """A running ``callguard serve`` and its JSON log lines (stderr)."""

    config_path: Path
    port: int
    proc: subprocess.Popen[bytes]
    log_lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None
    signal_pid: int = 0  # the proxy itself when it runs under a wrapper (strace): signals go there

    def _signal(self, sig: int) -> None:
        os.kill(self.signal_pid or self.proc.pid, sig)

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.log_lines):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out

    def log_text(self, last: int = 60) -> str:
        return "\n".join(self.log_lines[-last:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def reload(self) -> None:
        self._signal(signal.SIGHUP)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait, return the exit code (kill and raise if it does not exit)."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(
                    f"callguard serve did not exit {timeout}s after SIGTERM:\n{self.log_text()}") from None
        if self._reader is not None:
            self._reader.join(5)
        return int(self.proc.returncode)


def start_proxy(config_path: Path, port: int, *, startup_timeout: float = 20.0,
                extra_args: Iterable[str] = (), wrapper: Iterable[str] = ()) -> ProxyProcess:
    """Start ``callguard serve --config FILE`` and wait until OPTIONS is answered 200."""
    env = serve_env()
    wrapper = list(wrapper)
    cmd = [*wrapper, *serve_command(), "--config", str(config_path), *extra_args]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env, cwd=str(config_path.parent))
    pp = ProxyProcess(config_path=config_path, port=port, proc=proc)

    def read() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            pp.log_lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    pp._reader = threading.Thread(target=read, daemon=True)
    pp._reader.start()
    deadline = time.monotonic() + startup_timeout
    while True:
        if proc.poll() is not None:
            if pp._reader is not None:
                pp._reader.join(2)
            raise AssertionError(f"callguard serve exited with {proc.returncode} at start:\n{pp.log_text()}")
        resp = options_ping(port, 0.3)
        if resp is not None and status_of(resp) == 200:
            if wrapper:
                children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                pp.signal_pid = int(children[0])
            return pp
        if time.monotonic() >= deadline:
            proc.kill()
            proc.wait(5)
            raise AssertionError(f"callguard serve did not answer OPTIONS within {startup_timeout}s:\n"
                                 f"{pp.log_text()}")


# ---------------------------------------------------------------- config and lists
BANNED = "13800138000"          # on the blocklist (exact)
BANNED_PREFIX = "1710000"       # blocklist prefix entry
INBOUND_95 = "95555"            # filed, inbound only
FILED_95 = "95588"              # filed, outbound allowed
AREA_96 = "0391"
INBOUND_96 = "96123"            # filed in 0391, inbound only
ALLOWED = "10085"               # allowlisted (skips high_frequency)
RELOAD_BANNED = "13300000001"   # added to the blocklist by the reload test


def write_lists(folder: Path, extra_banned: Iterable[str] = ()) -> dict[str, str]:
    """Small CSV lists for the tests; returns the lists section of a config."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        "number,match,source,reason,added,expires,p",
        f"{BANNED},exact,regulator,fraud report,2026-01-10,,",
        f"{BANNED_PREFIX},prefix,manual,robocall range,2026-01-10,,",
        *(f"{n},exact,manual,added by test,2026-01-10,," for n in extra_banned),
    ]
    (folder / "blocklist.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "service_numbers.csv").write_text(
        "number,area,carrier,usage,inbound,outbound,valid_from,valid_until\n"
        f"{FILED_95},,China Telecom,bank customer service,true,true,2024-01-01,2099-12-31\n"
        f"{INBOUND_95},,China Unicom,bank hotline (inbound only),true,false,2024-01-01,2099-12-31\n"
        f"{INBOUND_96},{AREA_96},China Telecom,utility hotline (inbound only),true,false,2024-01-01,2099-12-31\n",
        encoding="utf-8")
    (folder / "allowlist.csv").write_text(
        f"number,match,reason\n{ALLOWED},exact,unified outbound platform\n", encoding="utf-8")
    return {"blocklist": "lists/blocklist.csv", "service_numbers": "lists/service_numbers.csv",
            "allowlist": "lists/allowlist.csv"}


def make_config(folder: Path, *, listen_port: int, trunk_port: int, record_route: bool = True,
                max_calls: int = 1000, window: float = 60.0, extra_banned: Iterable[str] = (),
                sip: dict[str, Any] | None = None) -> Path:
    """Write callguard.yaml + lists into ``folder``; return the config path."""
    folder.mkdir(parents=True, exist_ok=True)
    lists = write_lists(folder / "lists", extra_banned)
    sip_section: dict[str, Any] = {
        "listen": [f"udp:127.0.0.1:{listen_port}"],
        "record_route": record_route,
        "transaction_timeout": 8,
        "shutdown_grace": 2,
    }
    sip_section.update(sip or {})
    cfg: dict[str, Any] = {
        "sources": [{"name": "loopback", "networks": ["127.0.0.0/8"], "customer": "local",
                     "direction": "outbound", "trust_identity": True}],
        "trunks": [{"name": "trunk", "address": f"udp:127.0.0.1:{trunk_port}"}],
        "rate_limits": [{"name": "burst", "window": window, "max_calls": max_calls}],
        # Behaviour features off: a quick burst of short test calls must not push a caller over the
        # score threshold; the rules under test here are the list and rate-limit ones.
        "score": {"threshold": 0.75, "weights": {"attempt_rate": 0.0, "distinct_ratio": 0.0,
                                                 "unanswered": 0.0, "short_calls": 0.0}},
        "lists": lists,
        "sip": sip_section,
        "records": {"enabled": True, "path": str(folder / "records.sqlite3"),
                    "state_path": str(folder / "state.json")},
        "logging": {"level": "info", "format": "json"},
        "metrics": {"enabled": False, "listen": f"127.0.0.1:{free_tcp_port()}"},
    }
    path = folder / "callguard.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------- pjsua2 workers
class PjsuaPeer:
    """A ``tests/pjsua_peer.py`` subprocess: send JSON commands, wait for JSON events."""

    def __init__(self, answer: str = "auto", ident: str = "", start_timeout: float = 15.0) -> None:
        cmd = [sys.executable, str(PEER_SCRIPT), "--answer", answer]
        if ident:
            cmd += ["--id", ident]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=str(ROOT))
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._lock = threading.Lock()
        self._t_out = threading.Thread(target=self._read_out, daemon=True)
        self._t_err = threading.Thread(target=self._read_err, daemon=True)
        self._t_out.start()
        self._t_err.start()
        ready = self.wait_event(lambda e: e.get("event") == "ready", start_timeout, "pjsua peer ready")
        self.port = int(ready["port"])

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                ev = json.loads(raw)
            except ValueError:
                ev = {"event": "garbage", "text": raw.decode("utf-8", "replace")}
            with self._lock:
                self.events.append(ev)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.stderr.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def find(self, pred: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if pred(e)]

    def wait_event(self, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            hits = self.find(pred)
            if hits:
                return hits[0]
            if self.proc.poll() is not None:
                raise AssertionError(f"pjsua peer exited ({self.proc.returncode}) while waiting for {what}:\n"
                                     + "\n".join(self.stderr[-30:]))
            return None

        return wait_until(probe, timeout, what)

    def call(self, uri: str, caller_uri: str) -> int:
        """Start a call; return its id in the worker."""
        before = len(self.find(lambda e: e.get("event") == "called"))
        self.send(cmd="call", uri=uri, **{"from": caller_uri})
        ev = wait_until(lambda: self.find(lambda e: e.get("event") == "called")[before:], 5.0, "call started")
        return int(ev[0]["call"])

    def set_mode(self, answer: str) -> None:
        """Change how the worker answers incoming calls (auto, ring, manual)."""
        before = len(self.find(lambda e: e.get("event") == "mode"))
        self.send(cmd="mode", answer=answer)
        wait_until(lambda: self.find(lambda e: e.get("event") == "mode")[before:], 5.0, f"mode {answer}")

    def incoming(self, call_id: str) -> list[dict[str, Any]]:
        """Incoming-call events whose INVITE carries this Call-ID."""
        return self.find(lambda e: e.get("event") == "incoming"
                         and call_id in header(str(e.get("msg", "")), "Call-ID", "i"))

    def state(self, call: int, state: str, timeout: float = 10.0) -> dict[str, Any]:
        return self.wait_event(lambda e: e.get("event") == "state" and e.get("call") == call
                               and e.get("state") == state, timeout, f"call {call} state {state}")

    def close(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            try:
                self.send(cmd="quit")
                self.proc.wait(timeout)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        self._t_out.join(2)
        self._t_err.join(2)
        return int(self.proc.returncode)


# ---------------------------------------------------------------- SIPp
@dataclass
class SippResult:
    returncode: int
    stdout: str
    stderr: str
    stats: dict[str, str]
    counts: dict[str, str] = field(default_factory=dict)
    errors: str = ""

    def stat(self, key: str) -> int:
        """An integer statistic, e.g. ``SuccessfulCall(C)`` (cumulative)."""
        return int(self.stats.get(key, "0") or 0)

    def count(self, suffix: str) -> int:
        """Sum of the per-message counters whose name ends with ``suffix`` (e.g. ``_603_Recv``)."""
        return sum(int(v or 0) for k, v in self.counts.items() if k.endswith(suffix))

    def describe(self) -> str:
        keep = ("SuccessfulCall(C)", "FailedCall(C)", "Retransmissions(C)", "FailedUnexpectedMessage(C)",
                "FailedMaxUDPRetrans(C)", "FailedCallRejected(C)", "FailedCmdNotSent(C)", "OutOfCallMsgs(C)",
                "DeadCallMsgs(C)", "TotalCallCreated")
        return (f"rc={self.returncode} " + ", ".join(f"{k}={self.stats.get(k)}" for k in keep)
                + f"\ncounts={self.counts}\nerrors={self.errors[-1500:]}\nstderr={self.stderr[-800:]}")


def _last_stats(path: Path) -> dict[str, str]:
    """The last row of a SIPp ``-trace_stat`` CSV (semicolon separated) as a dict."""
    if not path.exists():
        return {}
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    if len(lines) < 2:
        return {}
    head = lines[0].rstrip(";").split(";")
    row = lines[-1].rstrip(";").split(";")
    return dict(zip(head, row))


class Sipp:
    """Run SIPp scenarios from ``tests/sipp`` against loopback ports."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)

    def start_uas(self, scenario: str, *, port: int = 0,
                  extra: Iterable[str] = ()) -> tuple[subprocess.Popen[bytes], int]:
        """Start a SIPp UAS in the background on 127.0.0.1 (port 0: find one); return (process, port)."""
        port = port or free_udp_port()
        cmd = [SIPP, "-sf", str(SIPP_DIR / scenario), "-i", "127.0.0.1", "-p", str(port), "-t", "u1",
               "-nostdin", "-buff_size", "1048576", "-trace_err",
               "-error_file", str(self.workdir / f"uas-{port}-errors.log"), *extra]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, cwd=str(self.workdir))
        return proc, port

    def start_uac(self, scenario: str, target_port: int, *, calls: int, rate: int = 10,
                  rate_period_ms: int = 1000, limit: int | None = None, inject: Path | None = None,
                  extra: Iterable[str] = (), timeout: float = 60.0, name: str = "uac") -> UacRun:
        """Start a SIPp UAC (-m calls) in the background; ``.wait()`` gives its final statistics."""
        rundir = self.workdir / name
        if rundir.exists():
            shutil.rmtree(rundir)
        rundir.mkdir(parents=True)
        cmd = [SIPP, f"127.0.0.1:{target_port}", "-sf", str(SIPP_DIR / scenario), "-i", "127.0.0.1",
               "-p", str(free_udp_port()), "-t", "u1", "-m", str(calls), "-r", str(rate),
               "-rp", str(rate_period_ms), "-l", str(limit or max(calls, 1)), "-nostdin",
               "-buff_size", "1048576", "-timeout", f"{int(timeout)}s", "-timeout_error",
               "-trace_stat", "-stf", str(rundir / "stat.csv"), "-fd", "1", "-trace_err",
               "-error_file", str(rundir / "errors.log"), "-trace_counts", *extra]
        if inject is not None:
            cmd += ["-inf", str(inject)]
        out = (rundir / "stdout.txt").open("wb")
        err = (rundir / "stderr.txt").open("wb")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=str(rundir))
        out.close()
        err.close()
        return UacRun(proc, rundir, timeout + 15)

    def run_uac(self, scenario: str, target_port: int, **kw: Any) -> SippResult:
        """Run a SIPp UAC to completion and return its final statistics."""
        return self.start_uac(scenario, target_port, **kw).wait()


@dataclass
class UacRun:
    """A SIPp UAC running in the background."""

    proc: subprocess.Popen[bytes]
    rundir: Path
    timeout: float

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self) -> SippResult:
        try:
            self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        counts = next(iter(self.rundir.glob("*_counts.csv")), None)
        errors = self.rundir / "errors.log"
        return SippResult(int(self.proc.returncode), (self.rundir / "stdout.txt").read_text(errors="replace"),
                          (self.rundir / "stderr.txt").read_text(errors="replace"),
                          _last_stats(self.rundir / "stat.csv"), _last_stats(counts) if counts else {},
                          errors.read_text(errors="replace") if errors.exists() else "")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """Stop a helper process we started (SIGTERM, then SIGKILL)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return int(proc.returncode)


def write_inject(path: Path, rows: Iterable[Iterable[str]], order: str = "SEQUENTIAL") -> Path:
    """A SIPp injection CSV (first line is the read order)."""
    path.write_text(order + "\n" + "".join(";".join(r) + ";\n" for r in rows), encoding="utf-8")
    return path
