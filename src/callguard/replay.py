"""``callguard replay``: a whole call log through the same core, in constant memory.

The log is read in chunks; each chunk is decided with one ``check_batch`` call
(the Cython core loops in C) and written out before the next is read, so tens of
millions of rows need no more memory than one chunk.
"""

from __future__ import annotations

import csv
import datetime as dt
import gc
import ipaddress
import os
import re
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO

import numpy as np

from .errors import InputError
from .guard import Guard
from .lists import MAX_EPOCH, not_utf8, parse_time, parse_tz
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


_EPOCH = re.compile(r"[0-9]+(?:\.[0-9]*)?").fullmatch


class TimeParser:
    """Epoch seconds or ISO 8601 to epoch seconds, fast for logs (dates are cached)."""

    def __init__(self, tz: dt.tzinfo) -> None:
        self.tz = tz
        self._minutes: dict[str, float] = {}

    def __call__(self, text: str) -> float:
        """Raises ValueError for anything but a valid time (hour 99, a zone with text after it, NaN...)."""
        # Fast path: YYYY-MM-DD[T ]HH:MM:SS[.ffffff] with an optional zone; the value up to the
        # minute is cached per zone, so a log costs one lookup per row.  What goes into the cache
        # was checked whole by fromisoformat; the seconds and fraction are checked here.
        if len(text) >= 19 and text[4:5] == "-" and text[10] in "T " and text[13] == ":" and text[16] == ":":
            seconds = text[17:19]
            if not ("00" <= seconds <= "59" and seconds.isdigit()):
                raise ValueError(f"not a time: {text!r}")
            frac = 0.0
            zone = text[19:]
            if zone[:1] == ".":
                end = 1
                while end < len(zone) and "0" <= zone[end] <= "9":
                    end += 1
                if end == 1:
                    raise ValueError(f"not a time: {text!r}")
                frac = float(zone[:end])
                zone = zone[end:]
            key = text[:16] + zone
            minute = self._minutes.get(key)
            if minute is None:
                stamp = dt.datetime.fromisoformat(f"{text[:16]}:00{zone}")
                if stamp.tzinfo is None:
                    stamp = stamp.replace(tzinfo=self.tz)
                minute = stamp.timestamp()
                if len(self._minutes) > 65536:
                    self._minutes.clear()
                self._minutes[key] = minute
            return minute + int(seconds) + frac
        if _EPOCH(text) is not None and not (len(text) in (8, 14) and text.isdigit()):
            # epoch seconds, as parse_time reads them (8 or 14 bare digits are basic ISO dates),
            # without its layers: half the rows of a log may be epoch times
            t = float(text)
            if t <= MAX_EPOCH:
                return t
        return parse_time(text, self.tz)


def replay(guard: Guard, log_path: str, out: IO[str] | None, progress: IO[str] | None = None,
           chunk_rows: int = CHUNK_ROWS, max_problems: int = 20) -> ReplaySummary:
    """Replay a call log; write rows + verdict,code,rule to ``out``; return the summary.

    Raises:
        InputError: the log cannot be read or lacks the time, caller or callee column.
    """
    try:
        # Bytes that are not UTF-8 become surrogates: their row is a bad row, the others replay.
        handle = open(log_path, newline="", encoding="utf-8-sig", errors="surrogateescape")
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
    time_of = TimeParser(parse_tz(guard.config.lists.timezone))
    reader = csv.reader(handle)
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(f"{log_path}: empty file: a header row time,caller,callee is needed") from None
    except csv.Error as exc:
        raise InputError(f"{log_path}:1: unreadable header: {exc}") from None
    if not_utf8(header):
        raise InputError(f"{log_path}:1: unreadable header: not UTF-8")
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

    known_sources: dict[str, str | None] = {}     # as written -> the address (None: not one)

    def source_of(text: str) -> str | None:
        """The address a source column holds (None: not one), remembered for the next rows."""
        try:
            address: str | None = str(ipaddress.ip_address(text.strip()))
        except ValueError:
            address = None
        if len(known_sources) > 65536:
            known_sources.clear()
        known_sources[text] = address
        return address

    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            # The row cannot be split into fields; it is kept, as a row of empty fields, so
            # the output still has a line for every line of the log.
            row = [""] * width
            problem: str | None = f"unreadable row: {exc}"
        else:
            if not row:
                continue
            problem = source = None
            if len(row) != width:
                problem = f"expected {width} fields, got {len(row)}"
            elif not_utf8(row):
                problem = "not UTF-8"
            else:
                try:
                    t = time_of(row[i_time])
                except (ValueError, IndexError):
                    t = -1.0
                if not t >= 0:
                    problem = f"time: not ISO 8601 or epoch seconds: {row[i_time]!r}"
                elif i_source >= 0 and row[i_source].strip():
                    source = known_sources.get(row[i_source], "")
                    if source == "":
                        source = source_of(row[i_source])
                    if source is None:
                        problem = f"source: not an IP address: {row[i_source]!r}"
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
            sources.append(source)
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


class Output:
    """Where the replayed rows go: a file, stdout for '-', nothing for None.

    A regular file is written beside its path and moved over it by :meth:`commit`, once the whole
    log has been replayed: a replay that fails (an unreadable log, a bad header) leaves an
    existing file as it was, where opening it for writing had already emptied it -- the log itself
    when both were the same path.  Devices and pipes are written directly.  Bytes of the log that
    were not UTF-8 are written back as they were.
    """

    def __init__(self, path: str | None, log_path: str) -> None:
        self.path = path
        self.stream: IO[str] | None = None
        self._temp: str | None = None
        if path is None:
            return
        if path == "-":
            sys.stdout.reconfigure(errors="surrogateescape")    # type: ignore[union-attr]
            self.stream = sys.stdout
            return
        try:
            existing = os.stat(path) if os.path.exists(path) else None
            if existing is not None and os.path.exists(log_path) and os.path.samestat(existing, os.stat(log_path)):
                raise InputError(f"{path}: is the log being replayed; write the rows elsewhere")
            if existing is not None and not stat.S_ISREG(existing.st_mode):
                self.stream = open(path, "w", newline="", encoding="utf-8", errors="surrogateescape")
                return
            folder, name = os.path.split(os.path.abspath(path))
            fd, self._temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            self.stream = open(fd, "w", newline="", encoding="utf-8", errors="surrogateescape")
        except OSError as exc:
            raise InputError(f"{path}: cannot write: {exc.strerror or exc}") from None

    def commit(self) -> None:
        """The rows are complete: close the file and put it in place."""
        stream, self.stream = self.stream, None
        if stream is None or stream is sys.stdout:
            return
        stream.close()
        if self._temp is not None:
            try:
                if os.path.exists(self.path or ""):
                    os.chmod(self._temp, os.stat(self.path or "").st_mode & 0o7777)
                else:
                    os.chmod(self._temp, 0o666 & ~_umask())
                os.replace(self._temp, self.path or "")
            except OSError as exc:
                raise InputError(f"{self.path}: cannot write: {exc.strerror or exc}") from None
            finally:
                self._discard()

    def abort(self) -> None:
        """The replay failed: leave the path as it was."""
        stream, self.stream = self.stream, None
        if stream is not None and stream is not sys.stdout:
            stream.close()
        self._discard()

    def _discard(self) -> None:
        if self._temp is not None:
            try:
                os.unlink(self._temp)
            except FileNotFoundError:
                pass
            self._temp = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

