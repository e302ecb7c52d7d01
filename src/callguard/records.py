"""Call records: every decision stored in SQLite, kept at least 30 days (SPEC §6, R9).

The proxy calls :meth:`RecordStore.add` once per decision and :meth:`RecordStore.outcome`
when the call is answered, fails or ends.  Neither touches the disk: both append to a
bounded in-memory queue that a writer thread drains every ``flush_interval`` seconds,
inserting the batch with ``executemany`` in one transaction.  A full queue drops the
record, counts it in :attr:`RecordStore.dropped` and logs once when dropping starts and
once when it stops — never silently, and never blocking the SIP path.

The database runs in WAL mode (``synchronous=NORMAL``), so ``callguard records`` can read
while the proxy writes.  Numbers are stored as given (the proxy gives them normalised).
NORMAL syncs the WAL at checkpoints only: a crash of the process loses nothing committed, a
power loss may lose the last committed batches but never corrupts the file.

Schema 2 keeps both tables insert-only: decisions in ``records`` (indexed by time, caller+time
and callee+time), outcomes in ``outcomes`` (by Call-ID), joined when read.  A version 1 file is
migrated when opened (one transaction; the table is rewritten once, so a large file takes a
while).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import operator
import os
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import CallguardError, ConfigError, InputError
from .lists import parse_time as lists_parse_time
from .lists import parse_tz
from .log import get_logger


def _log() -> Any:
    # Looked up at each (rare) event instead of cached at import, so a logging set-up made
    # later, or a test capturing logs, always applies.
    return get_logger("callguard.records")


SCHEMA_VERSION = 2
MIN_RETENTION_DAYS = 30
PRUNE_EVERY = 3600.0        # seconds between the writer's own pruning runs
PRUNE_CHUNK = 20_000        # rows per DELETE, so a big prune never holds the write lock for long
BATCH_MAX = 50_000          # queue items per transaction

#: Columns given by the proxy, in table order.
RECORD_FIELDS: tuple[str, ...] = ("time", "call_id", "source", "caller", "callee", "rule", "verdict", "code",
                                  "score", "latency_us")
#: Columns filled in later by :meth:`RecordStore.outcome`.
OUTCOME_FIELDS: tuple[str, ...] = ("final_code", "answered_at", "ended_at")
COLUMNS: tuple[str, ...] = RECORD_FIELDS + OUTCOME_FIELDS

# Schema 2: the decision table is insert-only.  Outcomes go to their own insert-only table and
# are joined at query time, so the hot table needs no Call-ID index (a random-order key that cost
# a page read-modify-write per insert) and is never updated.  Rule queries use the time index
# and filter; records_time also serves pruning and unfiltered time ranges.
_OUTCOMES_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    id          INTEGER PRIMARY KEY,
    call_id     TEXT    NOT NULL,
    upto        INTEGER NOT NULL,
    final_code  INTEGER,
    answered_at REAL,
    ended_at    REAL
);
CREATE INDEX IF NOT EXISTS outcomes_call_id ON outcomes (call_id);
CREATE INDEX IF NOT EXISTS outcomes_upto ON outcomes (upto);
"""
# outcomes.upto is the highest records.id when the outcome was written: an outcome applies to the
# records of its Call-ID with id <= upto, i.e. those stored before it (or in the same batch), as
# the former UPDATE did.  Several outcomes of one call each fill their own columns; for every
# column the newest non-NULL value wins (the former COALESCE update).

# Version 1 kept the outcome in the records row (UPDATE by Call-ID) and had five indexes.
_MIGRATE_1_TO_2 = _OUTCOMES_SCHEMA + """
INSERT INTO outcomes (call_id, upto, final_code, answered_at, ended_at)
    SELECT call_id, id, final_code, answered_at, ended_at FROM records
    WHERE final_code IS NOT NULL OR answered_at IS NOT NULL OR ended_at IS NOT NULL ORDER BY id;
DROP INDEX IF EXISTS records_call_id;
DROP INDEX IF EXISTS records_rule_time;
ALTER TABLE records DROP COLUMN final_code;
ALTER TABLE records DROP COLUMN answered_at;
ALTER TABLE records DROP COLUMN ended_at;
CREATE INDEX IF NOT EXISTS records_caller_time ON records (caller, time);
CREATE INDEX IF NOT EXISTS records_callee_time ON records (callee, time);
CREATE INDEX IF NOT EXISTS records_time ON records (time);
UPDATE schema_version SET version = 2;
"""
# Copying each record's outcome with upto = its own id reproduces the stored values exactly: a
# later record of the same Call-ID got every update the earlier one got after its insert, so the
# newest non-NULL value per column is the same.

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    id          INTEGER PRIMARY KEY,
    time        REAL    NOT NULL,
    call_id     TEXT    NOT NULL DEFAULT '',
    source      TEXT    NOT NULL DEFAULT '',
    caller      TEXT    NOT NULL DEFAULT '',
    callee      TEXT    NOT NULL DEFAULT '',
    rule        TEXT    NOT NULL DEFAULT '',
    verdict     TEXT    NOT NULL DEFAULT '',
    code        INTEGER NOT NULL DEFAULT 0,
    score       REAL    NOT NULL DEFAULT 0,
    latency_us  REAL    NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS records_caller_time ON records (caller, time);
CREATE INDEX IF NOT EXISTS records_callee_time ON records (callee, time);
CREATE INDEX IF NOT EXISTS records_time ON records (time);
""" + _OUTCOMES_SCHEMA

_INSERT = f"INSERT INTO records ({', '.join(RECORD_FIELDS)}) VALUES ({', '.join('?' * len(RECORD_FIELDS))})"
_INSERT_OUTCOME = ("INSERT INTO outcomes (final_code, answered_at, ended_at, call_id, upto) "
                   "VALUES (?, ?, ?, ?, ifnull((SELECT max(id) FROM records), 0))")


def _outcome_column(column: str) -> str:
    return (f"(SELECT o.{column} FROM outcomes o WHERE o.call_id = r.call_id AND o.upto >= r.id "
            f"AND o.{column} IS NOT NULL ORDER BY o.id DESC LIMIT 1)")


# The columns of a query, outcome columns joined from their table.
_SELECT = ("SELECT " + ", ".join(f"r.{c}" for c in RECORD_FIELDS) + ", "
           + ", ".join(f"{_outcome_column(c)} AS {c}" for c in OUTCOME_FIELDS) + " FROM records r")


def _statements(script: str) -> list[str]:
    """The statements of a schema script (no literal in it holds a semicolon)."""
    return [stmt.strip() for stmt in script.split(";") if stmt.strip()]


_DEFAULTS: dict[str, Any] = {"time": 0.0, "call_id": "", "source": "", "caller": "", "callee": "", "rule": "",
                             "verdict": "", "code": 0, "score": 0.0, "latency_us": 0.0}


def _row_of(record: dict[str, Any]) -> tuple[Any, ...]:
    """The insert parameters of one record; missing keys take their defaults, None too."""
    out = []
    for name in RECORD_FIELDS:
        v = record.get(name)
        out.append(_DEFAULTS[name] if v is None else v)
    return tuple(out)


def _defaults_filled(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """``row`` with each None replaced by its column's default."""
    if None not in row:
        return row
    return tuple(_DEFAULTS[name] if v is None else v for name, v in zip(RECORD_FIELDS, row, strict=True))


class _Rows:
    """Queued decision rows (tuples in RECORD_FIELDS order) from one add_many call."""

    __slots__ = ("rows",)

    def __init__(self, rows: Sequence[tuple[Any, ...]]) -> None:
        self.rows = rows


_NFIELDS = len(RECORD_FIELDS)
# The insert parameters of a row: its first RECORD_FIELDS items (C-level; a 10-tuple is returned as is).
_row_of_tuple = operator.itemgetter(slice(0, _NFIELDS))


class _Outcome:
    """A queued outcome update (a class, not a tuple, so the writer tells it from a record cheaply)."""

    __slots__ = ("params",)

    def __init__(self, params: tuple[int | None, float | None, float | None, str]) -> None:
        self.params = params


def _connect(path: str) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN/COMMIT), so a batch is exactly one.
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


class RecordStore:
    """The call-record database, written in the background.

    Args:
        path: SQLite file; its parent folder is created when missing.
        retention_days: records older than this are pruned (at least 30, R9).
        flush_interval: seconds between the writer's batches.
        queue_max: records and outcomes held in memory before new ones are dropped.
        on_written: called from the writer thread with the number of records each batch inserted
            (e.g. ``Metrics.record_written``).
        on_dropped: called from the writer thread with the number of records dropped since the
            last call (e.g. ``Metrics.record_dropped``).

    Attributes:
        written: records inserted so far.
        dropped: records and outcomes lost (queue full, store closed or a failed write).

    Raises:
        CallguardError: the file cannot be opened, is not a callguard database or comes from a
            newer callguard.
    """

    def __init__(self, path: str, retention_days: int = 30, *, flush_interval: float = 0.2,
                 queue_max: int = 1_000_000, on_written: Callable[[int], None] | None = None,
                 on_dropped: Callable[[int], None] | None = None) -> None:
        if retention_days < MIN_RETENTION_DAYS:
            raise CallguardError(f"records retention must be at least {MIN_RETENTION_DAYS} days "
                                 f"(got {retention_days})")
        if queue_max < 1:
            raise CallguardError(f"records queue_max must be >= 1 (got {queue_max})")
        self.path = str(path)
        self.retention_days = retention_days
        self.flush_interval = max(0.001, float(flush_interval))
        self.queue_max = queue_max
        self._on_written = on_written
        self._on_dropped = on_dropped
        self.written = 0
        self._dropped_full = 0      # incremented by add()/outcome() callers only
        self._dropped_failed = 0    # incremented by the writer thread only
        self._dropped_reported = 0
        self._dropping = False
        self._closed = False
        # deque.append/popleft are atomic in CPython: the SIP path never takes a lock.
        self._queue: collections.deque[Any] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._read_lock = threading.Lock()
        self._conn = self._open()           # for query/prune from callers' threads
        self._wconn = _connect(self.path)   # the writer thread's own connection
        self._wconn.execute("PRAGMA synchronous = NORMAL")
        # A 64 MB page cache for the writer: the caller and callee indexes take inserts at random
        # places, and re-reading their pages would cost a large part of each insert.
        self._wconn.execute("PRAGMA cache_size = -65536")
        # Checkpoint after ~80 MB of WAL instead of ~4 MB: an index page changed by many batches
        # is then copied into the database once, not once per checkpoint.
        self._wconn.execute("PRAGMA wal_autocheckpoint = 20000")
        self._last_prune = time.time()
        self._thread = threading.Thread(target=self._run, name="callguard-records", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ opening
    def _open(self) -> sqlite3.Connection:
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CallguardError(f"{self.path}: cannot create the records folder: {exc.strerror or exc}") from None
        try:
            conn = _connect(self.path)
        except sqlite3.Error as exc:
            raise CallguardError(f"{self.path}: cannot open the records database: {exc}") from None
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise CallguardError(f"{self.path}: cannot switch the records database to WAL (got {mode})")
            conn.execute("PRAGMA synchronous = NORMAL")
            # One IMMEDIATE transaction creates or migrates the schema, so a reader opening the
            # file while the proxy creates it waits instead of seeing half a schema.
            conn.execute("BEGIN IMMEDIATE")
            try:
                has_version = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                           "AND name = 'schema_version'").fetchone()
                version = None
                if has_version:
                    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
                    version = row[0] if row else None
                if version is None:
                    columns = {r[1] for r in conn.execute("PRAGMA table_info(records)")}
                    if "final_code" in columns:
                        # A version 1 file whose creation stopped before its version was stored.
                        conn.execute("INSERT INTO schema_version (version) VALUES (1)")
                        version = 1
                    else:
                        for stmt in _statements(_SCHEMA):
                            conn.execute(stmt)
                        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                        version = SCHEMA_VERSION
                if version > SCHEMA_VERSION:
                    raise CallguardError(f"{self.path}: records schema version {version} is newer than this "
                                         f"callguard understands ({SCHEMA_VERSION})")
                elif version == 1:
                    _log().info("records_migrating", path=self.path, from_version=1, to_version=SCHEMA_VERSION)
                    for stmt in _statements(_MIGRATE_1_TO_2):
                        conn.execute(stmt)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            conn.close()
            raise CallguardError(f"{self.path}: not a usable records database: {exc}") from None
        except CallguardError:
            conn.close()
            raise
        return conn

    # ------------------------------------------------------------ the SIP path
    def add(self, record: dict[str, Any]) -> None:
        """Queue one decision record; never blocks.

        Keys: ``time`` (epoch seconds), ``call_id``, ``source``, ``caller``, ``callee``, ``rule``,
        ``verdict``, ``code``, ``score``, ``latency_us``; missing keys are stored empty/zero.
        """
        if self._closed or len(self._queue) >= self.queue_max:
            self._drop()
            return
        self._queue.append(record)

    def add_many(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Queue many decision records at once; never blocks.

        Each row holds the values of ``RECORD_FIELDS`` in that order (items after them are ignored);
        the whole list becomes one queue item, turned into insert parameters by the writer thread.
        The list is taken over: the caller must not change it afterwards.
        """
        if not rows:
            return
        if self._closed or len(self._queue) >= self.queue_max:
            for _ in rows:
                self._drop()
            return
        self._queue.append(_Rows(rows))

    def outcome(self, call_id: str, final_code: int | None = None, answered_at: float | None = None,
                ended_at: float | None = None) -> None:
        """Queue the outcome of a call: its final response, when it was answered, when it ended.

        Updates every record of that Call-ID; arguments left at None keep what is stored, so
        the answer and the end may be reported by separate calls.
        """
        if self._closed or len(self._queue) >= self.queue_max:
            self._drop()
            return
        self._queue.append(_Outcome((final_code, answered_at, ended_at, call_id)))

    def _drop(self) -> None:
        self._dropped_full += 1
        if not self._dropping:
            # Logged once when dropping starts; the writer logs when it stops, with the count.
            self._dropping = True
            _log().warning("records_dropping", path=self.path, reason="closed" if self._closed else "queue full",
                        queue_max=self.queue_max, dropped=self.dropped)

    @property
    def dropped(self) -> int:
        """Records and outcomes lost: queue full, store closed or a failed write."""
        return self._dropped_full + self._dropped_failed

    @property
    def pending(self) -> int:
        """Items queued and not yet written."""
        return len(self._queue)

    # ------------------------------------------------------------ the writer
    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            try:
                self._drain()
                if time.time() - self._last_prune >= PRUNE_EVERY:
                    self._last_prune = time.time()
                    self._prune(self._wconn, time.time())
                self._report()
            except Exception:  # the writer must survive anything; logged with the traceback
                _log().exception("records_writer_fault", path=self.path)
            if stopping:
                break
            self._wake.wait(self.flush_interval)
            self._wake.clear()

    def _drain(self) -> None:
        q = self._queue
        while q:
            inserts: list[tuple[Any, ...]] = []
            updates: list[tuple[Any, ...]] = []
            markers: list[threading.Event] = []
            n = 0
            while q and n < BATCH_MAX:
                item = q.popleft()
                n += 1
                if isinstance(item, dict):
                    inserts.append(_row_of(item))
                elif isinstance(item, _Rows):
                    inserts.extend(map(_row_of_tuple, item.rows))
                elif isinstance(item, _Outcome):
                    updates.append(item.params)
                elif isinstance(item, threading.Event):
                    markers.append(item)
                    break   # a flush marker: commit what came before it, then release the waiter
            self._write(inserts, updates)
            for m in markers:
                m.set()

    def _write(self, inserts: list[tuple[Any, ...]], updates: list[tuple[Any, ...]]) -> None:
        if not inserts and not updates:
            return
        conn = self._wconn
        try:
            conn.execute("BEGIN")
            if inserts:
                conn.executemany(_INSERT, inserts)
            if updates:
                # After the inserts: an outcome applies to the records stored up to now (its upto).
                conn.executemany(_INSERT_OUTCOME, updates)
            conn.execute("COMMIT")
        except (sqlite3.Error, ValueError, TypeError, OverflowError) as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.IntegrityError) and any(None in row for row in inserts):
                # Every column is NOT NULL: a None in a row (add_many) fails the batch instead of
                # costing a check per row on every batch; store it with the column default.
                self._write([_defaults_filled(row) for row in inserts], updates)
                return
            if len(inserts) + len(updates) > 1:
                # One bad record must not cost the whole batch: retry row by row.
                for row in inserts:
                    self._write([row], [])
                for upd in updates:
                    self._write([], [upd])
                return
            self._dropped_failed += 1
            _log().error("records_write_failed", path=self.path, error=str(exc), dropped=self.dropped)
            return
        self.written += len(inserts)
        if inserts and self._on_written is not None:
            self._on_written(len(inserts))

    def _report(self) -> None:
        dropped = self.dropped
        if dropped != self._dropped_reported:
            if self._on_dropped is not None:
                self._on_dropped(dropped - self._dropped_reported)
            self._dropped_reported = dropped
        if self._dropping and not self._closed and len(self._queue) < self.queue_max:
            self._dropping = False
            _log().warning("records_dropping_stopped", path=self.path, dropped=dropped)

    # ------------------------------------------------------------ control
    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything queued before this call is on disk.

        Raises:
            CallguardError: not done within ``timeout`` seconds.
        """
        if self._closed:
            return
        marker = threading.Event()
        self._queue.append(marker)   # bypasses queue_max on purpose: a flush is never dropped
        self._wake.set()
        if not marker.wait(timeout):
            raise CallguardError(f"{self.path}: records not flushed within {timeout} s "
                                 f"({len(self._queue)} items pending)")

    def prune(self, now: float | None = None) -> int:
        """Delete records older than ``retention_days`` before ``now``; returns how many went."""
        if not self._closed:
            self.flush()
        with self._read_lock:
            return self._prune(self._conn, time.time() if now is None else now)

    def _prune(self, conn: sqlite3.Connection, now: float) -> int:
        cutoff = now - self.retention_days * 86400.0
        total = 0
        while True:
            cur = conn.execute("DELETE FROM records WHERE id IN (SELECT id FROM records WHERE time < ? LIMIT ?)",
                               (cutoff, PRUNE_CHUNK))
            total += cur.rowcount
            if cur.rowcount < PRUNE_CHUNK:
                break
        if total:
            # Outcomes of records all gone go too.  An outcome past the newest remaining record is
            # capped to it: SQLite may hand a deleted highest id out again, and the outcome must
            # not apply to a new record that happens to reuse it.
            lo, hi = conn.execute("SELECT min(id), max(id) FROM records").fetchone()
            lo = lo if lo is not None else 1 << 62
            hi = hi if hi is not None else 0
            while True:
                cur = conn.execute("DELETE FROM outcomes WHERE id IN (SELECT id FROM outcomes WHERE upto < ? LIMIT ?)",
                                   (lo, PRUNE_CHUNK))
                if cur.rowcount < PRUNE_CHUNK:
                    break
            conn.execute("UPDATE outcomes SET upto = ? WHERE upto > ?", (hi, hi))
            _log().info("records_pruned", path=self.path, deleted=total, older_than=cutoff)
        return total

    def close(self) -> None:
        """Write everything queued, stop the writer and close the database. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30.0)
        if self._thread.is_alive():
            _log().error("records_writer_stuck", path=self.path, pending=len(self._queue))
        else:
            self._wconn.close()
            # An add() racing with close() may land after the last drain: count it, do not lose it silently.
            left = sum(1 for item in self._queue if not isinstance(item, threading.Event))
            self._queue.clear()
            if left:
                self._dropped_failed += left
                _log().error("records_lost_on_close", path=self.path, dropped=left)
        with self._read_lock:
            self._conn.close()

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ reading
    def query(self, caller: str | None = None, callee: str | None = None, rule: str | None = None,
              since: float | None = None, until: float | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Records matching every given filter, newest first.

        Args:
            caller: normalised caller number, exact match.
            callee: normalised callee number, exact match.
            rule: rule id (``allow`` for calls nothing stopped).
            since: epoch seconds, inclusive.
            until: epoch seconds, exclusive.
            limit: at most this many rows; 0 for all.
        """
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("caller", caller), ("callee", callee), ("rule", rule)):
            if value is not None:
                where.append(f"r.{column} = ?")
                params.append(value)
        if since is not None:
            where.append("r.time >= ?")
            params.append(float(since))
        if until is not None:
            where.append("r.time < ?")
            params.append(float(until))
        if limit < 0:
            raise InputError(f"limit must be >= 0 (got {limit})")
        sql = _SELECT
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY r.time DESC, r.id DESC"
        if limit:
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._read_lock:
            rows = self._conn.execute(sql, params).fetchall()
        return [dict(zip(COLUMNS, row, strict=True)) for row in rows]

    def outcome_stats(self, since: float, short_seconds: float = 6.0) -> list[tuple[str, int, int, int]]:
        """Per caller since ``since``: (caller, finished, answered, short).

        ``finished`` counts records with a final response, ``answered`` those answered, ``short``
        those answered and ended less than ``short_seconds`` later.  Callers without any
        finished call are left out.  Ordered by caller.
        """
        sql = ("SELECT caller, count(*), count(answered_at), "
               "sum(CASE WHEN answered_at IS NOT NULL AND ended_at IS NOT NULL "
               "AND ended_at - answered_at < ? THEN 1 ELSE 0 END) "
               f"FROM (SELECT r.caller AS caller, {_outcome_column('final_code')} AS final_code, "
               f"{_outcome_column('answered_at')} AS answered_at, {_outcome_column('ended_at')} AS ended_at "
               "FROM records r WHERE r.time >= ? AND EXISTS (SELECT 1 FROM outcomes o WHERE o.call_id = r.call_id)) "
               "WHERE final_code IS NOT NULL GROUP BY caller ORDER BY caller")
        with self._read_lock:
            rows = self._conn.execute(sql, (float(short_seconds), float(since))).fetchall()
        return [(str(c), int(f), int(a), int(s or 0)) for c, f, a, s in rows]

    def pragma(self, name: str) -> Any:
        """The value of a read-only PRAGMA (``journal_mode``, ``synchronous``...), for checks."""
        if not re.fullmatch(r"[a-z_]+", name):
            raise InputError(f"not a pragma name: {name!r}")
        with self._read_lock:
            return self._conn.execute(f"PRAGMA {name}").fetchone()[0]


# ---------------------------------------------------------------- the command line
_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def parse_time(text: str, now: float | None = None, tz: dt.tzinfo = dt.UTC, end_of_day: bool = False) -> float:
    """Epoch seconds from ISO 8601, epoch seconds, ``now`` or a relative ``-30s/-15m/-1h/-30d/-2w``.

    ISO times without an offset are taken in ``tz``; a bare date is the start of that day, or
    with ``end_of_day`` the start of the next (so ``--until 2026-05-28`` includes that day).

    Raises:
        InputError: none of these forms.
    """
    s = text.strip()
    now = time.time() if now is None else now
    if s == "now":
        return now
    m = _RELATIVE.match(s)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return lists_parse_time(s, tz, end_of_day)
    except (ValueError, IndexError):
        raise InputError(f"not a time: {text!r} (use ISO 8601, epoch seconds or -30s/-15m/-1h/-30d/-2w)") from None


def _iso(t: float | None, tz: dt.tzinfo) -> str:
    if t is None:
        return "-"
    return dt.datetime.fromtimestamp(t, tz).isoformat(timespec="milliseconds")


def format_table(rows: Iterable[dict[str, Any]], tz: dt.tzinfo) -> str:
    """Render records as an aligned text table, one line per record."""
    head = ("time", "call_id", "caller", "callee", "rule", "verdict", "code", "score", "latency_us",
            "final", "answered", "ended")
    lines: list[tuple[str, ...]] = [head]
    for r in rows:
        lines.append((_iso(r["time"], tz), r["call_id"] or "-", r["caller"] or "-", r["callee"] or "-", r["rule"],
                      r["verdict"], str(r["code"]), f"{r['score']:.3f}", f"{r['latency_us']:.1f}",
                      "-" if r["final_code"] is None else str(r["final_code"]),
                      _iso(r["answered_at"], tz), _iso(r["ended_at"], tz)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines) + "\n"


def _number_arg(raw: str | None, what: str) -> str | None:
    if raw is None:
        return None
    from .numbers import normalize

    n = normalize(raw)
    if n.hidden:
        # A hidden caller is stored as ""; "anonymous" or "" asks for those records.
        if raw.strip().lower() in ("", "anonymous", "hidden"):
            return ""
        raise InputError(f"--{what}: not a number: {raw!r}")
    return n.digits


def records_main(args: argparse.Namespace) -> int:
    """``callguard records``: list (or prune) stored call records.

    Exit 0 on success, 2 on bad input or config (message on stderr).
    """
    from . import config as config_mod

    try:
        cfg_path = getattr(args, "config", None) or config_mod.default_config_path()
        cfg = config_mod.load(cfg_path)
        tz = parse_tz(cfg.lists.timezone)
        now = time.time()
        since = parse_time(args.since, now, tz) if getattr(args, "since", None) else None
        until = parse_time(args.until, now, tz, end_of_day=True) if getattr(args, "until", None) else None
        limit = getattr(args, "limit", None)
        limit = 100 if limit is None else int(limit)
        if limit < 0:
            raise InputError(f"--limit must be >= 0 (got {limit})")
        caller = _number_arg(getattr(args, "caller", None), "caller")
        callee = _number_arg(getattr(args, "callee", None), "callee")
        rule = getattr(args, "rule", None)
        known_rules = config_mod.RULE_IDS + ("allow",)
        if rule is not None and rule not in known_rules:
            raise InputError(f"--rule: unknown rule id {rule!r} (known: {', '.join(known_rules)})")
        path = cfg.records.path
        prune = bool(getattr(args, "prune", False))
        if not os.path.exists(path) and not prune:
            print(f"no records yet: {path} does not exist", file=sys.stderr)
            return 0
        store = RecordStore(path, cfg.records.retention_days)
        try:
            if prune:
                n = store.prune()
                print(f"pruned {n} records older than {cfg.records.retention_days} days from {path}",
                      file=sys.stderr)
            rows = store.query(caller=caller, callee=callee, rule=rule, since=since, until=until, limit=limit)
        finally:
            store.close()
    except (ConfigError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CallguardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        out = sys.stdout
        for r in rows:
            out.write(json.dumps({"time_iso": _iso(r["time"], tz), **r}, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(format_table(rows, tz))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``callguard records`` options on ``parser`` (for the CLI and tests)."""
    parser.add_argument("--config", help="config file (default: $CALLGUARD_CONFIG or config/callguard.yaml)")
    parser.add_argument("--caller", help="only this caller (any form; normalised)")
    parser.add_argument("--callee", help="only this callee (any form; normalised)")
    parser.add_argument("--rule", help="only this rule id (allow for calls nothing stopped)")
    parser.add_argument("--since", help="from this time: ISO 8601, epoch seconds or relative (-1h, -30d)")
    parser.add_argument("--until", help="before this time: same forms as --since")
    parser.add_argument("--limit", type=int, default=100, help="at most this many records, newest first (0: all)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--prune", action="store_true", help="delete records older than records.retention_days first")


def main(argv: list[str] | None = None) -> int:
    """Run ``callguard records`` on its own (``python -m callguard.records``)."""
    parser = argparse.ArgumentParser(prog="callguard records", description="List stored call records.")
    add_arguments(parser)
    return records_main(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
