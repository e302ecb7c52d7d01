#!/usr/bin/env python3
"""Alternated load points: the same path and rate offered to several systems in turn, round after round.

    python bench/pairs.py [--systems serve,kamailio-native] [--path reject] [--rate 10000] [--rounds 5]

A full ``bench/load.py`` run measures each system once, minutes apart, and this kind of machine
drifts by more than most changes of the code within that time.  Here every round runs one point of
each system back to back (freshly started, same SIPp mix and machinery as ``load.py``), so each
round's ratio compares figures taken a minute apart, in ABBA order so that a drift favours neither
side.  Printed: every point (server CPU µs per call, whether the rate was sustained, probe p50/p99
µs, server wake-ups per second); for every system, its ratio of CPU per call to the anchor's (the
last system named), as mean, median and range over the rounds where both held the rate, and its
median p99.  Writes bench/results/pairs-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadlib import mix, procs, sipp  # noqa: E402
from loadlib.runner import Bench, Options  # noqa: E402
from loadlib.systems import SYSTEMS  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default="serve,kamailio-native",
                   help="comma-separated, the last one is the anchor of the ratios (default serve,kamailio-native)")
    p.add_argument("--path", default="reject", choices=tuple(mix.MIXES),
                   help="call mix of every point (default reject)")
    p.add_argument("--rate", type=float, default=10000.0, help="calls/s of every point (default 10000)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of one point per system (default 5)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per point (default 10)")
    p.add_argument("--sipp-max-rate", type=float, default=35000, help="calls/s per SIPp instance (default 35000)")
    p.add_argument("--kamailio-children", type=int, default=1, help="Kamailio UDP workers (default 1)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="folder for the JSON result (default bench/results)")
    a = p.parse_args(argv)
    a.names = [s for s in a.systems.split(",") if s]
    if len(a.names) < 2:
        p.error("--systems needs at least two systems")
    unknown = [n for n in a.names if n not in SYSTEMS]
    if unknown:
        p.error(f"unknown system(s) {', '.join(unknown)} (known: {', '.join(SYSTEMS)})")
    narrow = [n for n in a.names if a.path not in SYSTEMS[n].paths]
    if narrow:
        only = "/".join(SYSTEMS[narrow[0]].paths)
        p.error(f"{', '.join(narrow)} cannot be measured on the {a.path} path (only {only})")
    if a.rounds < 1 or a.rate <= 0 or a.duration <= 0:
        p.error("--rounds, --rate and --duration must be positive")
    return a


def _brief(p: dict[str, Any], path: str) -> dict[str, Any]:
    kinds = p.get("probe", {}).get("kinds", {})
    k = kinds.get(path) or kinds.get("reject") or {}
    return {"cpu_us": p.get("server_cpu_us_per_call"), "sustained": bool(p.get("sustained")),
            "p50_us": k.get("p50_us"), "p99_us": k.get("p99_us"),
            "wakeups_per_s": p.get("load_phase", {}).get("server_wakeups_per_s"),
            "by_thread": p.get("load_phase_cpu_us_per_call_by_thread"),
            # why a point was not sustained, in the criterion's terms, and who was the limit
            "min_rate_share": p.get("min_rate_share"), "failed_share": p.get("failed_share"),
            "retrans_share": p.get("retrans_share"), "limited_by": p.get("limited_by"),
            "sipp_cores": p.get("sipp_cpu_share_whole_run")}


def _why(b: dict[str, Any]) -> str:
    if b["sustained"]:
        return "sustained"
    held, failed, retrans = b["min_rate_share"], b["failed_share"], b["retrans_share"]
    out = (f"NOT sustained (held {_fmt(held, '{:.3f}')}, failed {_fmt(failed, '{:.4f}')}, "
           f"retrans {_fmt(retrans, '{:.4f}')}")
    if b["limited_by"]:
        out += f", limited by the {b['limited_by']}"
    return out + ")"


def _fmt(v: float | None, f: str = "{:.1f}") -> str:
    return "-" if v is None else f.format(v)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if not sipp.sipp_binary():
        print("sipp is not installed (Debian: apt-get install sip-tester)", file=sys.stderr)
        return 2
    for n in a.names:
        why = SYSTEMS[n].available()
        if why:
            print(f"{n} is not available: {why}", file=sys.stderr)
            return 2
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix=f"callguard-pairs-{stamp}-"))
    bench = Bench(workdir, Options(duration=a.duration, sipp_max_rate=a.sipp_max_rate,
                                   kamailio_children=a.kamailio_children, log=lambda _line: None))
    anchor = a.names[-1]
    print(f"{a.path} at {a.rate:.0f} calls/s, {a.duration:.0f} s per point, {a.rounds} rounds of "
          f"{', '.join(a.names)}; ratios to {anchor}", flush=True)
    rounds: list[dict[str, dict[str, Any]]] = []
    for r in range(a.rounds):
        row: dict[str, dict[str, Any]] = {}
        # ABBA order: a drift of the machine within a round favours neither side over the run.
        for name in (a.names if r % 2 == 0 else a.names[::-1]):
            ports = tuple(procs.free_udp_ports(2))
            b = _brief(bench.point(SYSTEMS[name], a.path, a.rate, ports), a.path)  # type: ignore[arg-type]
            row[name] = b
            print(f"  round {r + 1} {name:18s} cpu {_fmt(b['cpu_us'])} us/call  "
                  f"{_why(b)}  p50/p99 {_fmt(b['p50_us'], '{:.0f}')}/"
                  f"{_fmt(b['p99_us'], '{:.0f}')} us  wake-ups {_fmt(b['wakeups_per_s'], '{:.0f}')}/s", flush=True)
        rounds.append(row)
    ratios: dict[str, list[float]] = {}
    print()
    for name in a.names[:-1]:
        # A round counts only when both points held the rate: an overloaded system's CPU goes to retransmissions.
        rs = [row[name]["cpu_us"] / row[anchor]["cpu_us"] for row in rounds
              if row[name]["sustained"] and row[anchor]["sustained"] and row[name]["cpu_us"] and row[anchor]["cpu_us"]]
        ratios[name] = [round(x, 3) for x in rs]
        if rs:
            print(f"{name} / {anchor}, CPU per call: mean {statistics.fmean(rs):.2f}x  "
                  f"median {statistics.median(rs):.2f}x  range {min(rs):.2f}-{max(rs):.2f}x  "
                  f"({len(rs)} of {len(rounds)} rounds)")
        else:
            print(f"{name} / {anchor}: no round where both held the rate")
    for name in a.names:
        p99 = [row[name]["p99_us"] for row in rounds if row[name]["sustained"] and row[name]["p99_us"] is not None]
        if p99:
            print(f"{name} probe p99: median {statistics.median(p99):.0f} us, range {min(p99):.0f}-{max(p99):.0f} us")
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"pairs-{stamp}.json"
    out.write_text(json.dumps({"path": a.path, "rate": a.rate, "duration_s": a.duration, "systems": a.names,
                               "anchor": anchor, "rounds": rounds, "cpu_ratios": ratios}, indent=1) + "\n")
    print(f"result {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
