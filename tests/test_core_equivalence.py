"""The compiled core must decide exactly like the pure-Python twin.

Random lists, random configs and random call streams go through ``Core`` and
``CorePy`` side by side; every verdict (``as_dict()``), every ``tracked()`` count
and the final ``snapshot()`` must be identical.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callguard import config as config_mod
from callguard._corepy import CorePy
from callguard._corepy import Verdict as VerdictPy
from callguard.lists import (
    NEVER,
    P_ABSENT,
    SOURCES,
    Allowlist,
    Blocklist,
    Filings,
    Lists,
    empty_blocklist,
    empty_filings,
    make_allowlist,
)
from callguard.numbers import key_of, normalize
from callguard.settings import RULE_NAMES, SOURCE_UNTRUSTED, compile_settings

try:
    from callguard import _core
except ImportError:
    if os.environ.get("CI"):
        raise  # in CI the compiled core must be there: never skip it silently
    pytest.skip("compiled core not built", allow_module_level=True)
Core = _core.Core

NOW = 1_800_000_000.0
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.data_too_large])

# Numbers that collide on purpose: lists are built from the same pool, so calls hit entries.
MOBILES = ["13800138000", "13800138001", "13800138009", "13912345678", "17100000001", "15000000000"]
FIXED = ["03913569391", "075523456789", "02150001234", "01012345678"]
SERVICE = ["95588", "95555", "95511", "96123", "039196123", "075596888", "9612345678901234567"]
OTHER = ["4001234567", "8001234567", "10085", "10086", "110", "12315", "008613800138000", "+447911123456"]
POOL = MOBILES + FIXED + SERVICE + OTHER
AREAS = ["", "0391", "021", "0755"]


def _wrap(number: str) -> st.SearchStrategy[str]:
    return st.sampled_from([
        number,
        f"sip:+86{number.lstrip('0') if number.startswith('0') else number}@gw;user=phone",
        f"sip:{number}@10.0.0.1",
        f"<sip:{number}@host>;tag=1",
        f"\"Name\" <tel:{number};phone-context=x>",
        f" {number[:3]}-{number[3:7]} {number[7:]} ",
        f"SIPS:{number}@x?h=1",
        f"0086{number}",
        f"+86 {number}",
    ])


def number_strategy() -> st.SearchStrategy[str]:
    pool = st.sampled_from(POOL).flatmap(_wrap)
    return st.one_of(
        pool, pool, pool, pool, pool,
        st.sampled_from(["anonymous", "", "sip:gw.example", "<sip:anonymous@anonymous.invalid>", "abc",
                         "+", "119", "110", "96123"]),
        st.text(alphabet="0123456789+-() <>:;@sipt", max_size=25),
        st.text(max_size=12),
    )


def _digits_prefix(number: str, cut: int) -> str:
    return number[:max(1, len(number) - cut)]


@st.composite
def lists_strategy(draw: Any) -> Lists:
    entries = []
    for _ in range(draw(st.integers(0, 25))):
        number = draw(st.sampled_from(MOBILES + FIXED + SERVICE + OTHER[:4]))
        prefix = draw(st.booleans())
        digits = _digits_prefix(number, draw(st.integers(0, 6))) if prefix else number
        if number.startswith("+") or number.startswith("00"):
            digits = number.lstrip("+")
        source = draw(st.integers(0, len(SOURCES) - 1))
        expires = draw(st.sampled_from([NEVER, NEVER, int(NOW) - 100, int(NOW) + 100, int(NOW) + 5]))
        p = draw(st.sampled_from([P_ABSENT, 7400, 7500, 7600, 0, 10000, 3000])) if source != 4 else \
            draw(st.sampled_from([7499, 7500, 7501, 6000, 9000, 0, 10000]))
        complaints = draw(st.sampled_from([0, 0, 1, 2, 3, 7, 65535]))
        reason = draw(st.integers(0, 2))
        if len(digits) > 18:
            continue
        entries.append((key_of(digits), prefix, source, expires, p, complaints, reason))
    keys = np.array([e[0] for e in entries], dtype=np.uint64)
    order = np.argsort(keys, kind="stable")

    def column(i: int, dtype: Any) -> np.ndarray:
        return np.array([e[i] for e in entries], dtype=dtype)[order]

    bl = Blocklist(keys=keys[order], prefix=column(1, np.bool_), source=column(2, np.uint8),
                   expires=column(3, np.uint32), p=column(4, np.uint16), complaints=column(5, np.uint16),
                   reason=column(6, np.uint32), reasons=["fraud", "spam calls", "robocalls"])
    fkeys, inbound, outbound, vfrom, vuntil = [], [], [], [], []
    for _ in range(draw(st.integers(0, 8))):
        number = draw(st.sampled_from(["95588", "95555", "95511", "96123", "96888", "9612345678901234567"]))
        area = draw(st.sampled_from(["0391", "0755", "021"])) if number.startswith("96") else ""
        start = draw(st.sampled_from([-math.inf, NOW - 1000, NOW + 50]))
        end = draw(st.sampled_from([math.inf, NOW + 1000, NOW - 10, NOW + 60]))
        if end <= start:
            end = math.inf
        k = key_of(area + number)
        if k >= 2 ** 64:
            continue
        fkeys.append(k)
        inbound.append(draw(st.booleans()))
        outbound.append(draw(st.booleans()))
        vfrom.append(start)
        vuntil.append(end)
    fk = np.array(fkeys, dtype=object).astype(np.uint64)
    forder = np.argsort(fk, kind="stable")
    fl = Filings(keys=fk[forder], inbound=np.array(inbound, dtype=np.bool_)[forder],
                 outbound=np.array(outbound, dtype=np.bool_)[forder],
                 valid_from=np.array(vfrom, dtype=np.float64)[forder],
                 valid_until=np.array(vuntil, dtype=np.float64)[forder],
                 carrier=["c"] * len(fkeys), usage=["u"] * len(fkeys))
    akeys, aprefix = [], []
    for _ in range(draw(st.integers(0, 5))):
        number = draw(st.sampled_from(MOBILES + FIXED + ["10085", "95588"]))
        prefix = draw(st.booleans())
        akeys.append(key_of(_digits_prefix(number, draw(st.integers(0, 5))) if prefix else number))
        aprefix.append(prefix)
    al: Allowlist = make_allowlist(akeys, aprefix, ["r"] * len(akeys))
    return Lists(bl, fl, al, [])


@st.composite
def config_strategy(draw: Any) -> Any:
    limits = []
    for i in range(draw(st.integers(0, 4))):
        calls = draw(st.sampled_from([0, 1, 2, 3, 5, 10]))
        distinct = draw(st.sampled_from([0, 0, 2, 3, 5]))
        if not calls and not distinct:
            calls = 2
        limits.append({"name": f"l{i}", "window": draw(st.sampled_from([1, 5, 60, 3600])), "max_calls": calls,
                       "max_distinct_callees": distinct,
                       "key": draw(st.sampled_from(["caller", "caller", "source", "customer"]))})
    rules = {}
    for rid in RULE_NAMES[1:-1]:
        rules[rid] = {"mode": draw(st.sampled_from(["enforce", "enforce", "shadow"])),
                      "code": draw(st.sampled_from([403, 433, 603, 608])), "reason": f"reason {rid}"}
    weights = {name: draw(st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.5, 1.0])) for name in
               ["listed", "big_data_p", "complaints", "expired_ban", "attempt_rate", "distinct_ratio",
                "unanswered", "short_calls", "no_filing_marketing"]}
    data = {
        "sources": [
            {"name": "loop", "networks": ["127.0.0.0/8", "::1/128"], "customer": "c1",
             "area": draw(st.sampled_from(AREAS)),
             "number_ranges": draw(st.sampled_from([[], [], ["138", "0391"], ["1"], ["03919"]]))},
            {"name": "ten", "networks": ["10.0.0.0/8"], "customer": draw(st.sampled_from(["c1", "c2"])),
             "area": draw(st.sampled_from(AREAS))},
        ],
        "emergency_numbers": draw(st.sampled_from([["110", "112", "119", "120", "122"], ["110", "039196123"]])),
        "rate_limits": limits,
        "max_tracked_keys": 1000,
        "score": {"threshold": draw(st.sampled_from([0.5, 0.75, 0.3, 1.0])),
                  "min_attempts": draw(st.sampled_from([1, 2, 5])),
                  "min_outcomes": draw(st.sampled_from([1, 2, 5])),
                  "complaint_saturation": draw(st.sampled_from([1, 3, 7])),
                  "short_call_seconds": draw(st.sampled_from([0, 6, 30])),
                  "weights": weights},
        "rules": rules,
    }
    return config_mod.from_mapping(data)


SOURCES_ADDR = ["127.0.0.1", "127.0.0.1", "10.1.2.3", "192.0.2.7", None, "::1", "not-an-ip", ""]


@st.composite
def stream_strategy(draw: Any) -> list[tuple[Any, ...]]:
    ops = []
    t = NOW
    callers = draw(st.lists(number_strategy(), min_size=1, max_size=8))
    for _ in range(draw(st.integers(1, 60))):
        t += draw(st.sampled_from([0.0, 0.001, 0.5, 1.0, 2.5, 30.0, 61.0, -0.5, -3.0, 0.0004]))
        caller = draw(st.sampled_from(callers)) if draw(st.integers(0, 4)) else draw(number_strategy())
        source = draw(st.sampled_from(SOURCES_ADDR))
        if draw(st.integers(0, 3)) == 0:
            ops.append(("observe", caller, draw(st.booleans()), draw(st.sampled_from([0.0, 3.0, 10.0, 100.0])),
                        source, t))
        else:
            callee = draw(st.sampled_from(["110", "119", "02150001234", "13800138000", "sip:10086@x", "",
                                           "95588", "96123"]) if draw(st.booleans()) else number_strategy())
            ops.append(("check", caller, callee, source, t))
    return ops


def run_both(cfg: Any, lists: Lists, ops: list[tuple[Any, ...]]) -> tuple[Any, Any]:
    s = compile_settings(cfg)
    fast, slow = Core(s, lists), CorePy(s, lists)
    for op in ops:
        if op[0] == "check":
            a = fast.check(*op[1:]).as_dict()
            b = slow.check(*op[1:]).as_dict()
            assert a == b, op
        else:
            assert fast.observe(*op[1:]) is None
            slow.observe(*op[1:])
        assert fast.tracked() == slow.tracked()
    assert fast.snapshot() == slow.snapshot()
    return fast, slow


@SETTINGS
@given(cfg=config_strategy(), lists=lists_strategy(), ops=stream_strategy())
def test_same_verdicts(cfg: Any, lists: Lists, ops: list[tuple[Any, ...]]) -> None:
    run_both(cfg, lists, ops)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=config_strategy(), lists=lists_strategy(), ops=stream_strategy())
def test_batch_equals_repeated_check(cfg: Any, lists: Lists, ops: list[tuple[Any, ...]]) -> None:
    s = compile_settings(cfg)
    calls = [op for op in ops if op[0] == "check" and isinstance(op[1], str) and isinstance(op[2], str)]
    callers = [c[1] for c in calls]
    callees = [c[2] for c in calls]
    sources = [c[3] for c in calls]
    times = np.array([c[4] for c in calls], dtype=np.float64)
    codes, rules, scores = Core(s, lists).check_batch(callers, callees, sources, times)
    slow = CorePy(s, lists)
    expected = [slow.check(a, b, c, float(t)) for a, b, c, t in zip(callers, callees, sources, times)]
    assert codes.dtype == np.int16 and rules.dtype == np.uint8 and scores.dtype == np.float64
    assert codes.tolist() == [v.code for v in expected]
    assert [RULE_NAMES[r] for r in rules.tolist()] == [v.rule for v in expected]
    assert scores.tolist() == [v.score for v in expected]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=config_strategy(), lists=lists_strategy(), ops=stream_strategy(), more=stream_strategy())
def test_snapshot_restore_round_trip(cfg: Any, lists: Lists, ops: list[tuple[Any, ...]],
                                     more: list[tuple[Any, ...]]) -> None:
    fast, slow = run_both(cfg, lists, ops)
    data = slow.snapshot()
    s = compile_settings(cfg)
    # a restored core, of either kind, continues exactly like the twin restored from the same data
    fast2, slow2 = Core(s, lists), CorePy(s, lists)
    fast2.restore(data)
    slow2.restore(data)
    assert fast2.snapshot() == slow2.snapshot() == data
    for op in more:
        if op[0] == "check":
            assert fast2.check(*op[1:]).as_dict() == slow2.check(*op[1:]).as_dict()
        else:
            fast2.observe(*op[1:])
            slow2.observe(*op[1:])
    assert fast2.snapshot() == slow2.snapshot()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=config_strategy(), lists=lists_strategy(), ops=stream_strategy())
def test_note_attempt_and_outcome_rebuild_the_state_check_built(cfg: Any, lists: Lists,
                                                                ops: list[tuple[Any, ...]]) -> None:
    """What a call record keeps (normalised caller and callee, source address, time, outcome),
    fed back through note_attempt and note_outcome in the same order, gives the state that
    check() and observe() built."""
    s = compile_settings(cfg)
    twin_live = CorePy(s, lists)
    kept: list[tuple[Any, ...]] = []
    for op in ops:
        if not all(isinstance(x, str) for x in op[1:2]):
            continue
        if op[0] == "check":
            _, caller, callee, source, t = op
            if not isinstance(callee, str):
                continue
            v = twin_live.check(caller, callee, source, t)
            trusted = twin_live.source_index(source) != SOURCE_UNTRUSTED
            kept.append(("attempt", v.caller, v.callee, source, t, trusted and v.caller_kind != "hidden"))
        else:
            _, caller, answered, duration, source, t = op
            twin_live.observe(caller, answered, duration, source, t)
            src = twin_live.source_index(source)
            digits = normalize(caller, s.sources[src].area if src >= 0 else "").digits
            kept.append(("outcome", digits, answered, duration, t, digits != ""))
    live = Core(s, lists)
    for op in ops:
        if op[0] == "check" and isinstance(op[1], str) and isinstance(op[2], str):
            live.check(*op[1:])
        elif op[0] == "observe" and isinstance(op[1], str):
            live.observe(*op[1:])
    for impl in (Core, CorePy):
        rebuilt = impl(s, lists)
        for kind, *args, counted in kept:
            got = rebuilt.note_attempt(*args) if kind == "attempt" else rebuilt.note_outcome(*args)
            assert got is counted, (kind, args)
        assert rebuilt.tracked() == twin_live.tracked()
        assert rebuilt.snapshot() == twin_live.snapshot() == live.snapshot()


def test_note_attempt_refuses_what_is_not_a_normalised_number() -> None:
    cfg = config_mod.from_mapping({"sources": [{"name": "loop", "networks": ["127.0.0.0/8"], "customer": "c"}]})
    s = compile_settings(cfg)
    for impl in (Core, CorePy):
        core = impl(s, Lists(empty_blocklist(), empty_filings(), make_allowlist([], [], []), []))
        for caller in ("", "sip:13800138000@x", "+8613800138000", "1380013800O", "１３８００１３８０００", "1" * 39):
            assert core.note_attempt(caller, "02150001234", "127.0.0.1", NOW) is False, caller
        assert core.note_attempt("13800138000", "02150001234", "192.0.2.1", NOW) is False   # untrusted
        assert core.tracked() == (0, 0, 0)
        assert core.note_attempt("13800138000", "", "127.0.0.1", NOW) is True    # hidden callee: counted
        assert core.tracked()[0] == 1
        with pytest.raises(OverflowError):
            core.note_attempt("13800138000", "02150001234", "127.0.0.1", math.inf)
        assert core.note_outcome("sip:13800138000@x", True, 3.0, NOW) is False
        assert core.note_outcome("13800138000", True, 3.0, NOW) is True
        with pytest.raises(OverflowError):
            core.note_outcome("13800138000", False, 0.0, math.inf)


@pytest.mark.parametrize("impl", [Core, CorePy], ids=["cython", "python"])
def test_eviction_keeps_memory_bounded(impl: Any) -> None:
    cfg = config_mod.from_mapping({"max_tracked_keys": 1000, "rate_limits": [
        {"name": "m", "window": 60, "max_calls": 3}, {"name": "d", "window": 600, "max_distinct_callees": 2}]})
    lists = _empty_lists()
    s = compile_settings(cfg)
    core = impl(s, lists)
    twin = CorePy(s, lists)
    t = NOW
    for i in range(3500):
        t += 0.01 if i % 7 else -0.02
        caller = f"1390000{(i * 7919) % 2600:04d}"
        callee = f"0215000{i % 13:04d}"
        assert core.check(caller, callee, "127.0.0.1", t).as_dict() == twin.check(caller, callee, "127.0.0.1",
                                                                                 t).as_dict()
        if i % 5 == 0:
            core.observe(caller, i % 2 == 0, 3.0, "127.0.0.1", t)
            twin.observe(caller, i % 2 == 0, 3.0, "127.0.0.1", t)
        assert core.tracked()[0] <= 1000
    assert core.tracked() == twin.tracked()
    assert core.snapshot() == twin.snapshot()
    # idle keys go first: after the window, one new caller evicts all idle ones
    core.check("13800000001", "110", "127.0.0.1", t + 10_000)
    twin.check("13800000001", "110", "127.0.0.1", t + 10_000)
    assert core.snapshot() == twin.snapshot()


def test_adopt_state_and_set_lists() -> None:
    cfg = config_mod.from_mapping({"rate_limits": [{"name": "m", "window": 60, "max_calls": 2}]})
    s = compile_settings(cfg)
    lists = _empty_lists()
    fast, slow = Core(s, lists), CorePy(s, lists)
    for core in (fast, slow):
        for i in range(3):
            core.check("13800138000", "02150001234", "127.0.0.1", NOW + i)
    fast2, slow2 = Core(s, lists), CorePy(s, lists)
    fast2.adopt_state(fast)
    slow2.adopt_state(slow)
    a = fast2.check("13800138000", "02150001234", "127.0.0.1", NOW + 4).as_dict()
    assert a == slow2.check("13800138000", "02150001234", "127.0.0.1", NOW + 4).as_dict()
    assert a["rule"] == "high_frequency"
    fast2.set_lists(lists)
    assert fast2.lists is lists and fast2.tracked() == (1, 0, 0)


def test_verdict_type_matches_twin() -> None:
    args = ("allow", 0, "allow", "internal fault: failed open", "internal fault", 0.0, "1", "2", "hidden", "", (),
            ())
    a, b = _core.Verdict(*args), VerdictPy(*args)
    assert a.as_dict() == b.as_dict()
    assert repr(a) == repr(b)
    assert list(a.as_dict()) == list(VerdictPy.__slots__)
    with pytest.raises(AttributeError):
        a.code = 1  # type: ignore[misc]


def test_source_index_and_errors() -> None:
    s = compile_settings(config_mod.from_mapping({}))
    fast, slow = Core(s, _empty_lists()), CorePy(s, _empty_lists())
    for addr in ["127.0.0.1", "192.0.2.1", None, "", "[::ffff:127.0.0.1]", "x"]:
        assert fast.source_index(addr) == slow.source_index(addr)
    with pytest.raises(TypeError):
        fast.check(None, "110", "127.0.0.1", NOW)
    with pytest.raises(ValueError):
        fast.restore({"version": 2})


def _empty_lists() -> Lists:
    from callguard.lists import empty_blocklist, empty_filings
    return Lists(empty_blocklist(), empty_filings(), make_allowlist([], [], []), [])


def test_unsorted_lists_are_indexed_like_the_twin() -> None:
    # the loaders sort by key; a list built by hand in any order must still decide the same
    keys = [key_of("13800138000"), key_of("138"), key_of("13800138000"), key_of("139")]
    bl = Blocklist(keys=np.array(keys, dtype=np.uint64), prefix=np.array([False, True, False, True]),
                   source=np.array([1, 0, 5, 4], dtype=np.uint8),
                   expires=np.array([int(NOW) - 1, NEVER, NEVER, NEVER], dtype=np.uint32),
                   p=np.array([P_ABSENT, P_ABSENT, P_ABSENT, 9000], dtype=np.uint16),
                   complaints=np.array([5, 0, 1, 0], dtype=np.uint16), reason=np.array([0, 1, 2, 0], dtype=np.uint32),
                   reasons=["a", "b", "c"])
    lists = _empty_lists()
    lists.blocklist = bl
    s = compile_settings(config_mod.from_mapping({}))
    fast, slow = Core(s, lists), CorePy(s, lists)
    for caller in ["13800138000", "13800138001", "13912345678", "02150001234"]:
        a = fast.check(caller, "02150001234", "127.0.0.1", NOW).as_dict()
        assert a == slow.check(caller, "02150001234", "127.0.0.1", NOW).as_dict()
    assert fast.check("13800138000", "1", "127.0.0.1", NOW).detail == "manual: c"  # first exact, unexpired entry


@pytest.mark.parametrize(("key", "value"), [
    ("area", "0\u0663\u0669\u0661"),
    ("number_ranges", ["0\u0663"]),
])
def test_config_refuses_digits_other_than_ascii(key: str, value: object) -> None:
    # Area codes and ranges are dialled digits: Arabic-Indic or superscript digits are refused up front
    # rather than normalised differently by the two cores.
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.from_mapping({"sources": [{"name": "x", "networks": ["127.0.0.0/8"], key: value}]})
    assert info.value.key == f"sources[0].{key}"
    with pytest.raises(config_mod.ConfigError):
        config_mod.from_mapping({"emergency_numbers": ["1\u00b2"]})
