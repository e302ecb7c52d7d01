"""Call-record store: CPU per stored decision, schema 3 (partitions indexed in bulk) against the schema 2 layout.

Prints numbers, asserts nothing.  Run from the repository root::

    python bench/records.py                   # 1M decisions, 500k outcomes
    python bench/records.py --rows 200000     # quicker

Both layouts run in this one run, through ``RecordStore`` and the same writer thread, on the
same rows (fast-path shape: 11-tuples handed over by ``add_many``), fed one second of decisions
at a time (``--rate`` rows, then a flush: one transaction each, as ``callguard serve`` writes):

  * schema 3 — the rows go to the partition being written, which has no secondary index; then a
    row in the next hour closes it and the writer builds its indexes in bulk (caller+time,
    callee+time, time, and the outcomes' Call-ID);
  * schema 3, executemany — the same, with the rows written by ``executemany`` (the reference
    path, used when the compiled inserter ``_recwriter`` is missing) instead of the inserter;
  * schema 2 layout — the same store with every index created with its partition, so each row
    pays for its index entries as it is inserted (``RecordStore._INDEX_ON_CREATE``), as schema 2
    did with its single table.

Reported: process CPU µs per row for the inserts (and per quarter of the rows, to show how the
incremental cost grows with the file), per outcome, for the bulk index build, and the total per
stored decision; the database size; and query times by caller and by callee (median of
``--queries`` numbers, ``limit=100`` as ``callguard records``) on the result — for schema 3
both while the partition is still being written (scanned) and once it is indexed.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from callguard import records as records_mod  # noqa: E402
from callguard.log import configure as configure_logs  # noqa: E402
from callguard.records import RecordStore  # noqa: E402

FAST_PATH_BATCH = 32     # rows per add_many, about what one fast-path batch hands over


class IncrementalStore(RecordStore):
    """The schema 2 way of paying for indexes: built with the partition, updated row by row."""

    _INDEX_ON_CREATE = True


def make_rows(n: int, t0: float, rate: float, seed: int = 3) -> list[tuple[Any, ...]]:
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        caller = f"13{rnd.randrange(10**9):09d}"
        callee = f"0{rnd.choice(('21', '10', '391', '755'))}{rnd.randrange(10**7):07d}"
        banned = rnd.random() < 0.4
        rows.append((t0 + i / rate, f"{rnd.getrandbits(64):016x}-{i}@10.1.{i % 250}.{i % 199}", "127.0.0.1",
                     caller, callee, "banned" if banned else "allow", "reject" if banned else "allow",
                     403 if banned else 0, 0.93 if banned else 0.12, 11 + i % 7, ()))
    return rows


def feed(store: RecordStore, rows: list[tuple[Any, ...]], per_flush: int) -> list[float]:
    """Add the rows one second's worth at a time, flushing each; process CPU at each quarter."""
    marks = [time.process_time()]
    bounds = [len(rows) * k // 4 for k in (1, 2, 3, 4)]
    for start in range(0, len(rows), per_flush):
        chunk = rows[start:start + per_flush]
        for k in range(0, len(chunk), FAST_PATH_BATCH):
            store.add_many(chunk[k:k + FAST_PATH_BATCH])
        store.flush(timeout=600)
        while len(marks) <= 4 and start + len(chunk) >= bounds[len(marks) - 1]:
            marks.append(time.process_time())
    return marks


def feed_outcomes(store: RecordStore, rows: list[tuple[Any, ...]], n: int, per_flush: int, seed: int = 5) -> float:
    """``n`` outcome() calls: half answers, half ends of the same calls; returns process CPU seconds."""
    rnd = random.Random(seed)
    calls = [rows[rnd.randrange(len(rows))] for _ in range(max(1, n // 2))]
    started = time.process_time()
    done = 0
    for start in range(0, len(calls), per_flush // 2):
        for r in calls[start:start + per_flush // 2]:
            store.outcome(r[1], 200, answered_at=r[0] + 3.0)
            done += 1
        for r in calls[start:start + per_flush // 2]:
            if done < n:
                store.outcome(r[1], ended_at=r[0] + 60.0)
                done += 1
        store.flush(timeout=600)
    return time.process_time() - started


def query_ms(store: RecordStore, numbers: list[str], column: str) -> float:
    times = []
    for number in numbers:
        started = time.perf_counter()
        rows = store.query(**{column: number}, limit=100)
        times.append((time.perf_counter() - started) * 1e3)
        assert rows, f"{column} {number} not found"
    return statistics.median(times)


def db_mb(path: str) -> float:
    return sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s)) / 1e6


def rebuild_rates(store: RecordStore, rows: list[tuple[Any, ...]]) -> dict[str, float]:
    """Records per second that ``callguard serve`` reads back into its rate-limit windows and
    answer/short-call counts after an unclean stop (no snapshot: every row is inside the shipped
    config's one-hour window), and the same attempts decided again by ``Guard.check``."""
    from callguard import config as config_mod
    from callguard.guard import Guard
    from callguard.log import get_logger
    from callguard.state import rebuild_rate_state

    cfg = config_mod.load(ROOT / "config" / "callguard.yaml")
    now = rows[-1][0] + 1.0
    guard = Guard(cfg)
    started = time.perf_counter()
    rebuild_rate_state(guard, store, cfg, None, get_logger(), now=now)
    rebuild = time.perf_counter() - started
    again = Guard(cfg)
    started = time.perf_counter()
    for row in rows:
        again.check(row[3], row[4], source=row[2], now=row[0])
    check = time.perf_counter() - started
    return {"rebuild_rows_s": len(rows) / rebuild, "check_rows_s": len(rows) / check}


def run(kind: str, cls: type[RecordStore], folder: Path, rows: list[tuple[Any, ...]], args: argparse.Namespace,
        callers: list[str], callees: list[str]) -> dict[str, Any]:
    path = str(folder / f"{kind}.sqlite3")
    n = len(rows)
    out: dict[str, Any] = {}
    store = cls(path, 30, partition_minutes=60, flush_interval=1.0, queue_max=10_000_000)
    try:
        marks = feed(store, rows, args.rate)
        out["insert"] = (marks[-1] - marks[0]) / n * 1e6
        out["quarters"] = [(b - a) / (n / 4) * 1e6 for a, b in zip(marks, marks[1:])]
        out["outcomes"] = feed_outcomes(store, rows, args.outcomes, args.rate) / max(1, args.outcomes) * 1e6
        out["q_caller_open"] = query_ms(store, callers, "caller")
        out["q_callee_open"] = query_ms(store, callees, "callee")
        if cls is RecordStore and records_mod._recwriter is not None:
            out.update(rebuild_rates(store, rows))
        # One row in the next hour: the partition closes and (schema 3) the writer indexes it.
        started = time.process_time()
        store.add_many([(rows[-1][0] + 3600.0, "closing", "127.0.0.1", "13000000000", "02100000000", "allow",
                         "allow", 0, 0.0, 1.0)])
        store.flush(timeout=600)
        while not store.partitions()[0]["indexed"]:
            time.sleep(0.02)
        out["build"] = (time.process_time() - started) / n * 1e6
        out["q_caller"] = query_ms(store, callers, "caller")
        out["q_callee"] = query_ms(store, callees, "callee")
        out["dropped"] = store.dropped
    finally:
        store.close()
    out["mb"] = db_mb(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="decisions stored (default 1M)")
    ap.add_argument("--outcomes", type=int, default=None, help="outcome() calls (default rows/2)")
    ap.add_argument("--rate", type=int, default=10_000, help="decisions per second of record time = rows per "
                    "transaction (default 10000)")
    ap.add_argument("--queries", type=int, default=50, help="numbers looked up per query kind (default 50)")
    ap.add_argument("--dir", default=None, help="where the databases go (default: a temporary folder, removed)")
    args = ap.parse_args()
    configure_logs("warning", "console", sys.stderr)
    if args.outcomes is None:
        args.outcomes = args.rows // 2
    if args.rows > args.rate * 3000:
        sys.exit("--rows must fit in one hour of record time at --rate (rows <= rate * 3000)")
    now = time.time()
    t0 = math.floor(now / 3600) * 3600 - 2 * 86400     # an hour two days ago: closed once the next hour has rows
    print(f"python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs; "
          f"{args.rows:,} decisions, {args.outcomes:,} outcomes, {args.rate:,} rows per transaction")
    rows = make_rows(args.rows, t0, args.rate)
    rnd = random.Random(11)
    callers = [rows[rnd.randrange(len(rows))][3] for _ in range(args.queries)]
    callees = [rows[rnd.randrange(len(rows))][4] for _ in range(args.queries)]
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="callguard-bench-records-"))
    folder.mkdir(parents=True, exist_ok=True)
    compiled = records_mod._recwriter
    try:
        v3 = run("schema3", RecordStore, folder, rows, args, callers, callees)
        records_mod._recwriter = None
        v3py = run("schema3-executemany", RecordStore, folder, rows, args, callers, callees)
        records_mod._recwriter = compiled
        v2 = run("schema2-layout", IncrementalStore, folder, rows, args, callers, callees)
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)

    def total(r: dict[str, Any]) -> float:
        return r["insert"] + r["outcomes"] * args.outcomes / args.rows + r["build"]

    print("\n## CPU µs per row (process CPU: the writer thread and the feeding)")
    if compiled is None:
        print("(callguard._recwriter is not built: both schema 3 rows use executemany)")
    print(f"{'layout':<23} {'insert':>7} {'by quarter of the rows':>28} {'outcome':>8} {'bulk index':>10} "
          f"{'total/decision':>14}")
    for name, r in (("schema 3", v3), ("schema 3, executemany", v3py), ("schema 2 layout", v2)):
        quarters = " ".join(f"{q:6.2f}" for q in r["quarters"])
        print(f"{name:<23} {r['insert']:7.2f} {quarters:>28} {r['outcomes']:8.2f} {r['build']:10.2f} "
              f"{total(r):14.2f}")
    print(f"ratio (schema 2 layout / schema 3), total per decision: {total(v2) / total(v3):.2f}x; "
          f"inserts, executemany / compiled inserter: {v3py['insert'] / v3['insert']:.2f}x")
    print("(total/decision = insert + outcomes × outcomes/rows + bulk index build; the schema 2 layout's "
          "bulk index column is the closing row only)")
    if "rebuild_rows_s" in v3:
        print(f"\n## restart after a crash: {v3['rebuild_rows_s'] / 1e3:.0f}k records/s read back into the rate-limit "
              f"state with their outcomes (rebuild_rate_state); the same attempts through Guard.check: "
              f"{v3['check_rows_s'] / 1e3:.0f}k/s")
    print("\n## database size (MB, file + WAL)")
    print(f"schema 3 {v3['mb']:.0f}   schema 2 layout {v2['mb']:.0f}")
    print(f"\n## query, median ms of {args.queries} (limit 100)")
    print(f"{'layout':<34} {'by caller':>9} {'by callee':>9}")
    print(f"{'schema 3, partition being written':<34} {v3['q_caller_open']:9.2f} {v3['q_callee_open']:9.2f}")
    print(f"{'schema 3, partition indexed':<34} {v3['q_caller']:9.2f} {v3['q_callee']:9.2f}")
    print(f"{'schema 2 layout':<34} {v2['q_caller']:9.2f} {v2['q_callee']:9.2f}")
    if v3["dropped"] or v3py["dropped"] or v2["dropped"]:
        print(f"\nWARNING: records dropped (schema 3 {v3['dropped']:.0f}, executemany {v3py['dropped']:.0f}, "
              f"schema 2 layout {v2['dropped']:.0f})")


if __name__ == "__main__":
    main()
