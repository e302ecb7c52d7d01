"""The compiled records inserter against Python's sqlite3 module writing the same rows."""

from __future__ import annotations

import math
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from callguard import records as R

if os.environ.get("CI"):
    import callguard._recwriter as recwriter  # in CI it must be built: never skip silently
else:
    recwriter = pytest.importorskip("callguard._recwriter")

TABLE = """CREATE TABLE records (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, call_id TEXT NOT NULL DEFAULT '', source TEXT NOT NULL DEFAULT '',
    caller TEXT NOT NULL DEFAULT '', callee TEXT NOT NULL DEFAULT '', rule TEXT NOT NULL DEFAULT '',
    verdict TEXT NOT NULL DEFAULT '', code INTEGER NOT NULL DEFAULT 0, score REAL NOT NULL DEFAULT 0,
    latency_us REAL NOT NULL DEFAULT 0)"""
INSERT = ("INSERT INTO records (time, call_id, source, caller, callee, rule, verdict, code, score, latency_us) "
          "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

ROWS: list[tuple[Any, ...]] = [
    (1_780_000_000.25, "a84b4c76e66710@pc33.example.com", "127.0.0.1", "13800138000", "02112345678", "banned",
     "reject", 403, 0.91, 3, ("score",)),
    (1_780_000_001.0, "", "::1", "", "110", "emergency", "allow", 0, 0.0, 1.5, ()),
    (1_780_000_002, "呼叫-ID@例子", "10.0.0.1", "95588", "13912345678", "allow", "allow", 0, 0.125, 12),
]


def _db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(TABLE)
    return conn


def _stored(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT time, call_id, source, caller, callee, rule, verdict, code, score, latency_us "
                        "FROM records ORDER BY id").fetchall()


def test_rows_are_stored_as_executemany_stores_them(tmp_path: Path) -> None:
    ref = _db(tmp_path / "ref.sqlite3")
    ref.executemany(INSERT, [r[:10] for r in ROWS])
    mine = _db(tmp_path / "mine.sqlite3")
    buf = recwriter.RowBuffer(300)            # small: grows while packing
    buf.extend(ROWS * 20)
    assert len(buf) == 60
    ins = recwriter.Inserter(str(tmp_path / "mine.sqlite3"))
    ins.prepare(INSERT)
    assert ins.insert(buf) == 60              # the last rowid
    assert _stored(mine) == _stored(ref) * 20
    # typed as Python's module types them: REAL stays float, INTEGER int
    assert [type(v) for v in _stored(mine)[2]] == [float, str, str, str, str, str, str, int, float, float]
    ins.close()


def test_buffer_round_trip_and_column_defaults() -> None:
    buf = recwriter.RowBuffer()
    buf.append((1.5, None, "127.0.0.1", "\udcff13800", None, "banned", "reject", None, None, None))
    (row,) = buf.to_rows()
    assert row == (1.5, "", "127.0.0.1", "?13800", "", "banned", "reject", 0, 0.0, 0.0)
    buf.clear()
    assert len(buf) == 0 and buf.to_rows() == []
    with pytest.raises(TypeError):
        buf.append((1.0, "too", "short"))
    with pytest.raises(TypeError):
        buf.extend([[1.0] * 10])             # rows are tuples
    assert len(buf) == 0


def test_a_failed_insert_stores_nothing_and_says_why(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "r.sqlite3", isolation_level=None)
    conn.execute(TABLE.replace("code INTEGER NOT NULL DEFAULT 0", "code INTEGER NOT NULL CHECK (code < 500)"))
    ins = recwriter.Inserter(str(tmp_path / "r.sqlite3"))
    ins.prepare(INSERT)
    buf = recwriter.RowBuffer()
    buf.extend([ROWS[0][:10], ROWS[1][:10], (*ROWS[2][:7], 503, 0.0, 1)])
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint"):
        ins.insert(buf)
    assert conn.execute("SELECT count(*) FROM records").fetchone() == (0,)
    assert len(buf) == 3                       # left as it was, for the fallback
    buf.clear()
    buf.append(ROWS[0][:10])
    ins.insert(buf)                            # the connection is usable again
    assert conn.execute("SELECT count(*) FROM records").fetchone() == (1,)


def test_buffer_keeps_the_time_bounds_of_its_rows() -> None:
    buf = recwriter.RowBuffer()
    assert (buf.tmin, buf.tmax, buf.odd) == (math.inf, -math.inf, False)
    buf.extend([(5.0, *ROWS[0][1:10]), (3.0, *ROWS[0][1:10]), (9.5, *ROWS[0][1:10])])
    assert (buf.tmin, buf.tmax, buf.odd) == (3.0, 9.5, False)
    buf.append((math.nan, *ROWS[0][1:10]))
    assert buf.odd                             # the writer sorts such a batch out row by row
    buf.clear()
    assert (buf.tmin, buf.tmax, buf.odd) == (math.inf, -math.inf, False)
    buf.append((None, *ROWS[0][1:10]))         # stored with time 0: not in any partition being written
    assert buf.odd


def test_insert_many_stores_every_buffer_in_order(tmp_path: Path) -> None:
    ref = _db(tmp_path / "ref.sqlite3")
    ref.executemany(INSERT, [r[:10] for r in ROWS * 3])
    mine = _db(tmp_path / "mine.sqlite3")
    bufs = []
    for _ in range(3):
        buf = recwriter.RowBuffer(256)
        buf.extend(ROWS)
        bufs.append(buf)
    ins = recwriter.Inserter(str(tmp_path / "mine.sqlite3"))
    ins.prepare(INSERT)
    assert ins.insert_many([]) == 0
    assert ins.insert_many(bufs) == 9
    assert _stored(mine) == _stored(ref)
    assert [len(b) for b in bufs] == [3, 3, 3]  # left as they were
    with pytest.raises(TypeError):
        ins.insert_many([bufs[0], ROWS[0]])
    assert mine.execute("SELECT count(*) FROM records").fetchone() == (9,)
    ins.close()


def test_a_failed_insert_many_stores_nothing(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "r.sqlite3", isolation_level=None)
    conn.execute(TABLE.replace("code INTEGER NOT NULL DEFAULT 0", "code INTEGER NOT NULL CHECK (code < 500)"))
    ins = recwriter.Inserter(str(tmp_path / "r.sqlite3"))
    ins.prepare(INSERT)
    good, bad = recwriter.RowBuffer(), recwriter.RowBuffer()
    good.extend([ROWS[0][:10], ROWS[1][:10]])
    bad.append((*ROWS[2][:7], 503, 0.0, 1))
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint"):
        ins.insert_many([good, bad])
    assert conn.execute("SELECT count(*) FROM records").fetchone() == (0,)
    ins.insert_many([good])                    # the connection is usable again
    assert conn.execute("SELECT count(*) FROM records").fetchone() == (2,)


def test_prepare_checks_the_statement(tmp_path: Path) -> None:
    _db(tmp_path / "r.sqlite3")
    ins = recwriter.Inserter(str(tmp_path / "r.sqlite3"))
    with pytest.raises(RuntimeError):
        ins.insert(recwriter.RowBuffer())      # nothing prepared yet
    with pytest.raises(ValueError):
        ins.prepare("INSERT INTO records (time) VALUES (?)")
    with pytest.raises(OSError, match="no such table"):
        ins.prepare(INSERT.replace("records", "nowhere"))
    with pytest.raises(OSError):
        recwriter.Inserter(str(tmp_path / "missing" / "r.sqlite3"))


def test_the_record_fields_are_the_inserters_order() -> None:
    assert R.RECORD_FIELDS == ("time", "call_id", "source", "caller", "callee", "rule", "verdict", "code", "score",
                               "latency_us")


def test_sharing_a_python_connection_inserts_inside_its_transaction(tmp_path: Path) -> None:
    conn = _db(tmp_path / "r.sqlite3")
    ins = recwriter.Inserter.sharing(conn)
    assert not ins.owned
    ins.prepare(INSERT)
    buf = recwriter.RowBuffer()
    buf.extend(r[:10] for r in ROWS)
    with pytest.raises(RuntimeError):
        ins.insert(buf)                       # no transaction open on the shared connection
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(INSERT, ROWS[0][:10])        # Python's module and the inserter, one transaction
    assert ins.insert(buf) == 4
    assert conn.execute("SELECT last_insert_rowid()").fetchone() == (4,)
    conn.execute("ROLLBACK")                  # the owner decides: nothing was committed
    assert _stored(conn) == []
    conn.execute("BEGIN IMMEDIATE")
    ins.insert(buf)
    conn.execute("COMMIT")
    other = sqlite3.connect(tmp_path / "r.sqlite3")
    assert other.execute("SELECT count(*) FROM records").fetchone() == (3,)
    ins.close()
    assert conn.execute("SELECT count(*) FROM records").fetchone() == (3,)   # still open: not ours
    with pytest.raises(TypeError):
        recwriter.Inserter.sharing(object())


def test_an_unknown_python_keeps_executemany(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    conn = _db(tmp_path / "r.sqlite3")
    monkeypatch.setattr(sys, "version_info", (3, 14, 0, "final", 0))
    with pytest.raises(RuntimeError, match="layout"):
        recwriter.Inserter.sharing(conn)
    # the store still writes every row, through Python's sqlite3 module
    store = R.RecordStore(str(tmp_path / "store.sqlite3"))
    try:
        assert store._inserter is None
        store.add_many([r[:10] for r in ROWS])
        store.flush()
        assert len(store.query(limit=0)) == len(ROWS)
    finally:
        store.close()


def test_a_buffer_adopted_from_packed_bytes_is_the_buffer_they_came_from() -> None:
    T0 = 1_780_000_000.0
    rows = [(T0 + 2, "c2", "127.0.0.1", "13800138000", "02150001234", "banned", "reject", 403, 0.5, 7.0),
            (T0, "c1", "10.0.0.1", "", "110", "emergency", "allow", 0, 0.0, 3.0)]
    buf = recwriter.RowBuffer()
    buf.extend(rows)
    copy = recwriter.RowBuffer.adopt(buf.packed(), buf.rows, buf.tmin, buf.tmax, buf.odd)
    assert copy.to_rows() == buf.to_rows() == [tuple(float(v) if i in (0, 9) else v for i, v in enumerate(r))
                                               for r in rows]
    assert (copy.rows, copy.tmin, copy.tmax, copy.odd) == (2, T0, T0 + 2, False)
