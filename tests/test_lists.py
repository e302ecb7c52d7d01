"""List files: formats of SPEC §4; broken rows reported with file and line, the rest still load."""

from __future__ import annotations

from pathlib import Path

import pytest

from callguard import lists, numbers
from callguard.errors import ListError

from .conftest import write


def test_broken_rows_are_reported_and_skipped(tmp_path: Path) -> None:
    path = write(tmp_path / "bl.csv", """\
        number,match,source,reason,added,expires,p
        13800138000,exact,regulator,ok,2026-01-01,,
        13800138001,fuzzy,regulator,bad match,2026-01-01,,
        13800138002,exact,police,bad source,2026-01-01,,
        13800138003,exact,big_data,no p,2026-01-01,,
        13800138004,exact,big_data,p too big,2026-01-01,,1.5
        not-a-number,exact,manual,bad number,2026-01-01,,
        13800138005,exact,manual,bad date,2026-13-01,,
        13800138006,exact,manual,too few fields
        13800138007,exact,manual,"quoted, with comma",2026-01-01,2027-01-01,

        # a comment line
        13800138008,prefix,manual,ok prefix,2026-01-01,,
        """)
    bl, problems = lists.load_blocklist(str(path))
    assert len(bl) == 3
    assert [p.line for p in problems] == [3, 4, 5, 6, 7, 8, 9]
    assert all(p.file == str(path) for p in problems)
    assert "match" in problems[0].problem and "source" in problems[1].problem
    assert "p" in problems[2].problem and "between 0 and 1" in problems[3].problem
    assert "not a number" in problems[4].problem and "expected 7 fields" in problems[6].problem
    assert str(problems[0]).startswith(f"{path}:3: ")
    keys = set(bl.keys.tolist())
    assert numbers.key_of("13800138000") in keys and numbers.key_of("13800138008") in keys


def test_strict_mode_refuses_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "bl.csv", "number,match,source,reason,added,expires,p\n1380013800x,exact,manual,x,,,\n")
    with pytest.raises(ListError) as info:
        lists.load_blocklist(str(path), strict=True)
    assert info.value.line == 2 and info.value.file == str(path)


def test_header_is_required_and_columns_may_be_reordered(tmp_path: Path) -> None:
    path = write(tmp_path / "bl.csv",
                 "reason,number,p,expires,added,source,match,extra\nx,13800138000,,,,manual,exact,y\n")
    bl, problems = lists.load_blocklist(str(path))
    assert len(bl) == 1 and not problems
    bad = write(tmp_path / "bad.csv", "number,reason\n13800138000,x\n")
    with pytest.raises(ListError, match="header lacks column"):
        lists.load_blocklist(str(bad))
    empty = write(tmp_path / "empty.csv", "")
    with pytest.raises(ListError, match="empty file"):
        lists.load_blocklist(str(empty))
    with pytest.raises(ListError, match="cannot read"):
        lists.load_blocklist(str(tmp_path / "missing.csv"))


def test_filings(tmp_path: Path) -> None:
    path = write(tmp_path / "sn.csv", """\
        number,area,carrier,usage,inbound,outbound,valid_from,valid_until
        95588,,CT,bank,true,true,2024-01-01,2029-12-31
        96123,,CT,needs area,true,false,2024-01-01,2029-12-31
        96123,0391,CT,ok,true,false,,
        13800138000,,CT,not a service number,true,true,,
        95566,,CT,bad bool,maybe,true,,
        95567,,CT,backwards,true,true,2025-01-01,2024-01-01
        """)
    fl, problems = lists.load_filings(str(path))
    assert len(fl) == 2
    assert [p.line for p in problems] == [3, 5, 6, 7]
    assert numbers.key_of("039196123") in set(fl.keys.tolist())


def test_allowlist_and_config_numbers(tmp_path: Path) -> None:
    path = write(tmp_path / "al.csv", "number,match,reason\n10085,exact,platform\n1880,prefix,range\nxx,exact,bad\n")
    loaded = lists.load_lists("", "", str(path), extra_allow=["10001"])
    assert len(loaded.allowlist) == 3
    assert [p.line for p in loaded.problems] == [4]


def test_dates_mean_whole_days_in_the_configured_zone(tmp_path: Path) -> None:
    tz = lists.parse_tz("+08:00")
    start = lists.parse_time("2026-01-01", tz)
    end = lists.parse_time("2026-01-01", tz, end_of_day=True)
    assert end - start == 86400
    assert start == 1767196800.0   # 2025-12-31T16:00:00Z
    assert lists.parse_time("1767196800", tz) == start
    assert lists.parse_time("2026-01-01T00:00:00Z", tz) == start + 8 * 3600
    with pytest.raises(ValueError):
        lists.parse_time("yesterday", tz)
