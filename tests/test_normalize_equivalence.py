"""The compiled core's C normalisation must equal ``numbers.normalize`` for every input."""

from __future__ import annotations

import os

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from callguard import numbers

try:
    from callguard import _core
except ImportError:
    if os.environ.get("CI"):
        raise  # in CI the compiled core must be there: never skip it silently
    pytest.skip("compiled core not built", allow_module_level=True)

AREAS = ["", "0391", "021", "010", "0755"]

PIECES = ["sip:", "SIP:", "sips:", "SiPs:", "tel:", "TEL:", "<", ">", "@", ";", "?", "+", "+86", "0086", "86",
          "00", "0", "1", "9", "95", "96", " ", "-", ".", "(", ")", "\t", "/", "\u3000", "\xa0", "\u0660",
          "\u0130", "\u212a", "anonymous", "user=phone", "13800138000", "0391", "96123", "400", "800", "10086",
          "44", "\n", "\x00", "\U0001f600", "ſ", ":", '"', "\\", "Bob ", "%", "%2B", "%33", "%3", "%25"]


@settings(max_examples=1500, deadline=None)
@given(raw=st.lists(st.sampled_from(PIECES), max_size=8).map("".join), area=st.sampled_from(AREAS))
@example(raw="sip:+8613800138000@gw;user=phone", area="")
@example(raw="tel:+86-391-3569391", area="")
@example(raw="96123", area="0391")
@example(raw="9612345678901234567", area="0391")
@example(raw="+86 " + "9" * 30, area="")
@example(raw="S\u0130P:1@x", area="")
def test_pieces(raw: str, area: str) -> None:
    assert _core.normalize(raw, area) == tuple(numbers.normalize(raw, area))


@settings(max_examples=800, deadline=None)
@given(raw=st.text(max_size=40), area=st.sampled_from(AREAS))
def test_any_text(raw: str, area: str) -> None:
    assert _core.normalize(raw, area) == tuple(numbers.normalize(raw, area))


@settings(max_examples=800, deadline=None)
@given(digits=st.text(alphabet="0123456789", min_size=0, max_size=26), lead=st.sampled_from(["", "+", "+86", "00",
                                                                                           "0086", "86", "0"]),
       area=st.sampled_from(AREAS))
def test_digit_strings(digits: str, lead: str, area: str) -> None:
    raw = lead + digits
    assert _core.normalize(raw, area) == tuple(numbers.normalize(raw, area))


def test_huge_and_non_ascii() -> None:
    for raw in ["1" * 100_000, "sip:" + "1" * 50_000 + "@x", "\u3000 13800138000 \u3000", "1380013800\u0660",
                "<sip:13800138000@x", "tel:13800138000;ext=1?x", "\U0001f600" * 10]:
        assert _core.normalize(raw, "") == tuple(numbers.normalize(raw, ""))
    # an area written with non-ASCII digits (the config accepts them) keeps its characters
    assert _core.normalize("96123", "0\u0663\u0669\u0661") == tuple(numbers.normalize("96123", "0\u0663\u0669\u0661"))


@pytest.mark.parametrize(("raw", "digits"), [
    ('"<sip:13912340099@x>" <sip:13800138000@127.0.0.1:5000>;tag=1', "13800138000"),
    ('"<tel:+8613912340097>" <sip:13800138000@x>', "13800138000"),
    ('"a \\" <sip:1@x>" <sip:13800138000@x>', "13800138000"),     # an escaped quote inside the name
    ('"a \\\\" <sip:13800138000@x>', "13800138000"),               # an escaped backslash ends it
    ('Bob <sip:13800138000@x>', "13800138000"),
    ('"unterminated <sip:13800138000@x>', ""),
])
def test_the_uri_is_the_one_after_a_quoted_display_name(raw: str, digits: str) -> None:
    assert numbers.normalize(raw).digits == digits
    assert _core.normalize(raw, "") == tuple(numbers.normalize(raw, ""))


@pytest.mark.parametrize(("raw", "digits"), [
    ("sip:%2B8613912340092@127.0.0.1", "13912340092"),        # RFC 3261 §19.1.4: escaped equals plain
    ("<sip:%3138001380%30%30@x>;tag=1", "13800138000"),
    ("tel:%2B86-391-3569391", "03913569391"),
    ("sip:1380013800%2530@x", ""),                               # decoded once: %25 is '%', not a digit
    ("sip:1380013800%3@x", ""),                                  # not an escape
    ("1380013800%30", ""),                                       # outside a URI nothing is unescaped
])
def test_escaped_user_parts_are_decoded_once(raw: str, digits: str) -> None:
    assert numbers.normalize(raw).digits == digits
    assert _core.normalize(raw, "") == tuple(numbers.normalize(raw, ""))
