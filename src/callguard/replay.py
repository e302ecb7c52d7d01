"""``callguard replay``: a whole call log through the same core, in constant memory.

The log is read in chunks; each chunk is decided with one ``check_batch`` call
(the Cython core loops in C) and written out before the next is read, so tens of
millions of rows need no more memory than one chunk.
"""

from __future__ import annotations

import csv
import datetime as dt
import gc
import os
import sys
import time
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from .errors import InputError
from .guard import Guard
from .lists import parse_tz
from .settings import RULE_NAMES

CHUNK_ROWS = 16384
BAD_ROW = "bad_row"


@dataclass
class ReplaySummary:
    rows: int = 0
    bad_rows: int = 0
    out_of_order: int = 0
    per_rule: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"{'rule':<24} {'calls':>12} {'share':>8}"]
        total = max(self.rows, 1)
        for rule in RULE_NAMES + (BAD_ROW,):
            n = self.per_rule.get(rule, 0)
            if n:
                lines.append(f"{rule:<24} {n:>12} {100.0 * n / total:>7.2f}%")
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        lines.append(f"{'total':<24} {self.rows:>12}   in {self.seconds:.2f} s ({rate:,.0f} rows/s)")
        if self.bad_rows:
            lines.append(f"warning: {self.bad_rows} broken row(s) written with verdict 'error' (first ones above)")
        if self.out_of_order:
            lines.append(f"warning: {self.out_of_order} row(s) earlier than the row before them; rate limits assume "
                         "time order: sort the log by time for an exact replay")
        return "\n".join(lines)


class TimeParser:
    """Epoch seconds or ISO 8601 to epoch seconds, fast for logs (dates are cached)."""

    def __init__(self, tz: dt.tzinfo) -> None:
        self.tz = tz
        self._minutes: dict[str, float] = {}

    def __call__(self, text: str) -> float:
        if text[4:5] != "-":
            return float(text)              # epoch seconds (ValueError if it is neither)
        # Fast path: YYYY-MM-DD[T ]HH:MM:SS[.ffffff] with an optional Z or ±HH:MM; the
        # value up to the minute is cached per zone, so a log costs one lookup per row.
        if len(text) >= 19 and text[10] in "T " and text[13] == ":" and text[16] == ":":
            frac = 0.0
            zone = text[19:]
            if zone[:1] == ".":
                end = 1
                while end < len(zone) and zone[end].isdigit():
                    end += 1
                frac = float(zone[:end])
                zone = zone[end:]
            key = text[:16] + zone
            minute = self._minutes.get(key)
            if minute is None:
                minute = self._day(text[:10], zone) + int(text[11:13]) * 3600 + int(text[14:16]) * 60
                if len(self._minutes) > 65536:
                    self._minutes.clear()
                self._minutes[key] = minute
            return minute + int(text[17:19]) + frac
        stamp = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=self.tz)
        return stamp.timestamp()

    def _day(self, date: str, zone: str) -> float:
        tz = self.tz
        if zone in ("Z", "z"):
            tz = dt.UTC
        elif zone:
            tz = parse_tz(zone)
        d = dt.date.fromisoformat(date)
        return dt.datetime(d.year, d.month, d.day, tzinfo=tz).timestamp()


def replay(guard: Guard, log_path: str, out: IO[str] | None, progress: IO[str] | None = None,
           chunk_rows: int = CHUNK_ROWS, max_problems: int = 20) -> ReplaySummary:
    """Replay a call log; write rows + verdict,code,rule to ``out``; return the summary.

    Raises:
        InputError: the log cannot be read or lacks the time, caller or callee column.
    """
    try:
        handle = open(log_path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise InputError(f"{log_path}: cannot read: {exc.strerror or exc}") from None
    with handle:
        # The replay allocates millions of short-lived lists and no cycles: the cyclic
        # collector would only rescan them (it halves the throughput), so it rests meanwhile.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return _replay(guard, log_path, handle, out, progress, chunk_rows, max_problems)
        finally:
            if gc_was_enabled:
                gc.enable()


def _replay(guard: Guard, log_path: str, handle: IO[str], out: IO[str] | None, progress: IO[str] | None,
            chunk_rows: int, max_problems: int) -> ReplaySummary:
    size = os.fstat(handle.fileno()).st_size
    summary = ReplaySummary()
    started = time.perf_counter()
    parse_time = TimeParser(parse_tz(guard.config.lists.timezone))
    reader = csv.reader(handle)
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(f"{log_path}: empty file: a header row time,caller,callee is needed") from None
    names = [h.strip().lower() for h in header]
    missing = [c for c in ("time", "caller", "callee") if c not in names]
    if missing:
        raise InputError(f"{log_path}:1: header lacks column(s) {', '.join(missing)}")
    i_time, i_caller, i_callee = names.index("time"), names.index("caller"), names.index("callee")
    i_source = names.index("source") if "source" in names else -1
    width = len(names)
    writer = csv.writer(out, lineterminator="\n") if out is not None else None
    if writer is not None:
        writer.writerow(header + ["verdict", "code", "rule"])
    counts = np.zeros(len(RULE_NAMES), dtype=np.int64)
    suffixes: dict[tuple[int, int], list[str]] = {}
    error_suffix = ["error", "", BAD_ROW]
    last_time = -float("inf")

    rows: list[list[str]] = []
    bad: set[int] = set()
    callers: list[str] = []
    callees: list[str] = []
    sources: list[str | None] = []
    times: list[float] = []

    def flush() -> None:
        nonlocal counts
        codes, rules, _scores = guard.check_batch(callers, callees, sources, np.array(times, dtype=np.float64))
        counts += np.bincount(rules, minlength=len(RULE_NAMES))
        if writer is not None:
            k = 0
            code_list = codes.tolist()
            rule_list = rules.tolist()
            for j, row in enumerate(rows):
                if bad and j in bad:
                    row.extend(error_suffix)
                    continue
                key = (code_list[k], rule_list[k])
                suffix = suffixes.get(key)
                if suffix is None:
                    suffix = suffixes[key] = ["reject" if key[0] else "allow", str(key[0]) if key[0] else "",
                                              RULE_NAMES[key[1]]]
                row.extend(suffix)
                k += 1
            writer.writerows(rows)
        summary.rows += len(rows)
        rows.clear()
        bad.clear()
        callers.clear()
        callees.clear()
        sources.clear()
        times.clear()
        if progress is not None:
            elapsed = time.perf_counter() - started
            share = f"{100.0 * handle.tell() / size:5.1f}%" if size else ""
            progress.write(f"\r{share} {summary.rows:,} rows, {summary.rows / max(elapsed, 1e-9):,.0f} rows/s ")
            progress.flush()

    for row in reader:
        if not row:
            continue
        problem = None
        if len(row) != width:
            problem = f"expected {width} fields, got {len(row)}"
        else:
            try:
                t = parse_time(row[i_time])
            except (ValueError, IndexError):
                t = -1.0
            if not t >= 0:
                problem = f"time: not ISO 8601 or epoch seconds: {row[i_time]!r}"
        if problem is not None:
            bad.add(len(rows))
            summary.bad_rows += 1
            if len(summary.problems) < max_problems:
                summary.problems.append(f"{log_path}:{reader.line_num}: {problem}")
        else:
            if t < last_time:
                summary.out_of_order += 1
            last_time = t
            times.append(t)
            callers.append(row[i_caller])
            callees.append(row[i_callee])
            sources.append((row[i_source] or None) if i_source >= 0 else None)
        rows.append(row)
        if len(rows) >= chunk_rows:
            flush()
    if rows:
        flush()
    if progress is not None:
        progress.write("\n")
    summary.per_rule = {RULE_NAMES[i]: int(n) for i, n in enumerate(counts) if n}
    if summary.bad_rows:
        summary.per_rule[BAD_ROW] = summary.bad_rows
    summary.seconds = time.perf_counter() - started
    return summary


def open_output(path: str | None) -> tuple[IO[str] | None, bool]:
    """The output stream for rows: a file, stdout for '-', nothing for None."""
    if path is None:
        return None, False
    if path == "-":
        return sys.stdout, False
    try:
        return open(path, "w", newline="", encoding="utf-8"), True
    except OSError as exc:
        raise InputError(f"{path}: cannot write: {exc.strerror or exc}") from None

