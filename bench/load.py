#!/usr/bin/env python3
"""SIP load bench: the same SIPp call mix against callguard serve, Kamailio + the callguard plug-in,
Kamailio with a native script (the anchor) and a bare uvloop responder.

    python bench/load.py [--systems serve,kamailio-plugin,kamailio-native] [--quick]

For each system: the highest sustained calls/s (BENCH-NOTES criterion: >= 99 % of the target rate
every second, failed <= 0.1 %, retransmissions <= 0.1 %), probe latency p50/p99 in microseconds,
and server CPU microseconds per call on the reject and the forward path at fixed rates.  Writes
bench/results/load-<timestamp>.json and .png and prints a table.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadlib import mix, procs, report, sipp  # noqa: E402
from loadlib.runner import Bench, Options  # noqa: E402
from loadlib.systems import SYSTEMS  # noqa: E402

DEFAULT_SYSTEMS = "uvloop-responder,serve,kamailio-plugin,kamailio-native"


def _rates(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default=DEFAULT_SYSTEMS,
                   help=f"comma-separated, from {', '.join(SYSTEMS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="short points, mixed call mix only, coarse search "
                   "(a few minutes for all systems)")
    p.add_argument("--mixes", help="call mixes whose highest sustained rate is searched (default: mixed; "
                   "full run: mixed,reject)")
    p.add_argument("--duration", type=float, help="seconds of load per point (default 3 quick, 10 full)")
    p.add_argument("--start-rate", type=float, default=2500, help="first rate of the search, calls/s (default 2500)")
    p.add_argument("--max-rate", type=float, default=80000, help="highest rate tried, calls/s (default 80000)")
    p.add_argument("--bisect", type=int, help="bisection steps after the first failure (default 1 quick, 3 full)")
    p.add_argument("--fixed-rates", type=_rates, help="rates for CPU per call on the reject and forward paths "
                   "(default 1000,10000 quick; 1000,10000,30000 full)")
    p.add_argument("--sipp-max-rate", type=float, default=35000, help="calls/s per SIPp instance; higher rates "
                   "are split over several instances on different ports (default 35000)")
    p.add_argument("--probe-interval-ms", type=float, help="one latency probe INVITE every N ms (default 2 quick, "
                   "5 full)")
    p.add_argument("--kamailio-children", type=int, default=1,
                   help="Kamailio UDP workers (default 1, as the BENCH-NOTES anchors)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="folder for the JSON result and the PNG plot (default bench/results)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (SIPp stats, system logs)")
    p.add_argument("--report", type=Path, metavar="JSON", help="only print the table of a saved result again "
                   "(and redraw its plot next to it); runs nothing")
    a = p.parse_args(argv)
    a.duration = a.duration or (3.0 if a.quick else 10.0)
    a.probe_interval_ms = a.probe_interval_ms or (2.0 if a.quick else 5.0)
    a.bisect = a.bisect if a.bisect is not None else (1 if a.quick else 3)
    a.fixed_rates = a.fixed_rates or ([1000.0, 10000.0] if a.quick else [1000.0, 10000.0, 30000.0])
    a.mixes = (a.mixes or ("mixed" if a.quick else "mixed,reject")).split(",")
    for m in a.mixes:
        if m not in mix.MIXES:
            p.error(f"unknown mix {m!r} (known: {', '.join(mix.MIXES)})")
    return a


def reprint(path: Path) -> int:
    """Print the table of a saved result (recomputing the ratios) and redraw its plot."""
    result = json.loads(path.read_text())
    fixed = result["options"]["fixed_rates"]
    summaries = {}
    for name, s in result["systems"].items():
        pts = [p for p in result["points"] if p["system"] == name]
        summaries[name] = {**s, **report.summarise(name, s["max_sustained"], pts, fixed)}
    print(report.table(summaries, report.ratios(summaries), fixed))
    png = report.plot(result["points"], path.with_suffix(".png"), f"callguard load bench {path.stem}")
    print(f"plot {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.report:
        return reprint(a.report)
    if not sipp.sipp_binary():
        print("sipp is not installed (Debian: apt-get install sip-tester)", file=sys.stderr)
        return 2
    names = [s for s in a.systems.split(",") if s]
    for n in names:
        if n not in SYSTEMS:
            print(f"unknown system {n!r} (known: {', '.join(SYSTEMS)})", file=sys.stderr)
            return 2
        if set(SYSTEMS[n].paths) != set(mix.MIXES):
            print(f"{n} answers the {'/'.join(SYSTEMS[n].paths)} path only, and a full run needs every call "
                  f"mix: measure it with bench/pairs.py --path reject", file=sys.stderr)
            return 2
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix=f"callguard-load-{stamp}-"))
    opts = Options(duration=a.duration, sipp_max_rate=a.sipp_max_rate, probe_interval_ms=a.probe_interval_ms,
                   kamailio_children=a.kamailio_children, keep=a.keep)
    bench = Bench(workdir, opts)
    started = time.time()
    result: dict[str, Any] = {
        "started": dt.datetime.now().isoformat(timespec="seconds"), "quick": a.quick,
        "options": {"duration_s": a.duration, "mixes": a.mixes, "start_rate": a.start_rate, "max_rate": a.max_rate,
                    "bisect": a.bisect, "fixed_rates": a.fixed_rates, "sipp_max_rate": a.sipp_max_rate,
                    "probe_interval_ms": a.probe_interval_ms, "kamailio_children": a.kamailio_children},
        "criterion": {"min_rate_share_every_second": 0.99, "max_failed_share": 0.001, "max_retrans_share": 0.001},
        "call_mix": mix.MIXES, "expected_response": mix.EXPECTED,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "systems": {}, "skipped": {}, "points": [],
    }
    summaries: dict[str, dict[str, Any]] = {}
    print(f"work folder {workdir}; {a.duration:.0f} s per point; systems {', '.join(names)}", flush=True)
    for name in names:
        system = SYSTEMS[name]
        why = system.available()
        if why:
            print(f"skip {name}: {why}", flush=True)
            result["skipped"][name] = why
            continue
        print(f"== {name}: {system.description}", flush=True)
        ports = tuple(procs.free_udp_ports(2))
        points: list[dict[str, Any]] = []
        max_rates: dict[str, float | None] = {}
        for m in a.mixes:
            best, pts = bench.search(system, m, a.start_rate, a.max_rate, a.bisect, ports)  # type: ignore[arg-type]
            max_rates[m] = best
            points += pts
        for path in ("reject", "forward"):
            for rate in a.fixed_rates:
                if _at_rate(points, path, rate):
                    continue
                p = bench._log_point(bench.point(system, path, rate, ports))  # type: ignore[arg-type]
                p["stage"] = "cpu"
                points.append(p)
        summaries[name] = report.summarise(name, max_rates, points, a.fixed_rates)
        summaries[name]["info"] = system.info()
        summaries[name]["description"] = system.description
        result["points"] += points
    result["systems"] = summaries
    result["ratios_vs_native"] = report.ratios(summaries)
    result["elapsed_s"] = round(time.time() - started, 1)
    a.out.mkdir(parents=True, exist_ok=True)
    base = a.out / f"load-{stamp}{'-quick' if a.quick else ''}"
    json_path = base.with_suffix(".json")
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    png = report.plot(result["points"], base.with_suffix(".png"),
                      f"callguard load bench {stamp}{' (quick)' if a.quick else ''}") if result["points"] else None
    print()
    if summaries:
        print(report.table(summaries, result["ratios_vs_native"], a.fixed_rates))
        print("(gen): a SIPp instance was at >= 90 % of a core; (cores): the cores were full (the system competes "
              "with its load generator or other work); *: that point was not sustained; noisy pts: points during "
              "which other processes on the machine used > 0.2 cores")
    for n, why in result["skipped"].items():
        print(f"skipped {n}: {why}")
    print(f"\nresult {json_path}\nplot   {png or '(matplotlib missing)'}\nelapsed {result['elapsed_s']:.0f} s")
    if a.keep:
        print(f"work folder kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _at_rate(points: list[dict[str, Any]], mix_name: str, rate: float) -> bool:
    return any(p["mix"] == mix_name and p["rate"] == rate and "error" not in p for p in points)


if __name__ == "__main__":
    sys.exit(main())
