"""Processes: free ports, per-process CPU from /proc, starting and stopping what the bench owns.

BENCH-NOTES: /proc/stat is unreliable on these virtual machines, so CPU is always read per
process from /proc/PID/stat (utime + stime, plus cutime + cstime of children already reaped).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that is free now (bind 0, read back, release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_udp_ports(n: int) -> list[int]:
    """``n`` distinct free UDP ports (all held until all are chosen, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rfind(")") + 2:].split()


def cpu_seconds(pid: int, with_reaped_children: bool = True) -> float:
    """utime + stime (+ cutime + cstime) of one process in seconds; 0.0 when it is gone."""
    f = _stat_fields(pid)
    if f is None:
        return 0.0
    ticks = int(f[11]) + int(f[12])          # utime, stime (fields 14, 15)
    if with_reaped_children:
        ticks += int(f[13]) + int(f[14])     # cutime, cstime (fields 16, 17)
    return ticks / CLK_TCK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of one process, keyed ``"<thread name>/<tid>"`` (empty when it is gone)."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        out[f"{name}/{tid}"] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def children_map() -> dict[int, list[int]]:
    """ppid -> child pids for every process on the machine."""
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = _stat_fields(int(name))
        if f is not None:
            out.setdefault(int(f[1]), []).append(int(name))
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    kids = children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def tree_cpu(pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds per process of the trees rooted at ``pids`` (children counted once, via their own stat)."""
    out: dict[int, float] = {}
    for root in pids:
        for p in tree(root):
            out[p] = cpu_seconds(p, with_reaped_children=False)
        # Children that already exited are in the root's cutime/cstime.
        f = _stat_fields(root)
        if f is not None:
            out[-root] = (int(f[13]) + int(f[14])) / CLK_TCK
    return out


def udp_drops() -> dict[int, int]:
    """Datagrams the kernel dropped per bound local UDP port (receive buffer full), from /proc/net/udp."""
    out: dict[int, int] = {}
    try:
        with open("/proc/net/udp") as fh:
            next(fh)
            for line in fh:
                f = line.split()
                port = int(f[1].rsplit(":", 1)[1], 16)
                out[port] = out.get(port, 0) + int(f[-1])
    except (OSError, ValueError, IndexError):
        pass
    return out


def kernel_threads(prefix: str = "ksoftirqd") -> list[int]:
    """Pids of kernel threads whose name starts with ``prefix`` (softirq work on loopback runs there
    when the machine is busy, and its CPU belongs to no process of the bench)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and comm(int(name)).startswith(prefix):
            out.append(int(name))
    return out


def all_cpu() -> dict[int, float]:
    """CPU seconds of every process on the machine (own time only)."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            out[int(name)] = cpu_seconds(int(name), with_reaped_children=False)
    return out


def runqueue_wait(pids: Sequence[int]) -> float:
    """Seconds the processes (all their threads) spent runnable but not running (/proc/PID/schedstat)."""
    total = 0
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                    total += int(fh.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def _status_number(path: str, field: str) -> int:
    """The number after ``field:`` in a /proc status file (0 when the file or the field is gone)."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def voluntary_switches(pids: Sequence[int]) -> int:
    """Times the processes' threads went to sleep of their own accord (waiting for I/O or a timer),
    each one a wake-up later: /proc/PID/task/TID/status ``voluntary_ctxt_switches``."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        total += sum(_status_number(f"/proc/{pid}/task/{tid}/status", "voluntary_ctxt_switches") for tid in tids)
    return total


def rss_mib(pids: Sequence[int]) -> float:
    """Resident memory of the processes in MiB (VmRSS; 0 for those gone)."""
    return round(sum(_status_number(f"/proc/{pid}/status", "VmRSS") for pid in pids) / 1024, 1)


def comm(pid: int) -> str:
    """The short command name of a process ('?' when it is gone)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def cpu_by_name(before: dict[int, float], after: dict[int, float], names: dict[int, str]) -> dict[str, float]:
    """CPU seconds between two samples, summed per command name (reaped children as 'reaped')."""
    out: dict[str, float] = {}
    for p, v in after.items():
        name = names.get(p, "reaped" if p < 0 else "?")
        out[name] = round(out.get(name, 0.0) + v - before.get(p, 0.0), 4)
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two :func:`tree_cpu` samples (processes born in between count whole)."""
    return sum(v - before.get(p, 0.0) for p, v in after.items())


@dataclass
class Proc:
    """A process the bench started, with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    extra_pids: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start(name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None,
          cwd: str | os.PathLike[str] | None = None) -> Proc:
    """Start a process in its own session, stdout+stderr to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = log.open("wb")
    popen = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env, cwd=cwd, start_new_session=True)
    fh.close()
    return Proc(name, popen, log)


def stop(proc: Proc | None, grace: float = 5.0, sig: int = signal.SIGTERM) -> int | None:
    """Stop one started process (and its process group, which only it and its children are in)."""
    if proc is None:
        return None
    if proc.popen.poll() is None:
        try:
            os.killpg(proc.pid, sig)          # its own session: the group is exactly what it started
        except ProcessLookupError:
            pass
        try:
            proc.popen.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.popen.wait(5)
    return proc.popen.returncode


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll ``pred`` until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def options_ping(port: int, timeout: float = 0.5) -> int | None:
    """Send OPTIONS to 127.0.0.1:port; return the response code, or None without an answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(timeout)
        lport = s.getsockname()[1]
        tag = f"{time.monotonic_ns():x}"
        msg = (f"OPTIONS sip:ping@127.0.0.1:{port} SIP/2.0\r\n"
               f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch=z9hG4bK-ping{tag};rport\r\n"
               f"From: <sip:bench@127.0.0.1>;tag={tag}\r\nTo: <sip:ping@127.0.0.1:{port}>\r\n"
               f"Call-ID: ping-{tag}@127.0.0.1\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
               "Content-Length: 0\r\n\r\n").encode()
        s.sendto(msg, ("127.0.0.1", port))
        try:
            while True:
                data, _ = s.recvfrom(65535)
                if data.startswith(b"SIP/2.0 "):
                    code = int(data[8:11])
                    if code >= 200:
                        return code
        except (TimeoutError, ValueError):
            return None
