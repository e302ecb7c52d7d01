"""Replay throughput: `callguard replay` (chunked, batch core) against the obvious per-row loop.

Prints rows per second for
  * replay       — callguard.replay.replay over a generated log (csv in chunks + check_batch + csv out),
  * per-row loop — csv.DictReader, one Guard.check per row, csv.DictWriter (same core),
  * twin         — replay with the pure-Python core (CALLGUARD_NO_EXTENSIONS path),
all in this one run. Goal: replay >= 250k rows/s on the 1M-row log.

    python bench/replay.py [--rows 1000000] [--sample 200000]
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from callguard import config as config_mod  # noqa: E402
from callguard.guard import Guard, load_lists  # noqa: E402
from callguard.replay import replay  # noqa: E402


def make_log(path: Path, rows: int, seed: int = 7) -> None:
    rnd = random.Random(seed)
    t = 1_780_000_000.0
    banned = ["13800138000", "17100000002", "16500001234"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["time", "caller", "callee", "source"])
        for i in range(rows):
            t += rnd.random() * 0.01
            r = rnd.random()
            if r < 0.05:
                caller = rnd.choice(banned)
            elif r < 0.08:
                caller = rnd.choice(["95555", "95599", "039196123", "95588"])
            elif r < 0.15:
                caller = f"1331234{rnd.randrange(50):04d}"          # busy callers -> high_frequency
            else:
                caller = f"13{rnd.randrange(10**9):09d}"
            callee = f"0215{rnd.randrange(10**7):07d}"
            stamp = f"{t:.3f}" if i % 2 else time.strftime("%Y-%m-%dT%H:%M:%S+08:00", time.gmtime(t + 8 * 3600))
            w.writerow([stamp, caller, callee, "127.0.0.1"])


def bench_replay(guard: Guard, log: Path, rows: int) -> float:
    with open(os.devnull, "w", newline="") as out:
        started = time.perf_counter()
        summary = replay(guard, str(log), out)
        elapsed = time.perf_counter() - started
    assert summary.rows == rows
    return rows / elapsed


def bench_per_row(guard: Guard, log: Path, rows: int) -> float:
    from callguard.lists import parse_tz
    from callguard.replay import TimeParser

    parse = TimeParser(parse_tz("+08:00"))
    started = time.perf_counter()
    with open(log, newline="") as f, open(os.devnull, "w", newline="") as out:
        reader = csv.DictReader(f)
        writer = csv.DictWriter(out, fieldnames=list(reader.fieldnames or []) + ["verdict", "code", "rule"])
        writer.writeheader()
        for row in reader:
            v = guard.check(row["caller"], row["callee"], source=row["source"], now=parse(row["time"]))
            row.update(verdict=v.verdict, code=v.code, rule=v.rule)
            writer.writerow(row)
    return rows / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--sample", type=int, default=200_000, help="rows for the slower comparisons")
    args = ap.parse_args()
    cfg = config_mod.load(ROOT / "config" / "callguard.yaml")
    lists = load_lists(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        big, small = Path(tmp) / "big.csv", Path(tmp) / "small.csv"
        make_log(big, args.rows)
        make_log(small, args.sample)
        print(f"replay bench: shipped config, logs of {args.rows:,} and {args.sample:,} rows")
        fast = bench_replay(Guard(cfg, lists), big, args.rows)
        print(f"  replay, compiled core ({args.rows:,} rows)      {fast:12,.0f} rows/s")
        loop = bench_per_row(Guard(cfg, lists), small, args.sample)
        print(f"  per-row loop, compiled core ({args.sample:,})  {loop:12,.0f} rows/s   replay is {fast / loop:.1f}x")
        twin = bench_replay(Guard(cfg, lists, implementation="python"), small, args.sample)
        print(f"  replay, pure-Python core ({args.sample:,})     {twin:12,.0f} rows/s   replay is {fast / twin:.1f}x")
        print(f"  goal: >= 250,000 rows/s -> {'met' if fast >= 250_000 else 'NOT met'}")


if __name__ == "__main__":
    main()
