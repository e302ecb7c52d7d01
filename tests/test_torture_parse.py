"""RFC 4475 torture messages through both parsers: the classification of manifest.tsv."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import pytest

from callguard.errors import SipError
from callguard.sip import message as sipmsg

DATA = Path(__file__).resolve().parent / "data" / "rfc4475"


def _c_parser() -> Any:
    if os.environ.get("CALLGUARD_NO_EXTENSIONS"):
        return None
    try:
        from callguard.sip import _sipcore
    except ImportError:
        if os.environ.get("CI"):
            raise
        return None
    return _sipcore


C = _c_parser()
PARSERS = [
    pytest.param(sipmsg.parse_message_py, id="py"),
    pytest.param(C.parse_message if C else None, id="c",
                 marks=pytest.mark.skipif(C is None, reason="_sipcore not built")),
]

with open(DATA / "manifest.tsv", newline="", encoding="utf-8") as fh:
    MANIFEST = {row["file"]: row for row in csv.DictReader(fh, delimiter="\t")}

# The parser's answer per file: None = parses, an int = the SipError code (0 = drop).
# Semantic answers (the proxy's) are in SEMANTIC below.
PARSE_EXPECTED: dict[str, int | None] = {
    "badinv01.dat": 400, "clerr.dat": 400, "ncl.dat": 400, "scalar02.dat": 400, "scalarlg.dat": 0,
    "quotbal.dat": 400, "ltgtruri.dat": 400, "lwsruri.dat": 400, "lwsstart.dat": 400, "trws.dat": 400,
    "escruri.dat": 400, "regbadct.dat": 400, "badaspec.dat": 400, "baddn.dat": 400, "badvers.dat": 505,
    "mismatch01.dat": 400, "bigcode.dat": 0, "insuf.dat": 400, "multi01.dat": 400, "mcl01.dat": 400,
    # baddate: RFC 4475 lets an element that does not use Date handle the request normally
    "baddate.dat": None,
    # mismatch02: syntactically a request; the 501 is a semantic answer (check_request_semantics)
    "mismatch02.dat": None,
}
SEMANTIC: dict[str, int] = {
    "mismatch02.dat": 501, "unkscm.dat": 416, "novelsc.dat": 416, "bext01.dat": 420, "zeromf.dat": 483,
    "bcast.dat": 0,
}


def _read(name: str) -> bytes:
    return (DATA / name).read_bytes()


def test_manifest_covers_every_file() -> None:
    files = {p.name for p in DATA.glob("*.dat")}
    assert files == set(MANIFEST)
    assert len(files) == 49
    assert set(PARSE_EXPECTED) <= files and set(SEMANTIC) <= files


@pytest.mark.parametrize("parse", PARSERS)
@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_classification(parse: Any, name: str) -> None:
    row = MANIFEST[name]
    data = _read(name)
    expected = PARSE_EXPECTED.get(name)
    if name not in PARSE_EXPECTED:
        # everything the manifest does not list as a syntax rejection must parse
        assert row["rfc_class"] != "INVALID"
    if expected is None:
        msg = parse(data)
        assert msg.is_request == (row["kind"] == "request")
        assert msg.raw == data[:len(msg.raw)]
        err = sipmsg.check_request_semantics(msg) if msg.is_request else sipmsg.check_response_semantics(msg)
        want = SEMANTIC.get(name)
        if want is None:
            assert err is None, (name, err)
        else:
            assert err is not None and err.code == want, (name, err)
    else:
        with pytest.raises(SipError) as info:
            parse(data)
        assert info.value.code == expected, (name, info.value)


@pytest.mark.parametrize("parse", PARSERS)
def test_rfc4475_details(parse: Any) -> None:
    wsinv = parse(_read("wsinv.dat"))
    assert wsinv.method == "INVITE" and wsinv.cseq == 9 and wsinv.cseq_method == "INVITE"
    assert wsinv.max_forwards == 68 and wsinv.content_length == 150 and len(wsinv.body) == 150
    assert wsinv.to_tag == "1918181833n" and wsinv.from_tag == "98asjd8"
    assert [sipmsg.parse_via(v).branch for v in wsinv.vias] == ["390skdjuw", "z9hG4bK9ikj8", "z9hG4bK30239"]
    assert wsinv.header("NewFangledHeader") == "newfangled value continued newfangled value"
    assert wsinv.header("s") == "" and wsinv.header("subject") == ""
    assert wsinv.header("unknownheaderwithunusualvalue") == ";;,,;;,;"
    assert wsinv.header_all("m")[0].startswith('"Quoted string \\"\\"" <sip:jdrosen@example.com>')

    dbl = parse(_read("dblreq.dat"))
    assert dbl.method == "REGISTER" and b"INVITE" not in dbl.raw and dbl.body == b""
    assert dbl.call_id == "dblreq.0ha0isndaksdj99sdfafnl3lk233412"

    esc02 = parse(_read("esc02.dat"))
    assert esc02.method == "RE%47IST%45R" and esc02.method != "REGISTER"
    assert len(esc02.header_all("contact")) == 2 and esc02.header("c%6fntact") is not None

    semi = parse(_read("semiuri.dat"))
    assert sipmsg.parse_uri_user(semi.uri) == "user;par=u@example.net"
    assert sipmsg.parse_uri_user(parse(_read("escnull.dat")).to_value) == "null-\x00-null"

    trans = parse(_read("transports.dat"))
    assert [sipmsg.parse_via(v).transport for v in trans.vias] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]

    mpart = parse(_read("mpart01.dat"))
    assert len(mpart.body) == mpart.content_length and b"\x00" in mpart.body or mpart.body

    unreason = parse(_read("unreason.dat"))
    assert unreason.status == 200 and unreason.reason.startswith("= 2**3 * 5**2 ")
    assert parse(_read("noreason.dat")).reason == ""

    legacy = parse(_read("inv2543.dat"))
    assert legacy.from_tag is None and legacy.max_forwards is None and legacy.content_length is None
    assert sipmsg.parse_via(legacy.vias[0]).branch is None

    intmeth = parse(_read("intmeth.dat"))
    assert intmeth.method == "!interesting-Method0123456789_*+`.%indeed'~"
    assert "\x00" in intmeth.to_value and intmeth.from_tag == "_token~1'+`*%!-."


def test_bext01_unsupported_header() -> None:
    msg = sipmsg.parse_message_py(_read("bext01.dat"))
    err = sipmsg.check_request_semantics(msg)
    assert err is not None and err.code == 420
    out = sipmsg.response_for_error(msg, err, to_tag="x1")
    assert out is not None
    assert b"\r\nUnsupported: noProxiesSupportThis, norDoAnyProxiesSupportThis\r\n" in out
    assert sipmsg.check_request_semantics(msg, {"noProxiesSupportThis", "norDoAnyProxiesSupportThis"}) is None


@pytest.mark.parametrize("name", sorted(n for n, c in PARSE_EXPECTED.items() if c == 400))
def test_rejected_requests_can_be_answered(name: str) -> None:
    """A 400 must reach the sender: the error response copies what routing needs."""
    data = _read(name)
    with pytest.raises(SipError) as info:
        sipmsg.parse_message_py(data)
    out = sipmsg.response_for_bad_bytes(data, info.value, to_tag="t1")
    if name == "insuf.dat":
        assert out is None  # no From/To/Call-ID: no response can be built
        return
    assert out is not None and out.startswith(b"SIP/2.0 400 Bad Request\r\n")
    assert b"\r\nVia: " in out and b"\r\nCall-ID: " in out and out.endswith(b"Content-Length: 0\r\n\r\n")
    # copied as received (the sender matches its own values), so the count of Via lines is kept
    assert out.count(b"\r\nVia: ") == data.split(b"\r\n\r\n")[0].count(b"\r\nVia:")
