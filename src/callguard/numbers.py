"""Number normalisation (SPEC §2): the reference implementation.

Callers and callees arrive as SIP/TEL URIs or digit strings.  They are reduced
to the Chinese national form: mobile ``1XXXXXXXXXX``; fixed line with the
leading 0 and area code; service numbers as dialled.  A 96 number is local,
so it keeps its area: ``0391 96123`` is 96123 in area 0391 and normalises to
``039196123``; without an area the source's configured area is used.

The Cython core has its own copy of this logic (``_core.pyx``); this module is
the specification it is tested against.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# Kinds of number.  Values are shared with the Cython core; do not renumber.
HIDDEN = 0          # hidden caller ID or not a plausible number
MOBILE = 1          # 1[3-9]XXXXXXXXX
FIXED = 2           # 0 + area code + 7-8 digit subscriber
SERVICE95 = 3       # 95xxx call-centre access number (national)
SERVICE96 = 4       # 96xxx call-centre access number (local: has an area)
SHORT = 5           # 1xx..1xxxxxxx short codes: 110, 10086, 12315, 10085
FREEPHONE = 6       # 400/800 + 7 digits
OTHER = 7           # a plausible number of no known shape (local without area, ...)
INTERNATIONAL = 8   # a foreign number, kept as 00 + country code + number

KIND_NAMES = ("hidden", "mobile", "fixed", "service95", "service96", "short", "freephone", "other",
              "international")

MAX_DIGITS = 18     # keys are packed in 64 bits as int("1" + digits)

_SEPARATORS = str.maketrans("", "", " -.()\t/")
_ASCII_DIGITS = frozenset("0123456789")


class Number(NamedTuple):
    """A normalised number: ``digits`` is the national form used as the key."""

    kind: int
    digits: str
    area: str

    @property
    def hidden(self) -> bool:
        return self.kind == HIDDEN


HIDDEN_NUMBER = Number(HIDDEN, "", "")


def _is_digits(s: str) -> bool:
    return bool(s) and all(c in _ASCII_DIGITS for c in s)


def _area_len(d: str) -> int:
    """Length of the area code (with its 0) at the start of ``d``: 010, 02x, else 0xxx."""
    return 3 if d[1] in "12" else 4


_ESCAPE_RE = re.compile(r"%([0-9A-Fa-f]{2})")


def unescape(s: str) -> str:
    """Every %XX of a URI part as the character it escapes, decoded once (RFC 3261 §19.1.4)."""
    return _ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 16)), s)


def _angle(s: str) -> int:
    """Where the name-addr's ``<`` is: the first outside a quoted display name (-1: none).

    A display name is a quoted string that may hold anything, ``<sip:...>`` included
    (RFC 3261 §25.1): the URI of ``"<sip:13912340099@x>" <sip:13800138000@x>`` is the second.
    Taking the first ``<`` let a banned caller pass as whatever number it quoted.
    """
    if '"' not in s:
        return s.find("<")
    quoted = escaped = False
    for i, c in enumerate(s):
        if quoted:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "<":
            return i
    return -1


def extract_user(raw: str) -> str:
    """Take the user part out of a SIP/TEL URI or name-addr; plain strings pass through."""
    s = raw.strip()
    lt = _angle(s)
    if lt >= 0:
        gt = s.find(">", lt + 1)
        s = s[lt + 1:gt] if gt > 0 else s[lt + 1:]
    low = s[:5].lower()
    if low.startswith("sip:") or low.startswith("sips:") or low.startswith("tel:"):
        scheme_len = 5 if low.startswith("sips:") else 4
        is_tel = low.startswith("tel:")
        s = s[scheme_len:]
        if not is_tel:
            at = s.find("@")
            if at < 0:
                return ""           # sip:host has no user: no caller ID
            s = s[:at]
        for stop in ";?":
            cut = s.find(stop)
            if cut >= 0:
                s = s[:cut]
        if "%" in s:
            s = unescape(s)     # escaped and plain are equal (RFC 3261 §19.1.4)
    return s


def classify(d: str, default_area: str = "", from_country_code: bool = False) -> Number:
    """Classify a national digit string (no country code left on it)."""
    n = len(d)
    if from_country_code and n and d[0] != "0":
        if n == 11 and d[0] == "1" and d[1] in "3456789":
            return Number(MOBILE, d, "")
        # +86 10 xxxxxxxx / +86 2x xxxxxxxx / +86 391 xxxxxxx: fixed lines without the trunk 0.
        if (d.startswith("10") and n == 10) or (d[0] == "2" and n == 10) or (d[0] in "3456789" and 10 <= n <= 11):
            return classify("0" + d, default_area)
    if n < 3 or n > MAX_DIGITS:
        return HIDDEN_NUMBER
    c0 = d[0]
    if c0 == "1":
        if n == 11 and d[1] in "3456789":
            return Number(MOBILE, d, "")
        if n <= 8:
            return Number(SHORT, d, "")
        return Number(OTHER, d, "")
    if c0 == "9":
        if n >= 5 and d[1] == "5":
            return Number(SERVICE95, d, "")
        if n >= 5 and d[1] == "6":
            if default_area:
                return Number(SERVICE96, default_area + d, default_area)
            return Number(SERVICE96, d, "")
        return Number(OTHER, d, "")
    if (c0 == "4" or c0 == "8") and n == 10 and d[1] == "0" and d[2] == "0":
        return Number(FREEPHONE, d, "")
    if c0 == "0":
        if n < 4:
            return Number(OTHER, d, "")
        alen = _area_len(d)
        area = d[:alen]
        rest = d[alen:]
        r = len(rest)
        if r >= 5 and rest[0] == "9" and rest[1] == "6":
            return Number(SERVICE96, d, area)
        if r >= 5 and rest[0] == "9" and rest[1] == "5":
            return Number(SERVICE95, rest, "")
        if 3 <= r <= 8 and rest[0] == "1" and r != 7 and r != 8:
            return Number(SHORT, rest, area)     # 0391 110: an emergency or short code dialled with area
        if 7 <= r <= 8:
            return Number(FIXED, d, area)
        return Number(OTHER, d, "")
    return Number(OTHER, d, "")


def normalize(raw: str, default_area: str = "") -> Number:
    """Normalise a caller or callee as SPEC §2 says.

    Args:
        raw: a SIP/TEL URI, a name-addr or a digit string, as it arrived.
        default_area: the area (``0391``) for a 96 number that came without one.

    Returns:
        The :class:`Number`; ``kind == HIDDEN`` for anything that is not a plausible number.
    """
    s = extract_user(raw).translate(_SEPARATORS)
    plus = s.startswith("+")
    if plus:
        s = s[1:]
    if not _is_digits(s):
        return HIDDEN_NUMBER
    if plus:
        if s.startswith("86"):
            return classify(s[2:], default_area, True)
        return _international(s)
    if s.startswith("0086"):
        return classify(s[4:], default_area, True)
    if s.startswith("00"):
        return _international(s[2:])
    if len(s) == 13 and s[0] == "8" and s[1] == "6" and s[2] == "1" and s[3] in "3456789":
        return Number(MOBILE, s[2:], "")        # 86 + mobile, sent without + or 00
    return classify(s, default_area)


def is_emergency(raw: str, emergency: frozenset[str] | set[str]) -> bool:
    """Whether the core's rule 1 lets this callee through: normalised as it normalises (``0391
    110``, ``0086110``, ``sip:110;phone-context=+86@…``), not hidden, one of ``emergency``."""
    number = normalize(raw)
    return number.kind != HIDDEN and number.digits in emergency


def _international(s: str) -> Number:
    if len(s) < 3 or len(s) + 2 > MAX_DIGITS:
        return HIDDEN_NUMBER
    return Number(INTERNATIONAL, "00" + s, "")


def normalize_prefix(raw: str) -> str:
    """Normalise a prefix entry of a list: separators and +86/0086 go, the rest stays.

    Prefixes are written in the national form they match (``0391``, ``1380013``, ``95``).
    Returns "" when the text is not a digit prefix.
    """
    s = raw.strip().translate(_SEPARATORS)
    if s.startswith("+86"):
        s = s[3:]
    elif s.startswith("0086"):
        s = s[4:]
    if not _is_digits(s) or len(s) > MAX_DIGITS:
        return ""
    return s


def key_of(digits: str) -> int:
    """Pack a digit string into 64 bits, keeping leading zeros: int("1" + digits)."""
    return int("1" + digits)
