"""Decision-core benchmark: compiled core vs the pure-Python twin.

Prints numbers, asserts nothing.  Run from the repository root::

    python bench/core.py                      # 1M-entry blocklist for checks, 1M and 10M for loading
    python bench/core.py --sizes 1000000      # skip the 10M load
    python bench/core.py --calls 50000 --entries 200000

Measures:
  * ``Guard.check`` from Python, ns per call (median, p99), compiled core and twin, and their ratio;
  * ``check_batch`` decisions per second, compiled core and twin;
  * blocklist load time and RSS (VmRSS / VmHWM from /proc/self/status) for each size, each in a
    fresh subprocess, compiled loader vs the Python csv loader (the Python loader only up to
    ``--python-max`` rows: it needs gigabytes at 10M).

Generated list files are cached under ``$TMPDIR/callguard-bench``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))

T0 = 1_780_000_000.0
SOURCES = ("regulator", "complaint", "eagle_eye", "provincial", "big_data", "manual")
REASONS = ("fraud report", "harassment complaints", "robocalls", "Eagle Eye model hit", "骚扰电话")


def blocklist_file(entries: int) -> Path:
    """A generated blocklist CSV with ``entries`` rows (cached)."""
    import numpy as np

    folder = Path(tempfile.gettempdir()) / "callguard-bench"
    folder.mkdir(exist_ok=True)
    path = folder / f"blocklist-{entries}.csv"
    if path.exists():
        return path
    rng = np.random.default_rng(entries)
    tmp = path.with_suffix(".part")
    with open(tmp, "w", encoding="utf-8") as out:
        out.write("number,match,source,reason,added,expires,p,complaints\n")
        step = 1_000_000
        for start in range(0, entries, step):
            n = min(step, entries - start)
            numbers = rng.integers(13_000_000_000, 19_999_999_999, n)
            kind = rng.integers(0, 100, n)
            src = rng.integers(0, 6, n)
            p = rng.integers(5000, 10001, n)
            rows = []
            for i in range(n):
                number = str(int(numbers[i]))
                k = int(kind[i])
                s = int(src[i])
                match = "exact"
                if k < 2:
                    number = number[:7]
                    match = "prefix"
                elif k < 10:
                    number = f"0{number[1:4]}{number[4:11]}"     # fixed line
                expires = "2027-06-30" if k % 3 == 0 else ""
                prob = f"0.{int(p[i]):04d}" if s == 4 and p[i] < 10000 else ("1" if s == 4 else "")
                rows.append(f"{number},{match},{SOURCES[s]},{REASONS[k % 5]},2026-01-01,{expires},{prob},{k % 4}\n")
            out.write("".join(rows))
    tmp.rename(path)
    return path


def rss() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024.0
    return out


def config_with(blocklist: str) -> object:
    from callguard import config as config_mod

    cfg = config_mod.load(ROOT / "config" / "callguard.yaml")
    return dataclasses.replace(cfg, lists=dataclasses.replace(cfg.lists, blocklist=blocklist))


def callers(n: int, seed: int = 1) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i, x in enumerate(rng.integers(13_000_000_000, 19_999_999_999, n)):
        m = i % 10
        if m < 6:
            out.append(str(int(x)))
        elif m < 8:
            out.append(f"sip:+86{int(x)}@gw;user=phone")
        elif m == 8:
            out.append(f"0{str(int(x))[1:11]}")
        else:
            out.append("95588")
    return out


# ---------------------------------------------------------------- workers (subprocesses)
def worker_load(path: str, impl: str) -> None:
    os.environ.pop("CALLGUARD_NO_EXTENSIONS", None)
    if impl == "python":
        os.environ["CALLGUARD_NO_EXTENSIONS"] = "1"
    from callguard import lists
    from callguard.guard import Guard

    base = rss()
    t = time.perf_counter()
    bl, problems = lists.load_blocklist(path, False, lists.parse_tz("+08:00"))
    load_s = time.perf_counter() - t
    after_load = rss()
    cfg = config_with(path)
    t = time.perf_counter()
    guard = Guard(cfg, lists.Lists(bl, lists.empty_filings(), lists.make_allowlist([], [], []), problems))
    core_s = time.perf_counter() - t
    guard.check("13800138000", "02150001234", "127.0.0.1", T0)
    print(json.dumps({"entries": len(bl), "problems": len(problems), "load_s": load_s, "core_s": core_s,
                      "base": base, "after_load": after_load, "final": rss(), "impl": impl}))


def time_checks(guard: object, names: list[str], reps: int) -> dict[str, float]:
    check = guard.check  # type: ignore[attr-defined]
    clock = time.perf_counter_ns
    samples = []
    now = T0
    for _ in range(reps):
        for name in names:
            now += 0.013
            a = clock()
            check(name, "02150001234", "127.0.0.1", now)
            samples.append(clock() - a)
    empty = []
    for _ in range(20000):
        a = clock()
        empty.append(clock() - a)
    overhead = statistics.median(empty)
    samples.sort()
    return {"median_ns": samples[len(samples) // 2] - overhead, "p99_ns": samples[int(len(samples) * 0.99)] - overhead,
            "timer_overhead_ns": overhead, "calls": len(samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=1_000_000, help="blocklist size for the check benchmark")
    ap.add_argument("--calls", type=int, default=200_000, help="timed Guard.check calls (compiled core)")
    ap.add_argument("--twin-calls", type=int, default=10_000, help="timed Guard.check calls (twin, at most 10000)")
    ap.add_argument("--batch", type=int, default=1_000_000, help="check_batch size (compiled core)")
    ap.add_argument("--sizes", default="1000000,10000000", help="blocklist sizes for the load benchmark")
    ap.add_argument("--python-max", type=int, default=1_000_000, help="largest size the Python loader runs")
    ap.add_argument("--worker", nargs=2, metavar=("PATH", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_load(*args.worker)
        return

    import numpy as np

    from callguard._corepy import CorePy
    from callguard.guard import Guard

    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} CPUs")
    path = blocklist_file(args.entries)
    cfg = config_with(str(path))
    guard = Guard(cfg)
    print(f"\n## Guard.check, shipped config + {len(guard.lists.blocklist):,}-entry blocklist")
    names = callers(10_000)
    fast = time_checks(guard, names, max(1, args.calls // len(names)))
    twin_guard = Guard(cfg, guard.lists)
    twin_guard.core = CorePy(twin_guard.settings, guard.lists)
    twin = time_checks(twin_guard, names[:args.twin_calls], 1)
    print(f"compiled core : median {fast['median_ns']:8.0f} ns  p99 {fast['p99_ns']:8.0f} ns  "
          f"({fast['calls']:,} calls; timer overhead {fast['timer_overhead_ns']:.0f} ns subtracted)")
    print(f"python twin   : median {twin['median_ns']:8.0f} ns  p99 {twin['p99_ns']:8.0f} ns  "
          f"({twin['calls']:,} calls)")
    print(f"ratio         : {twin['median_ns'] / fast['median_ns']:.1f}x (median)")

    print("\n## check_batch")
    names = callers(args.batch, seed=2)
    callees = ["02150001234"] * len(names)
    sources = ["127.0.0.1"] * len(names)
    times = T0 + 100_000 + np.arange(len(names), dtype=np.float64) * 0.001
    t = time.perf_counter()
    guard.check_batch(names, callees, sources, times)
    fast_rate = len(names) / (time.perf_counter() - t)
    m = min(len(names), 50_000)
    t = time.perf_counter()
    twin_guard.check_batch(names[:m], callees[:m], sources[:m], times[:m])
    twin_rate = m / (time.perf_counter() - t)
    print(f"compiled core : {fast_rate:12,.0f} decisions/s ({len(names):,})")
    print(f"python twin   : {twin_rate:12,.0f} decisions/s ({m:,})")
    print(f"ratio         : {fast_rate / twin_rate:.1f}x")

    print("\n## blocklist load (fresh subprocess each; RSS in MB)")
    print(f"{'entries':>11} {'loader':>8} {'load s':>8} {'core s':>7} {'RSS':>7} {'HWM':>7} {'base RSS':>9}")
    for size in [int(x) for x in args.sizes.split(",") if x]:
        file = blocklist_file(size)
        for impl in ("fast", "python"):
            if impl == "python" and size > args.python_max:
                continue
            out = subprocess.run([sys.executable, __file__, "--worker", str(file), impl], capture_output=True,
                                 text=True, cwd=ROOT)
            if out.returncode:
                print(f"{size:>11,} {impl:>8} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r['entries']:>11,} {impl:>8} {r['load_s']:8.2f} {r['core_s']:7.2f} {r['final']['VmRSS']:7.0f} "
                  f"{r['final']['VmHWM']:7.0f} {r['base']['VmRSS']:9.0f}")
    print("\n(lists.load_blocklist then Guard construction, which builds the hash indexes; RSS after one check)")


if __name__ == "__main__":
    main()
