"""``callguard replay``: a whole call log through the same core, in constant memory.

The log is read in chunks; each chunk is decided with one ``check_batch`` call
(the Cython core loops in C) and written out before the next is read, so tens of
millions of rows need no more memory than one chunk.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from .errors import InputError
from .guard import Guard
from .lists import parse_tz
from .settings import RULE_NAMES

CHUNK_ROWS = 65536
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
        self._days: dict[str, float] = {}

    def __call__(self, text: str) -> float:
        c0 = text[:1]
        if c0.isdigit() and (len(text) < 5 or text[4] != "-"):
            return float(text)
        # Fast path: YYYY-MM-DD[T ]HH:MM:SS[.ffffff] with an optional Z or ±HH:MM.
        if len(text) >= 19 and text[10] in "T " and text[13] == ":" and text[16] == ":":
            rest = text[19:]
            frac = 0.0
            if rest[:1] == ".":
                end = 1
                while end < len(rest) and rest[end].isdigit():
                    end += 1
                frac = float(rest[:end])
                rest = rest[end:]
            key = text[:10] + rest
            day = self._days.get(key)
            if day is None:
                day = self._day(text[:10], rest)
                if len(self._days) > 4096:
                    self._days.clear()
                self._days[key] = day
            return day + int(text[11:13]) * 3600 + int(text[14:16]) * 60 + int(text[17:19]) + frac
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


def _chunks(reader: Iterator[list[str]], size: int) -> Iterator[list[tuple[int, list[str]]]]:
    chunk: list[tuple[int, list[str]]] = []
    line = 1
    for row in reader:
        line += 1
        if not row:
            continue
        chunk.append((line, row))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _row_problem(row: list[str], width: int, i_time: int) -> str | None:
    if len(row) != width:
        return f"expected {width} fields, got {len(row)}"
    return None


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
    size = os.fstat(handle.fileno()).st_size
    summary = ReplaySummary()
    started = time.perf_counter()
    parse_time = TimeParser(parse_tz(guard.config.lists.timezone))
    with handle:
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
        last_time = -float("inf")
        counts = np.zeros(len(RULE_NAMES), dtype=np.int64)
        for chunk in _chunks(reader, chunk_rows):
            callers: list[str] = []
            callees: list[str] = []
            sources: list[str | None] = []
            times = np.empty(len(chunk), dtype=np.float64)
            good: list[int] = []
            bad: dict[int, str] = {}
            for j, (line, row) in enumerate(chunk):
                problem = _row_problem(row, width, i_time)
                if problem is None:
                    try:
                        t = parse_time(row[i_time])
                    except (ValueError, IndexError):
                        t = -1.0
                    if not t >= 0:
                        problem = f"time: not ISO 8601 or epoch seconds: {row[i_time]!r}"
                if problem is not None:
                    bad[j] = problem
                    summary.bad_rows += 1
                    if len(summary.problems) < max_problems:
                        summary.problems.append(f"{log_path}:{line}: {problem}")
                    continue
                if t < last_time:
                    summary.out_of_order += 1
                last_time = t
                times[len(good)] = t
                good.append(j)
                callers.append(row[i_caller])
                callees.append(row[i_callee])
                sources.append((row[i_source] or None) if i_source >= 0 else None)
            codes, rules, _scores = guard.check_batch(callers, callees, sources, times[:len(good)])
            counts += np.bincount(rules, minlength=len(RULE_NAMES))
            if writer is not None:
                code_list = codes.tolist()
                rule_list = rules.tolist()
                out_rows = []
                k = 0
                for j, (_line, row) in enumerate(chunk):
                    if j in bad:
                        out_rows.append(row + ["error", "", BAD_ROW])
                        continue
                    code = code_list[k]
                    out_rows.append(row + ["reject" if code else "allow", str(code) if code else "",
                                           RULE_NAMES[rule_list[k]]])
                    k += 1
                writer.writerows(out_rows)
            summary.rows += len(chunk)
            if progress is not None:
                elapsed = time.perf_counter() - started
                done = handle.tell() if hasattr(handle, "tell") else 0
                share = f"{100.0 * done / size:5.1f}%" if size else ""
                progress.write(f"\r{share} {summary.rows:,} rows, {summary.rows / max(elapsed, 1e-9):,.0f} rows/s ")
                progress.flush()
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

