"""Call records: round trip, outcomes, retention, WAL, overload, reopen and the records command."""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from callguard import records as records_mod
from callguard.errors import CallguardError, InputError
from callguard.records import RECORD_FIELDS, RecordStore, parse_time, records_main

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_780_000_000.0
DAY = 86400.0
RULES = ("allow", "banned", "high_frequency", "score")


def make_record(i: int, t: float) -> dict[str, Any]:
    rule = RULES[i % len(RULES)]
    return {"time": t, "call_id": f"call-{i}@test", "source": "loopback", "caller": f"138{i % 7:08d}",
            "callee": f"0215{i % 5:07d}", "rule": rule, "verdict": "allow" if rule == "allow" else "reject",
            "code": {"allow": 0, "banned": 403, "high_frequency": 603, "score": 608}[rule],
            "score": (i % 10) / 10, "latency_us": 10.0 + i % 3}


@pytest.fixture(params=["compiled", "python"])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which writes add_many rows: the compiled inserter, or executemany (the reference)."""
    if request.param == "python":
        monkeypatch.setattr(records_mod, "_recwriter", None)
    elif records_mod._recwriter is None:
        if os.environ.get("CI"):
            pytest.fail("callguard._recwriter is not built")
        pytest.skip("callguard._recwriter is not built")
    return str(request.param)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = RecordStore(str(tmp_path / "records.sqlite3"), flush_interval=0.05)
    yield s
    s.close()


def indexes_of(conn: sqlite3.Connection, *tables: str) -> set[str]:
    return {r[0] for r in conn.execute(f"SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name IN "
                                       f"({', '.join('?' * len(tables))})", tables)}


def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_round_trip_and_filters(store: RecordStore) -> None:
    records = [make_record(i, T0 + i) for i in range(3000)]
    for r in records:
        store.add(r)
    store.flush()
    assert store.written == 3000
    assert store.dropped == 0

    def expect(pred: Any, limit: int = 0) -> list[str]:
        ids = [r["call_id"] for r in sorted(records, key=lambda r: -r["time"]) if pred(r)]
        return ids[:limit] if limit else ids

    def ids(rows: list[dict[str, Any]]) -> list[str]:
        return [r["call_id"] for r in rows]

    assert ids(store.query(caller="13800000003", limit=0)) == expect(lambda r: r["caller"] == "13800000003")
    assert ids(store.query(callee="02150000004", limit=0)) == expect(lambda r: r["callee"] == "02150000004")
    assert ids(store.query(rule="banned", limit=0)) == expect(lambda r: r["rule"] == "banned")
    assert ids(store.query(since=T0 + 100, until=T0 + 200, limit=0)) == expect(
        lambda r: T0 + 100 <= r["time"] < T0 + 200)
    both = store.query(caller="13800000001", rule="score", since=T0 + 1000, limit=0)
    assert ids(both) == expect(lambda r: r["caller"] == "13800000001" and r["rule"] == "score"
                               and r["time"] >= T0 + 1000)
    assert both, "the combined filter should match something"
    # Newest first, limited; every field comes back as given.
    latest = store.query(limit=5)
    assert ids(latest) == expect(lambda r: True, 5)
    original = records[2999]
    assert {k: latest[0][k] for k in original} == original
    assert latest[0]["final_code"] is None and latest[0]["answered_at"] is None
    assert store.query(caller="19999999999") == []
    with pytest.raises(InputError):
        store.query(limit=-1)


def test_writer_flushes_without_being_asked(store: RecordStore) -> None:
    store.add(make_record(1, T0))
    assert wait_for(lambda: store.written == 1)
    assert len(store.query(caller="13800000001")) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names through /proc")
def test_writer_thread_is_named_for_the_system(store: RecordStore) -> None:
    tid = store._thread.native_id
    assert wait_for(lambda: Path(f"/proc/self/task/{tid}/comm").read_text().strip() == "cg-records")
    # and it runs at a lower priority than the SIP path (nice: field 19 of stat)
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    assert int(stat[stat.rindex(")") + 2:].split()[16]) == records_mod.WRITER_NICE
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != records_mod.WRITER_NICE


def test_outcomes_and_stats(store: RecordStore) -> None:
    # caller A: 4 finished calls, 3 answered, 2 of them short (< 6 s); 1 call still ringing.
    a, b = "13900000001", "13900000002"
    for i in range(5):
        store.add({"time": T0 + i, "call_id": f"a{i}", "caller": a, "callee": "02150001234", "rule": "allow"})
    store.add({"time": T0, "call_id": "b0", "caller": b, "callee": "02150001234", "rule": "allow"})
    store.add({"time": T0 - DAY, "call_id": "old", "caller": b, "callee": "02150001234", "rule": "allow"})
    store.outcome("a0", 200, answered_at=T0 + 1, ended_at=T0 + 3)        # short
    store.outcome("a1", 200, answered_at=T0 + 2)                           # answered, then the end separately
    store.outcome("a1", ended_at=T0 + 4)                                   # short
    store.outcome("a2", 200, answered_at=T0 + 3, ended_at=T0 + 60)         # long
    store.outcome("a3", 486)                                               # busy
    store.outcome("b0", 487)
    store.outcome("old", 200, answered_at=T0 - DAY + 1, ended_at=T0 - DAY + 2)
    store.outcome("no-such-call", 200)                                     # harmless
    store.flush()
    row = {r["call_id"]: r for r in store.query(caller=a)}
    assert (row["a1"]["final_code"], row["a1"]["answered_at"], row["a1"]["ended_at"]) == (200, T0 + 2, T0 + 4)
    assert row["a3"]["final_code"] == 486 and row["a3"]["answered_at"] is None
    assert row["a4"]["final_code"] is None
    assert store.outcome_stats(since=T0 - 10) == [(a, 4, 3, 2), (b, 1, 0, 0)]
    assert store.outcome_stats(since=T0 - 10, short_seconds=1.0) == [(a, 4, 3, 0), (b, 1, 0, 0)]
    assert store.outcome_stats(since=T0 - 2 * DAY) == [(a, 4, 3, 2), (b, 2, 1, 1)]


def test_prune_keeps_retention(tmp_path: Path) -> None:
    with RecordStore(str(tmp_path / "r.sqlite3"), retention_days=30) as s:
        now = T0
        ages = [0, 1, 29.9, 30.1, 45, 400]
        for i, age in enumerate(ages):
            s.add({"time": now - age * DAY, "call_id": f"c{i}", "caller": "13800000000", "rule": "allow"})
        assert s.prune(now=now) == 3
        left = sorted(r["call_id"] for r in s.query(limit=0))
        assert left == ["c0", "c1", "c2"]
        assert s.prune(now=now) == 0
    with pytest.raises(CallguardError, match="at least 30"):
        RecordStore(str(tmp_path / "r2.sqlite3"), retention_days=7)


def test_wal_mode_and_schema(store: RecordStore, tmp_path: Path) -> None:
    store.add(make_record(0, T0))
    store.flush()
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("synchronous") == 1       # NORMAL
    assert Path(store.path + "-wal").exists()
    # Another process's view (the records command while the proxy runs): same file, WAL, schema v3.
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(3,)]
        parts = conn.execute("SELECT name, outcomes, start_time, end_time, indexed, records FROM partitions").fetchall()
        # One hour of decision time per partition by default, aligned on the hour.
        assert parts == [("records_1", "outcomes_1", T0 - T0 % 3600, T0 - T0 % 3600 + 3600, 0, 1)]
        # The partition being written has no secondary index: inserts touch no random-order B-tree.
        assert indexes_of(conn, "records_1", "outcomes_1") == set()
        assert conn.execute("SELECT count(*) FROM records_1").fetchone()[0] == 1
    finally:
        conn.close()


def test_queue_full_counts_dropped(tmp_path: Path) -> None:
    # A writer that only wakes when asked: the queue fills up and further records are dropped.
    reported: list[int] = []
    s = RecordStore(str(tmp_path / "r.sqlite3"), flush_interval=3600, queue_max=100, on_dropped=reported.append)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1.0)   # keep the writer thread off the CPU while the queue is filled
    try:
        with capture_logs() as logs:
            for i in range(5000):
                s.add(make_record(i, T0 + i))
    finally:
        sys.setswitchinterval(old)
    try:
        assert s.dropped > 0
        s.flush()
        assert s.written + s.dropped == 5000
        assert len(s.query(limit=0)) == s.written
        events = [e for e in logs if e["event"] == "records_dropping"]
        assert len(events) == 1, "dropping is logged once when it starts, not per record"
        assert events[0]["log_level"] == "warning"
        assert wait_for(lambda: sum(reported) == s.dropped), "drops are reported to the metrics hook"
    finally:
        s.close()


def test_queue_max_counts_records_not_batches(tmp_path: Path) -> None:
    # A batch of rows is one queue item; the bound is on what it holds, or a stalled writer lets the
    # queue hold queue_max batches of rows.
    s = RecordStore(str(tmp_path / "r.sqlite3"), flush_interval=3600, queue_max=100)
    batch = [tuple(make_record(i, T0 + i)[k] for k in RECORD_FIELDS) for i in range(60)]
    s.flush()                    # the writer is asleep until asked again
    old = sys.getswitchinterval()
    sys.setswitchinterval(1.0)   # and stays off the CPU while the batches are queued
    try:
        for _ in range(3):
            s.add_many(list(batch))
        s.outcome("call-1@test", 486)
        queued, dropped = s.pending, s.dropped
    finally:
        sys.setswitchinterval(old)
    try:
        assert (queued, dropped) == (120, 61)   # the third batch and the outcome found it full
        s.flush()
        assert (s.written, s.pending) == (120, 0)
        s.outcome("call-1@test", 486)           # room again
        s.flush()
        assert s.dropped == 61 and s.pending == 0
    finally:
        s.close()


def test_reopen_keeps_data_and_close_is_final(tmp_path: Path) -> None:
    path = str(tmp_path / "sub" / "dir" / "records.sqlite3")     # parent folders are created
    s = RecordStore(path)
    for i in range(50):
        s.add(make_record(i, T0 + i))
    s.outcome("call-7@test", 200, answered_at=T0 + 8, ended_at=T0 + 20)
    s.close()                    # close flushes what is queued
    s.close()                    # twice is harmless
    s.add(make_record(99, T0))   # after close: counted, not lost silently
    assert s.dropped == 1
    with RecordStore(path) as again:
        rows = again.query(limit=0)
        assert len(rows) == 50
        assert [r for r in rows if r["call_id"] == "call-7@test"][0]["final_code"] == 200


def test_bad_record_costs_only_itself(store: RecordStore) -> None:
    store.add(make_record(1, T0))
    store.add({"time": T0, "call_id": {"not": "a string"}, "caller": "13800000000"})
    store.add(make_record(2, T0 + 1))
    store.flush()
    assert store.written == 2
    assert store.dropped == 1


def test_unusable_paths_raise_callguard_error(tmp_path: Path) -> None:
    not_db = tmp_path / "garbage.sqlite3"
    not_db.write_bytes(b"this is not an SQLite database, just some bytes" * 100)
    with pytest.raises(CallguardError, match="garbage.sqlite3"):
        RecordStore(str(not_db))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(CallguardError, match="cannot create the records folder"):
        RecordStore(str(a_file / "records.sqlite3"))
    with pytest.raises(CallguardError):
        RecordStore(str(tmp_path))          # a directory


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sqlite3")
    RecordStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(CallguardError, match="newer"):
        RecordStore(path)


# Version 1 as released: outcomes updated into the records row, five indexes.
_V1_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version VALUES (1);
CREATE TABLE records (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, call_id TEXT NOT NULL DEFAULT '', source TEXT NOT NULL DEFAULT '',
    caller TEXT NOT NULL DEFAULT '', callee TEXT NOT NULL DEFAULT '', rule TEXT NOT NULL DEFAULT '',
    verdict TEXT NOT NULL DEFAULT '', code INTEGER NOT NULL DEFAULT 0, score REAL NOT NULL DEFAULT 0,
    latency_us REAL NOT NULL DEFAULT 0, final_code INTEGER, answered_at REAL, ended_at REAL);
CREATE INDEX records_caller_time ON records (caller, time);
CREATE INDEX records_callee_time ON records (callee, time);
CREATE INDEX records_rule_time ON records (rule, time);
CREATE INDEX records_call_id ON records (call_id);
CREATE INDEX records_time ON records (time);
"""


@pytest.mark.parametrize("version_row", [True, False])
def test_version_1_file_is_migrated(tmp_path: Path, version_row: bool) -> None:
    path = str(tmp_path / "v1.sqlite3")
    conn = sqlite3.connect(path)
    conn.executescript(_V1_SCHEMA)
    if not version_row:
        # Version 1 created its tables before storing its version: a stop in between left this.
        conn.execute("DELETE FROM schema_version")
    ins = ("INSERT INTO records (time, call_id, caller, callee, rule, verdict, code, final_code, answered_at, "
           "ended_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
    # x: two records of one Call-ID; the earlier one also got an outcome before the second arrived.
    conn.executemany(ins, [
        (T0, "x", "13800000001", "0215", "allow", "allow", 0, 200, T0 + 1, T0 + 9),
        (T0 + 1, "y", "13800000002", "0215", "banned", "reject", 403, None, None, None),
        (T0 + 2, "x", "13800000001", "0215", "allow", "allow", 0, 200, None, T0 + 9),
        (T0 + 3, "z", "13800000003", "0215", "allow", "allow", 0, 486, None, None),
    ])
    conn.commit()
    conn.close()
    with RecordStore(path) as s:
        rows = [(r["call_id"], r["final_code"], r["answered_at"], r["ended_at"]) for r in s.query(limit=0)]
        assert rows == [("z", 486, None, None), ("x", 200, None, T0 + 9), ("y", None, None, None),
                        ("x", 200, T0 + 1, T0 + 9)]
        assert s.query(rule="banned")[0]["code"] == 403
        s.outcome("y", 487)
        s.flush()
        assert s.query(caller="13800000002")[0]["final_code"] == 487
        assert s.pragma("journal_mode") == "wal"
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(3,)]
        # The tables became one closed, indexed partition (the outcome of y went to its outcomes).
        assert "final_code" not in {r[1] for r in conn.execute("PRAGMA table_info(records)")}
        parts = conn.execute("SELECT name, outcomes, start_time, end_time, indexed, records FROM partitions").fetchall()
        assert parts == [("records", "outcomes", T0, math.nextafter(T0 + 3, math.inf), 1, 4)]
    finally:
        conn.close()


def test_outcome_applies_to_earlier_records_only(store: RecordStore) -> None:
    store.add({"time": T0, "call_id": "same", "caller": "13800000001", "rule": "allow"})
    store.flush()
    store.outcome("same", 486)
    store.flush()
    # A later decision on the same Call-ID starts without an outcome (as the former UPDATE left it).
    store.add({"time": T0 + 1, "call_id": "same", "caller": "13800000001", "rule": "allow"})
    store.flush()
    assert [r["final_code"] for r in store.query(limit=0)] == [None, 486]
    store.outcome("same", ended_at=T0 + 5)
    store.flush()
    assert [(r["final_code"], r["ended_at"]) for r in store.query(limit=0)] == [(None, T0 + 5), (486, T0 + 5)]


def test_add_many_none_takes_defaults(impl: str, store: RecordStore) -> None:
    assert (store._inserter is not None) == (impl == "compiled")
    store.add_many([(T0, None, None, "13800000001", None, "allow", "allow", None, None, None, ("shadow",)),
                    (T0 + 1, "c2", "lo", "13800000002", "0215", "banned", "reject", 403, 0.5, 7.0)])
    store.flush()
    assert store.dropped == 0 and store.written == 2
    rows = store.query(limit=0)
    assert [(r["call_id"], r["source"], r["callee"], r["code"], r["score"]) for r in rows] == [
        ("c2", "lo", "0215", 403, 0.5), ("", "", "", 0, 0.0)]


def test_prune_drops_outcomes_of_pruned_records(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sqlite3")
    with RecordStore(path) as s:
        s.add({"time": T0 - 40 * DAY, "call_id": "old", "caller": "13800000001", "rule": "allow"})
        s.add({"time": T0, "call_id": "new", "caller": "13800000001", "rule": "allow"})
        s.flush()
        s.outcome("old", 200)
        s.outcome("new", 486)
        assert s.prune(now=T0) == 1
        assert [(r["call_id"], r["final_code"]) for r in s.query(limit=0)] == [("new", 486)]
        # The newest record is pruned too; a later record reusing its id and Call-ID gets no stale outcome.
        assert s.prune(now=T0 + 40 * DAY) == 1
        s.add({"time": T0 + 40 * DAY, "call_id": "new", "caller": "13800000001", "rule": "allow"})
        s.flush()
        assert [(r["call_id"], r["final_code"]) for r in s.query(limit=0)] == [("new", None)]
    conn = sqlite3.connect(path)
    try:
        # Dropped with their partitions: no outcome table is left but the new partition's, empty.
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                             "AND name LIKE 'outcomes%'")}
        assert tables == {o for (o,) in conn.execute("SELECT outcomes FROM partitions")}
        assert sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables) == 0
    finally:
        conn.close()


def test_reader_while_writer_writes(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sqlite3")
    writer = RecordStore(path, flush_interval=0.01)
    reader = RecordStore(path)
    stop = threading.Event()
    errors: list[BaseException] = []

    def feed() -> None:
        i = 0
        while not stop.is_set() and i < 20000:
            writer.add(make_record(i, T0 + i))
            i += 1
            if i % 500 == 0:
                time.sleep(0.001)

    t = threading.Thread(target=feed)
    t.start()
    try:
        seen = 0
        while t.is_alive():
            try:
                seen = max(seen, len(reader.query(limit=0)))
            except BaseException as exc:  # a "database is locked" here would be a failure
                errors.append(exc)
                break
    finally:
        stop.set()
        t.join()
        writer.close()
    assert errors == []
    assert len(reader.query(limit=0)) == writer.written
    reader.close()


def test_parse_time_forms() -> None:
    now = T0
    assert parse_time("-1h", now) == now - 3600
    assert parse_time("-30d", now) == now - 30 * DAY
    assert parse_time("-15m", now) == now - 900
    assert parse_time("now", now) == now
    assert parse_time("1780000000", now) == 1_780_000_000.0
    assert parse_time("2026-05-28T00:00:00Z", now) == 1_779_926_400.0
    assert parse_time("2026-05-28T08:00:00+08:00", now) == 1_779_926_400.0
    assert parse_time("2026-05-28", now, end_of_day=True) == 1_779_926_400.0 + DAY
    for bad in ("yesterday", "-1y", "", "2026-13-01"):
        with pytest.raises(InputError):
            parse_time(bad, now)


# ---------------------------------------------------------------- the records command
def write_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "callguard.yaml"
    cfg.write_text("records:\n  path: data/records.sqlite3\n  retention_days: 30\nlists:\n  timezone: \"+08:00\"\n",
                   encoding="utf-8")
    return cfg


def fill(tmp_path: Path) -> None:
    now = time.time()
    with RecordStore(str(tmp_path / "data" / "records.sqlite3")) as s:
        s.add({"time": now - 60, "call_id": "fresh-1", "caller": "13800138000", "callee": "02150001234",
               "rule": "banned", "verdict": "reject", "code": 403, "score": 0.93, "latency_us": 14.2})
        s.add({"time": now - 7200, "call_id": "older-2", "caller": "13800138000", "callee": "039196123",
               "rule": "allow", "verdict": "allow", "code": 0, "score": 0.1, "latency_us": 9.0})
        s.add({"time": now - 3 * DAY, "call_id": "other-3", "caller": "13900139000", "callee": "02150001234",
               "rule": "score", "verdict": "reject", "code": 608, "score": 0.8, "latency_us": 11.0})
        s.add({"time": now - 40 * DAY, "call_id": "ancient-4", "caller": "13900139000", "callee": "02150001234",
               "rule": "allow", "verdict": "allow", "code": 0, "score": 0.0, "latency_us": 8.0})
        s.outcome("older-2", 200, answered_at=now - 7190, ended_at=now - 7100)


def ns(cfg: Path, **kw: Any) -> argparse.Namespace:
    base: dict[str, Any] = {"config": str(cfg), "caller": None, "callee": None, "rule": None, "since": None,
                            "until": None, "limit": 100, "json": False, "prune": False}
    base.update(kw)
    return argparse.Namespace(**base)


def test_records_main_direct(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    # No database yet: not an error, nothing created.
    assert records_main(ns(cfg)) == 0
    assert "no records yet" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
    fill(tmp_path)

    assert records_main(ns(cfg, caller="sip:+8613800138000@gw;user=phone", json=True)) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["call_id"] for x in lines] == ["fresh-1", "older-2"]
    assert lines[1]["final_code"] == 200 and lines[1]["answered_at"] is not None
    assert lines[0]["time_iso"].endswith("+08:00")

    assert records_main(ns(cfg, since="-1h")) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["time", "call_id", "caller", "callee", "rule"]
    assert len(out) == 2 and "fresh-1" in out[1] and "403" in out[1] and "banned" in out[1]

    assert records_main(ns(cfg, callee="+86 21 5000 1234", rule="score", json=True)) == 0
    assert [json.loads(x)["call_id"] for x in capsys.readouterr().out.splitlines()] == ["other-3"]

    assert records_main(ns(cfg, until="-1d", json=True, limit=0)) == 0
    assert [json.loads(x)["call_id"] for x in capsys.readouterr().out.splitlines()] == ["other-3", "ancient-4"]

    assert records_main(ns(cfg, prune=True, json=True)) == 0
    captured = capsys.readouterr()
    assert "pruned 1 records" in captured.err
    assert "ancient-4" not in captured.out and "fresh-1" in captured.out


@pytest.mark.parametrize("kw, message", [
    ({"since": "last tuesday"}, "not a time"),
    ({"caller": "not-a-number"}, "--caller"),
    ({"rule": "no_such_rule"}, "unknown rule"),
    ({"limit": -3}, "--limit"),
])
def test_records_main_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], kw: dict[str, Any],
                                message: str) -> None:
    cfg = write_config(tmp_path)
    fill(tmp_path)
    assert records_main(ns(cfg, **kw)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_records_main_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("records:\n  retention_days: 7\n", encoding="utf-8")
    assert records_main(ns(cfg)) == 2
    err = capsys.readouterr().err
    assert "records.retention_days" in err and "bad.yaml" in err
    assert records_main(ns(tmp_path / "missing.yaml")) == 2


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), CALLGUARD_NO_EXTENSIONS="1")
    return subprocess.run([sys.executable, "-m", "callguard", *args], capture_output=True, text=True, env=env,
                          timeout=60, cwd=str(ROOT))


def test_records_command_subprocess(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    fill(tmp_path)
    done = run_cli("records", "--config", str(cfg), "--caller", "13800138000", "--json")
    assert done.returncode == 0, done.stderr
    assert [json.loads(x)["call_id"] for x in done.stdout.splitlines()] == ["fresh-1", "older-2"]
    done = run_cli("records", "--config", str(cfg), "--rule", "score")
    assert done.returncode == 0, done.stderr
    assert "other-3" in done.stdout and "608" in done.stdout
    done = run_cli("records", "--config", str(cfg), "--since", "whenever")
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "not a time" in done.stderr


# ---------------------------------------------------------------- partitions (schema 3)
HOUR = 3600.0
P0 = T0 - T0 % HOUR           # start of T0's hour: the first partition boundary is at P0 + HOUR


class Model:
    """The meaning of records and outcomes, written plainly: the reference the store must match."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.outcomes: list[tuple[str, int, Any, Any, Any]] = []

    def add(self, store: RecordStore, record: dict[str, Any]) -> None:
        store.add(record)
        self.records.append({**record, "_id": len(self.records) + 1})

    def add_many(self, store: RecordStore, records: list[dict[str, Any]]) -> None:
        # In the fast path's shape: the fields in order, then its shadowed rules.
        store.add_many([(*(r[k] for k in RECORD_FIELDS), ("score",)) for r in records])
        for r in records:
            self.records.append({**r, "_id": len(self.records) + 1})

    def outcome(self, store: RecordStore, call_id: str, final_code: Any = None, answered_at: Any = None,
                ended_at: Any = None) -> None:
        # Outcomes are queued after a flush of the records before them, so upto is exact here.
        store.outcome(call_id, final_code, answered_at=answered_at, ended_at=ended_at)
        self.outcomes.append((call_id, len(self.records), final_code, answered_at, ended_at))

    def merged(self, r: dict[str, Any]) -> dict[str, Any]:
        out = {k: r.get(k) for k in ("time", "call_id", "source", "caller", "callee", "rule", "verdict", "code",
                                     "score", "latency_us")}
        for i, col in enumerate(("final_code", "answered_at", "ended_at")):
            values = [o[2 + i] for o in self.outcomes if o[0] == r["call_id"] and o[1] >= r["_id"]
                      and o[2 + i] is not None]
            out[col] = values[-1] if values else None
        return out

    def query(self, caller: Any = None, callee: Any = None, rule: Any = None, since: Any = None, until: Any = None,
              limit: int = 100) -> list[dict[str, Any]]:
        rows = [r for r in self.records if (caller is None or r["caller"] == caller)
                and (callee is None or r["callee"] == callee) and (rule is None or r["rule"] == rule)
                and (since is None or r["time"] >= since) and (until is None or r["time"] < until)]
        rows.sort(key=lambda r: (-r["time"], -r["_id"]))
        return [self.merged(r) for r in (rows[:limit] if limit else rows)]

    def stats(self, since: float, short: float = 6.0) -> list[tuple[str, int, int, int]]:
        acc: dict[str, list[int]] = {}
        for r in self.records:
            m = self.merged(r)
            if r["time"] < since or m["final_code"] is None:
                continue
            a = acc.setdefault(r["caller"], [0, 0, 0])
            a[0] += 1
            if m["answered_at"] is not None:
                a[1] += 1
                if m["ended_at"] is not None and m["ended_at"] - m["answered_at"] < short:
                    a[2] += 1
        return [(c, *v) for c, v in sorted(acc.items())]  # type: ignore[misc]


def rec(i: int, t: float, call_id: str | None = None) -> dict[str, Any]:
    r = make_record(i, t)
    if call_id is not None:
        r["call_id"] = call_id
    return r


def check_same(store: RecordStore, model: Model) -> None:
    callers = sorted({r["caller"] for r in model.records})
    callees = sorted({r["callee"] for r in model.records})
    times = sorted(r["time"] for r in model.records)
    cases: list[dict[str, Any]] = [{"limit": 0}, {"limit": 1}, {"limit": 7}, {"limit": 100}]
    cases += [{"caller": c, "limit": lim} for c in callers for lim in (0, 3)]
    cases += [{"callee": c, "limit": lim} for c in callees for lim in (0, 2)]
    cases += [{"rule": r, "limit": 0} for r in RULES]
    cases += [{"caller": callers[1], "callee": callees[2], "limit": 0}, {"rule": "banned", "caller": callers[3]}]
    for since, until in ((P0 + HOUR, P0 + 2 * HOUR), (P0 + HOUR - 1, P0 + 3 * HOUR + 1), (times[5], times[-5]),
                         (P0 + 2 * HOUR, None), (None, P0 + HOUR)):
        cases += [{"since": since, "until": until, "limit": 0}, {"since": since, "until": until, "limit": 4},
                  {"since": since, "until": until, "caller": callers[0], "limit": 0}]
    for kw in cases:
        assert store.query(**kw) == model.query(**kw), kw
    for since in (P0 - HOUR, P0 + HOUR + 0.5, times[len(times) // 2]):
        for short in (6.0, 30.0):
            assert store.outcome_stats(since, short) == model.stats(since, short), (since, short)


def test_partitions_give_the_same_results(tmp_path: Path, impl: str) -> None:
    # Four hours of decisions in 60-minute partitions, outcomes written over several partitions,
    # late records landing in closed partitions: every query must answer as one table would.
    path = str(tmp_path / "r.sqlite3")
    model = Model()
    with RecordStore(path, partition_minutes=60, flush_interval=0.01) as s:
        assert (s._inserter is not None) == (impl == "compiled")
        for start in range(0, 240, 40):                         # P0+600 .. P0+7770: hours 0, 1, 2
            model.add_many(s, [rec(i, P0 + 600 + i * 30) for i in range(start, start + 40)])
            s.flush()                                           # most batches within one partition
        model.add(s, rec(240, P0 + 5000, "call-7@test"))         # a second record of call-7, same time twice
        model.add(s, rec(241, P0 + 5000, "call-7@test"))
        s.flush()
        model.outcome(s, "call-7@test", 200, answered_at=P0 + 5010)
        model.outcome(s, "call-8@test", 486)
        for i in range(20, 60, 3):
            model.outcome(s, f"call-{i}@test", 200, answered_at=P0 + i * 30 + 700, ended_at=P0 + i * 30 + 703 + i % 9)
        s.flush()
        model.add_many(s, [rec(i, P0 + 3 * HOUR + (i - 242) * 40) for i in range(242, 300)])   # hour 3
        model.add(s, rec(300, P0 + 700, "call-7@test"))           # late: into the first (closed) partition
        model.add(s, rec(301, P0 + HOUR + 1, "call-20@test"))
        model.add(s, rec(302, P0 - 5, "early"))                   # before everything: a new, older partition
        s.flush()
        model.outcome(s, "call-7@test", ended_at=P0 + 5100)      # applies to all three call-7 records
        model.outcome(s, "call-20@test", ended_at=P0 + 2000)
        model.outcome(s, "early", 603)
        model.outcome(s, "call-250@test", 200, answered_at=P0 + 3 * HOUR + 400, ended_at=P0 + 3 * HOUR + 402)
        s.flush()
        check_same(s, model)
        parts = s.partitions()
        assert [(p["start"], p["end"], p["records"]) for p in parts] == [
            (P0 - HOUR, P0, 1), (P0, P0 + HOUR, 101), (P0 + HOUR, P0 + 2 * HOUR, 123),
            (P0 + 2 * HOUR, P0 + 3 * HOUR, 20), (P0 + 3 * HOUR, P0 + 4 * HOUR, 58)]
        # Closed partitions get indexed in the background; the answers stay the same.
        assert wait_for(lambda: all(p["indexed"] for p in s.partitions()[:-1]))
        check_same(s, model)
    with RecordStore(path, partition_minutes=60) as again:    # and after reopening
        check_same(again, model)


def test_closed_partitions_get_indexed(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sqlite3")
    with RecordStore(path, flush_interval=0.01) as s:
        s.add(rec(1, T0))
        s.flush()
        s.outcome("call-1@test", 486)
        s.add(rec(2, T0 + 2 * HOUR))        # a newer partition takes writes: T0's partition closes
        s.flush()
        assert wait_for(lambda: s.partitions()[0]["indexed"])
        conn = sqlite3.connect(path)
        try:
            assert indexes_of(conn, "records_1", "outcomes_1") == {
                "records_1_caller_time", "records_1_callee_time", "records_1_time", "outcomes_1_call_id"}
            # The one being written stays without index, although its period is over too.
            assert indexes_of(conn, "records_2", "outcomes_2") == set()
            assert conn.execute("SELECT name, indexed FROM partitions ORDER BY start_time").fetchall() == [
                ("records_1", 1), ("records_2", 0)]
            plan = " ".join(str(r) for r in conn.execute(
                "EXPLAIN QUERY PLAN SELECT * FROM records_1 WHERE caller = ? ORDER BY time DESC", ("x",)))
            assert "records_1_caller_time" in plan
        finally:
            conn.close()
        assert s.query(caller="13800000001")[0]["final_code"] == 486


def test_query_sees_one_snapshot_while_partitions_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "r.sqlite3")
    with RecordStore(path) as w:
        for i in range(30):
            w.add(rec(i, T0 + i * 600))     # five hours
    reader = RecordStore(path)
    try:
        expected = reader.query(limit=0)
        assert len(expected) == 30
        original = reader._read_catalog

        def racing(conn: sqlite3.Connection) -> Any:
            parts = original(conn)
            # Right after the query read the catalog, another process indexes one partition and
            # drops another (a prune), committing before the query reads them.
            other = sqlite3.connect(path, isolation_level=None)
            try:
                other.execute("PRAGMA busy_timeout = 10000")
                other.execute("BEGIN IMMEDIATE")
                other.execute("CREATE INDEX records_2_caller_time ON records_2 (caller, time)")
                other.execute("DROP TABLE records_1")
                other.execute("DROP TABLE outcomes_1")
                other.execute("DELETE FROM partitions WHERE name = 'records_1'")
                other.execute("COMMIT")
            finally:
                other.close()
            monkeypatch.setattr(reader, "_read_catalog", original)
            return parts

        monkeypatch.setattr(reader, "_read_catalog", racing)
        assert reader.query(limit=0) == expected                  # the snapshot it started with
        oldest = {r["call_id"] for r in expected if r["time"] < T0 - T0 % HOUR + HOUR}
        assert oldest and {r["call_id"] for r in reader.query(limit=0)} == {r["call_id"] for r in expected} - oldest
    finally:
        reader.close()


def test_queries_while_a_partition_is_indexed(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sqlite3")
    writer = RecordStore(path, flush_interval=0.01)
    reader = RecordStore(path)
    try:
        rows = [(T0 + i * 0.01, f"c{i}", "lo", f"138{i % 97:08d}", f"0215{i % 89:07d}", "allow", "allow", 0, 0.0, 1.0)
                for i in range(60_000)]
        writer.add_many(rows)
        writer.flush()
        want_caller = sorted((r for r in rows if r[3] == "13800000005"), key=lambda r: -r[0])
        want_callee = sorted((r for r in rows if r[4] == "02150000007"), key=lambda r: -r[0])
        writer.add(rec(0, T0 + 2 * HOUR))   # closes the partition: the writer starts its index builds
        checked = 0
        while True:
            indexed = reader.partitions()[0]["indexed"]
            assert [r["call_id"] for r in reader.query(caller="13800000005", limit=0)] == [r[1] for r in want_caller]
            assert [r["call_id"] for r in reader.query(callee="02150000007", limit=0)] == [r[1] for r in want_callee]
            checked += 1
            if indexed:
                break
            assert checked < 100_000, "the partition was never indexed"
        assert writer.dropped == 0
    finally:
        writer.close()
        reader.close()


def test_prune_drops_old_partitions_only(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sqlite3")
    now = T0 + 40 * DAY
    cutoff = now - 30 * DAY          # 1600 s into an hour: its partition straddles the cutoff
    assert cutoff % HOUR == 1600
    times = {"old": cutoff - 2 * HOUR, "just-old": cutoff - 1, "young": cutoff + 1, "new": now}
    with RecordStore(path, retention_days=30) as s:
        for cid, t in times.items():
            s.add({"time": t, "call_id": cid, "caller": "13800000001", "rule": "allow"})
        s.flush()
        s.outcome("young", 486)
        assert s.prune(now=now) == 1
        # The partition holding cutoff - 1 also holds cutoff + 1: it stays until its end is past.
        assert sorted(r["call_id"] for r in s.query(limit=0)) == ["just-old", "new", "young"]
        assert [r["final_code"] for r in s.query(limit=0) if r["call_id"] == "young"] == [486]
        conn = sqlite3.connect(path)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            assert "records_1" not in tables and "outcomes_1" not in tables
            assert {"records_2", "outcomes_2", "records_3", "outcomes_3"} <= tables
            assert [r[0] for r in conn.execute("SELECT name FROM partitions ORDER BY start_time")] == [
                "records_2", "records_3"]
        finally:
            conn.close()
        later = now + 2000 + 1       # the straddling partition's end is now past the retention period
        assert s.prune(now=later) == 2
        assert [r["call_id"] for r in s.query(limit=0)] == ["new"]
        assert s.prune(now=later) == 0


def test_prune_never_drops_a_record_younger_than_retention(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sqlite3")
    with RecordStore(path, retention_days=30, partition_minutes=60) as s:
        ts = [T0 + k * 1234.5 for k in range(200)]          # ~2.9 days, across ~70 partitions
        for i, t in enumerate(ts):
            s.add(rec(i, t))
        s.flush()
        for step in range(0, 200, 9):
            now = ts[step] + 30 * DAY
            s.prune(now=now)
            left = sorted(r["time"] for r in s.query(limit=0))
            assert all(t in left for t in ts if t >= now - 30 * DAY), step
            # And what is gone was older than the retention period, in partitions now past it.
            assert all(t < now - 30 * DAY for t in ts if t not in left), step


# Version 2 as released: one records table with three indexes, outcomes joined by Call-ID and upto.
_V2_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version VALUES (2);
CREATE TABLE records (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, call_id TEXT NOT NULL DEFAULT '', source TEXT NOT NULL DEFAULT '',
    caller TEXT NOT NULL DEFAULT '', callee TEXT NOT NULL DEFAULT '', rule TEXT NOT NULL DEFAULT '',
    verdict TEXT NOT NULL DEFAULT '', code INTEGER NOT NULL DEFAULT 0, score REAL NOT NULL DEFAULT 0,
    latency_us REAL NOT NULL DEFAULT 0);
CREATE INDEX records_caller_time ON records (caller, time);
CREATE INDEX records_callee_time ON records (callee, time);
CREATE INDEX records_time ON records (time);
CREATE TABLE outcomes (id INTEGER PRIMARY KEY, call_id TEXT NOT NULL, upto INTEGER NOT NULL, final_code INTEGER,
    answered_at REAL, ended_at REAL);
CREATE INDEX outcomes_call_id ON outcomes (call_id);
CREATE INDEX outcomes_upto ON outcomes (upto);
"""


def test_version_2_file_is_migrated(tmp_path: Path) -> None:
    path = str(tmp_path / "v2.sqlite3")
    conn = sqlite3.connect(path)
    conn.executescript(_V2_SCHEMA)
    n = 500
    conn.executemany("INSERT INTO records (id, time, call_id, source, caller, callee, rule, verdict, code, score, "
                     "latency_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     [(i + 1, *(make_record(i, T0 + i * 60)[k] for k in ("time", "call_id", "source", "caller",
                                                                          "callee", "rule", "verdict", "code",
                                                                          "score", "latency_us")))
                      for i in range(n)])
    # call-3: answered (upto 10), a second record of it (id 11, same Call-ID), then its end (upto 20):
    # the first record has both, the second only the end.
    conn.execute("INSERT INTO records (id, time, call_id, caller, rule) VALUES (?, ?, ?, ?, ?)",
                 (n + 1, T0 + n * 60, "call-3@test", "13800000003", "allow"))
    conn.executemany("INSERT INTO outcomes (call_id, upto, final_code, answered_at, ended_at) VALUES (?, ?, ?, ?, ?)",
                     [("call-3@test", 10, 200, T0 + 200, None), ("call-3@test", n + 1, None, None, T0 + 260),
                      ("call-9@test", n + 1, 486, None, None)])
    conn.commit()
    before = conn.execute("SELECT count(*) FROM records").fetchone()[0]
    conn.close()
    with RecordStore(path) as s:
        rows = s.query(limit=0)
        assert len(rows) == before == n + 1
        by = collections.defaultdict(list)
        for r in rows:
            by[r["call_id"]].append((r["time"], r["final_code"], r["answered_at"], r["ended_at"]))
        assert by["call-3@test"] == [(T0 + n * 60, None, None, T0 + 260), (T0 + 180, 200, T0 + 200, T0 + 260)]
        assert by["call-9@test"] == [(T0 + 540, 486, None, None)]
        assert sum(1 for r in rows if r["final_code"] is not None) == 2
        assert [r["call_id"] for r in s.query(caller="13800000003", limit=3)] == [
            "call-3@test", "call-493@test", "call-486@test"]
        # New records go to a new partition after the old range, with ids after the old ones; an
        # outcome written now applies to old records of its call too.
        s.add(rec(9, T0 + n * 60 + 30, "call-9@test"))
        s.add(rec(1000, T0 + 2 * DAY))
        s.flush()
        s.outcome("call-9@test", ended_at=T0 + 2 * DAY)
        s.flush()
        nine = [(r["time"], r["final_code"], r["ended_at"]) for r in s.query(limit=0) if r["call_id"] == "call-9@test"]
        assert nine == [(T0 + n * 60 + 30, None, T0 + 2 * DAY), (T0 + 540, 486, T0 + 2 * DAY)]
        # records_1 closes too (a newer partition took writes): only the newest stays unindexed.
        assert wait_for(lambda: s.partitions()[1]["indexed"])
        parts = s.partitions()
        assert [(p["name"], p["indexed"], p["records"]) for p in parts] == [
            ("records", True, n + 1), ("records_1", True, 1), ("records_2", False, 1)]
        assert parts[0]["start"] == T0 and parts[0]["end"] == parts[1]["start"] == math.nextafter(T0 + n * 60, math.inf)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(3,)]
        assert conn.execute("SELECT id FROM records_1").fetchall() == [(n + 2,)]
        assert conn.execute("SELECT id FROM records_2").fetchall() == [(n + 3,)]
        assert conn.execute("SELECT id, upto FROM outcomes_2").fetchall() == [(4, n + 3)]
        assert indexes_of(conn, "records", "outcomes") == {"records_caller_time", "records_callee_time",
                                                           "records_time", "outcomes_call_id"}
    finally:
        conn.close()


def test_empty_version_2_file_is_migrated(tmp_path: Path) -> None:
    path = str(tmp_path / "v2.sqlite3")
    conn = sqlite3.connect(path)
    conn.executescript(_V2_SCHEMA)
    conn.close()
    with RecordStore(path) as s:
        assert s.query(limit=0) == [] and s.partitions() == []
        s.add(rec(1, T0))
        s.flush()
        assert [r["call_id"] for r in s.query()] == ["call-1@test"]


def test_unusable_times_are_counted(impl: str, store: RecordStore) -> None:
    assert (store._inserter is not None) == (impl == "compiled")
    base = ("c", "lo", "13800000001", "0215", "allow", "allow", 0, 0.0, 1.0)
    with capture_logs() as logs:
        store.add_many([(T0, "ok", *base[1:]), ("not a time", *base), (math.inf, *base), (math.nan, *base),
                        (None, "no-time", *base[1:]), ("1780000001.5", "numeric", *base[1:])])
        store.flush()
    assert store.written == 3 and store.dropped == 3
    assert [(r["call_id"], r["time"]) for r in store.query(limit=0)] == [("numeric", T0 + 1.5), ("ok", T0),
                                                                         ("no-time", 0.0)]
    assert any(e["event"] == "records_write_failed" for e in logs)


def test_writer_follows_another_process(tmp_path: Path) -> None:
    # The records command prunes while the proxy writes: the proxy's writer sees the change
    # (PRAGMA data_version) and goes on with the new catalog, its ids still increasing.
    path = str(tmp_path / "r.sqlite3")
    now = time.time()
    a = RecordStore(path, flush_interval=0.01)
    try:
        a.add({"time": now - 40 * DAY, "call_id": "old", "caller": "13800000001", "rule": "allow"})
        a.add({"time": now - HOUR, "call_id": "kept", "caller": "13800000001", "rule": "allow"})
        a.flush()
        with RecordStore(path) as b:
            assert b.prune() == 1
        a.add({"time": now - 40 * DAY, "call_id": "old-again", "caller": "13800000001", "rule": "allow"})
        a.add({"time": now, "call_id": "now", "caller": "13800000001", "rule": "allow"})
        a.flush()
        a.outcome("kept", 200, answered_at=now)
        a.flush()
        assert a.dropped == 0 and a.written == 4
        with RecordStore(path) as b:
            rows = b.query(limit=0)
            assert [(r["call_id"], r["final_code"]) for r in rows] == [("now", None), ("kept", 200),
                                                                       ("old-again", None)]
    finally:
        a.close()
    conn = sqlite3.connect(path)
    try:
        ids = {cid: i for p, in conn.execute("SELECT name FROM partitions").fetchall()
               for i, cid in conn.execute(f"SELECT id, call_id FROM {p}")}
        assert ids["kept"] < ids["old-again"] < ids["now"]
    finally:
        conn.close()


def test_partition_period_floor() -> None:
    from callguard.records import MAX_PARTITIONS, partition_seconds

    assert partition_seconds(30, 60) == 3600.0
    assert partition_seconds(30, 5) == 22 * 60.0          # 30 days in 5-minute partitions would be 8640
    assert 3650 * 86400 / partition_seconds(3650, 60) <= MAX_PARTITIONS


def test_reader_opens_while_the_writer_holds_the_lock(tmp_path: Path) -> None:
    # `callguard records` while the proxy's writer is in a long transaction (an index build):
    # opening and querying need no write lock.
    path = str(tmp_path / "r.sqlite3")
    with RecordStore(path) as w:
        w.add(rec(1, T0))
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("CREATE INDEX records_1_caller_time ON records_1 (caller, time)")
        with RecordStore(path) as r:      # would fail with "database is locked" after the busy timeout
            assert [x["call_id"] for x in r.query()] == ["call-1@test"]
        other.execute("COMMIT")
    finally:
        other.close()


def test_close_during_an_index_build_loses_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sqlite3")
    rows = [(T0 + i * 0.01, f"c{i}", "lo", f"138{i % 997:08d}", f"0215{i % 991:07d}", "allow", "allow", 0, 0.0, 1.0)
            for i in range(200_000)]
    s = RecordStore(path, flush_interval=0.01)
    s.add_many(rows)
    s.flush(timeout=60)
    s.add(rec(1, T0 + 2 * HOUR))     # closes the big partition: its index builds start after this flush
    s.flush()
    s.close()                         # interrupts a build under way
    assert s.written == 200_001 and s.dropped == 0
    with RecordStore(path, flush_interval=0.01) as again:
        assert len(again.query(caller="13800000005", limit=0)) == len([r for r in rows if r[3] == "13800000005"])
        again.add(rec(2, T0 + 2 * HOUR + 1))      # a writing store finishes what is left
        again.flush()
        assert wait_for(lambda: again.partitions()[0]["indexed"], timeout=60)
        assert again.partitions()[0]["records"] == 200_000
    conn = sqlite3.connect(path)
    try:
        assert len(indexes_of(conn, "records_1", "outcomes_1")) == 4
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        conn.close()


def test_compiled_inserter_stores_what_executemany_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if records_mod._recwriter is None:
        if os.environ.get("CI"):
            pytest.fail("callguard._recwriter is not built")
        pytest.skip("callguard._recwriter is not built")
    rows = [(T0 + i, f"呼叫-{i}@例子" if i % 3 else f"c{i}@h", "10.0.0.1", f"138{i:08d}" if i % 4 else "",
             "0215", "banned" if i % 2 else "allow", "reject" if i % 2 else "allow", 403 * (i % 2),
             0.5 if i % 5 else 1, i % 7, ("score",)) for i in range(1, 400)]
    rows[7] = (T0 + 7.5, None, None, "13800000007", None, "allow", "allow", None, None, None)

    def stored(name: str) -> list[tuple[Any, ...]]:
        path = str(tmp_path / f"{name}.sqlite3")
        with RecordStore(path) as s:
            assert (s._inserter is not None) == (name == "compiled")
            s.add_many(rows[:1])
            s.flush()           # the first row creates the partition; the rest is one usual batch
            s.add_many(rows[1:])
        conn = sqlite3.connect(path)
        try:
            return conn.execute("SELECT * FROM records_1 ORDER BY id").fetchall()
        finally:
            conn.close()

    compiled = stored("compiled")
    monkeypatch.setattr(records_mod, "_recwriter", None)
    assert compiled == stored("python")
    assert [type(v) for v in compiled[7]] == [int, float, str, str, str, str, str, str, int, float, float]
    assert compiled[7][1:] == (T0 + 7.5, "", "", "13800000007", "", "allow", "allow", 0, 0.0, 0.0)


class _CountingInserter:
    """The store's compiled inserter, counting what reaches insert_many."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.batches: list[int] = []      # rows per insert_many call

    def prepare(self, sql: str) -> None:
        self.inner.prepare(sql)

    def insert(self, buf: Any) -> int:
        return int(self.inner.insert(buf))

    def insert_many(self, bufs: list[Any]) -> int:
        self.batches.append(sum(len(b) for b in bufs))
        return int(self.inner.insert_many(bufs))

    def close(self) -> None:
        self.inner.close()


def test_add_many_rows_are_packed_by_the_caller_and_inserted_with_one_call(tmp_path: Path) -> None:
    """The writer thread gets add_many rows packed (in C, by the caller) and inserts a batch of them with
    one insert_many: it takes the GIL once per batch, not once per slice of rows."""
    if records_mod._recwriter is None:
        if os.environ.get("CI"):
            pytest.fail("callguard._recwriter is not built")
        pytest.skip("callguard._recwriter is not built")
    path = str(tmp_path / "r.sqlite3")
    rows = [(T0 + i * 0.5, f"c{i}@h", "10.0.0.1", f"138{i:08d}", "0215", "banned", "reject", 403, 0.9, 2.0,
             ("score",)) for i in range(600)]
    with RecordStore(path, flush_interval=60.0) as s:
        counting = _CountingInserter(s._inserter)
        s._inserter = counting
        s.add_many(rows[:1])
        s.flush()                   # the first row creates the partition (the row-by-row path)
        for k in range(1, 600, 50):
            s.add_many(rows[k:k + 50])
        assert all(item.packed is not None and item.rows is None for item in s._queue)   # no tuples kept
        s.flush()
        assert sum(counting.batches) == 599 and len(counting.batches) <= 2
        # rows that do not pack (a time that is no number) go row by row, and are still stored or refused
        s.add_many([(T0 + 400, "ok", *rows[0][2:]), ("not a time", *rows[0][1:])])
        assert s._queue[-1].packed is None
        s.flush()
        assert sum(counting.batches) == 599
        assert len(s.query(limit=0)) == 601
        # packed, unpackable and packed again in one batch: stored in the order they came
        s.add_many([(T0 + 403, "p1", *rows[0][2:])])
        s.add_many([(T0 + 402, "u1", *rows[0][2:]), ("not a time", *rows[0][1:])])
        s.add_many([(T0 + 401, "p2", *rows[0][2:])])
        s.flush()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT call_id, caller FROM records_1 WHERE id = 300").fetchone() == \
            ("c299@h", "13800000299")
        assert [r[0] for r in conn.execute("SELECT call_id FROM records_1 WHERE call_id IN ('p1', 'u1', 'p2') "
                                           "ORDER BY id")] == ["p1", "u1", "p2"]
    finally:
        conn.close()


def test_replay_decisions_in_time_order_from_since(tmp_path: Path) -> None:
    """Rows of several partitions, some stored a little out of time order (as batches of the two
    paths interleave), come back in time order from ``since`` on, only for the rules asked."""
    path = str(tmp_path / "r.sqlite3")
    times = []
    with RecordStore(path, partition_minutes=10, flush_interval=0.01) as s:
        for i in range(3000):
            # 1 s apart over 50 minutes (several partitions); every 7th row stored 2 s late
            t = T0 + i + (-2.0 if i % 7 == 3 else 0.0)
            times.append(t)
            s.add(make_record(i, t))
        s.add({**make_record(9999, T0 + 1500.5), "rule": "overload", "caller": "not a number"})
        s.flush()
        assert len(s.partitions()) >= 3
        seen: list[tuple[float, str, str, str]] = []
        since = T0 + 700.0
        n = s.replay_decisions(since, lambda t, cr, ce, src: seen.append((t, cr, ce, src)), RULES)
    expected = sorted((t, make_record(i, 0)["caller"], make_record(i, 0)["callee"], "loopback")
                      for i, t in enumerate(times) if t >= since)
    assert n == len(seen) == len(expected) > 2000
    assert seen == expected
    assert [t for t, *_ in seen] == sorted(t for t, *_ in seen)
    assert all(cr != "not a number" for _, cr, _, _ in seen)     # an overload row is no decision of the core
    # only some rules; nothing since the last row
    with RecordStore(path, partition_minutes=10) as s:
        few: list[float] = []
        assert s.replay_decisions(since, lambda t, *_: few.append(t), ["banned"]) == len(few)
        assert len(few) == sum(1 for i, t in enumerate(times) if t >= since and RULES[i % len(RULES)] == "banned")
        assert s.replay_decisions(T0 + 4000.0, lambda *a: few.append(-1.0), RULES) == 0
        assert -1.0 not in few


def test_replay_decisions_of_an_empty_store(store: Any) -> None:
    assert store.replay_decisions(0.0, lambda *a: pytest.fail("no rows"), RULES) == 0


def test_replay_outcomes_finds_them_in_newer_partitions(tmp_path: Path) -> None:
    """An outcome goes into the newest partition's table when it is written: one of a call in an
    older partition is still found, and calls not over yet are left out."""
    with RecordStore(str(tmp_path / "r.sqlite3"), partition_minutes=10, flush_interval=0.01) as s:
        s.add(make_record(0, T0))
        s.add(make_record(1, T0 + 5))
        s.add(make_record(2, T0 + 10))
        s.flush()
        s.add(make_record(3, T0 + 1500))       # a newer partition takes the outcomes from now on
        s.flush()
        assert len(s.partitions()) == 2
        s.outcome("call-0@test", final_code=486)
        s.outcome("call-1@test", final_code=200, answered_at=T0 + 6)
        s.outcome("call-1@test", ended_at=T0 + 9)
        s.outcome("call-2@test", final_code=200, answered_at=T0 + 11)     # still talking
        s.outcome("call-3@test", final_code=503)
        s.flush()
        seen: list[tuple[float, str, bool, float]] = []
        assert s.replay_outcomes(T0, lambda *a: seen.append(a)) == 3
        assert sorted(seen) == [(T0, make_record(0, 0)["caller"], False, 0.0),
                                (T0 + 9, make_record(1, 0)["caller"], True, 3.0),
                                (T0 + 1500, make_record(3, 0)["caller"], False, 0.0)]
        seen.clear()
        assert s.replay_outcomes(T0 + 1000, lambda *a: seen.append(a)) == 1 and seen[0][0] == T0 + 1500


def test_replay_horizon_keeps_the_newest_rows(tmp_path: Path) -> None:
    with RecordStore(str(tmp_path / "r.sqlite3"), partition_minutes=5, flush_interval=0.01) as s:
        for i in range(3000):
            s.add(make_record(i, T0 + i))
        s.flush()
        assert len(s.partitions()) >= 3
        assert s.replay_horizon(T0, 5000) == T0                  # all of them fit
        assert s.replay_horizon(T0 + 400, 2600) == T0 + 400      # exactly
        assert s.replay_horizon(T0, 100) == T0 + 2900            # the newest 100, in the last partition
        assert s.replay_horizon(T0, 2000) == T0 + 1000           # across partitions
        assert s.replay_horizon(T0 + 4000, 10) == T0 + 4000      # nothing since then: nothing to cut
        assert s.replay_horizon(T0, 0) == math.inf
        seen: list[float] = []
        assert s.replay_decisions(s.replay_horizon(T0, 300), lambda t, *_: seen.append(t), RULES) == 300
        assert seen[0] == T0 + 2700 and seen[-1] == T0 + 2999


def test_rows_packed_elsewhere_are_stored_as_add_many_stores_them(impl: str, tmp_path: Path) -> None:
    rows = [(T0 + 1, "c1", "127.0.0.1", "13800000001", "02150001234", "banned", "reject", 403, 0.5, 7.0),
            (T0 + 2, "c2", "10.0.0.1", "13800000002", "110", "emergency", "allow", 0, 0.0, 3.0)]
    with RecordStore(str(tmp_path / "a.sqlite3")) as ref:
        ref.add_many(list(rows))
        ref.flush()
        want = ref.query(limit=0)
    with RecordStore(str(tmp_path / "b.sqlite3")) as s:
        if impl == "python":        # no compiled writer: nobody may pack for it
            assert not s.packs_rows
            with pytest.raises(RuntimeError):
                s.add_packed(b"", 1, T0, T0, False)
            return
        assert s.packs_rows
        buf = records_mod._recwriter.RowBuffer()
        buf.extend(rows)
        s.add_packed(buf.packed(), buf.rows, buf.tmin, buf.tmax, buf.odd)
        s.flush()
        assert s.written == 2 and s.dropped == 0
        assert [{k: v for k, v in r.items() if k != "id"} for r in s.query(limit=0)] == \
            [{k: v for k, v in r.items() if k != "id"} for r in want]
        s.close()
        s.add_packed(buf.packed(), buf.rows, buf.tmin, buf.tmax, buf.odd)     # closed: counted as lost
        assert s.dropped == 2


def test_a_full_store_drops_whole_batches_counted_and_logs_a_line_not_one_per_record(tmp_path: Path,
                                                                                      impl: str) -> None:
    """SQLITE_FULL (here the file may not grow: max_page_count) fails the store, not a row: the batch
    is dropped and counted at once, with one error line, instead of halving it down to single rows
    (about 2N transactions and one line per record); writing resumes once there is room."""
    s = RecordStore(str(tmp_path / "records.sqlite3"), flush_interval=0.05)
    try:
        s.add_many([tuple(make_record(i, T0 + i)[f] for f in RECORD_FIELDS) for i in range(10)])
        s.flush(timeout=30)
        assert s.written == 10
        pages = s._wconn.execute("PRAGMA page_count").fetchone()[0]
        s._wconn.execute(f"PRAGMA max_page_count = {pages}")
        rows = [tuple(make_record(i, T0 + i)[f] for f in RECORD_FIELDS) for i in range(10, 5010)]
        with capture_logs() as logs:
            for k in range(0, len(rows), 500):
                s.add_many(rows[k:k + 500])
            s.flush(timeout=30)
        assert s.written == 10 and s.dropped == 5000
        failed = [e for e in logs if e["event"] == "records_write_failed"]
        assert 1 <= len(failed) <= 2, len(failed)
        s._wconn.execute("PRAGMA max_page_count = 1073741823")
        s.add_many(rows[:5])
        s.flush(timeout=30)
        assert s.written == 15
    finally:
        s.close()


def test_records_that_cannot_be_opened_are_counted_as_dropped(tmp_path: Path) -> None:
    """records.path a directory (or a corrupt file): calls flow and every decision's record is
    counted in callguard_records_dropped_total and logged, not lost with the counter at 0."""
    from callguard import config as config_mod
    from callguard.metrics import Metrics
    from callguard.sip.proxy import UnwrittenRecords
    from callguard.sip.server import _open_records

    (tmp_path / "junk.sqlite3").write_bytes(os.urandom(5000))
    for path in (tmp_path, tmp_path / "junk.sqlite3"):
        cfg = config_mod.from_mapping({"records": {"enabled": True, "path": str(path)}, "metrics": {"enabled": True}})
        m = Metrics()
        with capture_logs() as logs:
            rec = _open_records(cfg, records_mod._log(), m)
            assert isinstance(rec, UnwrittenRecords)
            rec.add_packed(b"", 7, T0, T0, False)
            rec.add_many([("x",) * len(RECORD_FIELDS)] * 2)
            rec.add({"time": T0})
        assert m.registry.get_sample_value("callguard_records_dropped_total") == 10
        assert [e["event"] for e in logs] == ["records_failed", "records_dropping"]
        assert rec.packs_rows      # the fast path hands its rows over (ROWS_PACKED), so they are counted
