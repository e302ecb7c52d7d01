"""Loading the CSV lists (SPEC §4) into compact numpy arrays.

Both cores read the same arrays: the Cython core indexes them directly, the
pure-Python twin builds dicts from them.  Arrays keep ten million blocklist
entries within a few hundred megabytes, where Python objects would need gigabytes.

A broken row is reported with its file and line and skipped; the other rows still
load.  In strict mode any broken row refuses the whole file.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from . import numbers
from .errors import ListError

SOURCES = ("regulator", "complaint", "eagle_eye", "provincial", "big_data", "manual")
SOURCE_BIG_DATA = SOURCES.index("big_data")
NEVER = 0xFFFFFFFF          # "expires" of an entry that never expires (uint32 seconds)
P_ABSENT = 0xFFFF           # "p" of an entry without one; p is stored in units of 1/10000
P_SCALE = 10000.0
P_EPSILON = 1e-6    # below the list's resolution; absorbs the binary error of value * P_SCALE

BLOCKLIST_COLUMNS = ("number", "match", "source", "reason", "added", "expires", "p")
FILING_COLUMNS = ("number", "area", "carrier", "usage", "inbound", "outbound", "valid_from", "valid_until")
ALLOWLIST_COLUMNS = ("number", "match", "reason")


@dataclass(frozen=True, slots=True)
class RowProblem:
    """One broken row: where it is and what is wrong with it."""

    file: str
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.problem}"


@dataclass(slots=True)
class Blocklist:
    """Blocklist entries sorted by key (file order kept among equal keys)."""

    keys: np.ndarray                 # uint64: numbers.key_of(digits)
    prefix: np.ndarray               # bool: prefix entry (else exact)
    source: np.ndarray               # uint8: index into SOURCES
    expires: np.ndarray              # uint32: epoch seconds the entry stops applying; NEVER
    p: np.ndarray                    # uint16: big-data probability in 1/10000 (P_ABSENT when absent)
    complaints: np.ndarray           # uint16: complaint count (optional column)
    reason: np.ndarray               # uint32: index into reasons
    reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.keys.shape[0])


@dataclass(slots=True)
class Filings:
    """95/96 service-number filings, sorted by key."""

    keys: np.ndarray                 # uint64: key_of(area + number) for 96, key_of(number) for 95
    inbound: np.ndarray              # bool
    outbound: np.ndarray             # bool
    valid_from: np.ndarray           # float64 epoch seconds (-inf: always)
    valid_until: np.ndarray          # float64 epoch seconds, exclusive (inf: never)
    carrier: list[str] = field(default_factory=list)
    usage: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.keys.shape[0])


@dataclass(slots=True)
class Allowlist:
    keys: np.ndarray                 # uint64
    prefix: np.ndarray               # bool
    reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.keys.shape[0])


@dataclass(slots=True)
class Lists:
    """Everything the core looks numbers up in."""

    blocklist: Blocklist
    filings: Filings
    allowlist: Allowlist
    problems: list[RowProblem] = field(default_factory=list)


# ---------------------------------------------------------------- dates
def parse_tz(offset: str) -> dt.timezone:
    sign = -1 if offset[0] == "-" else 1
    hours, minutes = int(offset[1:3]), int(offset[4:6])
    return dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))


#: The last second of year 9999: later "epoch seconds" are a unit mistake (milliseconds) or garbage.
MAX_EPOCH = 253402300799.0


def parse_time(text: str, tz: dt.tzinfo, end_of_day: bool = False) -> float:
    """ISO 8601 date or date-time, or epoch seconds, to epoch seconds.

    A date without a time means the start of that day in ``tz``, or with
    ``end_of_day`` the start of the next day (so the named day is included).  Eight or fourteen
    digits are ISO 8601's basic form, ``YYYYMMDD`` and ``YYYYMMDDhhmmss`` (call-detail records
    write them so), not epoch seconds, which have ten digits for any date after 2001.
    """
    text = text.strip()
    try:
        if not text.isascii():
            raise ValueError(text)
        if text.isdigit() and len(text) in (8, 14):
            return _parse_iso(text if len(text) == 8 else f"{text[:8]}T{text[8:]}", tz, end_of_day)
        if text.replace(".", "", 1).isdigit():
            return epoch_seconds(text)
        return _parse_iso(text, tz, end_of_day)
    except ValueError:
        raise ValueError(f"not an ISO 8601 date or time: {text!r}") from None


def _time_field(row: dict[str, str], column: str, tz: dt.tzinfo, end_of_day: bool = False) -> float:
    """parse_time of one column of a list row; the error names the column."""
    try:
        return parse_time(row[column], tz, end_of_day)
    except ValueError as exc:
        raise ValueError(f"{column}: {exc}") from None


def epoch_seconds(text: str) -> float:
    """Epoch seconds from their text; ValueError unless a finite time from 1970 to year 9999."""
    t = float(text)
    if not 0.0 <= t <= MAX_EPOCH:     # NaN fails too
        raise ValueError(f"epoch seconds out of range: {text!r}")
    return t


def _parse_iso(text: str, tz: dt.tzinfo, end_of_day: bool) -> float:
    if len(text) in (8, 10) and text[:4].isdigit() and "T" not in text and " " not in text:
        day = dt.date.fromisoformat(text)
        start = dt.datetime(day.year, day.month, day.day, tzinfo=tz)
        if end_of_day:
            start += dt.timedelta(days=1)
        return start.timestamp()
    stamp = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=tz)
    return stamp.timestamp()


# ---------------------------------------------------------------- CSV rows
def _rows(path: str, required: Iterable[str]) -> Iterator[tuple[int, dict[str, str]]]:
    # Bytes that are not UTF-8 are decoded as surrogates (and their row reported): a decoding
    # error raised from the reader lost the decoder's whole buffer, some 190 good rows, silently.
    try:
        handle = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    except OSError as exc:
        raise ListError(path, 0, f"cannot read: {exc.strerror or exc}") from None
    with handle:
        reader = csv.reader(handle)
        while True:     # the header: the first row that is not blank or a `#` comment
            try:
                header = next(reader)
            except StopIteration:
                raise ListError(path, 0, "empty file: a header row is needed") from None
            except csv.Error as exc:
                raise ListError(path, reader.line_num, f"unreadable header: {exc}") from None
            if not _skipped(header):
                break
        if not_utf8(header):
            raise ListError(path, reader.line_num, "unreadable header: not UTF-8")
        names = [h.strip().lower() for h in header]
        twice = sorted({c for c in required if names.count(c) > 1})
        if twice:
            raise ListError(path, reader.line_num, f"header names column(s) {', '.join(twice)} more than once")
        missing = [c for c in required if c not in names]
        if missing:
            raise ListError(path, reader.line_num,
                            f"header lacks column(s) {', '.join(missing)} (has {', '.join(names)})")
        width = len(names)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield reader.line_num, {"__error__": str(exc)}
                continue
            if _skipped(row):
                continue
            if not_utf8(row):
                yield reader.line_num, {"__error__": "not UTF-8"}
                continue
            if len(row) != width:
                yield reader.line_num, {"__error__": f"expected {width} fields, got {len(row)}"}
                continue
            yield reader.line_num, {n: v.strip() for n, v in zip(names, row)}


def _skipped(row: list[str]) -> bool:
    """A blank line or a `#` comment."""
    return not row or (len(row) == 1 and not row[0].strip()) or row[0].startswith("#")


def not_utf8(row: list[str]) -> bool:
    """Whether the row holds bytes that were not UTF-8 (decoded as lone surrogates)."""
    text = "".join(row)
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _collect(path: str, required: Iterable[str], strict: bool,
             parse: Callable[[dict[str, str]], None]) -> list[RowProblem]:
    problems: list[RowProblem] = []
    for line, row in _rows(path, required):
        error = row.get("__error__")
        if error is None:
            try:
                parse(row)
                continue
            except ValueError as exc:
                error = str(exc)
        problem = RowProblem(path, line, error)
        if strict:
            raise ListError(path, line, error)
        problems.append(problem)
    return problems


def _bool(text: str, column: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes", "y"):
        return True
    if low in ("false", "0", "no", "n"):
        return False
    raise ValueError(f"{column}: expected true or false, got {text!r}")


def _match(text: str) -> bool:
    low = (text or "exact").lower()
    if low not in ("exact", "prefix"):
        raise ValueError(f"match: expected exact or prefix, got {text!r}")
    return low == "prefix"


def entry_key(number: str, prefix: bool) -> int:
    """The key of a list entry; raises ValueError when the number is not usable."""
    if prefix:
        digits = numbers.normalize_prefix(number)
        if not digits:
            raise ValueError(f"number: not a digit prefix: {number!r}")
    else:
        n = numbers.normalize(number)
        if n.hidden:
            raise ValueError(f"number: not a number: {number!r}")
        digits = n.digits
    return numbers.key_of(digits)


# ---------------------------------------------------------------- loaders
def blocklist_row(row: dict[str, str], tz: dt.tzinfo) -> tuple[int, bool, int, int, int, int, str]:
    """Parse one blocklist row: (key, prefix, source index, expires, p, complaints, reason).

    Raises:
        ValueError: the row is broken; the message names the column.
    """
    is_prefix = _match(row["match"])
    key = entry_key(row["number"], is_prefix)
    src = row["source"].lower()
    if src not in SOURCES:
        raise ValueError(f"source: expected one of {', '.join(SOURCES)}, got {row['source']!r}")
    if row["added"]:
        _time_field(row, "added", tz)
    exp = NEVER
    if row["expires"]:
        exp = int(_time_field(row, "expires", tz, end_of_day=True))
        exp = max(0, min(exp, NEVER - 1))
    prob = P_ABSENT
    if row["p"]:
        try:
            value = float(row["p"])
        except ValueError:
            raise ValueError(f"p: not a number: {row['p']!r}") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"p: must be between 0 and 1, got {row['p']!r}")
        # Kept to 1/P_SCALE, truncated: rounding made p = 0.74996 a 0.75 and banned it.  The
        # epsilon keeps a p written with four decimals exact (0.29 * 10000 is 2899.9999999999995).
        prob = math.floor(value * P_SCALE + P_EPSILON)
    elif src == "big_data":
        raise ValueError("p: a big_data entry needs its p")
    count = 0
    if row.get("complaints"):
        if not row["complaints"].isdigit():
            raise ValueError(f"complaints: not a count: {row['complaints']!r}")
        count = min(int(row["complaints"]), 65535)
    return key, is_prefix, SOURCES.index(src), exp, prob, count, row["reason"]


def _fast_loader_enabled() -> bool:
    return not os.environ.get("CALLGUARD_NO_EXTENSIONS")


def load_blocklist(path: str, strict: bool = False, tz: dt.tzinfo = dt.UTC) -> tuple[Blocklist, list[RowProblem]]:
    """Load a blocklist CSV into arrays sorted by key; broken rows are reported and skipped.

    The compiled loader (``callguard._core``) reads the file in big chunks and gives the same
    arrays and problems; it hands the file back to the Python reader for CSV features it does
    not handle (quoted line breaks, bare CR line ends, invalid UTF-8).

    Raises:
        ListError: the file cannot be read, has no usable header, or (strict) has a broken row.
    """
    if isinstance(path, str) and _fast_loader_enabled():
        try:
            from . import _core
        except ImportError:
            pass
        else:
            result = _core.load_blocklist(path, strict, tz)
            if result is not None:
                return result
    return load_blocklist_py(path, strict, tz)


def load_blocklist_py(path: str, strict: bool = False,
                      tz: dt.tzinfo = dt.UTC) -> tuple[Blocklist, list[RowProblem]]:
    """The Python blocklist loader (the reference of the compiled one)."""
    keys: list[int] = []
    prefix: list[bool] = []
    source: list[int] = []
    expires: list[int] = []
    p: list[int] = []
    complaints: list[int] = []
    reason_idx: list[int] = []
    reasons: list[str] = []
    reason_of: dict[str, int] = {}

    def parse(row: dict[str, str]) -> None:
        key, is_prefix, src, exp, prob, count, text = blocklist_row(row, tz)
        idx = reason_of.get(text)
        if idx is None:
            idx = reason_of[text] = len(reasons)
            reasons.append(text)
        keys.append(key)
        prefix.append(is_prefix)
        source.append(src)
        expires.append(exp)
        p.append(prob)
        complaints.append(count)
        reason_idx.append(idx)

    problems = _collect(path, BLOCKLIST_COLUMNS, strict, parse)
    order = np.argsort(np.array(keys, dtype=np.uint64), kind="stable")
    blocklist = Blocklist(
        keys=np.array(keys, dtype=np.uint64)[order],
        prefix=np.array(prefix, dtype=np.bool_)[order],
        source=np.array(source, dtype=np.uint8)[order],
        expires=np.array(expires, dtype=np.uint32)[order],
        p=np.array(p, dtype=np.uint16)[order],
        complaints=np.array(complaints, dtype=np.uint16)[order],
        reason=np.array(reason_idx, dtype=np.uint32)[order],
        reasons=reasons,
    )
    return blocklist, problems


def load_filings(path: str, strict: bool = False, tz: dt.tzinfo = dt.UTC) -> tuple[Filings, list[RowProblem]]:
    keys: list[int] = []
    inbound: list[bool] = []
    outbound: list[bool] = []
    valid_from: list[float] = []
    valid_until: list[float] = []
    carrier: list[str] = []
    usage: list[str] = []

    def parse(row: dict[str, str]) -> None:
        number = numbers.normalize_prefix(row["number"])
        if not number or not (number.startswith("95") or number.startswith("96")):
            raise ValueError(f"number: expected a 95/96 access number, got {row['number']!r}")
        area = row["area"]
        if number.startswith("96"):
            if not area:
                raise ValueError("area: a 96 number is local and needs its area code")
        if area and not (area.isdigit() and area.startswith("0") and 3 <= len(area) <= 4):
            raise ValueError(f"area: expected an area code like 0391, got {area!r}")
        if number.startswith("95"):
            area = ""                      # 95 numbers are national
        start = _time_field(row, "valid_from", tz) if row["valid_from"] else -math.inf
        end = _time_field(row, "valid_until", tz, end_of_day=True) if row["valid_until"] else math.inf
        if end <= start:
            raise ValueError("valid_until: before valid_from")
        ib = _bool(row["inbound"], "inbound")
        ob = _bool(row["outbound"], "outbound")
        keys.append(numbers.key_of(area + number))
        inbound.append(ib)
        outbound.append(ob)
        valid_from.append(start)
        valid_until.append(end)
        carrier.append(row["carrier"])
        usage.append(row["usage"])

    problems = _collect(path, FILING_COLUMNS, strict, parse)
    karr = np.array(keys, dtype=np.uint64)
    order = np.argsort(karr, kind="stable")
    filings = Filings(
        keys=karr[order],
        inbound=np.array(inbound, dtype=np.bool_)[order],
        outbound=np.array(outbound, dtype=np.bool_)[order],
        valid_from=np.array(valid_from, dtype=np.float64)[order],
        valid_until=np.array(valid_until, dtype=np.float64)[order],
        carrier=[carrier[i] for i in order],
        usage=[usage[i] for i in order],
    )
    return filings, problems


def load_allowlist(path: str, strict: bool = False) -> tuple[Allowlist, list[RowProblem]]:
    keys: list[int] = []
    prefix: list[bool] = []
    reasons: list[str] = []

    def parse(row: dict[str, str]) -> None:
        is_prefix = _match(row["match"])
        keys.append(entry_key(row["number"], is_prefix))
        prefix.append(is_prefix)
        reasons.append(row["reason"])

    problems = _collect(path, ALLOWLIST_COLUMNS, strict, parse)
    return make_allowlist(keys, prefix, reasons), problems


def make_allowlist(keys: list[int], prefix: list[bool], reasons: list[str]) -> Allowlist:
    karr = np.array(keys, dtype=np.uint64)
    order = np.argsort(karr, kind="stable")
    return Allowlist(keys=karr[order], prefix=np.array(prefix, dtype=np.bool_)[order],
                     reasons=[reasons[i] for i in order])


def empty_blocklist() -> Blocklist:
    return Blocklist(np.zeros(0, np.uint64), np.zeros(0, np.bool_), np.zeros(0, np.uint8),
                     np.zeros(0, np.uint32), np.zeros(0, np.uint16), np.zeros(0, np.uint16),
                     np.zeros(0, np.uint32), [])


def empty_filings() -> Filings:
    return Filings(np.zeros(0, np.uint64), np.zeros(0, np.bool_), np.zeros(0, np.bool_),
                   np.zeros(0, np.float64), np.zeros(0, np.float64), [], [])


def load_lists(blocklist: str, service_numbers: str, allowlist: str, extra_allow: Iterable[str] = (),
               strict: bool = False, tz: dt.tzinfo = dt.UTC) -> Lists:
    """Load the three lists; an empty path means an empty list.

    ``extra_allow`` are exact allowlist numbers from the config (``allowlist_numbers``).
    """
    problems: list[RowProblem] = []
    if blocklist:
        bl, pr = load_blocklist(blocklist, strict, tz)
        problems += pr
    else:
        bl = empty_blocklist()
    if service_numbers:
        fl, pr = load_filings(service_numbers, strict, tz)
        problems += pr
    else:
        fl = empty_filings()
    keys: list[int] = []
    prefix: list[bool] = []
    reasons: list[str] = []
    if allowlist:
        al, pr = load_allowlist(allowlist, strict)
        problems += pr
        keys += [int(k) for k in al.keys]
        prefix += [bool(x) for x in al.prefix]
        reasons += al.reasons
    for number in extra_allow:
        keys.append(entry_key(number, False))
        prefix.append(False)
        reasons.append("config allowlist_numbers")
    return Lists(bl, fl, make_allowlist(keys, prefix, reasons), problems)


def unfinished_file(path: str) -> bool:
    """Whether the file has content whose last line has no line end: most likely a writer is not
    done with it (reloads wait for the rest; a list is best renamed into place)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False    # the load says what is wrong with it


def file_stamp(*paths: str) -> tuple[tuple[str, float, int], ...]:
    """(path, mtime, size) of each list file: cheap change detection for reloads."""
    out = []
    for p in paths:
        if p:
            try:
                st = os.stat(p)
                out.append((p, st.st_mtime, st.st_size))
            except OSError:
                out.append((p, 0.0, -1))
    return tuple(out)
