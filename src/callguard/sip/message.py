"""SIP message parsing and response building: the pure-Python reference.

This module is the specification of :mod:`callguard.sip._sipcore`, its Cython
twin.  ``parse_message``, ``frame_stream`` and ``SipMessage`` are replaced by the
compiled versions when the extension is built, unless ``CALLGUARD_NO_EXTENSIONS``
is set; the pure-Python ones stay importable as ``parse_message_py``,
``frame_stream_py`` and ``SipMessagePy``.  Where the two disagree, this file is
right.

The parser is strict where a mistake would be forwarded or would change the
meaning of a request (start line, Via, From, To, Call-ID, CSeq, Content-Length,
Max-Forwards, Contact) and liberal where RFC 4475 asks for it (folding, white
space around separators, compact and unknown headers, odd but legal characters,
escapes).  Every error is a :class:`~callguard.errors.SipError` carrying the
response the message deserves: 400 or 505 for requests, 0 (drop silently) for
responses, which are never answered.

Header values are decoded from UTF-8 with ``surrogateescape``: any byte sequence
is accepted and ``value.encode("utf-8", "surrogateescape")`` gives back the
original bytes.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field

from ..errors import SipError
from ..numbers import unescape

__all__ = [
    "COMPACT_FORMS", "KNOWN_METHODS", "IMPLEMENTATION", "SipMessage", "SipMessagePy", "Via",
    "build_response", "canonical_name", "check_request_semantics", "check_response_semantics",
    "frame_stream", "frame_stream_py", "parse_message", "parse_message_py", "parse_uri_user", "parse_via",
    "response_for_bad_bytes", "response_for_error",
]

#: RFC 3261 7.3.3 and the IANA registry of compact header names.
COMPACT_FORMS: dict[str, str] = {
    "a": "accept-contact", "b": "referred-by", "c": "content-type", "d": "request-disposition",
    "e": "content-encoding", "f": "from", "i": "call-id", "j": "reject-contact", "k": "supported",
    "l": "content-length", "m": "contact", "n": "identity-info", "o": "event", "r": "refer-to",
    "s": "subject", "t": "to", "u": "allow-events", "v": "via", "x": "session-expires", "y": "identity",
}

#: Methods whose CSeq must match the request line (a mismatch is a 400); for other
#: methods a mismatch is left to :func:`check_request_semantics` (501, RFC 4475 3.1.2.18).
KNOWN_METHODS = frozenset({"INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "SUBSCRIBE",
                           "NOTIFY", "PUBLISH", "INFO", "REFER", "MESSAGE", "UPDATE"})

# Headers that may appear once only (RFC 3261 7.3.1: not a comma-separated list).
SINGLE_HEADERS = ("from", "to", "call-id", "cseq", "max-forwards", "content-length")

MAX_CSEQ = 2**31 - 1
ENC = "utf-8"
ERRS = "surrogateescape"

TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")
TOKEN_BYTES = frozenset(ord(c) for c in TOKEN_CHARS)
HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")
SCHEME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
SCHEME_CHARS = SCHEME_START | frozenset("0123456789+-.")
WS = " \t"

_FOLD = re.compile(rb"[ \t]*\r?\n[ \t]+")
_LINE = re.compile(rb"\r?\n")
_HEAD_END = re.compile(rb"\n\r?\n")
_VERSION = re.compile(rb"SIP/[0-9]+\.[0-9]+")


def _bad(detail: str) -> SipError:
    return SipError(400, "Bad Request", detail)


def canonical_name(name: str) -> str:
    """The canonical lower-case long name of a header name (compact forms expanded)."""
    low = name.lower()
    if len(low) == 1:
        return COMPACT_FORMS.get(low, low)
    return low


def _is_token(s: str) -> bool:
    if not s:
        return False
    for ch in s:
        if ch not in TOKEN_CHARS:
            return False
    return True


def _skip_ws(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i] in WS:
        i += 1
    return i


def _token_end(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i] in TOKEN_CHARS:
        i += 1
    return i


def _quoted_end(s: str, i: int) -> int:
    """Index after the closing quote of the quoted string starting at ``s[i] == '"'``."""
    n = len(s)
    i += 1
    while i < n:
        ch = s[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"':
            return i + 1
        i += 1
    raise _bad("unterminated quoted string")


def _split_commas(value: str) -> list[str]:
    """Splits a header value on the commas outside quotes and angle brackets."""
    parts: list[str] = []
    n = len(value)
    start = 0
    i = 0
    while i < n:
        ch = value[i]
        if ch == '"':
            i = _quoted_end(value, i)
            continue
        if ch == "<":
            j = value.find(">", i + 1)
            if j < 0:
                raise _bad("unterminated <")
            i = j + 1
            continue
        if ch == ",":
            parts.append(value[start:i].strip(WS))
            start = i + 1
        i += 1
    parts.append(value[start:].strip(WS))
    return parts


def _check_uri(uri: str, bare: bool) -> None:
    """A URI inside a header: scheme ':' and no white space; ``bare`` for an addr-spec without <>."""
    if not uri or uri[0] not in SCHEME_START:
        raise _bad("URI without a scheme")
    i = 1
    n = len(uri)
    while i < n and uri[i] in SCHEME_CHARS:
        i += 1
    if i >= n - 1 or uri[i] != ":":
        raise _bad("URI without a scheme")
    for ch in uri:
        if ch <= " " or ch in '<>"' or ch == "\x7f":
            raise _bad("invalid character in URI")
    # RFC 3261 20: a URI with a comma, question mark or semicolon must be in <>.
    if bare and ("?" in uri or "," in uri):
        raise _bad("URI with ? or , outside <>")


def _parse_params(s: str, i: int, params: dict[str, str | None]) -> None:
    """``*( SEMI generic-param )`` from ``s[i:]`` into ``params`` (first occurrence wins)."""
    n = len(s)
    while True:
        i = _skip_ws(s, i)
        if i >= n:
            return
        if s[i] != ";":
            raise _bad("garbage after value")
        i = _skip_ws(s, i + 1)
        j = _token_end(s, i)
        if j == i:
            raise _bad("empty parameter")
        name = s[i:j].lower()
        i = _skip_ws(s, j)
        value: str | None = None
        if i < n and s[i] == "=":
            i = _skip_ws(s, i + 1)
            if i < n and s[i] == '"':
                j = _quoted_end(s, i)
            elif i < n and s[i] == "[":
                j = s.find("]", i)
                if j < 0:
                    raise _bad("unterminated [")
                j += 1
            else:
                j = i
                while j < n and (s[j] in TOKEN_CHARS or s[j] == ":"):
                    j += 1
                if j == i:
                    raise _bad("empty parameter value")
            value = s[i:j]
            i = j
        if name not in params:
            params[name] = value


def _parse_addr(s: str) -> tuple[str, dict[str, str | None]]:
    """Parses ``name-addr / addr-spec *(SEMI param)`` (From, To, one Contact value)."""
    n = len(s)
    i = _skip_ws(s, 0)
    if i >= n:
        raise _bad("empty address")
    angle = -1
    if s[i] == '"':
        i = _skip_ws(s, _quoted_end(s, i))
        if i >= n or s[i] != "<":
            raise _bad("display name without <URI>")
        angle = i
    else:
        j = i
        while j < n and (s[j] in TOKEN_CHARS or s[j] in WS):
            j += 1
        if j < n and s[j] == "<":
            angle = j
        elif j < n and s[j] == ":" and j > i and s[j - 1] not in WS:
            # a scheme: addr-spec form; the display name cannot contain ':'
            for ch in s[i:j]:
                if ch in WS:
                    raise _bad("invalid display name")
        else:
            raise _bad("invalid display name")
    if angle >= 0:
        k = s.find(">", angle + 1)
        if k < 0:
            raise _bad("unterminated <")
        uri = s[angle + 1:k]
        _check_uri(uri, False)
        i = k + 1
    else:
        j = i
        while j < n and s[j] != ";" and s[j] not in WS:
            j += 1
        uri = s[i:j]
        _check_uri(uri, True)
        i = j
    params: dict[str, str | None] = {}
    _parse_params(s, i, params)
    return uri, params


@dataclass
class Via:
    """One Via value: ``SIP/2.0/<transport> host[:port] *(;param)``.

    ``transport`` is upper case; ``params`` has lower-case names and original values
    (None for a parameter without a value, e.g. a bare ``rport``); ``rport`` is the
    numeric value of ``rport`` when it has one.
    """

    transport: str
    host: str
    port: int | None
    params: dict[str, str | None] = field(default_factory=dict)
    branch: str | None = None
    received: str | None = None
    rport: int | None = None


def parse_via(via: str) -> Via:
    """Parses one Via value (not a comma-separated list); raises SipError(400)."""
    s = via
    n = len(s)
    i = _skip_ws(s, 0)
    parts: list[str] = []
    for k in range(3):
        j = _token_end(s, i)
        if j == i:
            raise _bad("malformed Via protocol")
        parts.append(s[i:j])
        i = _skip_ws(s, j)
        if k < 2:
            if i >= n or s[i] != "/":
                raise _bad("malformed Via protocol")
            i = _skip_ws(s, i + 1)
    if parts[0].upper() != "SIP" or parts[1] != "2.0":
        raise _bad("Via protocol is not SIP/2.0")
    if i == 0 or i >= n or s[i - 1] not in WS:
        raise _bad("Via without sent-by")
    if s[i] == "[":
        j = s.find("]", i)
        if j < 0 or j == i + 1:
            raise _bad("malformed Via host")
        for ch in s[i + 1:j]:
            if ch not in "0123456789abcdefABCDEF:.":
                raise _bad("malformed Via host")
        j += 1
    else:
        j = i
        while j < n and s[j] in HOST_CHARS:
            j += 1
        if j == i:
            raise _bad("malformed Via host")
    host = s[i:j]
    i = _skip_ws(s, j)
    port: int | None = None
    if i < n and s[i] == ":":
        i = _skip_ws(s, i + 1)
        j = i
        while j < n and "0" <= s[j] <= "9":
            j += 1
        if j == i or j - i > 5 or int(s[i:j]) > 65535:
            raise _bad("malformed Via port")
        port = int(s[i:j])
        i = j
    params: dict[str, str | None] = {}
    _parse_params(s, i, params)
    rport_value = params.get("rport")
    rport = int(rport_value) if rport_value and rport_value.isascii() and rport_value.isdigit() \
        and len(rport_value) <= 5 else None
    return Via(parts[2].upper(), host, port, params, params.get("branch"), params.get("received"), rport)


class SipMessage:
    """A parsed SIP request or response (see the module docstring for the decoding rules)."""

    __slots__ = ("raw", "is_request", "method", "uri", "status", "reason", "headers", "body", "call_id", "cseq",
                 "cseq_method", "from_value", "to_value", "from_tag", "to_tag", "vias", "max_forwards",
                 "content_length")

    raw: bytes
    is_request: bool
    method: str
    uri: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    call_id: str
    cseq: int
    cseq_method: str
    from_value: str
    to_value: str
    from_tag: str | None
    to_tag: str | None
    vias: list[str]
    max_forwards: int | None
    content_length: int | None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive, compact form accepted), or None."""
        key = canonical_name(name)
        for hname, value in self.headers:
            if hname == key:
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        """Every value of header ``name`` in wire order (one entry per header line)."""
        key = canonical_name(name)
        return [value for hname, value in self.headers if hname == key]

    def __repr__(self) -> str:
        if self.is_request:
            return f"<SipMessage {self.method} {self.uri} call-id={self.call_id!r}>"
        return f"<SipMessage {self.status} {self.reason} call-id={self.call_id!r}>"


def _is_response_start(data: bytes, start: int) -> bool:
    return data[start:start + 4].upper() == b"SIP/"


def parse_message(data: bytes, *, datagram: bool = True) -> SipMessage:
    """Parses one SIP message.

    Args:
        data: the bytes of a UDP datagram, or one message framed by :func:`frame_stream`.
        datagram: True for UDP (a missing Content-Length means "to the end of the
            datagram"; octets beyond Content-Length are not part of the message);
            False for a stream, where Content-Length is mandatory.

    Returns:
        The parsed message.

    Raises:
        SipError: with the code of the response the message deserves (400, 505), or
            code 0 when it must be dropped silently (malformed responses, empty input).
    """
    data = bytes(data)
    n = len(data)
    start = 0
    while start < n and data[start] in b"\r\n":
        start += 1
    if start >= n:
        raise SipError(0, "Empty", "no message")
    is_request = not _is_response_start(data, start)
    try:
        return _parse(data, start, is_request, datagram)
    except SipError as exc:
        if is_request:
            raise
        raise SipError(0, exc.reason, exc.detail) from None


def _parse(data: bytes, start: int, is_request: bool, datagram: bool) -> SipMessage:
    m = _HEAD_END.search(data, start)
    if m is not None:
        head_end = m.start() + 1
        body_start = m.end()
    elif datagram and data.endswith(b"\n"):
        # liberal: a datagram whose last header line lacks the empty line after it
        head_end = body_start = len(data)
    else:
        raise _bad("no empty line after the headers")
    eol = data.find(b"\n", start)
    line = data[start:eol]
    if line.endswith(b"\r"):
        line = line[:-1]
    if b"\r" in line:
        raise _bad("CR inside the start line")
    msg = SipMessage()
    if is_request:
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[0] or not parts[1] or not parts[2]:
            raise _bad("malformed request line")
        for b in parts[0]:
            if b not in TOKEN_BYTES:
                raise _bad("malformed method")
        version = parts[2].upper()
        if version != b"SIP/2.0":
            if _VERSION.fullmatch(version):
                raise SipError(505, "Version Not Supported", parts[2].decode(ENC, ERRS))
            raise _bad("malformed SIP version")
        for b in parts[1]:
            if b <= 0x20 or b >= 0x7F or b in b'<>"':
                raise _bad("invalid character in Request-URI")
        msg.method = parts[0].decode("ascii")
        msg.uri = parts[1].decode("ascii")
        _check_request_uri(msg.uri)
        msg.status = 0
        msg.reason = ""
    else:
        parts = line.split(b" ", 2)
        if parts[0].upper() != b"SIP/2.0":
            raise SipError(0, "Version Not Supported", "response version")
        if len(parts) < 2 or len(parts[1]) != 3 or not parts[1].isdigit() or not b"100" <= parts[1] <= b"699":
            raise _bad("malformed status code")
        msg.method = ""
        msg.uri = ""
        msg.status = int(parts[1])
        msg.reason = parts[2].decode(ENC, ERRS) if len(parts) == 3 else ""
    msg.is_request = is_request

    # Header block (after the start line), folded lines joined with one SP.
    block = data[eol + 1:head_end]
    if block[:1] in (b" ", b"\t"):
        raise _bad("folded start line")
    headers: list[tuple[str, str]] = []
    if block:
        block = _FOLD.sub(b" ", block)
        lines = _LINE.split(block)
        if lines and lines[-1] == b"":
            lines.pop()
        for raw_line in lines:
            if b"\r" in raw_line:
                raise _bad("CR inside a header line")
            colon = raw_line.find(b":")
            if colon <= 0:
                raise _bad("header line without a name")
            name = raw_line[:colon].rstrip(b" \t")
            if not name:
                raise _bad("empty header name")
            for b in name:
                if b not in TOKEN_BYTES:
                    raise _bad("invalid header name")
            value = raw_line[colon + 1:].strip(b" \t")
            if _CTL.search(value) is not None and not _ctl_quoted(value):
                raise _bad("control character in a header value")
            headers.append((canonical_name(name.decode("ascii")), value.decode(ENC, ERRS)))
    msg.headers = headers
    _fill(msg, headers)

    # Body, framed by Content-Length.
    avail = len(data) - body_start
    cl = msg.content_length
    if cl is None:
        if not datagram:
            raise _bad("missing Content-Length on a stream")
        end = len(data)
    else:
        if cl > avail:
            raise _bad("Content-Length larger than the message")
        end = body_start + cl
    msg.body = data[body_start:end]
    msg.raw = data[start:end]
    return msg


# Octets the grammar allows in a header value only as a quoted-pair ("\\" then the octet, inside a
# quoted string: RFC 3261 §25.1, as RFC 4475's intmeth has them): anywhere else a NUL, BEL or
# DEL is malformed, and forwarding it hands the trunk a header a C string would cut short.
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _ctl_quoted(value: bytes) -> bool:
    """Whether every control octet of ``value`` follows a backslash."""
    return all(m.start() > 0 and value[m.start() - 1] == 0x5C for m in _CTL.finditer(value))


def _check_request_uri(uri: str) -> None:
    if uri[0] not in SCHEME_START:
        raise _bad("Request-URI without a scheme")
    i = 1
    n = len(uri)
    while i < n and uri[i] in SCHEME_CHARS:
        i += 1
    if i >= n - 1 or uri[i] != ":":
        raise _bad("Request-URI without a scheme")
    scheme = uri[:i].lower()
    if scheme in ("sip", "sips"):
        rest = uri[i + 1:]
        at = rest.rfind("@")
        hostpart = rest[at + 1:]
        # RFC 3261 19.1.5: headers are not allowed in a Request-URI.
        if "?" in hostpart:
            raise _bad("headers in the Request-URI")
        if not hostpart or hostpart[0] in ";:":
            raise _bad("Request-URI without a host")


def _digits(value: str, what: str) -> int:
    if not value or not value.isascii() or not value.isdigit():
        raise _bad(f"malformed {what}")
    if len(value) > 10:
        return 1 << 40  # larger than any limit checked below; int() of a huge string is avoided
    return int(value)


def _fill(msg: SipMessage, headers: list[tuple[str, str]]) -> None:
    """Extracts and checks the fields every SIP element needs."""
    seen: dict[str, str] = {}
    vias: list[str] = []
    for name, value in headers:
        if name == "via":
            for part in _split_commas(value):
                parse_via(part)
                vias.append(part)
        elif name in SINGLE_HEADERS:
            if name in seen:
                raise _bad(f"more than one {name}")
            seen[name] = value
        elif name == "contact":
            if value != "*":
                for part in _split_commas(value):
                    _parse_addr(part)
    for name in ("from", "to", "call-id", "cseq"):
        if name not in seen:
            raise _bad(f"missing {name}")
    if not vias:
        raise _bad("missing via")
    msg.vias = vias

    from_uri, from_params = _parse_addr(seen["from"])
    to_uri, to_params = _parse_addr(seen["to"])
    del from_uri, to_uri
    msg.from_value = seen["from"]
    msg.to_value = seen["to"]
    msg.from_tag = from_params.get("tag")
    msg.to_tag = to_params.get("tag")

    call_id = seen["call-id"]
    if not call_id or any(ch in WS for ch in call_id):
        raise _bad("malformed Call-ID")
    msg.call_id = call_id

    cseq = seen["cseq"]
    i = 0
    n = len(cseq)
    while i < n and "0" <= cseq[i] <= "9":
        i += 1
    j = _skip_ws(cseq, i)
    if i == 0 or j == i:
        raise _bad("malformed CSeq")
    number = _digits(cseq[:i], "CSeq")
    if number > MAX_CSEQ:
        raise _bad("CSeq number too large")
    cseq_method = cseq[j:]
    if not _is_token(cseq_method):
        raise _bad("malformed CSeq method")
    msg.cseq = number
    msg.cseq_method = cseq_method
    if msg.is_request and cseq_method != msg.method and msg.method in KNOWN_METHODS:
        raise _bad("CSeq method does not match the request line")

    mf = seen.get("max-forwards")
    # RFC 4475 3.1.2.4: an overlarge Max-Forwards may be treated leniently; clamp it.
    msg.max_forwards = None if mf is None else min(_digits(mf, "Max-Forwards"), 255)

    cl = seen.get("content-length")
    if cl is None:
        msg.content_length = None
    else:
        if cl.startswith("-"):
            raise _bad("negative Content-Length")
        msg.content_length = _digits(cl, "Content-Length")


def frame_stream(buf: bytearray, max_size: int) -> bytes | None:
    """Pops one complete message from the front of a stream buffer.

    Leading CRLF keep-alives (RFC 5626 3.5.1) are removed.  Content-Length is
    mandatory on streams.

    Args:
        buf: bytes received so far on a TCP connection; consumed bytes are deleted.
        max_size: the largest message accepted (headers plus body).

    Returns:
        The bytes of one message, or None when more data is needed.

    Raises:
        SipError: framing cannot be recovered (missing, malformed, negative or
            duplicated Content-Length, or a message larger than ``max_size``); the
            caller closes the connection.
    """
    n = len(buf)
    start = 0
    while start < n and buf[start] in b"\r\n":
        start += 1
    if start:
        del buf[:start]
    m = _HEAD_END.search(buf)
    if m is None:
        if len(buf) > max_size:
            raise SipError(513, "Message Too Large", "headers larger than the limit")
        return None
    body_start = m.end()
    block = _FOLD.sub(b" ", bytes(buf[:m.start() + 1]))
    cl: int | None = None
    for line in _LINE.split(block)[1:]:
        colon = line.find(b":")
        if colon <= 0:
            continue
        name = line[:colon].rstrip(b" \t").lower()
        if name != b"content-length" and name != b"l":
            continue
        if cl is not None:
            raise _bad("more than one Content-Length")
        value = line[colon + 1:].strip(b" \t")
        if not value.isdigit() or len(value) > 10:
            raise _bad("malformed Content-Length")
        cl = int(value)
    if cl is None:
        raise _bad("missing Content-Length on a stream")
    total = body_start + cl
    if total > max_size:
        raise SipError(513, "Message Too Large", f"{total} octets")
    if len(buf) < total:
        return None
    out = bytes(buf[:total])
    del buf[:total]
    return out


# --------------------------------------------------------------------------- helpers for SIP elements


def parse_uri_user(uri: str) -> str:
    """The user part of a sip:/sips:/tel: URI or of a name-addr, percent-decoded; '' if none."""
    s = uri.strip()
    lt = s.find("<")
    if lt >= 0:
        gt = s.find(">", lt)
        s = s[lt + 1:gt] if gt > lt else s[lt + 1:]
    colon = s.find(":")
    if colon < 0:
        return ""
    scheme = s[:colon].strip().lower()
    rest = s[colon + 1:]
    if scheme == "tel":
        return unescape(rest.split(";", 1)[0].split("?", 1)[0])
    if scheme not in ("sip", "sips"):
        return ""
    at = rest.rfind("@")
    if at < 0:
        return ""
    userinfo = rest[:at]
    # a password follows the first ':' of userinfo, but ';' params of the user come first
    user = userinfo.split(":", 1)[0]
    return unescape(user)


def check_request_semantics(msg: SipMessage, supported: frozenset[str] | set[str] = frozenset()) -> SipError | None:
    """Proxy checks after parsing (RFC 3261 16.3, RFC 4475 3.1.2.18 and 3.3).

    Returns the error to answer with, or None.  In order: 501 for an unknown method
    whose CSeq method differs; 416 for a Request-URI scheme other than sip, sips or
    tel; 483 when Max-Forwards is 0 (a proxy may still answer an OPTIONS addressed
    to itself before calling this); 420 when Proxy-Require lists an option tag not in
    ``supported`` — the error's ``detail`` is then the value of the Unsupported
    header.  For an ACK every error has code 0: an ACK is never answered.
    """
    err = _request_semantics(msg, supported)
    if err is not None and msg.method == "ACK":
        return SipError(0, err.reason, err.detail)
    return err


def _request_semantics(msg: SipMessage, supported: frozenset[str] | set[str]) -> SipError | None:
    if msg.cseq_method != msg.method:
        return SipError(501, "Not Implemented", f"unknown method {msg.method}")
    scheme = msg.uri.split(":", 1)[0].lower()
    if scheme not in ("sip", "sips", "tel"):
        return SipError(416, "Unsupported URI Scheme", scheme)
    if msg.max_forwards == 0:
        return SipError(483, "Too Many Hops", "Max-Forwards is 0")
    wanted: list[str] = []
    for value in msg.header_all("proxy-require"):
        for tag in value.split(","):
            tag = tag.strip(WS)
            if tag and tag not in supported and tag not in wanted:
                wanted.append(tag)
    if wanted:
        return SipError(420, "Bad Extension", ", ".join(wanted))
    return None


def _unusable_address(host: str | None) -> bool:
    if not host:
        return False
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv4Address) and addr == ipaddress.IPv4Address("255.255.255.255"):
        return True
    return addr.is_multicast or addr.is_unspecified


def check_response_semantics(msg: SipMessage) -> SipError | None:
    """A response a proxy must drop (code 0): a Via to a broadcast, multicast or
    unspecified address (RFC 4475 3.3.10), whose relay would be an amplifier."""
    for value in msg.vias:
        via = parse_via(value)
        for host in (via.host, via.received, via.params.get("maddr")):
            if _unusable_address(host):
                return SipError(0, "Broadcast Via", f"Via to {host}")
    return None


def _clean(text: str) -> str:
    """Text safe on one header line: CR, LF and other controls become spaces."""
    return "".join(" " if (ch < " " and ch != "\t") or ch == "\x7f" else ch for ch in text)


def build_response(req: SipMessage, code: int, reason: str, *, to_tag: str | None = None,
                   extra_headers: list[tuple[str, str]] | tuple[()] = (), server: str | None = None) -> bytes:
    """Builds a response to ``req`` (RFC 3261 8.2.6).

    Copies every Via (in order), From, To (with ``;tag=to_tag`` added if To has no
    tag and one is given), Call-ID and CSeq; adds ``extra_headers``, ``Server`` and
    ``Content-Length: 0``.  The reason phrase and extra values lose any CR/LF.

    Raises:
        ValueError: ``code`` is not a SIP status code (100-699).
    """
    if not 100 <= code <= 699:
        raise ValueError(f"not a SIP status code: {code}")
    to_value = req.to_value
    if to_tag is not None and req.to_tag is None:
        to_value = f"{to_value};tag={_clean(to_tag)}"
    lines = [f"SIP/2.0 {code} {_clean(reason)}"]
    lines.extend(f"Via: {v}" for v in req.header_all("via"))
    lines.append(f"From: {req.from_value}")
    lines.append(f"To: {to_value}")
    lines.append(f"Call-ID: {req.call_id}")
    lines.append(f"CSeq: {req.cseq} {req.cseq_method}")
    for name, value in extra_headers:
        lines.append(f"{_clean(name)}: {_clean(value)}")
    if server:
        lines.append(f"Server: {_clean(server)}")
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode(ENC, ERRS)


def response_for_error(req: SipMessage, err: SipError, *, to_tag: str | None = None,
                       server: str | None = None) -> bytes | None:
    """The response to send for ``err`` about a parsed request, or None to drop.

    A 420 carries ``Unsupported: <err.detail>``; nothing is sent for code 0, for a
    response or for an ACK.
    """
    if err.code == 0 or not req.is_request or req.method == "ACK":
        return None
    extra: list[tuple[str, str]] = []
    if err.code == 420 and err.detail:
        extra.append(("Unsupported", err.detail))
    return build_response(req, err.code, err.reason, to_tag=to_tag, extra_headers=extra, server=server)


def response_for_bad_bytes(data: bytes, err: SipError, *, to_tag: str | None = None,
                           server: str | None = None) -> bytes | None:
    """Best-effort response to a request :func:`parse_message` rejected.

    Copies Via, From, To, Call-ID and CSeq lines found in the bytes (RFC 3261 needs
    them to route a response back); returns None when the error says drop, when the
    message is not a request, is an ACK, or lacks what a response needs.
    """
    if err.code == 0:
        return None
    data = bytes(data).lstrip(b"\r\n")
    if _is_response_start(data, 0):
        return None
    m = _HEAD_END.search(data)
    head = data[:m.start()] if m else data
    lines = _LINE.split(_FOLD.sub(b" ", head))
    if not lines or lines[0].split(b" ", 1)[0] == b"ACK":
        return None
    found: dict[str, list[str]] = {}
    for line in lines[1:]:
        colon = line.find(b":")
        if colon <= 0:
            continue
        try:
            name = canonical_name(line[:colon].rstrip(b" \t").decode("ascii"))
        except UnicodeDecodeError:
            continue
        if name in ("via", "from", "to", "call-id", "cseq"):
            found.setdefault(name, []).append(_clean(line[colon + 1:].strip(b" \t").decode(ENC, ERRS)))
    if any(name not in found for name in ("via", "from", "to", "call-id", "cseq")):
        return None
    cseq = found["cseq"][0].split()
    if len(cseq) == 2 and cseq[1] == "ACK":
        return None
    to_value = found["to"][0]
    if to_tag is not None and ";tag=" not in to_value.replace(" ", "").lower():
        to_value = f"{to_value};tag={_clean(to_tag)}"
    out = [f"SIP/2.0 {err.code} {_clean(err.reason)}"]
    out.extend(f"Via: {v}" for v in found["via"])
    out.append(f"From: {found['from'][0]}")
    out.append(f"To: {to_value}")
    out.append(f"Call-ID: {found['call-id'][0]}")
    out.append(f"CSeq: {found['cseq'][0]}")
    if server:
        out.append(f"Server: {_clean(server)}")
    out.append("Content-Length: 0")
    return ("\r\n".join(out) + "\r\n\r\n").encode(ENC, ERRS)


# --------------------------------------------------------------------------- implementation selection

SipMessagePy = SipMessage
parse_message_py = parse_message
frame_stream_py = frame_stream
IMPLEMENTATION = "python"

if not os.environ.get("CALLGUARD_NO_EXTENSIONS"):
    try:
        from ._sipcore import SipMessage, frame_stream, parse_message  # type: ignore[assignment]
    except ImportError:  # not built: the reference serves, slower but identical
        pass
    else:
        IMPLEMENTATION = "cython"
