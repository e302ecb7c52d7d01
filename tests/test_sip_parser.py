"""The SIP parser: API, framing, responses, and the Cython twin against the reference."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callguard.errors import SipError
from callguard.sip import message as sipmsg

DATA = Path(__file__).resolve().parent / "data" / "rfc4475"
CORPUS = [p.read_bytes() for p in sorted(DATA.glob("*.dat"))]


def _c_module() -> Any:
    if os.environ.get("CALLGUARD_NO_EXTENSIONS"):
        return None
    try:
        from callguard.sip import _sipcore
    except ImportError:
        if os.environ.get("CI"):
            raise
        return None
    return _sipcore


C = _c_module()
NEEDS_C = pytest.mark.skipif(C is None, reason="_sipcore not built")
IMPLS = [
    pytest.param((sipmsg.parse_message_py, sipmsg.frame_stream_py), id="py"),
    pytest.param((C.parse_message, C.frame_stream) if C else None, id="c", marks=NEEDS_C),
]
FIELDS = ("raw", "is_request", "method", "uri", "status", "reason", "headers", "body", "call_id", "cseq",
          "cseq_method", "from_value", "to_value", "from_tag", "to_tag", "vias", "max_forwards", "content_length")

SDP = (b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
       b"m=audio 4000 RTP/AVP 0 8\r\na=rtpmap:0 PCMU/8000\r\n")


def invite(**over: str) -> bytes:
    """A typical INVITE; keyword arguments replace or add header lines (None-like '' removes)."""
    headers = {
        "Via": "SIP/2.0/UDP 192.0.2.1:5062;branch=z9hG4bK776asdhds;rport",
        "Max-Forwards": "70",
        "To": "<sip:02150001234@gw.example.com>",
        "From": '"Alice" <sip:+8613800138000@192.0.2.1>;tag=1928301774',
        "Call-ID": "a84b4c76e66710@192.0.2.1",
        "CSeq": "314159 INVITE",
        "Contact": "<sip:alice@192.0.2.1:5062>",
        "Content-Type": "application/sdp",
        "Content-Length": str(len(SDP)),
    }
    for key, value in over.items():
        name = key.replace("_", "-")
        if value == "":
            headers.pop(name, None)
        else:
            headers[name] = value
    lines = ["INVITE sip:02150001234@gw.example.com SIP/2.0"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + SDP


def outcome(parse: Any, data: bytes, datagram: bool = True) -> tuple[Any, ...]:
    try:
        msg = parse(data, datagram=datagram)
    except SipError as exc:
        return ("error", exc.code)
    return tuple(getattr(msg, name) for name in FIELDS)


@pytest.mark.parametrize("impl", IMPLS)
def test_typical_invite(impl: Any) -> None:
    parse, _ = impl
    msg = parse(invite())
    assert msg.is_request and msg.method == "INVITE" and msg.uri == "sip:02150001234@gw.example.com"
    assert msg.status == 0 and msg.reason == ""
    assert msg.call_id == "a84b4c76e66710@192.0.2.1" and msg.cseq == 314159 and msg.cseq_method == "INVITE"
    assert msg.from_tag == "1928301774" and msg.to_tag is None
    assert msg.max_forwards == 70 and msg.content_length == len(SDP) and msg.body == SDP
    assert msg.header("v") == msg.header("VIA") == msg.vias[0]
    assert msg.header("X-Nothing") is None and msg.header_all("contact") == ["<sip:alice@192.0.2.1:5062>"]
    assert msg.headers[0] == ("via", "SIP/2.0/UDP 192.0.2.1:5062;branch=z9hG4bK776asdhds;rport")
    assert sipmsg.parse_uri_user(msg.from_value) == "+8613800138000"
    assert sipmsg.parse_uri_user(msg.uri) == "02150001234"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("over", "code"), [
    ({"CSeq": "1 BYE"}, 400),
    ({"CSeq": "2147483648 INVITE"}, 400),
    ({"CSeq": "INVITE"}, 400),
    ({"Call_ID": ""}, 400),
    ({"Via": ""}, 400),
    ({"Via": "SIP/2.0/UDP 192.0.2.1;;branch=x"}, 400),
    ({"Via": "SIP/2.0/UDP 192.0.2.1:99999"}, 400),
    ({"Via": "SIP/3.0/UDP 192.0.2.1"}, 400),
    ({"From": '"Alice <sip:a@b>;tag=1'}, 400),
    ({"From": "Alice, Bob <sip:a@b>;tag=1"}, 400),
    ({"To": "< sip:a@b >"}, 400),
    ({"Contact": "sip:a@b?Route=x"}, 400),
    ({"Max_Forwards": "seventy"}, 400),
    ({"Content_Length": "-1"}, 400),
    ({"Content_Length": "9999"}, 400),
    ({"Content_Length": "1, 2"}, 400),
])
def test_bad_requests(impl: Any, over: dict[str, str], code: int) -> None:
    parse, _ = impl
    with pytest.raises(SipError) as info:
        parse(invite(**over))
    assert info.value.code == code


@pytest.mark.parametrize("impl", IMPLS)
def test_start_lines(impl: Any) -> None:
    parse, _ = impl
    base = invite()
    rest = base[base.index(b"\r\n"):]
    assert outcome(parse, b"INVITE sip:x@y SIP/2.1" + rest)[0:2] == ("error", 505)
    assert outcome(parse, b"INVITE sip:x@y sip/2.0" + rest)[1] is True  # case-insensitive version
    assert outcome(parse, b"INVITE sip:x@y HTTP/1.1" + rest) == ("error", 400)
    assert outcome(parse, b"INVITE sip:x@y?Route=z SIP/2.0" + rest) == ("error", 400)
    assert outcome(parse, b"INVITE tel:+8613800138000 SIP/2.0" + rest)[1] is True
    assert outcome(parse, b"\r\n\r\n") == ("error", 0)
    assert outcome(parse, b"") == ("error", 0)
    response = b"SIP/2.0 180 Ringing" + rest.replace(b"CSeq: 314159 INVITE", b"CSeq: 1 INVITE")
    msg = parse(response)
    assert not msg.is_request and msg.status == 180 and msg.reason == "Ringing" and msg.method == ""
    assert outcome(parse, b"SIP/2.0 99 Low" + rest) == ("error", 0)
    assert outcome(parse, b"SIP/2.0 180 Ringing" + rest.replace(b"Call-ID", b"X-Call-ID")) == ("error", 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_stream_needs_content_length(impl: Any) -> None:
    parse, _ = impl
    data = invite(Content_Length="")
    assert parse(data).body == SDP  # UDP: the rest of the datagram
    assert outcome(parse, data, datagram=False) == ("error", 400)


@pytest.mark.parametrize("impl", IMPLS)
def test_frame_stream(impl: Any) -> None:
    parse, frame = impl
    one = invite()
    buf = bytearray(b"\r\n\r\n" + one + one[:50])
    assert frame(buf, 65536) == one
    assert buf == bytearray(one[:50])
    assert frame(buf, 65536) is None
    buf += one[50:] + one[:-1]
    assert frame(buf, 65536) == one
    assert frame(buf, 65536) is None
    buf += one[-1:]
    got = frame(buf, 65536)
    assert got == one and parse(got, datagram=False).body == SDP and buf == bytearray()
    for bad in (invite(Content_Length=""), invite(Content_Length="-5"), invite(l="5")):
        with pytest.raises(SipError):
            frame(bytearray(bad), 65536)
    with pytest.raises(SipError) as info:
        frame(bytearray(one), 100)
    assert info.value.code == 513
    with pytest.raises(SipError):
        frame(bytearray(b"x" * 200), 100)  # no end of headers within the limit


def test_build_response() -> None:
    req = sipmsg.parse_message_py(invite(Via="SIP/2.0/UDP a.example;branch=z9hG4bK1, SIP/2.0/TCP b.example"))
    out = sipmsg.build_response(req, 403, "Forbidden\r\nX-Injected: 1", to_tag="abc",
                                extra_headers=[("Reason", "Q.850;cause=21")], server="callguard")
    resp = sipmsg.parse_message_py(out)
    assert resp.status == 403 and "\r" not in resp.reason and resp.header("x-injected") is None
    assert resp.vias == req.vias and resp.call_id == req.call_id and resp.cseq == req.cseq
    assert resp.from_tag == req.from_tag and resp.to_tag == "abc" and resp.header("reason") == "Q.850;cause=21"
    assert resp.header("server") == "callguard" and resp.content_length == 0
    tagged = sipmsg.parse_message_py(invite(To="<sip:b@c>;tag=keep"))
    assert sipmsg.parse_message_py(sipmsg.build_response(tagged, 486, "Busy", to_tag="new")).to_tag == "keep"
    with pytest.raises(ValueError):
        sipmsg.build_response(req, 42, "nope")


def test_semantics() -> None:
    msg = sipmsg.parse_message_py(invite(Max_Forwards="0"))
    err = sipmsg.check_request_semantics(msg)
    assert err is not None and err.code == 483
    ack = sipmsg.parse_message_py(invite(CSeq="314159 ACK").replace(b"INVITE sip:", b"ACK sip:", 1))
    assert ack.method == "ACK"
    assert sipmsg.check_request_semantics(sipmsg.parse_message_py(invite())) is None


def test_parse_via_and_user() -> None:
    via = sipmsg.parse_via("SIP / 2.0 / udp [2001:db8::1] : 5070 ;branch=z9hG4bKx;rport=4000;received=192.0.2.9")
    assert (via.transport, via.host, via.port, via.branch, via.rport, via.received) == \
        ("UDP", "[2001:db8::1]", 5070, "z9hG4bKx", 4000, "192.0.2.9")
    assert sipmsg.parse_via("SIP/2.0/UDP h;rport").params == {"rport": None}
    assert sipmsg.parse_uri_user("tel:+86-391-3569391;phone-context=x") == "+86-391-3569391"
    assert sipmsg.parse_uri_user("<sips:bob:secret@example.com;transport=tls>") == "bob"
    assert sipmsg.parse_uri_user("sip:example.com") == "" and sipmsg.parse_uri_user("mailto:a@b") == ""


# ------------------------------------------------------------------ random inputs

TOKENS = [b"\r\n", b"\n", b"\r", b" ", b"\t", b";", b",", b'"', b"\\", b"<", b">", b":", b"\r\n ", b"\n\t", b"\x00",
          b"\xff", b"\xc3\xa9", b"-", b"9" * 12, b"@", b"?", b"[", b"]", b"=", b"/", b"SIP/2.0", b"tag",
          b"l: 5\r\n", b"\r\n\r\n"]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(CORPUS + [invite()])))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.integers(0, 3))
        i = draw(st.integers(0, len(data)))
        if op == 0 and i < len(data):
            data[i] = draw(st.integers(0, 255))
        elif op == 1:
            data[i:i] = draw(st.sampled_from(TOKENS))
        elif op == 2:
            del data[i:i + draw(st.integers(1, 20))]
        else:
            del data[i:]
    return bytes(data)


header_values = st.lists(st.sampled_from(list(' \t;,"<>:@=/abcZ09.-_%\\') + ["sip:", "\r\n "]),
                         max_size=30).map("".join)


@st.composite
def generated(draw: st.DrawFn) -> bytes:
    over = {name: draw(header_values) for name in
            draw(st.lists(st.sampled_from(["Via", "From", "To", "Call_ID", "CSeq", "Contact", "Max_Forwards",
                                           "Content_Length", "X_Other"]), max_size=3, unique=True))}
    return invite(**{k: v for k, v in over.items() if v})


INPUTS = st.one_of(mutated(), generated(), st.binary(max_size=300))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(INPUTS)
def test_reference_raises_only_sip_error(data: bytes) -> None:
    for datagram in (True, False):
        result = outcome(sipmsg.parse_message_py, data, datagram)
        assert result[0] != "error" or result[1] in (0, 400, 505)
    try:
        sipmsg.frame_stream_py(bytearray(data), 4096)
    except SipError as exc:
        assert exc.code in (400, 513)
    err = sipmsg.SipError(400, "Bad Request")
    out = sipmsg.response_for_bad_bytes(data, err, to_tag="t")
    assert out is None or out.startswith(b"SIP/2.0 400 ")


def _frames(frame: Any, data: bytes) -> tuple[list[Any], bytes]:
    buf = bytearray(data)
    out: list[Any] = []
    try:
        for _ in range(4):
            out.append(frame(buf, 3000))
    except SipError as exc:
        out.append(("error", exc.code))
    return out, bytes(buf)


@NEEDS_C
@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(INPUTS)
def test_cython_matches_reference(data: bytes) -> None:
    for datagram in (True, False):
        assert outcome(C.parse_message, data, datagram) == outcome(sipmsg.parse_message_py, data, datagram)
    assert _frames(C.frame_stream, data) == _frames(sipmsg.frame_stream_py, data)


@NEEDS_C
@pytest.mark.parametrize("index", range(len(CORPUS)))
def test_cython_matches_reference_on_corpus(index: int) -> None:
    data = CORPUS[index]
    for datagram in (True, False):
        assert outcome(C.parse_message, data, datagram) == outcome(sipmsg.parse_message_py, data, datagram)
    assert _frames(C.frame_stream, data + data) == _frames(sipmsg.frame_stream_py, data + data)


# ------------------------------------------------------------------ batched UDP I/O over loopback


@NEEDS_C
@pytest.mark.parametrize("family,host", [(2, "127.0.0.1"), (10, "::1")], ids=["ipv4", "ipv6"])
def test_udp_batch_roundtrip(family: int, host: str) -> None:
    import select
    import socket
    import time

    try:
        server = socket.socket(family, socket.SOCK_DGRAM)
        server.bind((host, 0))
    except OSError:
        pytest.skip(f"{host} not available")
    client = socket.socket(family, socket.SOCK_DGRAM)
    client.bind((host, 0))
    server.setblocking(False)
    client.setblocking(False)
    try:
        batch = C.UdpBatch(server.fileno(), 16)
        assert batch.recv(8) == []  # nothing yet: EAGAIN is an empty batch, not an error
        payloads = [invite(Call_ID=f"call-{i}@h") for i in range(20)]
        for data in payloads[:10]:
            client.sendto(data, server.getsockname())
        client.sendto(b"\r\n\r\n", server.getsockname())  # keep-alive: dropped inside
        for data in payloads[10:]:
            client.sendto(data, server.getsockname())
        got: list[tuple[bytes, tuple[Any, ...]]] = []
        deadline = time.monotonic() + 5
        while len(got) < 20 and time.monotonic() < deadline:
            select.select([server], [], [], 0.2)
            got.extend(batch.recv(8))
        assert [d for d, _ in got] == payloads
        assert all(addr[:2] == client.getsockname()[:2] for _, addr in got)
        assert batch.dropped_keepalives == 1
        assert C.parse_message(got[3][0]).call_id == "call-3@h"

        replies = [(b"SIP/2.0 100 Trying " + str(i).encode(), addr) for i, (_, addr) in enumerate(got)]
        assert batch.send_many(replies) == 20
        echoed: list[bytes] = []
        deadline = time.monotonic() + 5
        while len(echoed) < 20 and time.monotonic() < deadline:
            select.select([client], [], [], 0.2)
            try:
                while True:
                    echoed.append(client.recv(65535))
            except BlockingIOError:
                pass
        assert echoed == [r for r, _ in replies]
        with pytest.raises(ValueError):
            batch.send_many([(b"x", ("not-an-address", 5060))])
    finally:
        server.close()
        client.close()
