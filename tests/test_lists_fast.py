"""The compiled blocklist loader must give exactly what the Python loader gives.

Random valid and broken CSV files go through both; the arrays, the reason table and
the reported problems (file, line, text) must be identical, and strict mode must
refuse the same file with the same error.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callguard import lists
from callguard.errors import ListError

try:
    from callguard import _core
except ImportError:
    if os.environ.get("CI"):
        raise  # in CI the compiled core must be there: never skip it silently
    pytest.skip("compiled core not built", allow_module_level=True)

TZ = lists.parse_tz("+08:00")
COLUMNS = ("keys", "prefix", "source", "expires", "p", "complaints", "reason")

NUMBERS = ["13800138000", "+86 138 0013 8001", "0391-3569391", "sip:+8613800138002@gw", "95588", "96123",
           "4001234567", "abc", "", "1", "0086 171 0000 0001", "(021) 5000-1234", "13800１38000", "\u3000139123",
           "+447911123456", "1380013", "+86", "0391", "9612345678901234567890", "13800138000 ", "1/3/8"]
MATCHES = ["", "exact", "prefix", "Prefix", "EXACT", "bad", " prefix "]
SOURCE_WORDS = list(lists.SOURCES) + ["BIG_DATA", "Regulator", "unknown", ""]
REASONS = ["fraud", "spam calls", "骚扰电话", "  padded  ", '"quoted, with comma"', '"with ""quotes"""', "",
           "a\u3000"]
DATES = ["", "2026-01-10", "2026-02-30", "2024-02-29", "2023-02-29", "2026-01-10T08:00:00+08:00", "1767225600",
         "1767225600.5", ".5", "abc", "2026-W02-3", "20260110", "0001-01-01", "2026-13-01", " 2026-01-10 ",
         "1969-12-31", "2026-01-10Z", "１２３"]
PS = ["", "0.5", "1", "1.0", "0.75", "0.74995", "2", "-0.1", "abc", ".5", "1e-1", " 0.3 ", "nan", "0_5", "0.00005",
      "0.00015"]
COMPLAINTS = ["", "3", "70000", "x", "٣", " 4 ", "0"]
GOOD = {"number": NUMBERS[:8] + ["0391-3569391", "+86 171 0000 0002"], "match": ["", "exact", "Exact"],
        "source": ["regulator", "complaint", "manual", "big_data"], "reason": REASONS,
        "added": ["", "2026-01-10", "1767225600"], "expires": ["", "2026-01-10", "2030-06-30", "1767225600.5"],
        "p": ["0.5", "0.75", "0.74995", "1"], "complaints": ["", "3", "70000"]}


def _field(draw: Any, pool: list[str]) -> str:
    return draw(st.sampled_from(pool))


@st.composite
def csv_text(draw: Any) -> str:
    with_complaints = draw(st.booleans())
    header = ["number", "match", "source", "reason", "added", "expires", "p"]
    if with_complaints:
        header.append("complaints")
    if draw(st.integers(0, 5)) == 0:
        header.insert(draw(st.integers(0, len(header))), "note")
    if draw(st.integers(0, 5)) == 0:
        header = [h.upper() if i % 2 else f" {h} " for i, h in enumerate(header)]
    eol = draw(st.sampled_from(["\n", "\n", "\r\n"]))
    lines = [",".join(header)]
    for _ in range(draw(st.integers(0, 30))):
        kind = draw(st.integers(0, 20))
        if kind == 0:
            lines.append("")
        elif kind == 1:
            lines.append("   ")
        elif kind == 2:
            lines.append("# comment, with, commas")
        elif kind == 3:
            lines.append(",".join(["1"] * draw(st.integers(1, 12))))
        else:
            row = []
            good = draw(st.booleans())
            for h in header:
                name = h.strip().lower()
                pool = {"number": NUMBERS, "match": MATCHES, "source": SOURCE_WORDS, "reason": REASONS,
                        "added": DATES, "expires": DATES, "p": PS, "complaints": COMPLAINTS}.get(name, ["x", ""])
                if good and name in GOOD:
                    pool = GOOD[name]
                value = _field(draw, pool)
                if "," in value and not value.startswith('"'):
                    value = f'"{value}"'
                row.append(value)
            if draw(st.integers(0, 8)) == 0:
                row[0] = f'"{row[0]}"' if '"' not in row[0] else row[0]
            lines.append(",".join(row))
    text = eol.join(lines)
    if draw(st.booleans()):
        text += eol
    if draw(st.integers(0, 6)) == 0:
        text = "\ufeff" + text
    return text


def _write(data: bytes) -> str:
    fd, path = tempfile.mkstemp(suffix=".csv")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


def _same(path: str, strict: bool = False) -> Any:
    try:
        expected = lists.load_blocklist_py(path, strict, TZ)
    except ListError as exc:
        with pytest.raises(ListError) as caught:
            lists.load_blocklist(path, strict, TZ)
        assert str(caught.value) == str(exc)
        return None
    got = lists.load_blocklist(path, strict, TZ)
    for name in COLUMNS:
        a, b = getattr(got[0], name), getattr(expected[0], name)
        assert a.dtype == b.dtype, name
        assert np.array_equal(a, b), name
    assert got[0].reasons == expected[0].reasons
    assert got[1] == expected[1]
    return got


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=csv_text(), strict=st.booleans())
def test_random_files(text: str, strict: bool) -> None:
    path = _write(text.encode("utf-8"))
    try:
        fast = _core.load_blocklist(path, strict, TZ) if not strict else None
        _same(path, strict)
        if fast is not None:
            # the compiled reader took the file itself (no fallback) and still agrees
            assert fast[1] == lists.load_blocklist_py(path, False, TZ)[1]
    finally:
        os.unlink(path)


@pytest.mark.parametrize("data", [
    b'number,match,source,reason,added,expires,p\n13800138000,exact,regulator,"two\nlines",,,\n',
    b"number,match,source,reason,added,expires,p\r13800138000,exact,regulator,x,,,\r",
    b"number,match,source,reason,added,expires,p\n13800138000,exact,regulator,\xff\xfe,,,\n",
    b'number,match,source,reason,added,expires,p\n13800138000,exact,regulator,"a"b,,,\n',
    b'"number",match,source,reason,added,expires,p\n13800138000,exact,regulator,a,,,\n',
    b"",
    b"\xef\xbb\xbf",
    b"number,match\n1,exact\n",
    b"\nnumber,match,source,reason,added,expires,p\n",
    b"number,match,source,reason,added,expires,p\n13800138000,exact,regulator,a,,,",
    b"number,match,source,reason,added,expires,p\n13800138000,exact,big_data,a,,,\n13800138001,exact,manual,a,,,\n",
    b"number,match,source,reason,added,expires,p,complaints\n" + b"13800138000,exact,regulator,r,,,,99999\n" * 3,
    b"number,match,source,reason,added,expires,p\n1,exact,regulator,a,,,\n13800138000,exact,regulator,\xff,,,\n",
], ids=["quoted-newline", "cr-only", "bad-utf8", "text-after-quote", "quoted-header", "empty", "bom-only",
        "missing-columns", "blank-header", "no-final-newline", "big-data-without-p", "complaints-capped",
        "broken-row-then-bad-utf8"])
@pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])
def test_edge_files(data: bytes, strict: bool) -> None:
    path = _write(data)
    try:
        _same(path, strict)
    finally:
        os.unlink(path)


def test_fallback_is_reported_as_none() -> None:
    path = _write(b'number,match,source,reason,added,expires,p\n1,exact,regulator,"a\nb",,,\n')
    try:
        assert _core.load_blocklist(path, False, TZ) is None
    finally:
        os.unlink(path)
    assert _core.load_blocklist("/nonexistent/blocklist.csv", False, TZ) is None


def test_big_file_in_chunks(tmp_path: Any) -> None:
    # more than one read chunk, lines cut at chunk edges, sorted output with ties in file order
    rng = np.random.default_rng(7)
    rows = ["number,match,source,reason,added,expires,p,complaints"]
    for i in range(300_000):
        n = int(rng.integers(0, 5000))
        rows.append(f"1380{n:07d},exact,{lists.SOURCES[i % 6]},reason {i % 17},2026-01-01,"
                    f"{'2027-01-01' if i % 3 else ''},{f'0.{i % 10000:04d}' if i % 6 == 4 else ''},{i % 9}")
    path = tmp_path / "big.csv"
    path.write_text("\n".join(rows) + "\n")
    got = _same(str(path))
    assert got is not None and len(got[0]) == 300_000
    assert np.all(np.diff(got[0].keys.astype(np.int64)) >= 0)


def test_timezone_other_than_fixed_offset() -> None:
    class Odd(dt.tzinfo):
        def utcoffset(self, when: Any) -> dt.timedelta:
            return dt.timedelta(hours=3)

        def dst(self, when: Any) -> dt.timedelta:
            return dt.timedelta(0)

    path = _write(b"number,match,source,reason,added,expires,p\n13800138000,exact,regulator,a,2026-01-01,2026-02-01,\n")
    try:
        a = lists.load_blocklist(path, False, Odd())
        b = lists.load_blocklist_py(path, False, Odd())
        assert a[0].expires.tolist() == b[0].expires.tolist()
    finally:
        os.unlink(path)
