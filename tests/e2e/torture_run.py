"""Send the RFC 4475 torture corpus through ``callguard serve`` and write what happened as JSON.

Meant to run inside a private network namespace that has only loopback
(``unshare --net``), so that nothing the proxy might send towards the messages' foreign
Via, Route or Request-URI hosts can leave the machine; when ``strace`` is available the
proxy runs under it and every destination it tried to send to is reported.

For each corpus file, in manifest order: the raw bytes go to the proxy from a fresh UDP
socket; an OPTIONS ping from another socket is then answered 200, which proves the proxy
has handled the torture datagram (one event loop, datagrams in order) and that it is still
alive. The trunk is a UDP socket that records everything and answers like a busy phone
(486 to INVITE, 200 to other requests). At the end a marker INVITE is forwarded, so
everything sent to the trunk before it has arrived.

Usage: ``python tests/e2e/torture_run.py CORPUS_DIR WORK_DIR OUT.json``
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers  # noqa: E402

CALL_ID_RE = re.compile(rb"^(?:call-id|i)[ \t]*:[ \t]*(\S+)", re.I | re.M)


def call_id_of(data: bytes) -> str:
    head = data.split(b"\r\n\r\n", 1)[0]
    m = CALL_ID_RE.search(head)
    return m.group(1).decode("utf-8", "replace") if m else ""


class AnsweringTrunk(helpers.UdpSink):
    """The sink trunk: records every datagram and answers requests like a busy phone."""

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
            text = data.decode("utf-8", "replace")
            method = helpers.method_of(text)
            if method and method != "ACK":
                code = "486 Busy Here" if method == "INVITE" else "200 OK"
                try:
                    self.sock.sendto(self._response(text, code), addr)
                except OSError:
                    pass

    @staticmethod
    def _response(req: str, status: str) -> bytes:
        head = req.split("\r\n\r\n", 1)[0].split("\r\n")
        keep = []
        for line in head[1:]:
            name = line.split(":", 1)[0].strip().lower()
            if name in ("via", "v", "from", "f", "call-id", "i", "cseq"):
                keep.append(line)
            elif name in ("to", "t"):
                keep.append(line if ";tag=" in line else line + ";tag=trunk")
        return ("\r\n".join([f"SIP/2.0 {status}", *keep, "Content-Length: 0", "", ""])).encode()


def _strace_destinations(path: Path) -> list[str]:
    """Every address the traced proxy tried to send to or connect to (from strace's output)."""
    out: list[str] = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        if not re.search(r"\b(sendto|sendmsg|sendmmsg|connect)\(", line):
            continue
        for m in re.finditer(r'sin_port=htons\((\d+)\), sin_addr=inet_addr\("([^"]+)"\)', line):
            out.append(f"{m.group(2)}:{m.group(1)}")
        for m in re.finditer(r'sin6_port=htons\((\d+)\).*?inet_pton\(AF_INET6, "([^"]+)"', line):
            out.append(f"[{m.group(2)}]:{m.group(1)}")
        if "sun_path" in line or "AF_NETLINK" in line:
            continue
    return out


def _drain(s: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            resp, _ = s.recvfrom(65535)
        except (BlockingIOError, ConnectionRefusedError):
            return out
        out.append(resp.decode("utf-8", "replace"))


def main() -> int:
    corpus, work, out_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    work.mkdir(parents=True, exist_ok=True)
    manifest = [ln.split("\t") for ln in (corpus / "manifest.tsv").read_text().splitlines()[1:] if ln.strip()]
    trunk = AnsweringTrunk()
    port = helpers.free_udp_port()
    cfg = helpers.make_config(work, listen_port=port, trunk_port=trunk.port, record_route=True)
    strace = shutil.which("strace")
    trace = work / "strace.txt"
    wrapper = [strace, "-f", "-qq", "-e", "trace=sendto,sendmsg,sendmmsg,connect", "-o", str(trace)] if strace else []
    proxy = helpers.start_proxy(cfg, port, wrapper=wrapper, startup_timeout=40.0)
    results: dict[str, Any] = {"files": {}, "strace": bool(strace)}
    try:
        sockets: dict[str, socket.socket] = {}
        for row in manifest:
            name = row[0]
            data = (corpus / name).read_bytes()
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            sockets[name] = s
            s.sendto(data, ("127.0.0.1", port))
            ping = helpers.options_ping(port, 5.0)
            results["files"][name] = {
                "call_id": call_id_of(data),
                "responses": _drain(s),
                "alive_after": ping is not None and helpers.status_of(ping) == 200,
            }
        # barrier: a valid INVITE from a number, forwarded to the trunk after everything else
        uac = helpers.RawUac(port)
        marker, ids = uac.invite_bytes("13812345678", "13987654321")
        uac.send(marker)
        helpers.wait_until(lambda: any(ids["call_id"] in m for m in trunk.messages()), 10, "the marker INVITE")
        final = uac.final(ids["call_id"], 10)
        uac.ack(ids, final)
        uac.close()
        results["marker_final"] = helpers.status_of(final)
        # answers that came later than the ping (e.g. after an asynchronous DNS lookup)
        for name, s in sockets.items():
            results["files"][name]["late_responses"] = _drain(s)
            s.close()
        ping = helpers.options_ping(port, 5.0)
        results["alive_at_end"] = ping is not None and helpers.status_of(ping) == 200
    finally:
        code = proxy.stop(30.0)
        trunk.close()
    by_call: dict[str, list[str]] = {}
    for raw, _addr in trunk.received:
        # surrogateescape: the exact bytes survive the JSON round trip (binary bodies are compared)
        by_call.setdefault(call_id_of(raw), []).append(raw.decode("utf-8", "surrogateescape"))
    for _name, info in results["files"].items():
        info["forwarded"] = by_call.get(info["call_id"], []) if info["call_id"] else []
    results["trunk_call_ids"] = sorted(by_call)
    results["exit_code"] = code
    results["destinations"] = sorted(set(_strace_destinations(trace)))
    results["log_tail"] = proxy.log_lines[-80:]
    results["faults"] = [ln for ln in proxy.log_lines if '"fault"' in ln or "Traceback" in ln][:20]
    out_path.write_text(json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


def run_isolated(corpus: Path, work: Path, out: Path, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run this driver in a fresh network namespace with only loopback up."""
    script = Path(__file__).resolve()
    inner = f'ip link set lo up && exec "$0" "{script}" "{corpus}" "{work}" "{out}"'
    return subprocess.run(["unshare", "--net", "--", "sh", "-c", inner, sys.executable], capture_output=True,
                          text=True, timeout=timeout, env=helpers.serve_env())


def isolation_available() -> bool:
    """Whether this machine lets us make a private network namespace (root, unshare and ip present)."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    try:
        proc = subprocess.run(["unshare", "--net", "--", "ip", "link", "set", "lo", "up"], capture_output=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


if __name__ == "__main__":
    sys.exit(main())
