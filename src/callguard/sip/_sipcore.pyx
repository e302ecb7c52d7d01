"""Cython twin of :mod:`callguard.sip.message`: ``parse_message``, ``frame_stream``, ``SipMessage``.

Same results as the pure-Python reference (the tests compare both on the RFC 4475
corpus and on random messages); the bytes are scanned with C pointers and every
structural check works on bytes, which is equivalent to the reference's checks on
the decoded text because every SIP delimiter is ASCII.  Also hosts ``UdpBatch``,
batched UDP I/O with recvmmsg/sendmmsg.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.string cimport memchr, memcpy

from callguard.errors import SipError
from callguard.sip._sipscan cimport (
    MAX_CSEQ, TOKEN, bad_request_uri_char, check_request_uri, check_via, is_ws, next_comma, parse_addr,
    parse_digits, skip_ws,
)

COMPACT_FORMS = {
    "a": "accept-contact", "b": "referred-by", "c": "content-type", "d": "request-disposition",
    "e": "content-encoding", "f": "from", "i": "call-id", "j": "reject-contact", "k": "supported",
    "l": "content-length", "m": "contact", "n": "identity-info", "o": "event", "r": "refer-to",
    "s": "subject", "t": "to", "u": "allow-events", "v": "via", "x": "session-expires", "y": "identity",
}
KNOWN_METHODS = frozenset({"INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "SUBSCRIBE",
                           "NOTIFY", "PUBLISH", "INFO", "REFER", "MESSAGE", "UPDATE"})

# interned canonical names, so that header(), header_all() and _fill compare by identity first
cdef str H_VIA = "via"
cdef str H_FROM = "from"
cdef str H_TO = "to"
cdef str H_CALLID = "call-id"
cdef str H_CSEQ = "cseq"
cdef str H_MF = "max-forwards"
cdef str H_CL = "content-length"
cdef str H_CONTACT = "contact"

# canonical names of common header spellings, looked up before decoding and lower-casing
cdef dict NAME_CACHE = {}


cdef inline str _dec(const unsigned char* s, Py_ssize_t n):
    return PyUnicode_DecodeUTF8(<const char*>s, n, "surrogateescape")


cdef str canonical_name_c(str name):
    low = name.lower()
    if len(low) == 1:
        return COMPACT_FORMS.get(low, low)
    return low


cdef object _bad(str detail):
    return SipError(400, "Bad Request", detail)


cdef class SipMessage:
    """A parsed SIP request or response (same fields as message.SipMessagePy)."""

    cdef public bytes raw
    cdef public bint is_request
    cdef public str method
    cdef public str uri
    cdef public int status
    cdef public str reason
    cdef public list headers
    cdef public bytes body
    cdef public str call_id
    cdef public long long cseq
    cdef public str cseq_method
    cdef public str from_value
    cdef public str to_value
    cdef public object from_tag
    cdef public object to_tag
    cdef public list vias
    cdef public object max_forwards
    cdef public object content_length

    def header(self, str name):
        """The first value of header ``name`` (case-insensitive, compact form accepted), or None."""
        key = canonical_name_c(name)
        for hname, value in self.headers:
            if hname == key:
                return value
        return None

    def header_all(self, str name):
        """Every value of header ``name`` in wire order (one entry per header line)."""
        key = canonical_name_c(name)
        return [value for hname, value in self.headers if hname == key]

    def __repr__(self):
        if self.is_request:
            return f"<SipMessage {self.method} {self.uri} call-id={self.call_id!r}>"
        return f"<SipMessage {self.status} {self.reason} call-id={self.call_id!r}>"


cdef Py_ssize_t find_head_end(const unsigned char* p, Py_ssize_t start, Py_ssize_t n,
                              Py_ssize_t* body_start) noexcept nogil:
    """Position of the '\\n' that ends the last header line (first \\n\\r?\\n), or -1."""
    cdef const unsigned char* q
    cdef Py_ssize_t i = start
    while i < n:
        q = <const unsigned char*>memchr(p + i, 10, n - i)
        if q == NULL:
            return -1
        i = q - p
        if i + 1 < n and p[i + 1] == 10:
            body_start[0] = i + 2
            return i
        if i + 2 < n and p[i + 1] == 13 and p[i + 2] == 10:
            body_start[0] = i + 3
            return i
        i += 1
    return -1


cdef class _Lines:
    """Iterates over the logical (unfolded) lines of a header block, as the reference's
    ``[ \\t]*\\r?\\n[ \\t]+ -> SP`` then ``\\r?\\n`` split does."""

    cdef const unsigned char* p
    cdef Py_ssize_t pos, end
    cdef bytes folded   # keeps a joined line alive
    cdef const unsigned char* ls
    cdef Py_ssize_t ln

    cdef int next(self) except -2:
        """1 with (ls, ln) set, 0 at the end."""
        cdef Py_ssize_t s, e, ce, nxt
        cdef const unsigned char* q
        cdef bytearray acc
        if self.pos >= self.end:
            return 0
        s = self.pos
        q = <const unsigned char*>memchr(self.p + s, 10, self.end - s)
        e = (q - self.p) if q != NULL else self.end
        nxt = e + 1
        if nxt >= self.end or not is_ws(self.p[nxt]):
            # the common case: no continuation
            ce = e
            if ce > s and q != NULL and self.p[ce - 1] == 13:
                ce -= 1
            self.ls = self.p + s
            self.ln = ce - s
            self.pos = nxt
            return 1
        acc = bytearray()
        first = True
        while True:
            q = <const unsigned char*>memchr(self.p + s, 10, self.end - s)
            e = (q - self.p) if q != NULL else self.end
            ce = e
            if ce > s and q != NULL and self.p[ce - 1] == 13:
                ce -= 1
            if not first:
                s = skip_ws(self.p, s, ce)
            nxt = e + 1
            cont = nxt < self.end and is_ws(self.p[nxt])
            if cont:
                while ce > s and is_ws(self.p[ce - 1]):
                    ce -= 1
            if not first:
                acc += b" "
            acc += PyBytes_FromStringAndSize(<const char*>self.p + s, ce - s)
            first = False
            s = nxt
            if not cont:
                break
        self.folded = bytes(acc)
        self.ls = <const unsigned char*>PyBytes_AS_STRING(self.folded)
        self.ln = PyBytes_GET_SIZE(self.folded)
        self.pos = s
        return 1


cdef inline _Lines _lines(const unsigned char* p, Py_ssize_t s, Py_ssize_t e):
    cdef _Lines it = _Lines.__new__(_Lines)
    it.p = p
    it.pos = s
    it.end = e
    return it


def parse_message(data, *, bint datagram=True):
    """Parses one SIP message; see callguard.sip.message.parse_message."""
    cdef bytes b = data if type(data) is bytes else bytes(data)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(b)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    cdef Py_ssize_t start = 0
    cdef bint is_request
    while start < n and (p[start] == 13 or p[start] == 10):
        start += 1
    if start >= n:
        raise SipError(0, "Empty", "no message")
    is_request = not (n - start >= 4 and (p[start] | 32) == 115 and (p[start + 1] | 32) == 105
                      and (p[start + 2] | 32) == 112 and p[start + 3] == 47)
    try:
        return _parse(b, p, n, start, is_request, datagram)
    except SipError as exc:
        if is_request:
            raise
        raise SipError(0, exc.reason, exc.detail) from None


cdef SipMessage _parse(bytes b, const unsigned char* p, Py_ssize_t n, Py_ssize_t start, bint is_request,
                       bint datagram):
    cdef Py_ssize_t head_nl, head_end, body_start = 0, eol, le, i, sp1, sp2, nsp, k
    cdef const unsigned char* q
    cdef SipMessage msg = SipMessage.__new__(SipMessage)
    head_nl = find_head_end(p, start, n, &body_start)
    if head_nl >= 0:
        head_end = head_nl + 1
    elif datagram and p[n - 1] == 10:
        head_end = n
        body_start = n
    else:
        raise _bad("no empty line after the headers")
    q = <const unsigned char*>memchr(p + start, 10, n - start)
    eol = q - p
    le = eol
    if le > start and p[le - 1] == 13:
        le -= 1
    for i in range(start, le):
        if p[i] == 13:
            raise _bad("CR inside the start line")
    if is_request:
        sp1 = -1
        sp2 = -1
        nsp = 0
        for i in range(start, le):
            if p[i] == 32:
                nsp += 1
                if nsp == 1:
                    sp1 = i
                elif nsp == 2:
                    sp2 = i
        if nsp != 2 or sp1 == start or sp2 == sp1 + 1 or sp2 == le - 1:
            raise _bad("malformed request line")
        for i in range(start, sp1):
            if not TOKEN[p[i]]:
                raise _bad("malformed method")
        if not (le - sp2 - 1 == 7 and (p[sp2 + 1] | 32) == 115 and (p[sp2 + 2] | 32) == 105
                and (p[sp2 + 3] | 32) == 112 and p[sp2 + 4] == 47 and p[sp2 + 5] == 50 and p[sp2 + 6] == 46
                and p[sp2 + 7] == 48):
            if _is_version(p + sp2 + 1, le - sp2 - 1):
                raise SipError(505, "Version Not Supported", _dec(p + sp2 + 1, le - sp2 - 1))
            raise _bad("malformed SIP version")
        for i in range(sp1 + 1, sp2):
            if bad_request_uri_char(p[i]):
                raise _bad("invalid character in Request-URI")
        msg.method = PyUnicode_DecodeASCII(<const char*>p + start, sp1 - start, NULL)
        msg.uri = PyUnicode_DecodeASCII(<const char*>p + sp1 + 1, sp2 - sp1 - 1, NULL)
        if check_request_uri(p + sp1 + 1, sp2 - sp1 - 1) < 0:
            raise _bad("malformed Request-URI")
        msg.status = 0
        msg.reason = ""
    else:
        q = <const unsigned char*>memchr(p + start, 32, le - start)
        sp1 = (q - p) if q != NULL else le
        if not (sp1 - start == 7 and p[start + 4] == 50 and p[start + 5] == 46 and p[start + 6] == 48):
            raise SipError(0, "Version Not Supported", "response version")
        if sp1 >= le:
            raise _bad("malformed status code")
        q = <const unsigned char*>memchr(p + sp1 + 1, 32, le - sp1 - 1) if sp1 + 1 < le else NULL
        sp2 = (q - p) if q != NULL else le
        if sp2 - sp1 - 1 != 3:
            raise _bad("malformed status code")
        k = 0
        for i in range(sp1 + 1, sp2):
            if p[i] < 48 or p[i] > 57:
                raise _bad("malformed status code")
            k = k * 10 + (p[i] - 48)
        if k < 100 or k > 699:
            raise _bad("malformed status code")
        msg.method = ""
        msg.uri = ""
        msg.status = <int>k
        msg.reason = _dec(p + sp2 + 1, le - sp2 - 1) if sp2 < le else ""
    msg.is_request = is_request

    if eol + 1 < head_end and is_ws(p[eol + 1]):
        raise _bad("folded start line")
    _fill(msg, p, eol + 1, head_end)

    cdef Py_ssize_t avail = n - body_start, end
    cdef object cl = msg.content_length
    if cl is None:
        if not datagram:
            raise _bad("missing Content-Length on a stream")
        end = n
    else:
        if <long long>cl > avail:
            raise _bad("Content-Length larger than the message")
        end = body_start + <Py_ssize_t>cl
    msg.body = b[body_start:end]
    msg.raw = b[start:end] if (start or end != n) else b
    return msg


cdef bint _is_version(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """SIP/1*DIGIT.1*DIGIT (case-insensitive 'SIP')."""
    cdef Py_ssize_t i = 4, d
    if n < 7 or (s[0] | 32) != 115 or (s[1] | 32) != 105 or (s[2] | 32) != 112 or s[3] != 47:
        return False
    d = i
    while i < n and 48 <= s[i] <= 57:
        i += 1
    if i == d or i >= n or s[i] != 46:
        return False
    i += 1
    d = i
    while i < n and 48 <= s[i] <= 57:
        i += 1
    return i == n and i > d


cdef str _name_of(const unsigned char* s, Py_ssize_t n):
    key = PyBytes_FromStringAndSize(<const char*>s, n)
    name = NAME_CACHE.get(key)
    if name is None:
        name = canonical_name_c(PyUnicode_DecodeASCII(<const char*>s, n, NULL))
        if len(NAME_CACHE) < 4096:  # bounded: header names are attacker-chosen
            NAME_CACHE[key] = name
    return name


cdef int _check_list(const unsigned char* v, Py_ssize_t vn, list vias) except -1:
    """Checks each comma-separated element of a Via value (``vias``: appended there) or,
    with ``vias`` None, of a Contact value."""
    cdef Py_ssize_t i = 0, c, a, z
    while True:
        c = next_comma(v, i, vn)
        if c < 0:
            raise _bad("unterminated quote or <")
        a = skip_ws(v, i, c)
        z = c
        while z > a and is_ws(v[z - 1]):
            z -= 1
        if vias is not None:
            if check_via(v + a, z - a) < 0:
                raise _bad("malformed Via")
            vias.append(_dec(v + a, z - a))
        elif parse_addr(v + a, z - a, NULL, NULL) < 0:
            raise _bad("malformed Contact")
        if c >= vn:
            return 0
        i = c + 1


cdef object _tag_of(bytes value, str problem):
    """The tag of a From or To value, None without one; SipError(400, problem) when malformed."""
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(value)
    cdef Py_ssize_t tag_s = -2, tag_e = -2
    if parse_addr(s, PyBytes_GET_SIZE(value), &tag_s, &tag_e) < 0:
        raise _bad(problem)
    return _dec(s + tag_s, tag_e - tag_s) if tag_s >= 0 else None


cdef bint _ctl_quoted(const unsigned char* v, Py_ssize_t n) noexcept:
    """message._ctl_quoted: whether every control octet follows a backslash (a quoted-pair)."""
    cdef Py_ssize_t i
    for i in range(n):
        if (v[i] < 32 and v[i] != 9) or v[i] == 127:
            if i == 0 or v[i - 1] != 92:
                return False
    return True


cdef void _fill(SipMessage msg, const unsigned char* p, Py_ssize_t bs, Py_ssize_t be) except *:
    cdef _Lines it = _lines(p, bs, be)
    cdef const unsigned char* s
    cdef const unsigned char* v
    cdef const unsigned char* q
    cdef Py_ssize_t n, colon, ne, vs, ve, vn, i, c, a
    cdef bint ctl
    cdef long long num
    cdef list headers = []
    cdef list vias = []
    cdef str name, value
    cdef bytes fv = None, tv = None, cidv = None, cseqv = None, mfv = None, clv = None
    while it.next():
        s = it.ls
        n = it.ln
        ctl = False
        for i in range(n):
            if s[i] < 32 or s[i] == 127:
                if s[i] == 13:
                    raise _bad("CR inside a header line")
                if s[i] != 9:
                    ctl = True
        q = <const unsigned char*>memchr(s, 58, n) if n > 0 else NULL
        if q == NULL or q == s:
            raise _bad("header line without a name")
        colon = q - s
        ne = colon
        while ne > 0 and is_ws(s[ne - 1]):
            ne -= 1
        if ne == 0:
            raise _bad("empty header name")
        for i in range(ne):
            if not TOKEN[s[i]]:
                raise _bad("invalid header name")
        vs = colon + 1
        ve = n
        while vs < ve and is_ws(s[vs]):
            vs += 1
        while ve > vs and is_ws(s[ve - 1]):
            ve -= 1
        v = s + vs
        vn = ve - vs
        if ctl and not _ctl_quoted(v, vn):
            raise _bad("control character in a header value")
        name = _name_of(s, ne)
        value = _dec(v, vn)
        headers.append((name, value))
        if name == H_VIA:
            _check_list(v, vn, vias)
        elif name == H_CONTACT:
            if not (vn == 1 and v[0] == 42):
                _check_list(v, vn, None)
        elif name == H_FROM or name == H_TO or name == H_CALLID or name == H_CSEQ or name == H_MF \
                or name == H_CL:
            raw = PyBytes_FromStringAndSize(<const char*>v, vn)
            if name == H_FROM:
                if fv is not None:
                    raise _bad("more than one from")
                fv = raw
                msg.from_value = value
            elif name == H_TO:
                if tv is not None:
                    raise _bad("more than one to")
                tv = raw
                msg.to_value = value
            elif name == H_CALLID:
                if cidv is not None:
                    raise _bad("more than one call-id")
                cidv = raw
                msg.call_id = value
            elif name == H_CSEQ:
                if cseqv is not None:
                    raise _bad("more than one cseq")
                cseqv = raw
            elif name == H_MF:
                if mfv is not None:
                    raise _bad("more than one max-forwards")
                mfv = raw
            else:
                if clv is not None:
                    raise _bad("more than one content-length")
                clv = raw
    if fv is None or tv is None or cidv is None or cseqv is None:
        raise _bad("missing from, to, call-id or cseq")
    if not vias:
        raise _bad("missing via")
    msg.headers = headers
    msg.vias = vias

    msg.from_tag = _tag_of(fv, "malformed From")
    msg.to_tag = _tag_of(tv, "malformed To")

    s = <const unsigned char*>PyBytes_AS_STRING(cidv)
    n = PyBytes_GET_SIZE(cidv)
    if n == 0:
        raise _bad("malformed Call-ID")
    for i in range(n):
        if is_ws(s[i]):
            raise _bad("malformed Call-ID")

    s = <const unsigned char*>PyBytes_AS_STRING(cseqv)
    n = PyBytes_GET_SIZE(cseqv)
    i = 0
    while i < n and 48 <= s[i] <= 57:
        i += 1
    c = skip_ws(s, i, n)
    if i == 0 or c == i:
        raise _bad("malformed CSeq")
    num = parse_digits(s, i)
    if num > MAX_CSEQ:
        raise _bad("CSeq number too large")
    if c >= n:
        raise _bad("malformed CSeq method")
    for a in range(c, n):
        if not TOKEN[s[a]]:
            raise _bad("malformed CSeq method")
    msg.cseq = num
    msg.cseq_method = PyUnicode_DecodeASCII(<const char*>s + c, n - c, NULL)
    if msg.is_request and msg.cseq_method != msg.method and msg.method in KNOWN_METHODS:
        raise _bad("CSeq method does not match the request line")

    if mfv is None:
        msg.max_forwards = None
    else:
        num = parse_digits(<const unsigned char*>PyBytes_AS_STRING(mfv), PyBytes_GET_SIZE(mfv))
        if num < 0:
            raise _bad("malformed Max-Forwards")
        msg.max_forwards = <int>(num if num < 255 else 255)
    if clv is None:
        msg.content_length = None
    else:
        s = <const unsigned char*>PyBytes_AS_STRING(clv)
        n = PyBytes_GET_SIZE(clv)
        if n > 0 and s[0] == 45:
            raise _bad("negative Content-Length")
        num = parse_digits(s, n)
        if num < 0:
            raise _bad("malformed Content-Length")
        msg.content_length = num


def frame_stream(bytearray buf, Py_ssize_t max_size):
    """Pops one complete message from the front of a stream buffer; see message.frame_stream."""
    cdef Py_ssize_t n = len(buf), start = 0, head_nl, body_start = 0, ne, vs, ve, total, colon
    cdef long long cl = -1, v
    cdef const unsigned char* p
    cdef const unsigned char* s
    cdef const unsigned char* q
    cdef _Lines it
    p = <const unsigned char*>(<char*>buf)
    while start < n and (p[start] == 13 or p[start] == 10):
        start += 1
    if start:
        del buf[:start]
        n = len(buf)
    p = <const unsigned char*>(<char*>buf)
    head_nl = find_head_end(p, 0, n, &body_start)
    if head_nl < 0:
        if n > max_size:
            raise SipError(513, "Message Too Large", "headers larger than the limit")
        return None
    it = _lines(p, 0, head_nl + 1)
    first = True
    while it.next():
        if first:
            first = False
            continue
        s = it.ls
        q = <const unsigned char*>memchr(s, 58, it.ln) if it.ln > 0 else NULL
        if q == NULL or q == s:
            continue
        colon = q - s
        ne = colon
        while ne > 0 and is_ws(s[ne - 1]):
            ne -= 1
        if not ((ne == 1 and (s[0] | 32) == 108) or (ne == 14 and _ieq(s, b"content-length", 14))):
            continue
        if cl >= 0:
            raise _bad("more than one Content-Length")
        vs = colon + 1
        ve = it.ln
        while vs < ve and is_ws(s[vs]):
            vs += 1
        while ve > vs and is_ws(s[ve - 1]):
            ve -= 1
        v = parse_digits(s + vs, ve - vs)
        if v < 0 or ve - vs > 10:
            raise _bad("malformed Content-Length")
        cl = v
    if cl < 0:
        raise _bad("missing Content-Length on a stream")
    total = body_start + <Py_ssize_t>cl
    if total > max_size:
        raise SipError(513, "Message Too Large", f"{total} octets")
    if n < total:
        return None
    out = bytes(buf[:total])
    del buf[:total]
    return out


cdef bint _ieq(const unsigned char* s, const char* lower, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n):
        c = s[i]
        if 65 <= c <= 90:
            c += 32
        if c != <unsigned char>lower[i]:
            return False
    return True


# --------------------------------------------------------------------------- batched UDP I/O
# (the socket declarations and the recvmmsg/sendmmsg loops come from _udpio, shared with the fast path)

from libc.stdlib cimport free, malloc
from libc.string cimport strlen

from callguard.sip._udpio cimport (
    AF_INET, AF_INET6, alloc_vectors, batch_family, free_vectors, inet_ntop, iovec, is_keepalive, mmsghdr, ntohl, ntohs,
    recv_batch, send_batch, sockaddr_in, sockaddr_in6, sockaddr_storage,
)


cdef object _addr_tuple(sockaddr_storage* ss):
    cdef char host[64]
    cdef sockaddr_in* a4
    cdef sockaddr_in6* a6
    if ss.ss_family == AF_INET:
        a4 = <sockaddr_in*>ss
        inet_ntop(AF_INET, &a4.sin_addr, host, sizeof(host))
        return (host[:strlen(host)].decode("ascii"), ntohs(a4.sin_port))
    if ss.ss_family == AF_INET6:
        a6 = <sockaddr_in6*>ss
        inet_ntop(AF_INET6, &a6.sin6_addr, host, sizeof(host))
        return (host[:strlen(host)].decode("ascii"), ntohs(a6.sin6_port), ntohl(a6.sin6_flowinfo),
                a6.sin6_scope_id)
    return ("", 0)


cdef class UdpBatch:
    """Batched datagram I/O on a bound non-blocking UDP socket (recvmmsg/sendmmsg).

    ``recv`` drops what needs no answer at all (empty datagrams and CRLF
    keep-alives, RFC 5626 4.4.1) and returns every other datagram with its source
    address, in the form ``socket.recvfrom`` uses: ``(host, port)`` for IPv4,
    ``(host, port, flowinfo, scope_id)`` for IPv6.  The socket stays owned by the
    caller; the object only borrows its file descriptor.
    """

    cdef int fd
    cdef int family
    cdef unsigned int capacity
    cdef size_t bufsize
    cdef char* bufs
    cdef mmsghdr* msgs
    cdef iovec* iovs
    cdef sockaddr_storage* addrs
    cdef readonly unsigned long long dropped_keepalives

    def __cinit__(self, int fd, unsigned int capacity=64, size_t bufsize=65535):
        self.family = batch_family(fd, capacity, bufsize)
        self.fd = fd
        self.capacity = capacity
        self.bufsize = bufsize
        self.bufs = <char*>malloc(capacity * bufsize)
        alloc_vectors(capacity, &self.msgs, &self.iovs, &self.addrs)
        if self.bufs == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.bufs)
        free_vectors(self.msgs, self.iovs, self.addrs)

    @property
    def fileno(self) -> int:
        """The borrowed file descriptor."""
        return self.fd

    def recv(self, unsigned int max_batch=64):
        """Up to ``max_batch`` datagrams waiting on the socket, [] when none; raises OSError."""
        cdef unsigned int i, count = max_batch if max_batch < self.capacity else self.capacity
        cdef int got
        cdef unsigned int length
        cdef const unsigned char* p
        cdef list out = []
        if count == 0:
            return out
        got = recv_batch(self.fd, self.msgs, self.iovs, self.addrs, self.bufs, self.bufsize, count)
        for i in range(<unsigned int>got):
            length = self.msgs[i].msg_len
            p = <const unsigned char*>(self.bufs + i * self.bufsize)
            if is_keepalive(p, length):
                self.dropped_keepalives += 1
                continue
            out.append((PyBytes_FromStringAndSize(<const char*>p, length), _addr_tuple(&self.addrs[i])))
        return out

    def send_many(self, list items):
        """Sends ``[(data, addr), ...]`` with as few system calls as possible.

        Returns how many were sent: fewer than given only when the socket buffer is
        full (EAGAIN); the caller decides whether to retry the rest.  Raises
        ValueError for a bad address, OSError for other failures.
        """
        return send_batch(self.fd, self.family, items, self.capacity, self.msgs, self.iovs, self.addrs)
