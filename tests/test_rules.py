"""SPEC §3: every rule, its order, modes and responses — through both cores."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from .conftest import T0

MakeGuard = Callable[..., Any]
SRC = "127.0.0.1"
CLEAN_CALLEE = "02150001234"


def check(guard: Any, caller: str, callee: str = CLEAN_CALLEE, source: str | None = SRC, now: float = T0) -> Any:
    return guard.check(caller, callee, source=source, now=now)


def test_clean_call_is_allowed(make_guard: MakeGuard) -> None:
    v = check(make_guard(), "13312345678")
    assert (v.verdict, v.code, v.rule, v.score) == ("allow", 0, "allow", 0.0)


@pytest.mark.parametrize("callee", ["110", "112", "119", "120", "122", "sip:120@gw", "0391 110", "tel:+86110"])
def test_emergency_always_passes(make_guard: MakeGuard, callee: str) -> None:
    guard = make_guard()
    for caller, source in [("13800138000", SRC), ("anonymous", SRC), ("13800138000", "192.0.2.9"),
                           ("95555", SRC)]:
        v = check(guard, caller, callee, source=source)
        assert (v.verdict, v.rule, v.code) == ("allow", "emergency", 0), (caller, source)


def test_emergency_numbers_come_from_config(make_guard: MakeGuard) -> None:
    guard = make_guard(emergency_numbers=["999"])
    assert check(guard, "13800138000", "999").rule == "emergency"
    assert check(guard, "13800138000", "110").rule == "banned"


def test_emergency_passes_even_above_rate_limits(make_guard: MakeGuard) -> None:
    guard = make_guard(rate_limits=[{"window": 60, "max_calls": 1}])
    assert check(guard, "13312345678").rule == "allow"
    assert check(guard, "13312345678", now=T0 + 1).rule == "high_frequency"
    assert check(guard, "13312345678", "110", now=T0 + 2).rule == "emergency"


def test_untrusted_source(make_guard: MakeGuard) -> None:
    guard = make_guard()
    v = check(guard, "13312345678", source="192.0.2.1")
    assert (v.verdict, v.code, v.rule) == ("reject", 403, "untrusted_source")
    assert check(guard, "13312345678", source="::1").rule == "untrusted_source"
    assert check(guard, "13312345678", source="not-an-ip").rule == "untrusted_source"
    assert check(guard, "13312345678", source=None).rule == "allow"   # offline check: no source


def test_ipv6_and_mapped_sources(make_guard: MakeGuard) -> None:
    guard = make_guard(sources=[{"name": "v6", "networks": ["2001:db8::/32", "127.0.0.0/8"]}])
    assert check(guard, "13312345678", source="2001:db8::5").rule == "allow"
    assert check(guard, "13312345678", source="::ffff:127.0.0.1").rule == "allow"
    assert check(guard, "13312345678", source="2001:db9::5").rule == "untrusted_source"


def test_anonymous(make_guard: MakeGuard) -> None:
    guard = make_guard()
    for caller in ["anonymous", "", "sip:anonymous@anonymous.invalid", "unknown", "1234abc"]:
        v = check(guard, caller)
        assert (v.verdict, v.code, v.rule, v.reason) == ("reject", 433, "anonymous", "Anonymity Disallowed")


def test_banned_exact_prefix_and_sources(make_guard: MakeGuard) -> None:
    guard = make_guard()
    v = check(guard, "+86 138 0013 8000")
    assert (v.verdict, v.code, v.rule) == ("reject", 403, "banned")
    assert "police notice" in v.detail
    assert check(guard, "16500001234").rule == "banned"          # prefix entry 1650000
    assert check(guard, "1650000").rule == "banned"              # the prefix itself
    assert check(guard, "16500011234").rule == "allow"           # outside the prefix
    assert check(guard, "13800138001").rule == "allow"           # exact entry does not act as a prefix


def test_expired_ban_does_not_fire(make_guard: MakeGuard) -> None:
    guard = make_guard()
    assert check(guard, "13700137000").rule == "allow"
    # ...but it did apply while it was in force (expires 2025-06-30, inclusive, +08:00).
    assert check(guard, "13700137000", now=1_751_200_000.0).rule == "banned"     # 2025-06-29


def test_big_data_entries_need_p_at_threshold(make_guard: MakeGuard) -> None:
    guard = make_guard()
    assert check(guard, "13900139000").rule == "banned"       # p 0.91
    assert check(guard, "13900139002").rule == "banned"       # p 0.75 == threshold
    assert check(guard, "13900139001").rule == "allow"        # p 0.42
    stricter = make_guard(score={"threshold": 0.95})
    assert check(stricter, "13900139000").rule == "allow"


def test_unfiled_service_number(make_guard: MakeGuard) -> None:
    guard = make_guard()
    v = check(guard, "95599")
    assert (v.verdict, v.code, v.rule) == ("reject", 403, "unfiled_service_number")
    assert check(guard, "95123").rule == "unfiled_service_number"
    assert check(guard, "039196999").rule == "unfiled_service_number"   # 96 filed in 0391 only for 96123/96555
    assert check(guard, "075596123").rule == "unfiled_service_number"   # 96123 is filed in 0391, not 0755


def test_filing_covers_sub_codes_longest_prefix_wins(make_guard: MakeGuard) -> None:
    guard = make_guard()
    assert check(guard, "95588").rule == "allow"
    assert check(guard, "9558812").rule == "allow"                 # sub-code of 95588
    assert check(guard, "951234567").rule == "outbound_prohibited"  # 9512345 is its own filing
    assert check(guard, "0391965551").rule == "allow"              # sub-code of 96555 in 0391


def test_filing_expired(make_guard: MakeGuard) -> None:
    guard = make_guard()
    v = check(guard, "95511")
    assert (v.verdict, v.code, v.rule) == ("reject", 403, "filing_expired")
    assert check(guard, "95588", now=1_600_000_000.0).rule == "filing_expired"    # 2020: before valid_from
    assert check(guard, "95511", now=1_700_000_000.0).rule == "allow"             # 2023: in force


def test_outbound_prohibited(make_guard: MakeGuard) -> None:
    guard = make_guard()
    v = check(guard, "95555")
    assert (v.verdict, v.code, v.rule) == ("reject", 403, "outbound_prohibited")
    assert check(guard, "0391-96123").rule == "outbound_prohibited"


def test_caller_id_mismatch(make_guard: MakeGuard) -> None:
    guard = make_guard(sources=[{"name": "pbx", "networks": ["127.0.0.0/8"], "number_ranges": ["0391356", "1880"]}])
    v = check(guard, "13312345678")
    assert (v.verdict, v.code, v.rule) == ("reject", 403, "caller_id_mismatch")
    assert check(guard, "03913569391").rule == "allow"
    assert check(guard, "18800001111").rule == "allow"
    assert check(guard, "13312345678", source=None).rule == "allow"   # no source: nothing declared


def test_high_frequency_window(make_guard: MakeGuard) -> None:
    guard = make_guard(rate_limits=[{"name": "m", "window": 60, "max_calls": 3}])
    caller = "13312345678"
    assert [check(guard, caller, now=T0 + i).rule for i in range(5)] == \
        ["allow", "allow", "allow", "high_frequency", "high_frequency"]
    v = check(guard, caller, now=T0 + 5)
    assert (v.code, v.rule, v.detail) == (603, "high_frequency", "limit m")
    # Attempts at T0+3.. T0+5 were intercepted but still count: at T0+61 the window (T0+1, T0+61]
    # holds the attempts at T0+2..T0+5 -> still over the limit.
    assert check(guard, caller, now=T0 + 61).rule == "high_frequency"
    # At T0+200 the window is empty again.
    assert check(guard, caller, now=T0 + 200).rule == "allow"


def test_window_edge_is_open_on_the_left(make_guard: MakeGuard) -> None:
    guard = make_guard(rate_limits=[{"window": 60, "max_calls": 1}])
    assert check(guard, "13312345678", now=T0).rule == "allow"
    assert check(guard, "13312345678", now=T0 + 59.999).rule == "high_frequency"
    guard2 = make_guard(rate_limits=[{"window": 60, "max_calls": 1}])
    assert check(guard2, "13312345678", now=T0).rule == "allow"
    assert check(guard2, "13312345678", now=T0 + 60).rule == "allow"     # (t-W, t]: T0 is out


def test_shipped_limits(make_guard: MakeGuard) -> None:
    guard = make_guard()   # defaults: 10/60 s, 60/h, 30 distinct callees/h
    rules = [check(guard, "13312345678", f"0215000{i:04d}", now=T0 + i).rule for i in range(12)]
    assert rules[:10] == ["allow"] * 10
    assert rules[10:] == ["high_frequency"] * 2


def test_distinct_callees(make_guard: MakeGuard) -> None:
    guard = make_guard(rate_limits=[{"name": "d", "window": 3600, "max_distinct_callees": 3}])
    caller = "13312345678"
    got = [check(guard, caller, f"0215000000{i}", now=T0 + i * 100).rule for i in range(3)]
    assert got == ["allow"] * 3
    assert check(guard, caller, "02150000001", now=T0 + 400).rule == "high_frequency"
    v = check(guard, caller, "02150000009", now=T0 + 4000)   # the first two left the window
    assert v.rule == "allow"


def test_limits_keyed_by_source_and_customer(make_guard: MakeGuard) -> None:
    sources = [{"name": "a", "networks": ["127.0.0.1/32"], "customer": "acme"},
               {"name": "b", "networks": ["127.0.0.2/32"], "customer": "acme"},
               {"name": "c", "networks": ["127.0.0.3/32"], "customer": "other"}]
    guard = make_guard(sources=sources, rate_limits=[{"window": 60, "max_calls": 2, "key": "customer"}])
    assert check(guard, "13300000001", source="127.0.0.1").rule == "allow"
    assert check(guard, "13300000002", source="127.0.0.2", now=T0 + 1).rule == "allow"
    assert check(guard, "13300000003", source="127.0.0.1", now=T0 + 2).rule == "high_frequency"
    assert check(guard, "13300000004", source="127.0.0.3", now=T0 + 3).rule == "allow"
    by_source = make_guard(sources=sources, rate_limits=[{"window": 60, "max_calls": 1, "key": "source"}])
    assert check(by_source, "13300000001", source="127.0.0.1").rule == "allow"
    assert check(by_source, "13300000002", source="127.0.0.2", now=T0 + 1).rule == "allow"
    assert check(by_source, "13300000003", source="127.0.0.1", now=T0 + 2).rule == "high_frequency"


def test_allowlist_skips_frequency_and_score_only(make_guard: MakeGuard) -> None:
    guard = make_guard(rate_limits=[{"window": 60, "max_calls": 1}], allowlist_numbers=["10001"])
    for i in range(5):
        assert check(guard, "10085", now=T0 + i).rule == "allow"            # allowlist file
        assert check(guard, "10001", now=T0 + i).rule == "allow"            # config allowlist_numbers
        assert check(guard, "18800001234", now=T0 + i).rule == "allow"      # allowlist prefix entry
    banned_and_allowed = make_guard(allowlist_numbers=["13800138000"])
    assert check(banned_and_allowed, "13800138000").rule == "banned"    # rules 1-8 still apply


def test_score_rule(make_guard: MakeGuard) -> None:
    guard = make_guard()
    v = check(guard, "13900139001")     # big-data p 0.42 below cut-off, 1 complaint
    assert v.rule == "allow"
    assert v.score == pytest.approx(0.42 + 0.3 / 3)
    assert dict(v.features) == pytest.approx({"big_data_p": 0.42, "complaints": 0.1})
    heavy = make_guard(score={"weights": {"big_data_p": 2.0}})
    v = check(heavy, "13900139001")
    assert (v.verdict, v.code, v.rule) == ("reject", 608, "score")
    assert v.score == pytest.approx(0.94)


def test_score_from_outcomes(make_guard: MakeGuard) -> None:
    guard = make_guard(score={"weights": {"unanswered": 0.6, "short_calls": 0.6}, "min_outcomes": 3})
    caller = "13312345678"
    for i in range(4):
        guard.observe(caller, answered=(i == 0), duration=2.0, source=SRC, now=T0 + i)
    v = check(guard, caller, now=T0 + 10)
    # 3 of 4 unanswered -> 0.45; short-call share needs 3 answered calls -> not yet counted
    assert v.score == pytest.approx(0.45)
    assert v.rule == "allow"
    for i in range(3):
        guard.observe(caller, answered=True, duration=1.0, source=SRC, now=T0 + 20 + i)
    v = check(guard, caller, now=T0 + 30)
    assert v.score == pytest.approx(0.6 * 3 / 7 + 0.6 * 1.0)
    assert v.rule == "score"


def test_score_from_attempt_rate(make_guard: MakeGuard) -> None:
    guard = make_guard(rate_limits=[{"window": 60, "max_calls": 10}],
                       score={"min_attempts": 5, "weights": {"attempt_rate": 1.0, "distinct_ratio": 0.0}})
    scores = [check(guard, "13312345678", now=T0 + i).score for i in range(9)]
    assert scores[:5] == [0.0] * 5
    assert scores[5:] == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert check(guard, "13312345678", now=T0 + 9).rule == "score"   # 9 prior attempts of 10: 0.9 >= 0.75


def test_rule_order(make_guard: MakeGuard) -> None:
    guard = make_guard(sources=[{"name": "pbx", "networks": ["127.0.0.0/8"], "number_ranges": ["1"]}])
    assert check(guard, "13800138000").rule == "banned"
    assert check(guard, "95555").rule == "outbound_prohibited"   # rule 7 before 8 (95555 is outside "1")
    assert check(guard, "02150001234").rule == "caller_id_mismatch"
    limited = make_guard(rate_limits=[{"window": 60, "max_calls": 1}])
    assert check(limited, "95599").rule == "unfiled_service_number"
    assert check(limited, "95599", now=T0 + 1).rule == "unfiled_service_number"   # rule 5 before 9


def test_shadow_mode_logs_and_passes(make_guard: MakeGuard) -> None:
    guard = make_guard(rules={"banned": {"mode": "shadow"}, "untrusted_source": {"mode": "shadow"},
                              "score": {"mode": "shadow"}})
    v = check(guard, "13800138000")
    assert (v.verdict, v.rule, v.shadowed) == ("allow", "allow", ("banned", "score"))
    # Shadowing one rule does not shadow the others: the listing still drives the score rule.
    only_banned = make_guard(rules={"banned": {"mode": "shadow"}})
    v = check(only_banned, "13800138000")
    assert (v.verdict, v.rule, v.shadowed) == ("reject", "score", ("banned",))
    v = check(guard, "95555", source="192.0.2.1")
    assert (v.verdict, v.rule, v.shadowed) == ("reject", "outbound_prohibited", ("untrusted_source",))


def test_codes_and_reasons_are_configurable(make_guard: MakeGuard) -> None:
    guard = make_guard(rules={"banned": {"code": 480, "reason": "Temporarily Unavailable"},
                              "anonymous": {"code": 403}})
    v = check(guard, "13800138000")
    assert (v.code, v.reason) == (480, "Temporarily Unavailable")
    v = check(guard, "anonymous")
    assert (v.code, v.reason) == (403, "Anonymity Disallowed")


def test_batch_equals_single_checks(make_guard: MakeGuard) -> None:
    import numpy as np

    from callguard.settings import RULE_NAMES

    calls = [("13800138000", "02150001234"), ("13312345678", "110"), ("95555", "02150001234"),
             ("anonymous", "02150001234")] + [("13312345678", f"0215000{i:04d}") for i in range(12)]
    single = make_guard()
    expected = [check(single, a, b, now=T0 + i) for i, (a, b) in enumerate(calls)]
    batch = make_guard()
    codes, rules, scores = batch.check_batch([a for a, _ in calls], [b for _, b in calls], [SRC] * len(calls),
                                             np.array([T0 + i for i in range(len(calls))]))
    assert [RULE_NAMES[r] for r in rules] == [v.rule for v in expected]
    assert codes.tolist() == [v.code for v in expected]
    assert scores.tolist() == [v.score for v in expected]


def test_state_survives_snapshot_and_reload(make_guard: MakeGuard) -> None:
    import json

    guard = make_guard(rate_limits=[{"window": 60, "max_calls": 2}])
    check(guard, "13312345678")
    check(guard, "13312345678", now=T0 + 1)
    data = json.loads(json.dumps(guard.snapshot()))
    fresh = make_guard(rate_limits=[{"window": 60, "max_calls": 2}])
    fresh.restore(data)
    assert check(fresh, "13312345678", now=T0 + 2).rule == "high_frequency"
    reloaded = guard.with_config(guard.config)
    assert check(reloaded, "13312345678", now=T0 + 2).rule == "high_frequency"


def test_internal_fault_fails_open(make_guard: MakeGuard) -> None:
    guard = make_guard()

    class Broken:
        def check(self, *a: Any) -> Any:
            raise RuntimeError("boom")

    guard.core = Broken()
    v = guard.check("13800138000", "02150001234", source=SRC, now=T0)
    assert (v.verdict, v.code) == ("allow", 0)
    assert guard.faults == 1
