"""SIPp: the UAS standing in for the trunk, the UAC instances offering the load, and their statistics."""

from __future__ import annotations

import csv
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import procs

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
BUFF = "4194304"  # BENCH-NOTES: the default 64 KB socket buffer drops replies at 20k calls/s


def sipp_binary() -> str | None:
    """The SIPp executable (Debian's sip-tester installs it as ``sipp``)."""
    return shutil.which("sipp")


def udp_bound(port: int) -> bool:
    """Whether some socket is bound to 127.0.0.1:port or *:port (from /proc/net/udp)."""
    want = f":{port:04X}"
    try:
        with open("/proc/net/udp") as fh:
            next(fh)
            return any(line.split()[1].endswith(want) for line in fh)
    except OSError:
        return False


def start_uas(port: int, workdir: Path) -> procs.Proc:
    """Start the trunk UAS (answers 486) on 127.0.0.1:port and wait until it is bound."""
    p = procs.start("uas", [sipp_binary() or "sipp", "-sf", str(SCENARIOS / "uas.xml"), "-i", "127.0.0.1",
                            "-p", str(port), "-t", "u1", "-buff_size", BUFF, "-nostdin",
                            "-trace_err", "-error_file", str(workdir / "uas-errors.log"),
                            "-trace_counts", "-trace_stat", "-stf", str(workdir / "uas-stat.csv"), "-fd", "1"],
                    workdir / "uas.out", cwd=workdir)
    if not procs.wait_until(lambda: udp_bound(port) or not p.alive(), 10):
        raise RuntimeError("SIPp UAS did not bind")
    if not p.alive():
        raise RuntimeError(f"SIPp UAS exited: {p.log_tail()}")
    return p


@dataclass
class UacResult:
    """What one SIPp UAC instance did."""

    rate: float
    calls_planned: int
    created: int = 0
    successful: int = 0
    failed: int = 0
    retransmissions: int = 0
    dead_call_msgs: int = 0
    per_second_rates: list[float] = field(default_factory=list)
    responses: dict[str, int] = field(default_factory=dict)
    unexpected: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    exit_code: int | None = None
    errors_tail: str = ""


def _elapsed(text: str) -> float:
    """SIPp's ``HH:MM:SS:uuuuuu`` (or ``HH:MM:SS``) as seconds."""
    parts = text.split(":")
    h, m, s = int(parts[0]), int(parts[1]), int(parts[2])
    us = int(parts[3]) if len(parts) > 3 else 0
    return h * 3600 + m * 60 + s + us / 1e6


def parse_stats(path: Path, planned: int) -> tuple[dict[str, int], list[float]]:
    """Cumulative counters from the last row, and the call rate of every full second of call creation."""
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh, delimiter=";"))
    if len(rows) < 2:
        return {}, []
    head = rows[0]
    idx = {name: i for i, name in enumerate(head)}
    rates: list[float] = []
    for row in rows[1:]:
        if len(row) < len(head) - 1:
            continue
        created_total = int(row[idx["OutgoingCall(C)"]])
        period = _elapsed(row[idx["ElapsedTime(P)"]])
        made = int(row[idx["OutgoingCall(P)"]])
        # Only whole seconds in which SIPp was still creating calls: not the first (ramp-up),
        # not the last partial one, not the drain after the last call was created.
        if period >= 0.9 and 0 < created_total < planned and made > 0:
            rates.append(made / period)
    last = rows[-1]
    totals = {k: int(last[idx[k]]) for k in ("OutgoingCall(C)", "SuccessfulCall(C)", "FailedCall(C)",
                                            "Retransmissions(C)", "DeadCallMsgs(C)")}
    # The first creating period starts with SIPp's warm-up; drop it when there are others.
    if len(rates) > 2:
        rates = rates[1:]
    return totals, rates


def parse_counts(path: Path) -> tuple[dict[str, int], int]:
    """Calls that ended on each final response, and unexpected messages (from ``-trace_counts``)."""
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh, delimiter=";"))
    if len(rows) < 2:
        return {}, 0
    head, last = rows[0], rows[-1]
    out: dict[str, int] = {}
    unexpected = 0
    for name, value in zip(head, last):
        parts = name.split("_")
        if len(parts) == 3 and parts[2] == "Recv" and parts[1].isdigit() and int(parts[1]) >= 200:
            out[parts[1]] = out.get(parts[1], 0) + int(value or 0)
        elif len(parts) == 3 and parts[2] == "Unexp":
            unexpected += int(value or 0)
    return out, unexpected


class UacRun:
    """Several SIPp UAC instances started together, each with its own port, injection file and share."""

    def __init__(self, target_port: int, rates: list[float], duration: float, injections: list[Path],
                 workdir: Path) -> None:
        self.target_port = target_port
        self.rates = rates
        self.duration = duration
        self.injections = injections
        self.workdir = workdir
        self.procs: list[procs.Proc] = []
        self.planned: list[int] = []
        self.started = 0.0
        self.ports: list[int] = []

    def start(self) -> None:
        ports = procs.free_udp_ports(len(self.rates))
        self.ports = ports
        self.started = time.monotonic()
        for i, (rate, port, inf) in enumerate(zip(self.rates, ports, self.injections)):
            calls = max(1, int(round(rate * self.duration)))
            self.planned.append(calls)
            d = self.workdir / f"uac{i}"
            d.mkdir(parents=True, exist_ok=True)
            argv = [sipp_binary() or "sipp", f"127.0.0.1:{self.target_port}", "-sf", str(SCENARIOS / "uac.xml"),
                    "-inf", str(inf), "-i", "127.0.0.1", "-p", str(port), "-t", "u1", "-buff_size", BUFF,
                    "-nostdin", "-r", f"{rate:.0f}", "-rp", "1000", "-m", str(calls),
                    # Calls in flight: 4 s of load; reaching the limit shows as a rate drop.
                    "-l", str(max(1000, int(rate * 4))),
                    "-timeout", f"{int(self.duration + 40)}s", "-timeout_error",
                    "-trace_stat", "-stf", str(d / "stat.csv"), "-fd", "1", "-trace_counts",
                    "-trace_err", "-error_file", str(d / "errors.log"), "-error_overwrite", "true"]
            self.procs.append(procs.start(f"uac{i}", argv, d / "sipp.out", cwd=d))

    def wait(self) -> list[UacResult]:
        """Wait for every instance (reaping with wait4 for its CPU time) and parse what it wrote."""
        results = []
        deadline = self.started + self.duration + 60
        for i, p in enumerate(self.procs):
            r = UacResult(rate=self.rates[i], calls_planned=self.planned[i])
            status, usage = None, None
            while time.monotonic() < deadline:
                pid, st, ru = os.wait4(p.pid, os.WNOHANG)
                if pid == p.pid:
                    status, usage = st, ru
                    break
                time.sleep(0.05)
            if status is None:
                procs.stop(p)
                r.exit_code = -1
            else:
                r.exit_code = os.waitstatus_to_exitcode(status)
                p.popen.returncode = r.exit_code
                r.cpu_s = usage.ru_utime + usage.ru_stime if usage is not None else 0.0
            r.wall_s = time.monotonic() - self.started
            d = self.workdir / f"uac{i}"
            stat = d / "stat.csv"
            if stat.exists():
                totals, r.per_second_rates = parse_stats(stat, r.calls_planned)
                r.created = totals.get("OutgoingCall(C)", 0)
                r.successful = totals.get("SuccessfulCall(C)", 0)
                r.failed = totals.get("FailedCall(C)", 0)
                r.retransmissions = totals.get("Retransmissions(C)", 0)
                r.dead_call_msgs = totals.get("DeadCallMsgs(C)", 0)
            counts = sorted(d.glob("*_counts.csv"))
            if counts:
                r.responses, r.unexpected = parse_counts(counts[-1])
            errs = d / "errors.log"
            if errs.exists() and errs.stat().st_size:
                with errs.open("rb") as fh:
                    r.errors_tail = fh.read(600).decode(errors="replace")
            results.append(r)
        return results

    def stop(self) -> None:
        for p in self.procs:
            if p.popen.returncode is None:
                procs.stop(p)
