"""SPEC §2: every number form, through both cores (the verdict carries the normalised numbers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from callguard import numbers
from callguard.numbers import normalize

from .conftest import T0

# (as it arrives, normalised digits, kind name)
FORMS = [
    ("sip:+8613800138001@gw;user=phone", "13800138001", "mobile"),
    ("sips:+8613800138001@gw", "13800138001", "mobile"),
    ("<sip:+86-138-0013-8001@gw>;tag=abc", "13800138001", "mobile"),
    ('"Alice" <sip:13800138001@10.0.0.1:5060;transport=udp>', "13800138001", "mobile"),
    ("tel:+86-391-3569391", "03913569391", "fixed"),
    ("tel:+8613800138001;phone-context=+86", "13800138001", "mobile"),
    ("008613800138001", "13800138001", "mobile"),
    ("8613800138001", "13800138001", "mobile"),
    ("+8613800138001", "13800138001", "mobile"),
    ("13800138001", "13800138001", "mobile"),
    ("138 0013 8001", "13800138001", "mobile"),
    ("138-0013-8001", "13800138001", "mobile"),
    ("(0391) 356-9391", "03913569391", "fixed"),
    ("03913569391", "03913569391", "fixed"),
    ("02150001234", "02150001234", "fixed"),
    ("+86 21 5000 1234", "02150001234", "fixed"),
    ("+86 10 1234 5678", "01012345678", "fixed"),
    ("0086 755 2345 6789", "075523456789", "fixed"),
    ("95588", "95588", "service95"),
    ("955881", "955881", "service95"),
    ("tel:+8695588", "95588", "service95"),
    ("039196123", "039196123", "service96"),
    ("0391 96123", "039196123", "service96"),
    ("96123", "96123", "service96"),
    ("10085", "10085", "short"),
    ("12315", "12315", "short"),
    ("110", "110", "short"),
    ("0391 110", "110", "short"),
    ("4001234567", "4001234567", "freephone"),
    ("800-123-4567", "8001234567", "freephone"),
    ("+14155551234", "0014155551234", "international"),
    ("anonymous", "", "hidden"),
    ("sip:anonymous@anonymous.invalid", "", "hidden"),
    ("", "", "hidden"),
    ("   ", "", "hidden"),
    ("sip:gw.example.com", "", "hidden"),
    ("Restricted", "", "hidden"),
    ("12", "", "hidden"),
    ("1380013800a", "", "hidden"),
    ("１３８００１３８００１", "", "hidden"),   # full-width digits are not a dialled number
    ("1" * 40, "", "hidden"),
]


@pytest.mark.parametrize(("raw", "digits", "kind"), FORMS)
def test_reference_normaliser(raw: str, digits: str, kind: str) -> None:
    n = normalize(raw)
    assert (n.digits, numbers.KIND_NAMES[n.kind]) == (digits, kind)


@pytest.mark.parametrize(("raw", "digits", "kind"), FORMS)
def test_core_normalises_caller(make_guard: Callable[..., Any], raw: str, digits: str, kind: str) -> None:
    guard = make_guard()
    v = guard.check(raw, "02150001234", source="127.0.0.1", now=T0)
    assert v.caller == digits
    assert v.caller_kind == kind
    if kind == "hidden":
        assert v.rule == "anonymous" and v.code == 433


@pytest.mark.parametrize(("raw", "digits", "kind"), [f for f in FORMS if f[2] != "hidden"])
def test_core_normalises_callee(make_guard: Callable[..., Any], raw: str, digits: str, kind: str) -> None:
    guard = make_guard()
    v = guard.check("13312345678", raw, source="127.0.0.1", now=T0)
    assert v.callee == digits


def test_96_number_takes_the_source_area(make_guard: Callable[..., Any]) -> None:
    guard = make_guard(sources=[{"name": "henan", "networks": ["127.0.0.0/8"], "area": "0391"}])
    v = guard.check("96123", "13800000000", source="127.0.0.1", now=T0)
    assert (v.caller, v.caller_kind, v.rule) == ("039196123", "service96", "outbound_prohibited")


def test_96_without_area_is_unfiled(make_guard: Callable[..., Any]) -> None:
    guard = make_guard()
    v = guard.check("96123", "13800000000", source="127.0.0.1", now=T0)
    assert v.rule == "unfiled_service_number"


def test_prefix_normaliser() -> None:
    assert numbers.normalize_prefix("+86 138-0013") == "1380013"
    assert numbers.normalize_prefix("0086391") == "391"
    assert numbers.normalize_prefix("0391") == "0391"
    assert numbers.normalize_prefix("abc") == ""
