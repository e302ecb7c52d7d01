"""What real data does to the offline side: list files, YAML, call logs and the CLI's options.

Each case is one a carrier's export or an engineer's hand-written config contains, and each was
answered wrongly once (a wrong verdict, a silently lost row, a traceback); the test names the
behaviour that is right.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import pytest

from callguard import cli, lists
from callguard import config as config_mod
from callguard.errors import ConfigError, InputError
from callguard.guard import Guard, load_lists

from .conftest import CYTHON, write

BL_HEADER = "number,match,source,reason,added,expires,p\n"
FL_HEADER = "number,area,carrier,usage,inbound,outbound,valid_from,valid_until\n"
TZ8 = dt.timezone(dt.timedelta(hours=8))


@pytest.fixture(autouse=True)
def _keep_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    # cli.main configures structlog for the process, onto the stream pytest captures and closes
    # after the test: the tests that follow would log into a closed file.
    monkeypatch.setattr(cli, "configure_logging", lambda *args, **kwargs: None)


def _loaders() -> list[Any]:
    out: list[Any] = [pytest.param(lists.load_blocklist_py, id="py-loader")]
    if CYTHON:
        from callguard import _core

        out.append(pytest.param(lambda path, strict=False, tz=dt.UTC: _core.load_blocklist(path, strict, tz),
                                id="c-loader"))
    return out


def _guard(tmp_path: Path, impl: str, blocklist: str = BL_HEADER, filings: str = FL_HEADER,
           **overrides: Any) -> Guard:
    data: dict[str, Any] = {
        "lists": {"blocklist": str(write(tmp_path / "bl.csv", blocklist)),
                  "service_numbers": str(write(tmp_path / "sn.csv", filings))},
        "records": {"enabled": False}, "metrics": {"enabled": False}}
    data.update(overrides)
    cfg = config_mod.from_mapping(data, str(tmp_path / "test.yaml"))
    return Guard(cfg, load_lists(cfg), implementation=impl)


# ---------------------------------------------------------------- list files
@pytest.mark.parametrize("load", _loaders())
def test_big_data_p_is_truncated_to_the_list_resolution_not_rounded_up(tmp_path: Path, load: Any) -> None:
    text = BL_HEADER + "".join(f"1380013800{i},exact,big_data,bd,,,{p}\n"
                               for i, p in enumerate(["0.74996", "0.75", "0.749951", "0.29", "1", "0"]))
    bl, problems = load(str(write(tmp_path / "bl.csv", text)))
    assert not problems
    by_key = dict(zip(bl.keys.tolist(), bl.p.tolist()))
    got = [by_key[lists.entry_key(f"1380013800{i}", False)] for i in range(6)]
    assert got == [7499, 7500, 7499, 2900, 10000, 0]


def test_a_big_data_p_just_under_the_threshold_is_not_banned(tmp_path: Path, impl: str) -> None:
    g = _guard(tmp_path, impl, BL_HEADER + "13800138000,exact,big_data,bd,,,0.74996\n"
                                           "13800138001,exact,big_data,bd,,,0.75\n")
    assert g.check("13800138000", "02150001234").rule != "banned"
    assert g.check("13800138001", "02150001234").rule == "banned"


@pytest.mark.parametrize("order", ["expired first", "renewal first"])
def test_a_renewed_filing_beside_the_expired_one_is_in_force(tmp_path: Path, impl: str, order: str) -> None:
    rows = ["95598,,A,old,true,true,2020-01-01,2021-12-31\n", "95598,,A,renewed,true,true,2022-01-01,2029-12-31\n"]
    if order == "renewal first":
        rows.reverse()
    g = _guard(tmp_path, impl, filings=FL_HEADER + "".join(rows))
    in_force = dt.datetime(2026, 10, 1, 10, tzinfo=TZ8).timestamp()
    assert g.check("95598", "02150001234", now=in_force).rule == "allow"
    assert g.check("95598", "02150001234", now=dt.datetime(2030, 6, 1, tzinfo=TZ8).timestamp()).rule \
        == "filing_expired"
    assert g.check("95598", "02150001234", now=dt.datetime(2021, 6, 1, tzinfo=TZ8).timestamp()).rule == "allow"


def test_of_two_filings_in_force_the_last_in_the_file_decides(tmp_path: Path, impl: str) -> None:
    g = _guard(tmp_path, impl, filings=FL_HEADER + "95598,,A,both,true,true,2020-01-01,2029-12-31\n"
                                                   "95598,,A,inbound,true,false,2025-01-01,2029-12-31\n")
    assert g.check("95598", "02150001234", now=dt.datetime(2026, 1, 1, tzinfo=TZ8).timestamp()).rule \
        == "outbound_prohibited"
    assert g.check("95598", "02150001234", now=dt.datetime(2024, 1, 1, tzinfo=TZ8).timestamp()).rule == "allow"


@pytest.mark.parametrize("load", _loaders())
def test_basic_iso_dates_are_dates_not_epoch_seconds(tmp_path: Path, load: Any) -> None:
    text = BL_HEADER + ("13800138000,exact,regulator,x,20260101,20271231,\n"
                        "13800138001,exact,regulator,x,,1798675200,\n"
                        "13800138002,exact,regulator,x,,20271231235959,\n")
    bl, problems = load(str(write(tmp_path / "bl.csv", text)), False, TZ8)
    assert not problems
    expires = dict(zip(bl.keys.tolist(), bl.expires.tolist()))
    end_2027 = int(dt.datetime(2028, 1, 1, tzinfo=TZ8).timestamp())
    assert expires[lists.entry_key("13800138000", False)] == end_2027        # through the 31st
    assert expires[lists.entry_key("13800138001", False)] == 1798675200      # ten digits: epoch seconds
    assert expires[lists.entry_key("13800138002", False)] == end_2027 - 1


@pytest.mark.parametrize("text", ["99999999999999", "1e18", "nan", "inf", "2026-02-30", "２０２６-01-01"])
def test_times_out_of_range_or_impossible_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        lists.parse_time(text, TZ8)


@pytest.mark.parametrize("load", [lists.load_blocklist, lists.load_blocklist_py])
def test_a_row_that_is_not_utf8_is_reported_and_no_other_row_is_lost(tmp_path: Path, load: Any) -> None:
    # (the compiled loader hands such a file to the Python reader)
    body = b"".join(b"1380%07d,exact,regulator,%s,2026-01-01,,\n" % (i, b"caf\xe9" if i == 1000 else b"ok")
                    for i in range(2000))
    path = tmp_path / "bl.csv"
    path.write_bytes(BL_HEADER.encode() + body)
    bl, problems = load(str(path))
    assert [(p.line, p.problem) for p in problems] == [(1002, "not UTF-8")]
    want = {lists.entry_key(f"1380{i:07d}", False) for i in range(2000) if i != 1000}
    assert set(bl.keys.tolist()) == want


def test_comment_and_blank_lines_before_the_header_are_skipped(tmp_path: Path) -> None:
    path = write(tmp_path / "bl.csv", "# exported 2026-10-01\n\n" + BL_HEADER + "13800138000,exact,regulator,x,,,\n"
                 "13800138001,exact,nowhere,x,,,\n")
    bl, problems = lists.load_blocklist(str(path))
    assert bl.keys.tolist() == [lists.entry_key("13800138000", False)]
    assert [p.line for p in problems] == [5]         # lines as in the file


# ---------------------------------------------------------------- YAML
def _load_yaml(tmp_path: Path, text: str) -> config_mod.Config:
    return config_mod.load(write(tmp_path / "c.yaml", text))


def test_unquoted_area_codes_stay_the_digits_written(tmp_path: Path) -> None:
    cfg = _load_yaml(tmp_path, "sources:\n  - {name: h, networks: [127.0.0.0/8], number_ranges: [0371, 021, 138]}\n"
                               "emergency_numbers: [110, 0110]\n")
    assert cfg.sources[0].number_ranges == ("0371", "021", "138")
    assert cfg.emergency_numbers == ("110", "0110")


@pytest.mark.parametrize("value", ["0x100000", "0o4000000", "1_048_576", "1:30"])
def test_numbers_in_other_bases_are_refused_where_an_integer_is_wanted(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="sip.tcp_write_queue_max: expected an integer"):
        _load_yaml(tmp_path, f"sip: {{tcp_write_queue_max: {value}}}\n")


def test_a_key_given_twice_is_refused_with_its_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"line 3, column 1: key 'lists' given twice"):
        _load_yaml(tmp_path, "lists: {blocklist: bl.csv}\nmetrics: {enabled: false}\nlists: {allowlist: ''}\n")
    with pytest.raises(ConfigError, match="key 'mode' given twice"):
        _load_yaml(tmp_path, "rules:\n  banned:\n    mode: shadow\n    mode: enforce\n")


def test_a_rule_given_only_its_mode_keeps_its_own_code_and_reason(tmp_path: Path) -> None:
    cfg = _load_yaml(tmp_path, "rules:\n  anonymous: {mode: shadow}\n  score: {reason: risky}\n"
                               "  high_frequency: {code: 486}\n")
    assert (cfg.rules["anonymous"].mode, cfg.rules["anonymous"].code) == ("shadow", 433)
    assert (cfg.rules["score"].code, cfg.rules["score"].reason) == (608, "risky")
    assert cfg.rules["high_frequency"].code == 486


@pytest.mark.parametrize(("text", "message"), [
    ('lists: {timezone: "+25:00"}\n', "lists.timezone: not a UTC offset"),
    ('lists: {timezone: "+08:60"}\n', "lists.timezone: not a UTC offset"),
    ('allowlist_numbers: ["12"]\n', "allowlist_numbers: not a number a caller can have"),
])
def test_values_that_failed_later_are_refused_with_their_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load_yaml(tmp_path, text)


def test_a_config_that_is_not_utf8_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"metrics: {enabled: false}\n# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8: byte 0xe9 on line 2"):
        config_mod.load(path)


# ---------------------------------------------------------------- call logs and the CLI
def _config(tmp_path: Path) -> str:
    write(tmp_path / "bl.csv", BL_HEADER + "13800138000,exact,regulator,x,2026-01-01,2026-06-30T12:00:00+08:00,\n")
    write(tmp_path / "sn.csv", FL_HEADER)
    return str(write(tmp_path / "c.yaml", "lists: {blocklist: bl.csv, service_numbers: sn.csv}\n"
                                          "records: {enabled: false}\nmetrics: {enabled: false}\n"))


@pytest.mark.parametrize(("when", "rule"), [
    ("2026-06-30T09:15:00+0530", "banned"),       # 11:45 at +08:00: before the ban expires at noon
    ("2026-06-30T09:15:00+05:30", "banned"),
    ("2026-06-30T12:15:00+0800", "allow"),
    ("20260630", "banned"),
    ("20260630121500", "allow"),
])
def test_check_time_in_every_iso_form(tmp_path: Path, capsys: pytest.CaptureFixture[str], when: str,
                                      rule: str) -> None:
    code = cli.main(["check", "13800138000", "02150001234", "--config", _config(tmp_path), "--time", when, "--json"])
    assert json.loads(capsys.readouterr().out)["rule"] == rule
    assert code == (3 if rule == "banned" else 0)


@pytest.mark.parametrize("when", ["2026-06-29T99:00:00", "2026-06-30T-1:00:00", "2026-06-30T09:15:00+08:00garbage",
                                  "2026-06-30T09:15:61", "nan", "inf", "1e18", "-5"])
def test_check_refuses_a_time_that_is_not_one(tmp_path: Path, capsys: pytest.CaptureFixture[str], when: str) -> None:
    assert cli.main(["check", "13800138000", "02150001234", "--config", _config(tmp_path), f"--time={when}"]) == 2
    assert "--time" in capsys.readouterr().err


def _replay(tmp_path: Path, log: Path, capsys: pytest.CaptureFixture[str]) -> tuple[list[dict[str, str]], str]:
    out = tmp_path / "out.csv"
    assert cli.main(["replay", str(log), "--config", _config(tmp_path), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f)), err


def test_replay_keeps_every_row_of_a_log_with_broken_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [b"time,caller,callee,source",
             b"2026-06-01T10:00:00,13800138000,02150001234,127.0.0.1 ",     # padded: the address
             b"2026-06-01T10:00:01,13800138000,02150001234,garbage",
             b"1e18,13800138000,02150001234,",
             b"inf,13800138000,02150001234,",
             b"2026-06-01T10:00:02," + b"1" * (1 << 18) + b",02150001234,",  # past the CSV field limit
             b"2026-06-01T10:00:03,13800138000,caf\xe9,",
             b"2026-06-29T99:00:00,13800138000,02150001234,",
             b"2026-06-01T10:00:04,13800138000,02150001234,"]
    log = tmp_path / "log.csv"
    log.write_bytes(b"\n".join(lines) + b"\n")
    rows, err = _replay(tmp_path, log, capsys)
    assert [r["rule"] for r in rows] == ["banned"] + ["bad_row"] * 6 + ["banned"]
    assert rows[5]["callee"] == "caf\udce9"          # written back byte for byte
    for line, what in ((3, "source: not an IP address"), (4, "time"), (5, "time"), (6, "unreadable row"),
                       (7, "not UTF-8"), (8, "time")):
        assert f"log.csv:{line}: {what}" in err, err
    assert (tmp_path / "out.csv").read_bytes().count(b"caf\xe9") == 1


def test_replay_that_fails_leaves_the_output_file_as_it_was(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path)
    existing = write(tmp_path / "existing.csv", "keep me\n")
    assert cli.main(["replay", str(tmp_path / "missing.csv"), "--config", cfg, "--out", str(existing)]) == 2
    bad_header = write(tmp_path / "bad.csv", "when,who\n1,2\n")
    assert cli.main(["replay", str(bad_header), "--config", cfg, "--out", str(existing)]) == 2
    assert existing.read_text() == "keep me\n"
    log = write(tmp_path / "log.csv", "time,caller,callee\n2026-06-01T10:00:00,13800138000,02150001234\n")
    assert cli.main(["replay", str(log), "--config", cfg, "--out", str(log)]) == 2
    assert "is the log being replayed" in capsys.readouterr().err
    assert log.read_text().endswith("02150001234\n")
    assert cli.main(["replay", str(log), "--config", cfg, "--out", str(existing)]) == 0
    assert existing.read_text().splitlines()[1].endswith(",reject,403,banned")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_records_takes_a_relative_time_after_a_space_and_bounds_the_limit(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from callguard.records import RecordStore

    cfg = str(write(tmp_path / "r.yaml", "records: {enabled: true, path: r.sqlite3}\nmetrics: {enabled: false}\n"))
    store = RecordStore(str(tmp_path / "r.sqlite3"), 30)
    try:
        store.add({"time": time.time() - 60, "call_id": "c1", "source": "127.0.0.1", "caller": "13800138000",
                   "callee": "02150001234", "rule": "banned", "verdict": "reject", "code": 403})
        store.flush(timeout=30)
        with pytest.raises(InputError):
            store.query(limit=1 << 64)
    finally:
        store.close()
    assert cli.main(["records", "--config", cfg, "--since", "-1h", "--json"]) == 0
    assert [json.loads(line)["call_id"] for line in capsys.readouterr().out.splitlines()] == ["c1"]
    assert cli.main(["records", "--config", cfg, "--until", "-2h", "--json"]) == 0
    assert capsys.readouterr().out == ""
    assert cli.main(["records", "--config", cfg, "--limit", str(1 << 70)]) == 2
    assert "--limit must be from 0 to" in capsys.readouterr().err


@pytest.mark.parametrize("load", _loaders() + [pytest.param(lists.load_blocklist, id="either")])
def test_a_column_named_twice_in_the_header_is_refused(tmp_path: Path, load: Any) -> None:
    path = write(tmp_path / "bl.csv", "number,match,source,reason,added,expires,p,number\n"
                                      "13800138000,exact,regulator,x,,,,13900139000\n")
    if load is not lists.load_blocklist_py and load is not lists.load_blocklist:
        assert load(str(path)) is None           # the compiled reader leaves it to the Python one
        return
    with pytest.raises(lists.ListError, match="bl.csv:1: header names column.s. number more than once"):
        load(str(path))


def test_a_date_error_names_its_column(tmp_path: Path) -> None:
    path = write(tmp_path / "bl.csv", BL_HEADER + "13800138000,exact,regulator,x,2026-01-01,2026-02-30,\n")
    _, problems = lists.load_blocklist(str(path))
    assert [p.problem for p in problems] == ["expires: not an ISO 8601 date or time: '2026-02-30'"]
    path = write(tmp_path / "sn.csv", FL_HEADER + "95598,,A,x,true,true,yesterday,\n")
    _, problems = lists.load_filings(str(path))
    assert [p.problem for p in problems] == ["valid_from: not an ISO 8601 date or time: 'yesterday'"]


@pytest.mark.parametrize("text", ["", "\n  \n", "# nothing here\n"])
def test_an_empty_config_file_is_refused_not_run_with_no_lists(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        _load_yaml(tmp_path, text)
    assert _load_yaml(tmp_path, "{}\n").lists.blocklist is not None       # every default, said so


def test_validate_lists_every_broken_row_with_strict_lists_too(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "bl.csv", BL_HEADER + "13800138000,exact,nowhere,x,,,\n13800138001,exact,regulator,x,,,\n"
                                           "13800138002,fuzzy,regulator,x,,,\n")
    write(tmp_path / "sn.csv", FL_HEADER)
    cfg = write(tmp_path / "c.yaml", "lists: {blocklist: bl.csv, service_numbers: sn.csv, strict: true}\n"
                                     "records: {enabled: false}\nmetrics: {enabled: false}\n")
    assert cli.main(["validate", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "bl.csv:2:" in err and "bl.csv:4:" in err and "lists.strict is on" in err
