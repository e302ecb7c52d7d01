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

Schema 3 partitions the records by time, the way CDR stores do.  Each partition covers
``partition_minutes`` of decision time and owns two insert-only tables: its decisions
(``records_N``) and the outcomes written while it was the newest partition (``outcomes_N``);
the ``partitions`` table lists them.  The partition being written has no secondary index, so
an insert costs no random-order B-tree update; once its period is over and a newer partition
has taken writes, the writer thread builds its indexes in bulk (caller+time, callee+time, time;
Call-ID for the outcomes), which costs a fraction of the incremental inserts and does not grow
with the file.  Pruning drops whole partitions.  Version 1 and 2 files are migrated when opened:
the old tables become one closed, indexed partition.

The rows of :meth:`RecordStore.add_many` are packed in C by the caller and inserted by the
compiled inserter (``_recwriter``) inside the writer's transaction, the GIL let go once per batch;
``executemany`` is the reference and writes everything else (and everything when the module is
missing or ``CALLGUARD_NO_EXTENSIONS`` is set).

Reading: :meth:`RecordStore.query` and :meth:`RecordStore.outcome_stats` for people and scripts;
:meth:`RecordStore.replay_decisions` and :meth:`RecordStore.replay_outcomes` give the rate-limit
state back what a crash took from it (see :mod:`callguard.state`).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import datetime as dt
import heapq
import json
import math
import operator
import os
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import CallguardError, ConfigError, InputError
from .lists import parse_time as lists_parse_time
from .lists import parse_tz
from .log import get_logger
from .osthread import set_os_thread_name

_recwriter: Any = None
if not os.environ.get("CALLGUARD_NO_EXTENSIONS"):
    try:
        from . import _recwriter
    except ImportError:     # optional at build time: executemany writes the rows instead
        pass


def _log() -> Any:
    # Looked up at each (rare) event instead of cached at import, so a logging set-up made
    # later, or a test capturing logs, always applies.
    return get_logger("callguard.records")


SCHEMA_VERSION = 3
MIN_RETENTION_DAYS = 30
PRUNE_EVERY = 3600.0        # seconds between the writer's own pruning runs
REPLAY_SLACK = 60.0         # replay_decisions starts this much before its start time (rows slightly out of order)
REPLAY_REORDER = 5.0        # and puts rows up to this many seconds out of order back in time order
BATCH_MAX = 50_000          # queue items per transaction
PACK_ROWS = 1000            # rows packed for the compiled inserter at a time (see _insert)
_PACKED_ROW_GUESS = 192     # bytes a packed decision row takes, about (it grows if not)
WRITER_NICE = 19            # scheduling priority of the writer thread (see _lower_priority)
MAX_PARTITIONS = 2000       # over the retention period: every schema change re-reads the whole schema
PRUNE_TIMEOUT = 600.0       # seconds prune() waits for the writer thread
RETRY_MAINTENANCE = 60.0    # seconds before a failed index build is tried again

#: Columns given by the proxy, in table order.
RECORD_FIELDS: tuple[str, ...] = ("time", "call_id", "source", "caller", "callee", "rule", "verdict", "code",
                                  "score", "latency_us")
#: Columns filled in later by :meth:`RecordStore.outcome`.
OUTCOME_FIELDS: tuple[str, ...] = ("final_code", "answered_at", "ended_at")
COLUMNS: tuple[str, ...] = RECORD_FIELDS + OUTCOME_FIELDS

# The tables of one partition.  Both are insert-only.  outcomes.upto is the highest record id
# when the outcome was written: an outcome applies to the records of its Call-ID with id <= upto,
# i.e. those stored before it (or in the same batch), as the UPDATE of version 1 did.  Several
# outcomes of one call each fill their own columns; for every column the newest (highest id)
# non-NULL value wins (the former COALESCE update).  Record ids and outcome ids are increasing
# across all partitions (``last_ids`` keeps the highest ever given), so upto and "newest" keep
# their meaning whatever partition a row lands in.
_RECORDS_TABLE = """(
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
)"""
_OUTCOMES_TABLE = """(
    id          INTEGER PRIMARY KEY,
    call_id     TEXT    NOT NULL,
    upto        INTEGER NOT NULL,
    final_code  INTEGER,
    answered_at REAL,
    ended_at    REAL
)"""
# The indexes of a closed partition, named <table>_<suffix>: the queries by caller or callee
# (newest first), by time range, and by rule (time index, then filtered); the outcomes by Call-ID.
_RECORD_INDEXES: tuple[tuple[str, str], ...] = (("caller_time", "caller, time"), ("callee_time", "callee, time"),
                                                ("time", "time"))
_OUTCOME_INDEXES: tuple[tuple[str, str], ...] = (("call_id", "call_id"),)

# Where an outcome goes: into the outcomes table of the newest partition (greatest start) at the
# time it is written.  So an outcome of a record in partition P is in P's outcomes table or in
# that of a newer partition — never an older one — which lets a read look at those only, and
# lets pruning drop a partition's outcomes with it (every record they can apply to is in that
# partition or an older one, all dropped together).
_CATALOG = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS partitions (
    name        TEXT    PRIMARY KEY,
    outcomes    TEXT    NOT NULL UNIQUE,
    start_time  REAL    NOT NULL,
    end_time    REAL    NOT NULL,
    indexed     INTEGER NOT NULL DEFAULT 0,
    records     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS last_ids (
    record      INTEGER NOT NULL,
    outcome     INTEGER NOT NULL,
    partition   INTEGER NOT NULL
);
"""
# partitions: records with start_time <= time < end_time are in table `name`; ranges never
# overlap.  indexed: its indexes are built.  records: its row count (kept by the writer, so a
# prune can say how many went without counting).  last_ids: the highest record id, outcome id
# and partition number ever given.

# Version 2: one records table (indexes on time, caller+time, callee+time) and one outcomes table.
_V2_OUTCOMES_SCHEMA = """
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

# Version 1 kept the outcome in the records row (UPDATE by Call-ID) and had five indexes.
_MIGRATE_1_TO_2 = _V2_OUTCOMES_SCHEMA + """
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

_FIELDS_SQL = ", ".join(RECORD_FIELDS)
_MARKS_SQL = ", ".join("?" * len(RECORD_FIELDS))

# Reading: a query's outcomes are looked up by the Call-IDs of its rows (put in cg_want);
# outcome_stats gathers the outcomes of the partitions it reads in cg_out.  Both are temporary
# tables of the reading connection, so filling them never takes the database's write lock.
_READER_TEMP = """
CREATE TEMP TABLE IF NOT EXISTS cg_want (call_id PRIMARY KEY);
CREATE TEMP TABLE IF NOT EXISTS cg_out (id INTEGER PRIMARY KEY, call_id, upto, final_code, answered_at, ended_at);
CREATE INDEX IF NOT EXISTS temp.cg_out_call_id ON cg_out (call_id);
"""


def _outcome_column(column: str) -> str:
    return (f"(SELECT o.{column} FROM temp.cg_out o WHERE o.call_id = r.call_id AND o.upto >= r.id "
            f"AND o.{column} IS NOT NULL ORDER BY o.id DESC LIMIT 1)")


def _statements(script: str) -> list[str]:
    """The statements of a schema script (no literal in it holds a semicolon)."""
    return [stmt.strip() for stmt in script.split(";") if stmt.strip()]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_DEFAULTS: dict[str, Any] = {"time": 0.0, "call_id": "", "source": "", "caller": "", "callee": "", "rule": "",
                             "verdict": "", "code": 0, "score": 0.0, "latency_us": 0.0}
_NFIELDS = len(RECORD_FIELDS)


def _row_of(record: dict[str, Any]) -> tuple[Any, ...]:
    """The insert parameters of one record; missing keys take their defaults, None too."""
    out = []
    for name in RECORD_FIELDS:
        v = record.get(name)
        out.append(_DEFAULTS[name] if v is None else v)
    return tuple(out)


def _has_none(row: Sequence[Any]) -> bool:
    return None in row[:_NFIELDS]


def _defaults_filled(row: Sequence[Any]) -> tuple[Any, ...]:
    """The insert parameters of ``row`` with each None replaced by its column's default."""
    return tuple(_DEFAULTS[name] if v is None else v for name, v in zip(RECORD_FIELDS, row[:_NFIELDS], strict=True))


def _weight(item: Any) -> int:
    """Records and outcomes in a queue item (flush markers and calls: none)."""
    if isinstance(item, _Rows):
        return len(item.rows) if item.rows is not None else int(item.packed.rows)
    if isinstance(item, (threading.Event, _Call)):
        return 0
    return 1


class _Rows:
    """Queued decision rows from one add_many call: packed for the compiled inserter by the caller
    (``packed``, a RowBuffer; ``rows`` is then None), or the tuples in RECORD_FIELDS order when the
    inserter is missing or a row did not pack."""

    __slots__ = ("rows", "packed")

    def __init__(self, rows: Sequence[tuple[Any, ...]] | None, packed: Any = None) -> None:
        self.rows = rows
        self.packed = packed


def _unpacked(buffers: Sequence[Any]) -> list[Sequence[Any]]:
    """The rows of packed buffers as tuples again, in order (for the row-by-row paths)."""
    return [row for buf in buffers for row in buf.to_rows()]


# The insert parameters of a row: its first RECORD_FIELDS items (C-level; a 10-tuple is returned as is).
_row_of_tuple = operator.itemgetter(slice(0, _NFIELDS))
_time_of = operator.itemgetter(0)


class _Call:
    """Work for the writer thread (a prune), run in queue order; the caller waits for ``done``."""

    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class _Part:
    """One partition, as listed in the ``partitions`` table."""

    __slots__ = ("name", "outcomes", "start", "end", "indexed", "rows")

    def __init__(self, name: str, outcomes: str, start: float, end: float, indexed: int, rows: int) -> None:
        self.name = name
        self.outcomes = outcomes
        self.start = start
        self.end = end
        self.indexed = bool(indexed)
        self.rows = rows


def _catalog(conn: sqlite3.Connection) -> list[_Part]:
    """The partitions, oldest first."""
    return [_Part(*row) for row in conn.execute(
        "SELECT name, outcomes, start_time, end_time, indexed, records FROM partitions ORDER BY start_time")]


def _first_id_at(conn: sqlite3.Connection, table: str, t: float) -> int | None:
    """The smallest row id of ``table`` whose time is at least ``t``, by bisecting the row ids
    (records go in about in time order); None when there is none."""
    lo, hi = conn.execute(f"SELECT min(id), max(id) FROM {table}").fetchone()
    if lo is None:
        return None
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        row = conn.execute(f"SELECT id, time FROM {table} WHERE id >= ? ORDER BY id LIMIT 1", (mid,)).fetchone()
        if row is None or row[0] > hi:
            hi = mid - 1
        elif row[1] >= t:
            best = row[0]
            hi = mid - 1
        else:
            lo = row[0] + 1
    return best


def _index_sql(table: str, suffix: str, columns: str) -> str:
    return f"CREATE INDEX IF NOT EXISTS {_quote(table + '_' + suffix)} ON {_quote(table)} ({columns})"


def _partition_indexes(part: _Part) -> list[tuple[str, str]]:
    """(index name, CREATE statement) of every index a closed partition has."""
    return ([(f"{part.name}_{s}", _index_sql(part.name, s, c)) for s, c in _RECORD_INDEXES]
            + [(f"{part.outcomes}_{s}", _index_sql(part.outcomes, s, c)) for s, c in _OUTCOME_INDEXES])


def _existing_indexes(conn: sqlite3.Connection, part: _Part) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name IN (?, ?)",
                                       (part.name, part.outcomes))}


def _migrate_2_to_3(conn: sqlite3.Connection) -> None:
    """The version 2 tables become one closed partition covering their time range (no row is copied)."""
    for stmt in _statements(_CATALOG):
        conn.execute(stmt)
    conn.execute("DROP INDEX IF EXISTS outcomes_upto")   # served pruning by DELETE only
    max_rid = conn.execute("SELECT max(id) FROM records").fetchone()[0]
    max_oid = conn.execute("SELECT max(id) FROM outcomes").fetchone()[0] or 0
    if max_rid is None:
        # No record: nothing to keep (an outcome only ever applies to an older record).
        conn.execute("DROP TABLE records")
        conn.execute("DROP TABLE outcomes")
        max_rid = 0
    else:
        # The range of its finite times (the time index answers both); a row with some other
        # time (only a bad add() could store one) stays in the table, outside every range.
        big = sys.float_info.max
        lo = conn.execute("SELECT time FROM records WHERE time >= ? ORDER BY time LIMIT 1", (-big,)).fetchone()
        hi = conn.execute("SELECT time FROM records WHERE time <= ? ORDER BY time DESC LIMIT 1", (big,)).fetchone()
        start = float(lo[0]) if lo else 0.0
        end = math.nextafter(float(hi[0]), math.inf) if hi else 0.0
        count = conn.execute("SELECT count(*) FROM records").fetchone()[0]
        part = _Part("records", "outcomes", start, end, 0, count)
        have = _existing_indexes(conn, part)
        indexed = all(name in have for name, _ in _partition_indexes(part))
        conn.execute("INSERT INTO partitions (name, outcomes, start_time, end_time, indexed, records) "
                     "VALUES (?, ?, ?, ?, ?, ?)", ("records", "outcomes", start, end, int(indexed), count))
    conn.execute("INSERT INTO last_ids (record, outcome, partition) VALUES (?, ?, 0)", (max_rid, max_oid))
    conn.execute("UPDATE schema_version SET version = 3")


def _connect(path: str) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN/COMMIT), so a batch is exactly one.
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def partition_seconds(retention_days: int, partition_minutes: float) -> float:
    """The partition period used: ``partition_minutes``, or longer when the retention period
    would otherwise hold more than :data:`MAX_PARTITIONS` partitions."""
    least = retention_days * 86400.0 / MAX_PARTITIONS
    return max(float(partition_minutes) * 60.0, math.ceil(least / 60.0) * 60.0)


class RecordStore:
    """The call-record database, written in the background.

    Args:
        path: SQLite file; its parent folder is created when missing.
        retention_days: records older than this are pruned (at least 30, R9).
        partition_minutes: decision time covered by one partition (see :func:`partition_seconds`).
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

    #: Build a partition's indexes when it is created instead of when it closes (the schema 2
    #: way of paying for them, row by row; bench/records.py compares the two).
    _INDEX_ON_CREATE = False

    def __init__(self, path: str, retention_days: int = 30, *, partition_minutes: float = 60,
                 flush_interval: float = 0.2, queue_max: int = 1_000_000,
                 on_written: Callable[[int], None] | None = None,
                 on_dropped: Callable[[int], None] | None = None) -> None:
        if retention_days < MIN_RETENTION_DAYS:
            raise CallguardError(f"records retention must be at least {MIN_RETENTION_DAYS} days "
                                 f"(got {retention_days})")
        if queue_max < 1:
            raise CallguardError(f"records queue_max must be >= 1 (got {queue_max})")
        if not partition_minutes > 0:
            raise CallguardError(f"records partition_minutes must be > 0 (got {partition_minutes})")
        self.path = str(path)
        self.retention_days = retention_days
        self.period = partition_seconds(retention_days, partition_minutes)
        if self.period > float(partition_minutes) * 60.0:
            _log().info("records_partition_raised", path=self.path, partition_minutes=partition_minutes,
                        used_minutes=self.period / 60.0, retention_days=retention_days, max_partitions=MAX_PARTITIONS)
        self.flush_interval = max(0.001, float(flush_interval))
        self.queue_max = queue_max
        self._on_written = on_written
        self._on_dropped = on_dropped
        self.written = 0
        self._dropped_full = 0      # incremented by add()/outcome() callers only
        self._dropped_failed = 0    # incremented by the writer thread only
        self._store_error_logged: float | None = None   # when a store-wide write error was last logged
        self._dropped_reported = 0
        self._dropping = False
        self._closed = False
        # deque.append/popleft are atomic in CPython: the SIP path never takes a lock.
        self._queue: collections.deque[Any] = collections.deque()
        # Records and outcomes queued (a batch of rows is one queue item, so queue_max counts these,
        # not items): each counter has one writer -- the adding side, the writer thread -- so
        # neither loses an update without a lock.
        self._queued_in = 0
        self._queued_out = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._read_lock = threading.Lock()
        self._conn = self._open()           # for queries from callers' threads
        for stmt in _statements(_READER_TEMP):
            self._conn.execute(stmt)
        self._wconn = _connect(self.path)   # the writer thread's own connection
        self._wconn.execute("PRAGMA synchronous = NORMAL")
        self._wconn.execute("PRAGMA cache_size = -65536")
        # Checkpoint after ~80 MB of WAL instead of ~4 MB, and truncate a WAL left bigger (an
        # index build writes its whole index to the WAL once) back to 64 MB.
        self._wconn.execute("PRAGMA wal_autocheckpoint = 20000")
        self._wconn.execute("PRAGMA journal_size_limit = 67108864")
        # Debian's SQLite zeroes every freed page (SECURE_DELETE): a dropped partition would be
        # written over in full, through the WAL.  FAST zeroes only what is written anyway; the
        # freed pages are reused by the next partitions.
        self._wconn.execute("PRAGMA secure_delete = FAST")
        # The compiled inserter (``_recwriter``) writes add_many rows inside the writer's own
        # transactions with the GIL released for the whole batch; executemany is the reference
        # and writes add() records, unusual rows and everything when the module is missing.
        self._inserter: Any = None
        self._buffer: Any = None
        if _recwriter is not None:
            try:
                self._inserter = _recwriter.Inserter.sharing(self._wconn)
                self._buffer = _recwriter.RowBuffer()
            except (RuntimeError, TypeError, ValueError) as exc:
                _log().info("records_inserter_unavailable", path=self.path, error=str(exc))
        # The writer's view of the catalog, loaded in its first transaction and again whenever
        # another connection has changed the file (PRAGMA data_version).
        self._dv: int | None = None
        self._parts: list[_Part] = []        # oldest first
        self._starts: list[float] = []
        self._rid = 0                        # highest record id given
        self._oid = 0                        # highest outcome id given
        self._pno = 0                        # highest partition number given
        # The tables holding the highest record / outcome id: rows inserted there get the next
        # id from SQLite itself (max + 1); elsewhere the first row of a batch is given it.
        self._rtable: str | None = None
        self._otable: str | None = None
        self._wrote = False                  # indexes are built and partitions pruned by writing stores only
        self._maintaining = False
        self._maintain_after = 0.0
        self._index_seconds = 0.0            # spent on the partition being indexed so far
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
            if self._current_version(conn) == SCHEMA_VERSION:
                # Nothing to create or migrate: no write lock, which the writer of a running proxy
                # may hold for a while (an index build).
                return conn
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
                        for stmt in _statements(_CATALOG):
                            conn.execute(stmt)
                        conn.execute("INSERT INTO last_ids (record, outcome, partition) VALUES (0, 0, 0)")
                        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                        version = SCHEMA_VERSION
                if version > SCHEMA_VERSION:
                    raise CallguardError(f"{self.path}: records schema version {version} is newer than this "
                                         f"callguard understands ({SCHEMA_VERSION})")
                if version < SCHEMA_VERSION:
                    _log().info("records_migrating", path=self.path, from_version=version, to_version=SCHEMA_VERSION)
                if version == 1:
                    for stmt in _statements(_MIGRATE_1_TO_2):
                        conn.execute(stmt)
                    version = 2
                if version == 2:
                    _migrate_2_to_3(conn)
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

    @staticmethod
    def _current_version(conn: sqlite3.Connection) -> int | None:
        conn.execute("BEGIN")
        try:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
                                ).fetchone():
                return None
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            return row[0] if row else None
        finally:
            conn.execute("COMMIT")

    # ------------------------------------------------------------ the SIP path
    def add(self, record: dict[str, Any]) -> None:
        """Queue one decision record; never blocks.

        Keys: ``time`` (epoch seconds), ``call_id``, ``source``, ``caller``, ``callee``, ``rule``,
        ``verdict``, ``code``, ``score``, ``latency_us``; missing keys are stored empty/zero.
        """
        if self._closed or self.pending >= self.queue_max:
            self._drop()
            return
        self._queue.append(record)
        self._queued_in += 1

    def add_many(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Queue many decision records at once; never blocks.

        Each row holds the values of ``RECORD_FIELDS`` in that order (items after them are ignored);
        the whole list becomes one queue item, turned into insert parameters by the writer thread.
        The list is taken over: the caller must not change it afterwards.
        """
        if not rows:
            return
        if self._closed or self.pending >= self.queue_max:
            for _ in rows:
                self._drop()
            return
        packed = None
        if self._inserter is not None:
            # Packed here, in C, on the caller's thread (about 0.15 us a row, moved from the writer),
            # and the tuples are not kept: packing and freeing a second's worth of them in the writer
            # held the GIL for milliseconds, which the event loop's thread then waited for (at 30k
            # calls/s the slowest answers waited 2-3 ms).  Here they go a batch at a time.
            packed = _recwriter.RowBuffer(len(rows) * _PACKED_ROW_GUESS)
            try:
                packed.extend(rows)
            except (TypeError, ValueError, OverflowError):
                packed = None   # the writer sorts these rows out one by one
        self._queue.append(_Rows(None if packed is not None else rows, packed))
        self._queued_in += len(rows)

    @property
    def packs_rows(self) -> bool:
        """Whether :meth:`add_packed` is there to take rows packed elsewhere (the compiled writer is)."""
        return self._inserter is not None

    def add_packed(self, data: bytes, rows: int, tmin: float, tmax: float, odd: bool) -> None:
        """Queue ``rows`` decision records packed in ``RowBuffer``'s layout (the proxy's fast path packs
        its decisions so, without a tuple or a string per row); never blocks."""
        if self._inserter is None:
            raise RuntimeError("add_packed needs the compiled records writer (see packs_rows)")
        if rows <= 0:
            return
        if self._closed or self.pending >= self.queue_max:
            for _ in range(rows):
                self._drop()
            return
        self._queue.append(_Rows(None, _recwriter.RowBuffer.adopt(data, rows, tmin, tmax, odd)))
        self._queued_in += rows

    def outcome(self, call_id: str, final_code: int | None = None, answered_at: float | None = None,
                ended_at: float | None = None) -> None:
        """Queue the outcome of a call: its final response, when it was answered, when it ended.

        Applies to every record of that Call-ID stored so far; arguments left at None keep what
        is stored, so the answer and the end may be reported by separate calls.
        """
        if self._closed or self.pending >= self.queue_max:
            self._drop()
            return
        # A bare tuple: the writer tells it from the other queue items by its type, and holding only
        # numbers and a string it leaves the garbage collector's view at its first pass.
        self._queue.append((final_code, answered_at, ended_at, call_id))
        self._queued_in += 1

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
        """Records and outcomes queued and not yet written."""
        return self._queued_in - self._queued_out

    # ------------------------------------------------------------ the writer
    @staticmethod
    def _lower_priority() -> None:
        """Run the writer at nice WRITER_NICE: on a machine whose cores the SIP path and its peers
        keep busy, the scheduler then gives a core to the event loop first.  Measured with serve at
        10k calls/s on 2 cores: p99 answer time 0.8-1.2 ms with the writer at the loop's priority,
        0.4-0.55 ms at nice 19 (as without records).  The writer needs ~2 % of a core at that rate
        and still gets its share; what it has not written waits in the queue, never dropped before
        ``queue_max``.  Linux sets this per thread; elsewhere it is skipped."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        except (OSError, AttributeError):
            pass

    def _run(self) -> None:
        set_os_thread_name("cg-records")
        self._lower_priority()
        while True:
            stopping = self._stop.is_set()
            busy = False
            try:
                self._drain()
                if not stopping and self._wrote:
                    busy = self._maintain()
                self._report()
            except Exception:  # the writer must survive anything; logged with the traceback
                _log().exception("records_writer_fault", path=self.path)
            if stopping:
                break
            if not busy:
                self._wake.wait(self.flush_interval)
                self._wake.clear()

    def _drain(self) -> None:
        q = self._queue
        while q:
            inserts: list[Sequence[Any]] = []
            updates: list[tuple[Any, ...]] = []
            markers: list[threading.Event] = []
            calls: list[_Call] = []
            packable = True     # only add_many rows: the compiled inserter may take them
            packed: list[Any] = []      # while every add_many batch so far came packed: their buffers
            n = 0
            while q and n < BATCH_MAX:
                item = q.popleft()
                n += 1
                self._queued_out += _weight(item)
                if isinstance(item, _Rows):
                    if item.packed is not None and not inserts:
                        packed.append(item.packed)
                        continue
                    if packed:      # rows of another kind: everything goes row by row, in order
                        inserts.extend(_unpacked(packed))
                        packed = []
                    inserts.extend(item.packed.to_rows() if item.rows is None else item.rows)
                elif isinstance(item, dict):
                    if packed:
                        inserts.extend(_unpacked(packed))
                        packed = []
                    inserts.append(_row_of(item))
                    packable = False
                elif type(item) is tuple:      # an outcome (see outcome())
                    updates.append(item)
                elif isinstance(item, threading.Event):
                    markers.append(item)
                    break   # a flush marker: commit what came before it, then release the waiter
                elif isinstance(item, _Call):
                    calls.append(item)
                    break   # runs after what came before it is written
            self._write(inserts, updates, packable, packed or None)
            for m in markers:
                m.set()
            for c in calls:
                try:
                    c.result = c.fn()
                except Exception as exc:  # handed to the waiting caller
                    c.error = exc
                c.done.set()

    def _write(self, inserts: list[Sequence[Any]], updates: list[tuple[Any, ...]], packable: bool = False,
               packed: list[Any] | None = None) -> None:
        """Write a batch: rows (``inserts``), or add_many batches packed by their callers (``packed``,
        RowBuffers, then ``inserts`` is empty), and outcomes (``updates``)."""
        if not inserts and not updates and not packed:
            return
        conn = self._wconn
        try:
            stored, bad = self._commit(inserts, updates, packable, packed)
        except (sqlite3.Error, ValueError, TypeError, OverflowError) as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._dv = None     # the catalog may have changed in the rolled-back transaction: reload
            if packed:
                # Sorted out the reference way: the rows again, with the halving below.
                self._write(inserts + _unpacked(packed), updates, packable)
                return
            if isinstance(exc, sqlite3.IntegrityError) and any(map(_has_none, inserts)):
                # Every column is NOT NULL: a None in a row (add_many) fails the batch instead of
                # costing a check per row on every batch; store it with the column default.
                self._write([_defaults_filled(row) if _has_none(row) else row for row in inserts], updates, packable)
                return
            if _store_wide(exc):
                # The store itself failed (a full disk, an I/O error, a read-only or corrupt file):
                # no half of the batch would fare better.  Halving down to single rows cost ~2N
                # transactions and one error line per record (tens of thousands a second).
                self._dropped_failed += len(inserts) + len(updates)
                now = time.monotonic()
                if self._store_error_logged is None or now - self._store_error_logged >= STORE_ERROR_LOG_INTERVAL:
                    self._store_error_logged = now
                    _log().error("records_write_failed", path=self.path, error=str(exc), records=len(inserts),
                                 outcomes=len(updates), dropped=self.dropped)
                return
            if len(inserts) + len(updates) > 1:
                # One bad record must not cost the whole batch: retry each half (the outcomes
                # after all records, as in one batch).
                h = len(inserts) // 2
                if h:
                    self._write(inserts[:h], [], packable)
                    self._write(inserts[h:], [], packable)
                elif inserts:
                    self._write(inserts, [], packable)
                h = len(updates) // 2
                if h:
                    self._write([], updates[:h])
                    self._write([], updates[h:])
                elif updates:
                    self._write([], updates)
                return
            self._dropped_failed += 1
            _log().error("records_write_failed", path=self.path, error=str(exc), dropped=self.dropped)
            return
        self._wrote = True
        if bad:
            self._dropped_failed += bad
            _log().error("records_write_failed", path=self.path, error="time is not a finite number",
                         records=bad, dropped=self.dropped)
        self.written += stored
        if stored and self._on_written is not None:
            self._on_written(stored)

    def _begin(self) -> None:
        """Start a write transaction, with the catalog as committed (another process may write too)."""
        conn = self._wconn
        conn.execute("BEGIN IMMEDIATE")
        dv = conn.execute("PRAGMA data_version").fetchone()[0]
        if dv != self._dv:
            self._parts = _catalog(conn)
            self._starts = [p.start for p in self._parts]
            self._rid, self._oid, self._pno = conn.execute(
                "SELECT record, outcome, partition FROM last_ids").fetchone()
            self._rtable = self._otable = None
            self._dv = dv

    def _commit(self, inserts: list[Sequence[Any]], updates: list[tuple[Any, ...]],
                packable: bool, packed: list[Any] | None = None) -> tuple[int, int]:
        """Write one batch in one transaction; returns (records stored, records with an unusable time)."""
        conn = self._wconn
        self._begin()
        stored = bad = 0
        if packed:
            # The usual batch: add_many rows packed by the callers, every time in the partition being
            # written (the buffers know their earliest and latest time: no row is read), which holds
            # the highest id.  Anything else goes row by row.
            cur = self._parts[-1] if self._parts else None
            if cur is not None and self._rtable == cur.name and not any(b.odd for b in packed) \
                    and cur.start <= min(b.tmin for b in packed) and max(b.tmax for b in packed) < cur.end:
                stored = self._insert_packed(cur, packed)
            else:
                inserts = inserts + _unpacked(packed)
        if inserts:
            groups, bad = self._route(inserts)
            # Rows of add_many (every time a number in the partition being written) go through the
            # compiled inserter, a slice at a time; a batch that needed sorting out goes row by row.
            packable = packable and len(groups) == 1 and not bad and groups[0][0] is self._parts[-1]
            for part, rows in groups:
                self._insert(part, rows, packable)
                stored += len(rows)
        if updates:
            # After the inserts: an outcome applies to the records stored up to now (its upto).
            self._insert_outcomes(updates)
        conn.execute("UPDATE last_ids SET record = ?, outcome = ?, partition = ?", (self._rid, self._oid, self._pno))
        conn.execute("COMMIT")
        return stored, bad

    def _route(self, rows: list[Sequence[Any]]) -> tuple[list[tuple[_Part, list[Sequence[Any]]]], int]:
        """The rows grouped by partition (created when missing), and how many have no usable time."""
        if self._parts:
            cur = self._parts[-1]
            try:
                # The usual batch: every row in the partition being written (two C-level passes).
                if cur.start <= min(map(_time_of, rows)) and max(map(_time_of, rows)) < cur.end:
                    return [(cur, rows)], 0
            except TypeError:
                pass    # a None or a non-number: sorted out row by row
        groups: dict[str, tuple[_Part, list[Sequence[Any]]]] = {}
        bad = 0
        for row in rows:
            t = row[0]
            if t is None:
                t = 0.0     # stored as the default, 0
            elif type(t) is not float:
                try:
                    t = float(t)
                except (TypeError, ValueError, OverflowError):
                    bad += 1
                    continue
            if not math.isfinite(t):
                bad += 1
                continue
            part = self._partition_for(t)
            group = groups.get(part.name)
            if group is None:
                groups[part.name] = group = (part, [])
            group[1].append(row)
        return list(groups.values()), bad

    def _partition_for(self, t: float) -> _Part:
        i = bisect.bisect_right(self._starts, t)
        if i and t < self._parts[i - 1].end:
            return self._parts[i - 1]
        start = math.floor(t / self.period) * self.period
        end = start + self.period
        # Never overlap a neighbour (after a change of partition_minutes, or next to a migrated file).
        if i:
            start = max(start, self._parts[i - 1].end)
        if i < len(self._parts):
            end = min(end, self._parts[i].start)
        start = min(start, t)
        if not end > t:
            end = math.nextafter(t, math.inf)
        self._pno += 1
        part = _Part(f"records_{self._pno}", f"outcomes_{self._pno}", start, end, 0, 0)
        conn = self._wconn
        conn.execute(f"CREATE TABLE {_quote(part.name)} {_RECORDS_TABLE}")
        conn.execute(f"CREATE TABLE {_quote(part.outcomes)} {_OUTCOMES_TABLE}")
        if self._INDEX_ON_CREATE:
            for _, sql in _partition_indexes(part):
                conn.execute(sql)
            part.indexed = True
        conn.execute("INSERT INTO partitions (name, outcomes, start_time, end_time, indexed) VALUES (?, ?, ?, ?, ?)",
                     (part.name, part.outcomes, start, end, int(part.indexed)))
        self._parts.insert(i, part)
        self._starts.insert(i, start)
        return part

    def _insert_packed(self, part: _Part, packed: list[Any]) -> int:
        """Insert packed batches into ``part``, the table holding the highest id: one call, the GIL let go
        once for them all.  Returns the number of rows."""
        conn = self._wconn
        n = sum(map(len, packed))
        self._inserter.prepare(f"INSERT INTO {_quote(part.name)} ({_FIELDS_SQL}) VALUES ({_MARKS_SQL})")
        self._inserter.insert_many(packed)
        self._rid = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        conn.execute("UPDATE partitions SET records = records + ? WHERE name = ?", (n, part.name))
        part.rows += n
        return n

    def _insert(self, part: _Part, rows: list[Sequence[Any]], packable: bool = False) -> None:
        conn = self._wconn
        table = _quote(part.name)
        first = 0
        if self._rtable != part.name:
            # The next id is one past the highest anywhere, not in this table.
            conn.execute(f"INSERT INTO {table} (id, {_FIELDS_SQL}) VALUES (?, {_MARKS_SQL})",
                         (self._rid + 1, *rows[0][:_NFIELDS]))
            first = 1
        if len(rows) > first:
            rest = rows if not first else rows[first:]
            sql = f"INSERT INTO {table} ({_FIELDS_SQL}) VALUES ({_MARKS_SQL})"
            if packable and self._inserter is not None:
                self._inserter.prepare(sql)
                # Packing holds the GIL (it reads Python objects); in slices of PACK_ROWS the event
                # loop's thread waits at most ~0.2 ms for it, never a whole batch's worth.
                for j in range(0, len(rest), PACK_ROWS):
                    part_rows = rest[j:j + PACK_ROWS]
                    if self._pack(part_rows):
                        self._inserter.insert(self._buffer)
                    else:
                        conn.executemany(sql, map(_row_of_tuple, part_rows))
            else:
                conn.executemany(sql, map(_row_of_tuple, rest))
        self._rid = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        self._rtable = part.name
        conn.execute("UPDATE partitions SET records = records + ? WHERE name = ?", (len(rows), part.name))
        part.rows += len(rows)

    def _pack(self, rows: Sequence[Sequence[Any]]) -> bool:
        """Pack ``rows`` for the compiled inserter; False when it is missing or a row does not pack."""
        buf = self._buffer
        if buf is None:
            return False
        buf.clear()
        try:
            buf.extend(rows)
        except (TypeError, ValueError, OverflowError):
            return False     # not a tuple, a number that is not one...: executemany sorts it out
        return True

    def _insert_outcomes(self, updates: list[tuple[Any, ...]]) -> None:
        conn = self._wconn
        part = self._parts[-1] if self._parts else self._partition_for(time.time())
        table = _quote(part.outcomes)
        upto = int(self._rid)
        first = 0
        if self._otable != part.outcomes:
            conn.execute(f"INSERT INTO {table} (id, final_code, answered_at, ended_at, call_id, upto) "
                         f"VALUES (?, ?, ?, ?, ?, {upto})", (self._oid + 1, *updates[0]))
            first = 1
        if len(updates) > first:
            conn.executemany(f"INSERT INTO {table} (final_code, answered_at, ended_at, call_id, upto) "
                             f"VALUES (?, ?, ?, ?, {upto})", updates if not first else updates[first:])
        self._oid = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        self._otable = part.outcomes

    # ------------------------------------------------------------ upkeep (writer thread)
    def _maintain(self) -> bool:
        """One step of upkeep: a due prune, or one index of a closed partition.  True if it did one."""
        now = time.time()
        if now - self._last_prune >= PRUNE_EVERY:
            self._last_prune = now
            self._prune(now)
            return True
        if now < self._maintain_after:
            return False
        # Closed: its period is over and a newer partition has taken writes (it is not the last).
        part = next((p for p in self._parts[:-1] if not p.indexed and p.end <= now), None)
        if part is None:
            return False
        self._maintaining = True
        try:
            if self._stop.is_set():
                return False
            self._index_step(part)
        except sqlite3.Error as exc:
            if self._wconn.in_transaction:
                self._wconn.execute("ROLLBACK")
            self._dv = None
            if self._stop.is_set():
                _log().info("records_index_interrupted", path=self.path, partition=part.name)
            else:
                self._maintain_after = time.time() + RETRY_MAINTENANCE
                _log().error("records_index_failed", path=self.path, partition=part.name, error=str(exc))
        finally:
            self._maintaining = False
        return True

    def _index_step(self, part: _Part) -> None:
        """Build the first missing index of ``part`` (one per transaction: batches go in between)."""
        conn = self._wconn
        self._begin()
        if not any(p is part for p in self._parts):
            conn.execute("COMMIT")      # gone (another process pruned it); the catalog is reloaded
            return
        have = _existing_indexes(conn, part)
        missing = [sql for name, sql in _partition_indexes(part) if name not in have]
        started = time.perf_counter()
        if missing:
            conn.execute(missing[0])
        if len(missing) <= 1:
            conn.execute("UPDATE partitions SET indexed = 1 WHERE name = ?", (part.name,))
        conn.execute("COMMIT")
        self._index_seconds += time.perf_counter() - started
        if len(missing) <= 1:
            part.indexed = True
            _log().info("records_partition_indexed", path=self.path, partition=part.name, records=part.rows,
                        seconds=round(self._index_seconds, 3))
            self._index_seconds = 0.0

    def _prune(self, now: float) -> int:
        """Drop the partitions whose end is older than the retention period, one per transaction."""
        cutoff = now - self.retention_days * 86400.0
        conn = self._wconn
        total = 0
        dropped = 0
        try:
            while True:
                self._begin()
                part = next((p for p in self._parts if p.end <= cutoff), None)
                if part is None:
                    conn.execute("COMMIT")
                    break
                # Its outcomes go with it: they apply to records in it or in older partitions only.
                conn.execute(f"DROP TABLE IF EXISTS {_quote(part.name)}")
                conn.execute(f"DROP TABLE IF EXISTS {_quote(part.outcomes)}")
                conn.execute("DELETE FROM partitions WHERE name = ?", (part.name,))
                conn.execute("COMMIT")
                i = self._parts.index(part)
                del self._parts[i]
                del self._starts[i]
                if self._rtable == part.name:
                    self._rtable = None
                if self._otable == part.outcomes:
                    self._otable = None
                total += part.rows
                dropped += 1
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._dv = None
            raise
        if dropped:
            _log().info("records_pruned", path=self.path, deleted=total, partitions=dropped, older_than=cutoff)
        return total

    def _report(self) -> None:
        dropped = self.dropped
        if dropped != self._dropped_reported:
            if self._on_dropped is not None:
                self._on_dropped(dropped - self._dropped_reported)
            self._dropped_reported = dropped
        if self._dropping and not self._closed and self.pending < self.queue_max:
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
        """Drop the partitions whose records are all older than ``retention_days`` before ``now``
        (after writing what is queued); returns how many records went.

        A partition goes once its end is past the retention period, so a record may stay up to
        one partition period longer; none goes earlier.

        Raises:
            CallguardError: the store is closed, or the writer did not manage within
                :data:`PRUNE_TIMEOUT` seconds or failed.
        """
        if self._closed:
            raise CallguardError(f"{self.path}: the records store is closed")
        when = time.time() if now is None else float(now)
        call = _Call(lambda: self._prune(when))
        self._queue.append(call)     # like a flush, never dropped
        self._wake.set()
        if not call.done.wait(PRUNE_TIMEOUT):
            raise CallguardError(f"{self.path}: records not pruned within {PRUNE_TIMEOUT} s")
        if call.error is not None:
            raise CallguardError(f"{self.path}: cannot prune the records: {call.error}") from call.error
        return int(call.result)

    def close(self) -> None:
        """Write everything queued, stop the writer and close the database. Safe to call twice.

        An index build under way is interrupted (the next writer builds it again).
        """
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + 30.0
        while self._thread.is_alive() and time.monotonic() < deadline:
            if self._maintaining:
                self._wconn.interrupt()
            self._thread.join(timeout=0.05)
        if self._thread.is_alive():
            _log().error("records_writer_stuck", path=self.path, pending=len(self._queue))
        else:
            if self._inserter is not None:
                self._inserter.close()
            self._wconn.close()
            # An add() racing with close() may land after the last drain: count it, do not lose it silently.
            left = sum(map(_weight, self._queue))
            for item in self._queue:
                if isinstance(item, _Call):
                    item.error = CallguardError(f"{self.path}: the records store is closed")
                    item.done.set()
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
    def _read_catalog(self, conn: sqlite3.Connection) -> list[_Part]:
        """The partitions, newest first, as of the read transaction ``conn`` is in."""
        return _catalog(conn)[::-1]

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """One read transaction on the reading connection: the catalog and every partition as of
        one moment, whatever the writer switches, indexes or drops meanwhile."""
        with self._read_lock:
            conn = self._conn
            conn.execute("BEGIN")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _with_outcomes(self, conn: sqlite3.Connection, since: float) -> Iterator[_Part]:
        """The partitions holding records from ``since`` on, newest first.  When partition P comes,
        temp.cg_out holds the outcomes of P and of every newer partition, the only ones that can
        apply to P's records; it is emptied again at the end.  Inside :meth:`_reading`."""
        conn.execute("DELETE FROM temp.cg_out")
        for p in self._read_catalog(conn):
            if p.end <= since:
                break
            conn.execute("INSERT INTO temp.cg_out SELECT id, call_id, upto, final_code, answered_at, "
                         f"ended_at FROM {_quote(p.outcomes)}")
            yield p
        conn.execute("DELETE FROM temp.cg_out")

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
        if not 0 <= limit <= MAX_LIMIT:
            raise InputError(f"limit must be from 0 to {MAX_LIMIT} (got {limit})")
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("caller", caller), ("callee", callee), ("rule", rule)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        lo = None if since is None else float(since)
        hi = None if until is None else float(until)
        if lo is not None:
            where.append("time >= ?")
            params.append(lo)
        if hi is not None:
            where.append("time < ?")
            params.append(hi)
        tail = (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY time DESC, id DESC"
        with self._reading() as conn:
            parts = self._read_catalog(conn)
            found: list[tuple[float, tuple[Any, ...]]] = []
            for p in parts:
                # Partitions are disjoint time ranges, newest first: their rows come in query order.
                if (lo is not None and p.end <= lo) or (hi is not None and p.start >= hi):
                    continue
                sql = f"SELECT id, {_FIELDS_SQL} FROM {_quote(p.name)}{tail}"
                if limit:
                    rows = conn.execute(sql + " LIMIT ?", (*params, limit - len(found))).fetchall()
                else:
                    rows = conn.execute(sql, params).fetchall()
                found.extend((p.start, row) for row in rows)
                if limit and len(found) >= limit:
                    break
            outcomes = self._outcomes_of(conn, parts, found)
        return [dict(zip(COLUMNS, (*row[1:], *outcome), strict=True)) for (_, row), outcome in zip(found, outcomes)]

    @staticmethod
    def _outcomes_of(conn: sqlite3.Connection, parts: list[_Part],
                     found: list[tuple[float, tuple[Any, ...]]]) -> list[tuple[Any, Any, Any]]:
        """(final_code, answered_at, ended_at) of each found (partition start, (id, fields...)) row."""
        if not found:
            return []
        conn.execute("DELETE FROM temp.cg_want")
        conn.executemany("INSERT OR IGNORE INTO temp.cg_want (call_id) VALUES (?)", ((row[2],) for _, row in found))
        oldest = min(start for start, _ in found)
        by_call: dict[Any, list[tuple[Any, ...]]] = collections.defaultdict(list)
        for p in parts:
            if p.start < oldest:
                continue    # written before any of these records: its outcomes cannot apply
            for o in conn.execute("SELECT id, call_id, upto, final_code, answered_at, ended_at "
                                  f"FROM {_quote(p.outcomes)} WHERE call_id IN (SELECT call_id FROM temp.cg_want)"):
                by_call[o[1]].append(o)
        for outs in by_call.values():
            outs.sort(reverse=True)     # newest (highest id) first
        out: list[tuple[Any, Any, Any]] = []
        for _, row in found:
            rid = row[0]
            final = answered = ended = None
            for _oid, _cid, upto, f, a, e in by_call.get(row[2], ()):
                if upto < rid:
                    continue
                if final is None:
                    final = f
                if answered is None:
                    answered = a
                if ended is None:
                    ended = e
            out.append((final, answered, ended))
        return out

    def replay_horizon(self, since: float, max_rows: int) -> float:
        """The start time from which at most about ``max_rows`` records, the newest, are held:
        ``since`` itself when there are no more than that from ``since`` on.  Counted by row ids
        (found by bisecting each partition's), so it reads a few rows, not all of them."""
        if max_rows <= 0:
            return math.inf
        held = 0
        with self._reading() as conn:
            for p in self._read_catalog(conn):      # newest first
                if p.end <= since:
                    break
                table = _quote(p.name)
                first = _first_id_at(conn, table, since)
                if first is None:
                    continue
                last = conn.execute(f"SELECT max(id) FROM {table}").fetchone()[0]
                if held + (last - first + 1) > max_rows:
                    # the newest max_rows - held rows of this partition: from the row that many back
                    row = conn.execute(f"SELECT time FROM {table} WHERE id >= ? ORDER BY id LIMIT 1",
                                       (last - (max_rows - held) + 1,)).fetchone()
                    return max(since, float(row[0])) if row else since
                held += last - first + 1
        return since

    def replay_decisions(self, since: float, fn: Callable[[float, str, str, str], object],
                         rules: Iterable[str]) -> int:
        """Call ``fn(time, caller, callee, source)`` for every record from ``since`` on whose rule is
        one of ``rules``, oldest first; returns how many.  ``callguard serve`` rebuilds its
        rate-limit windows with it after an unclean stop.

        A partition is read in insertion order from the first row at ``since`` (found by bisecting
        its row ids: records go in about in time order), so no sort over the partition and no
        index is needed, and memory stays small: the writer stores batches as they come, a few
        milliseconds out of time order at most, which a reorder buffer of REPLAY_REORDER seconds
        puts back in order.
        """
        wanted = frozenset(rules)
        pending: list[tuple[float, int, str, str, str]] = []
        done = 0
        seq = 0
        with self._reading() as conn:
            for p in reversed(self._read_catalog(conn)):      # oldest first
                if p.end <= since:
                    continue
                table = _quote(p.name)
                first = _first_id_at(conn, table, since - REPLAY_SLACK)
                if first is None:
                    continue
                for t, caller, callee, source, rule in conn.execute(
                        f"SELECT time, caller, callee, source, rule FROM {table} WHERE id >= ? ORDER BY id", (first,)):
                    if t < since or rule not in wanted:
                        continue
                    heapq.heappush(pending, (t, seq, caller, callee, source))
                    seq += 1
                    while pending[0][0] < t - REPLAY_REORDER:
                        rt, _, rcaller, rcallee, rsource = heapq.heappop(pending)
                        fn(rt, rcaller, rcallee, rsource)
                        done += 1
        while pending:
            rt, _, rcaller, rcallee, rsource = heapq.heappop(pending)
            fn(rt, rcaller, rcallee, rsource)
            done += 1
        return done

    def replay_outcomes(self, since: float, fn: Callable[[float, str, bool, float], object]) -> int:
        """Call ``fn(time, caller, answered, duration)`` for every call decided from ``since`` on that
        finished: not answered (a final response other than 2xx; ``time`` is its decision) or
        answered and ended (``duration`` from answer to end; ``time`` is its end).  Calls still
        ringing or talking are left out, as the proxy only scores a call once it is over.  Returns
        how many.  In no particular order: the counts they feed do not depend on it.
        """
        # Each record with the outcome rows that apply to it (same Call-ID, written after it): its
        # value of a column is the one the newest of them set, as query() reads it.
        sql = ("SELECT r.id, r.time, r.caller, o.id, o.final_code, o.answered_at, o.ended_at FROM {table} r "
               "JOIN temp.cg_out o ON o.call_id = r.call_id AND o.upto >= r.id "
               "WHERE r.id >= ? AND r.time >= ? ORDER BY r.id")
        done = 0

        def emit(t: float, caller: str, final: Any, answered: Any, ended: Any) -> int:
            if answered is not None:
                if ended is None:
                    return 0            # still talking when the proxy stopped
                fn(float(ended), caller, True, max(0.0, float(ended) - float(answered)))
                return 1
            if final is not None and not 200 <= int(final) < 300:
                fn(t, caller, False, 0.0)
                return 1
            return 0

        with self._reading() as conn:
            for p in self._with_outcomes(conn, since):
                table = _quote(p.name)
                first = _first_id_at(conn, table, since - REPLAY_SLACK)
                if first is None:
                    continue
                current = None
                t0 = 0.0
                caller0 = ""
                # per column: (outcome id, value) of the newest outcome row that set it
                newest: list[tuple[int, Any]] = []
                for rid, t, caller, oid, *values in conn.execute(sql.replace("{table}", table), (first, float(since))):
                    if rid != current:
                        if current is not None:
                            done += emit(t0, caller0, *(v for _, v in newest))
                        current, t0, caller0 = rid, float(t), caller
                        newest = [(-1, None)] * 3
                    for k, v in enumerate(values):
                        if v is not None and oid > newest[k][0]:
                            newest[k] = (oid, v)
                if current is not None:
                    done += emit(t0, caller0, *(v for _, v in newest))
        return done

    def outcome_stats(self, since: float, short_seconds: float = 6.0) -> list[tuple[str, int, int, int]]:
        """Per caller since ``since``: (caller, finished, answered, short).

        ``finished`` counts records with a final response, ``answered`` those answered, ``short``
        those answered and ended less than ``short_seconds`` later.  Callers without any
        finished call are left out.  Ordered by caller.  Reads every record since ``since`` and
        the outcomes written since then: meant for short periods.
        """
        sql = ("SELECT caller, count(*), count(answered_at), "
               "sum(CASE WHEN answered_at IS NOT NULL AND ended_at IS NOT NULL "
               "AND ended_at - answered_at < ? THEN 1 ELSE 0 END) "
               f"FROM (SELECT r.caller AS caller, {_outcome_column('final_code')} AS final_code, "
               f"{_outcome_column('answered_at')} AS answered_at, {_outcome_column('ended_at')} AS ended_at "
               "FROM {table} r WHERE r.time >= ? AND EXISTS (SELECT 1 FROM temp.cg_out o WHERE o.call_id = r.call_id)) "
               "WHERE final_code IS NOT NULL GROUP BY caller")
        stats: dict[str, list[int]] = {}
        with self._reading() as conn:
            for p in self._with_outcomes(conn, since):
                for c, f, a, s in conn.execute(sql.replace("{table}", _quote(p.name)),
                                               (float(short_seconds), float(since))):
                    acc = stats.setdefault(str(c), [0, 0, 0])
                    acc[0] += int(f)
                    acc[1] += int(a)
                    acc[2] += int(s or 0)
        return [(c, acc[0], acc[1], acc[2]) for c, acc in sorted(stats.items())]

    def partitions(self) -> list[dict[str, Any]]:
        """The partitions, oldest first: name, outcomes (its outcomes table), start, end (epoch
        seconds, records with start <= time < end), indexed, records (row count)."""
        with self._read_lock:
            return [{"name": p.name, "outcomes": p.outcomes, "start": p.start, "end": p.end, "indexed": p.indexed,
                     "records": p.rows} for p in _catalog(self._conn)]

    def pragma(self, name: str) -> Any:
        """The value of a read-only PRAGMA (``journal_mode``, ``synchronous``...), for checks."""
        if not re.fullmatch(r"[a-z_]+", name):
            raise InputError(f"not a pragma name: {name!r}")
        with self._read_lock:
            return self._conn.execute(f"PRAGMA {name}").fetchone()[0]


# ---------------------------------------------------------------- the command line
_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


MAX_LIMIT = (1 << 63) - 1     # SQLite's largest integer


# SQLite primary result codes of a failure of the store rather than of a row: BUSY, LOCKED, NOMEM,
# READONLY, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL, NOTADB.
_STORE_ERRORS = frozenset((5, 6, 7, 8, 10, 11, 13, 14, 15, 26))
STORE_ERROR_LOG_INTERVAL = 10.0     # seconds between records_write_failed lines of a store-wide error


def _store_wide(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in _STORE_ERRORS


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
        if not 0 <= limit <= MAX_LIMIT:
            raise InputError(f"--limit must be from 0 to {MAX_LIMIT} (got {limit})")
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
        store = RecordStore(path, cfg.records.retention_days, partition_minutes=cfg.records.partition_minutes)
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


def join_time_values(argv: list[str]) -> list[str]:
    """``--since -1h`` as ``--since=-1h``: argparse takes a value starting with '-' for an option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in ("--since", "--until") and i + 1 < len(argv) and _RELATIVE.match(argv[i + 1].strip()):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Run ``callguard records`` on its own (``python -m callguard.records``)."""
    parser = argparse.ArgumentParser(prog="callguard records", description="List stored call records.")
    add_arguments(parser)
    return records_main(parser.parse_args(join_time_values(sys.argv[1:] if argv is None else list(argv))))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
