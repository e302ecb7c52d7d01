# The compiled forward path of the fast path (included by _fastpath.pyx).
#
# An INVITE the core allowed is forwarded here when its first usable trunk is reached over UDP
# through the listener it came in on: 100 Trying and the forwarded INVITE are built from the
# scan's offsets, byte for byte as Proxy._response / Proxy._forward_head / Proxy._assemble write
# them, and the transaction is a FwdTx (the same fields as proxy.Tx) in the proxy's own tables.
# A trunk's response to such a transaction (top Via ours, every line within the strict grammar)
# is handled here too: 1xx relayed, a non-2xx final ACKed and relayed, a 2xx relayed, each as
# Proxy._on_response does it.  Whatever needs a decision of the Python path -- failover on 503,
# a CANCEL waiting for a provisional, a late answer of an older attempt, an unknown branch,
# keepalive answers, anything the scan is unsure of -- goes to Proxy.handle unchanged; timers,
# CANCEL and failover run in Python on the FwdTx, whose parsed message is made when first asked for.

cimport cython
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.string cimport memcmp

from callguard.sip._sipscan cimport next_comma
from callguard.sip._udpio cimport fill_addr

from callguard.sip import message as _sipmsg

cdef extern from *:
    """
    /* BLAKE2b (RFC 7693), unkeyed, streaming: the digests of Proxy's _h (hashlib.blake2b, digest_size=6). */
    #include <stdint.h>
    typedef struct { uint64_t h[8]; uint64_t t; size_t n; unsigned char buf[128]; } cg_b2b;
    static const uint64_t cg_b2b_iv[8] = {
        0x6A09E667F3BCC908ULL, 0xBB67AE8584CAA73BULL, 0x3C6EF372FE94F82BULL, 0xA54FF53A5F1D36F1ULL,
        0x510E527FADE682D1ULL, 0x9B05688C2B3E6C1FULL, 0x1F83D9ABFB41BD6BULL, 0x5BE0CD19137E2179ULL};
    static const unsigned char cg_b2b_sigma[12][16] = {
        {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
        {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
        {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
        {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
        {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
        {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
        {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
        {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
        {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
        {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
        {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
        {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};
    #define CG_ROTR64(x, y) (((x) >> (y)) ^ ((x) << (64 - (y))))
    #define CG_G(a, b, c, d, x, y) do { \
        v[a] = v[a] + v[b] + (x); v[d] = CG_ROTR64(v[d] ^ v[a], 32); \
        v[c] = v[c] + v[d]; v[b] = CG_ROTR64(v[b] ^ v[c], 24); \
        v[a] = v[a] + v[b] + (y); v[d] = CG_ROTR64(v[d] ^ v[a], 16); \
        v[c] = v[c] + v[d]; v[b] = CG_ROTR64(v[b] ^ v[c], 63); } while (0)
    static void cg_b2b_compress(cg_b2b* s, int last) {
        uint64_t v[16], m[16];
        int i, k;
        for (i = 0; i < 8; i++) { v[i] = s->h[i]; v[i + 8] = cg_b2b_iv[i]; }
        v[12] ^= s->t;
        if (last) v[14] = ~v[14];
        for (i = 0; i < 16; i++) {
            uint64_t w = 0;
            for (k = 7; k >= 0; k--) w = (w << 8) | s->buf[8 * i + k];
            m[i] = w;
        }
        for (i = 0; i < 12; i++) {
            const unsigned char* z = cg_b2b_sigma[i];
            CG_G(0, 4, 8, 12, m[z[0]], m[z[1]]);
            CG_G(1, 5, 9, 13, m[z[2]], m[z[3]]);
            CG_G(2, 6, 10, 14, m[z[4]], m[z[5]]);
            CG_G(3, 7, 11, 15, m[z[6]], m[z[7]]);
            CG_G(0, 5, 10, 15, m[z[8]], m[z[9]]);
            CG_G(1, 6, 11, 12, m[z[10]], m[z[11]]);
            CG_G(2, 7, 8, 13, m[z[12]], m[z[13]]);
            CG_G(3, 4, 9, 14, m[z[14]], m[z[15]]);
        }
        for (i = 0; i < 8; i++) s->h[i] ^= v[i] ^ v[i + 8];
    }
    static void cg_b2b_init(cg_b2b* s, int outlen) {
        int i;
        for (i = 0; i < 8; i++) s->h[i] = cg_b2b_iv[i];
        s->h[0] ^= 0x01010000ULL ^ (uint64_t)outlen;
        s->t = 0;
        s->n = 0;
    }
    static void cg_b2b_update(cg_b2b* s, const void* data, size_t len) {
        const unsigned char* p = (const unsigned char*)data;
        while (len > 0) {
            size_t k;
            if (s->n == 128) { s->t += 128; cg_b2b_compress(s, 0); s->n = 0; }
            k = 128 - s->n;
            if (k > len) k = len;
            memcpy(s->buf + s->n, p, k);
            s->n += k; p += k; len -= k;
        }
    }
    /* finishes the digest; writes 2 * outlen lower-case hex digits */
    static void cg_b2b_hex(cg_b2b* s, int outlen, char* out) {
        static const char hexd[] = "0123456789abcdef";
        int i;
        s->t += s->n;
        memset(s->buf + s->n, 0, 128 - s->n);
        cg_b2b_compress(s, 1);
        for (i = 0; i < outlen; i++) {
            unsigned char b = (unsigned char)(s->h[i / 8] >> (8 * (i % 8)));
            out[2 * i] = hexd[b >> 4];
            out[2 * i + 1] = hexd[b & 15];
        }
    }
    """
    ctypedef struct cg_b2b:
        pass
    void cg_b2b_init(cg_b2b* s, int outlen) noexcept nogil
    void cg_b2b_update(cg_b2b* s, const void* data, size_t n) noexcept nogil
    void cg_b2b_hex(cg_b2b* s, int outlen, char* out) noexcept nogil


# Constants of proxy.py the compiled path needs (the tests check that they agree).
T1 = 0.5
K_RETRANS = 0
K_TRUNK = 1
K_TIMER_C = 2
cdef double _T1 = 0.5
cdef double _TX_LINGER = 32.0
cdef double _T4 = 5.0
cdef enum:
    MAX_CANON_EXC = 32


def blake2b_hex6(bytes data) -> str:
    """``hashlib.blake2b(data, digest_size=6).hexdigest()`` by the compiled BLAKE2b (for the tests)."""
    cdef cg_b2b st
    cdef char out[12]
    cg_b2b_init(&st, 6)
    cg_b2b_update(&st, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
    cg_b2b_hex(&st, 6, out)
    return PyUnicode_DecodeASCII(out, 12, NULL)


cdef inline void _b2b_part(cg_b2b* st, const unsigned char* s, Py_ssize_t n, bint sep) noexcept nogil:
    """One part of Proxy._h: the parts are joined with NUL."""
    if sep:
        cg_b2b_update(st, b"\x00", 1)
    if n > 0:
        cg_b2b_update(st, s, n)


cdef inline void _b2b_lower(cg_b2b* st, const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """A part in lower case (the sent-by of the transaction key)."""
    cdef unsigned char chunk[64]
    cdef Py_ssize_t k, m
    cg_b2b_update(st, b"\x00", 1)
    while n > 0:
        m = n if n < 64 else 64
        for k in range(m):
            chunk[k] = s[k] + 32 if 65 <= s[k] <= 90 else s[k]
        cg_b2b_update(st, chunk, m)
        s += m
        n -= m


cdef inline Py_ssize_t _utoa(char* o, unsigned long v) noexcept nogil:
    """The decimal digits of v at o; returns how many."""
    cdef char tmp[24]
    cdef Py_ssize_t k = 0, m
    if v == 0:
        o[0] = 48
        return 1
    while v:
        tmp[k] = <char>(48 + v % 10)
        v //= 10
        k += 1
    for m in range(k):
        o[m] = tmp[k - 1 - m]
    return k


cdef inline Py_ssize_t _head_end(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Where the body starts (after the first empty line); the scans made sure there is one."""
    cdef const unsigned char* q = <const unsigned char*>memmem(p, n, b"\r\n\r\n", 4)
    return (q - p) + 4 if q != NULL else n


cdef inline void _count(dict counts, object key) except *:
    n = counts.get(key)
    counts[key] = 1 if n is None else n + 1


cdef char* _stamp_top_via(char* o, const unsigned char* p, Scan* sc, const char* ip, Py_ssize_t iplen,
                          int port) noexcept nogil:
    """The caller's top Via as Proxy._stamp_via writes it (RFC 3261 received, RFC 3581 rport).

    The scan left the Via's parameters without white space, so the proxy's regular expressions
    come down to looking at each ';'-separated parameter's name.
    """
    cdef Py_ssize_t vs = sc.via_s[0], ve = sc.via_e[0], i, ns, ne, j, hs, he
    cdef bint rport_bare = False, rport_value = False, eq
    # The Via parameter by parameter: a received the sender wrote is left out (ours replaces
    # it), the first bare rport gets the source port.
    o = _put(o, <const char*>p + vs, sc.sent_e - vs)
    i = sc.sent_e
    while i < ve:
        ns = i + 1
        j = ns
        while j < ve and p[j] != 61 and p[j] != 59:
            j += 1
        ne = j
        eq = j < ve and p[j] == 61
        if eq:
            while j < ve and p[j] != 59:
                j += 1
        if eq and _name_is(p + ns, ne - ns, "received", 8):
            pass
        elif _name_is(p + ns, ne - ns, "rport", 5) and not eq and not rport_bare:
            rport_bare = True
            o = _put(o, b";rport=", 7)
            o += _utoa(o, <unsigned long>port)
        else:
            if _name_is(p + ns, ne - ns, "rport", 5):
                rport_value = True
            o = _put(o, <const char*>p + i, j - i)
        i = j
    if not rport_bare:
        if not rport_value:
            hs = sc.sent_s
            he = sc.sent_e
            if p[hs] == 91:
                hs += 1
                j = hs
                while j < he and p[j] != 93:
                    j += 1
                he = j if j < he else he - 1
            else:
                j = hs
                while j < he and p[j] != 58:
                    j += 1
                he = j
            if he - hs == iplen and memcmp(p + hs, ip, iplen) == 0:
                return o
    o = _put(o, b";received=", 10)
    return _put(o, ip, iplen)


cdef bytes _trying(FastPath fp, const unsigned char* p, Scan* sc):
    """100 Trying as Proxy._response(msg, 100, "Trying") writes it."""
    cdef bytes tail = fp.server_tail
    cdef Py_ssize_t size, k
    cdef char* o
    cdef bytes out
    size = 20 + PyBytes_GET_SIZE(tail) + (sc.from_e - sc.from_s) + (sc.to_e - sc.to_s) + (sc.cid_e - sc.cid_s) \
        + (sc.cseq_e - sc.cseq_s) + 6 + 6 + 11 + 8 + 9
    for k in range(sc.nvia):
        size += 7 + sc.via_e[k] - sc.via_s[k]
    out = PyBytes_FromStringAndSize(NULL, size)
    o = PyBytes_AS_STRING(out)
    o = _put(o, b"SIP/2.0 100 Trying\r\n", 20)
    for k in range(sc.nvia):
        o = _put(o, b"Via: ", 5)
        o = _put(o, <const char*>p + sc.via_s[k], sc.via_e[k] - sc.via_s[k])
        o = _put(o, b"\r\n", 2)
    o = _put(o, b"From: ", 6)
    o = _put(o, <const char*>p + sc.from_s, sc.from_e - sc.from_s)
    o = _put(o, b"\r\nTo: ", 6)
    o = _put(o, <const char*>p + sc.to_s, sc.to_e - sc.to_s)
    o = _put(o, b"\r\nCall-ID: ", 11)
    o = _put(o, <const char*>p + sc.cid_s, sc.cid_e - sc.cid_s)
    o = _put(o, b"\r\nCSeq: ", 8)
    o = _put(o, <const char*>p + sc.cseq_s, sc.cseq_e - sc.cseq_s)
    o = _put(o, b" INVITE\r\n", 9)
    _put(o, PyBytes_AS_STRING(tail), PyBytes_GET_SIZE(tail))
    return out


# ---------------------------------------------------------------- a forwarded INVITE's transaction
@cython.no_gc
@cython.final
cdef class FwdTx:
    """A forwarded INVITE's transaction made by the compiled path, with the fields of ``proxy.Tx``.

    The parsed request (``msg``), the head the Python path forwards from (``out_head``), the To
    tag of our own finals (``to_tag``) and the list of branches are made when first asked for.
    Not tracked by the garbage collector: nothing it holds refers back to it.
    """

    cdef public object key, up_ep, up_addr, branch, out, dest_ep, dest_addr, trunk, candidates, last_resp
    cdef public object caller, callee, source, call_id
    cdef public bint is_invite, provisional, cancelled, expired_soon
    cdef public int attempt, final
    cdef public double interval, started
    cdef object _msg, _out_head, _to_tag, _branches, _branch0
    cdef bytes raw                  # the INVITE as received
    cdef bytes routes               # its "Route: ...\r\n" lines, for our ACK
    cdef Py_ssize_t uri_s, uri_e, from_s, from_e, cid_s, cid_e, cseq_s, cseq_e
    cdef sockaddr_storage up_ss     # up_addr as the socket gave it
    cdef socklen_t up_len

    @property
    def msg(self):
        if self._msg is None:
            self._msg = _sipmsg.parse_message(self.raw, datagram=True)
        return self._msg

    @property
    def out_head(self):
        return self._out_head

    @out_head.setter
    def out_head(self, value):
        self._out_head = value

    @property
    def to_tag(self):
        if self._to_tag is None:
            cseq = self.raw[self.cseq_s:self.cseq_e].decode("ascii")
            self._to_tag = "cg" + blake2b_hex6("\x00".join((self.call_id, cseq, str(self.key))).encode(
                "utf-8", "surrogateescape"))
        return self._to_tag

    @to_tag.setter
    def to_tag(self, value):
        self._to_tag = value

    @property
    def branches(self):
        if self._branches is None:
            self._branches = [self._branch0]
        return self._branches


# ---------------------------------------------------------------- the strict scan of a response
cdef struct Resp:
    int code
    Py_ssize_t line_e               # end of the status line (its CR)
    int nvia
    Py_ssize_t via_s[MAX_VIAS]
    Py_ssize_t via_e[MAX_VIAS]
    Py_ssize_t head_s               # the first header line
    Py_ssize_t body, blen
    Py_ssize_t to_s, to_e
    Py_ssize_t cm_s, cm_e           # the CSeq method


cdef int _scan_response(const unsigned char* p, Py_ssize_t n, Resp* r) noexcept nogil:
    """A response within the strict grammar, which the parser accepts too: 0, else -1 (the Python path).

    "SIP/2.0 <code> <reason>", the request scan's rules for header lines (CRLF, no folding, long
    names, printable ASCII), at most MAX_VIAS Vias, and the parser's checks of Via, From, To, Call-ID,
    CSeq, Max-Forwards, Content-Length and Contact.
    """
    cdef Py_ssize_t i, le, vs, ve, body, k, c, a, z, cl = -1
    cdef const unsigned char* q
    cdef int hid
    cdef bint seen_from = False, seen_cid = False, seen_cseq = False, seen_mf = False
    cdef long long num
    if n < 16 or p[0] != 83 or p[1] != 73 or p[2] != 80 or p[3] != 47 or p[4] != 50 or p[5] != 46 \
            or p[6] != 48 or p[7] != 32 or p[11] != 32:
        return -1
    r.code = 0
    for k in range(8, 11):
        if p[k] < 48 or p[k] > 57:
            return -1
        r.code = r.code * 10 + (p[k] - 48)
    if r.code < 100 or r.code > 699:
        return -1
    q = <const unsigned char*>memmem(p, n, b"\r\n\r\n", 4)
    if q == NULL:
        return -1
    body = (q - p) + 4
    i = 12
    while i < body and p[i] != 13:
        if not VALC[p[i]]:
            return -1
        i += 1
    if i + 1 >= body or p[i + 1] != 10:
        return -1
    r.line_e = i
    i += 2
    r.head_s = i
    r.nvia = 0
    r.to_s = -1
    r.cm_s = -1
    while i < body - 2:
        # the request scan's line rules (the head ends in CRLFCRLF: no empty line comes before it)
        hid = header_line(p, i, body, &le, &vs)
        if hid < 0:
            return -1
        ve = le
        i = le + 2
        if hid == H_VIA:
            # each comma-separated element, split and trimmed as the parser's _check_list does
            k = vs
            while True:
                c = next_comma(p, k, ve)
                if c < 0 or r.nvia >= MAX_VIAS:
                    return -1
                a = skip_ws(p, k, c)
                z = c
                while z > a and is_ws(p[z - 1]):
                    z -= 1
                if check_via(p + a, z - a) < 0:
                    return -1
                r.via_s[r.nvia] = a
                r.via_e[r.nvia] = z
                r.nvia += 1
                if c >= ve:
                    break
                k = c + 1
        elif hid == H_FROM:
            if seen_from or parse_addr(p + vs, ve - vs, NULL, NULL) < 0:
                return -1
            seen_from = True
        elif hid == H_TO:
            if r.to_s >= 0 or parse_addr(p + vs, ve - vs, NULL, NULL) < 0:
                return -1
            r.to_s = vs
            r.to_e = ve
        elif hid == H_CALLID:
            if seen_cid:
                return -1
            for k in range(vs, ve):
                if is_ws(p[k]):
                    return -1
            seen_cid = True
        elif hid == H_CSEQ:
            if seen_cseq:
                return -1
            seen_cseq = True
            k = vs
            while k < ve and 48 <= p[k] <= 57:
                k += 1
            if k == vs or k >= ve or not is_ws(p[k]) or parse_digits(p + vs, k - vs) > MAX_CSEQ:
                return -1
            r.cm_s = skip_ws(p, k, ve)
            r.cm_e = ve
            for k in range(r.cm_s, r.cm_e):
                if not TOKEN[p[k]]:
                    return -1
        elif hid == H_MF:
            if seen_mf or parse_digits(p + vs, ve - vs) < 0:
                return -1
            seen_mf = True
        elif hid == H_CL:
            if cl >= 0:
                return -1
            num = parse_digits(p + vs, ve - vs)
            if num < 0 or num > n - body:
                return -1
            cl = <Py_ssize_t>num
        elif hid == H_CONTACT:
            if not ((ve - vs == 1 and p[vs] == 42) or (memchr(p + vs, 44, ve - vs) == NULL
                                                       and parse_addr(p + vs, ve - vs, NULL, NULL) == 0)):
                return -1
        # other names (P-Asserted-Identity and Proxy-Require among them) are taken as they are
    if i != body - 2:
        return -1
    if r.nvia == 0 or not seen_from or r.to_s < 0 or not seen_cid or not seen_cseq:
        return -1
    r.body = body
    r.blen = cl if cl >= 0 else n - body
    return 0


# ---------------------------------------------------------------- forwarding state of one listener
cdef class Forwarder:
    """What the compiled forward path needs of the proxy, taken at start and at each reload."""

    cdef object proxy
    cdef object ep                  # the listener this fast path serves
    cdef dict ctx
    cdef object seq                 # the proxy's timer sequence (itertools.count)
    cdef object q_trunk, q_retrans, q_timer_c
    cdef double trunk_timeout, timer_c_first
    cdef LingerQueue tx_linger, branch_linger, tx_acked, branch_acked
    cdef list trunks                # TrunkState, as in proxy.trunks
    cdef list prefixes              # per trunk: tuple of (UTF-8 bytes, length in characters)
    cdef list all_trunks            # the candidates when no trunk has prefixes
    cdef bint any_prefix
    cdef list via_heads             # per trunk: b"Via: SIP/2.0/UDP <sent-by>;branch=z9hG4bKcg", None: Python path
    cdef list rr_lines              # per trunk: b"Record-Route: <sip:<sent-by>;lr>\r\n" or b""
    cdef sockaddr_storage* rt_ss
    cdef socklen_t* rt_len
    cdef bytes ua_line              # b"User-Agent: <ua>\r\n", as the proxy's own ACK writes it
    cdef list keep                  # the bytes the tables below point into
    cdef int nexc
    cdef Py_ssize_t exc_len[MAX_CANON_EXC]
    cdef const char* exc_lower[MAX_CANON_EXC]
    cdef const char* exc_canon[MAX_CANON_EXC]
    cdef char* obuf
    cdef Py_ssize_t obuf_size

    def __cinit__(self):
        self.rt_ss = NULL
        self.rt_len = NULL
        self.obuf = NULL

    def __dealloc__(self):
        free(self.rt_ss)
        free(self.rt_len)
        free(self.obuf)

    cdef int setup(self, int family, Py_ssize_t bufsize, object proxy, object ep, list routes, bytes ua_line,
                   list canon_exc, tuple queues, double trunk_timeout, double timer_c_first) except -1:
        cdef Py_ssize_t k, nt = len(routes)
        self.proxy = proxy
        self.ep = ep
        self.ctx = proxy.ctx
        self.seq = proxy._seq
        self.trunk_timeout = trunk_timeout
        self.timer_c_first = timer_c_first
        self.q_trunk, self.q_retrans, self.q_timer_c = queues
        self.tx_linger = proxy.tx_linger
        self.branch_linger = proxy.branch_linger
        self.tx_acked = proxy.tx_acked
        self.branch_acked = proxy.branch_acked
        self.ua_line = ua_line
        self.keep = []
        if len(canon_exc) > MAX_CANON_EXC:
            raise ValueError("too many header name spellings")
        self.nexc = 0
        for lower, spelled in canon_exc:
            if len(lower) != len(spelled):
                raise ValueError("a header name spelling of another length")
            self.keep.append(lower)
            self.keep.append(spelled)
            self.exc_len[self.nexc] = len(lower)
            self.exc_lower[self.nexc] = PyBytes_AS_STRING(lower)
            self.exc_canon[self.nexc] = PyBytes_AS_STRING(spelled)
            self.nexc += 1
        self.trunks = []
        self.prefixes = []
        self.via_heads = []
        self.rr_lines = []
        self.any_prefix = False
        self.rt_ss = <sockaddr_storage*>malloc((nt + 1) * sizeof(sockaddr_storage))
        self.rt_len = <socklen_t*>malloc((nt + 1) * sizeof(socklen_t))
        # Each header line may grow by one byte (": " after the name) and each Via element by "Via: "
        # and CRLF; the forwarded INVITE and the Route lines for our ACK share the buffer: 3n is ample.
        self.obuf_size = 3 * bufsize + 8192
        self.obuf = <char*>malloc(self.obuf_size)
        if self.rt_ss == NULL or self.rt_len == NULL or self.obuf == NULL:
            raise MemoryError()
        for k in range(nt):
            trunk, prefixes, via_head, rr, addr = routes[k]
            self.trunks.append(trunk)
            self.prefixes.append(tuple([(pr.encode("utf-8", "surrogateescape"), len(pr)) for pr in prefixes]))
            if prefixes:
                self.any_prefix = True
            self.rr_lines.append(rr)
            if via_head is not None:
                if len(via_head) > 1024 or len(rr) > 1024:
                    via_head = None
                else:
                    try:
                        fill_addr(family, addr, &self.rt_ss[k], &self.rt_len[k])
                    except ValueError:      # another family: the Python path sends it (or fails) as before
                        via_head = None
            self.via_heads.append(via_head)
        self.all_trunks = list(self.trunks)
        return 0

    cdef object _candidates(self, str callee, Py_ssize_t* pick):
        """Proxy._candidates(callee); pick[0]: index in self.trunks of the first one up (-1: none),
        pick[1]: its index among the candidates (the attempt)."""
        cdef Py_ssize_t k, m, best = -1, length = 0, plen
        cdef const char* s
        cdef list out, idx
        cdef tuple pref
        pick[0] = -1
        pick[1] = -1
        if not self.any_prefix:
            for k in range(len(self.trunks)):
                if self.trunks[k].up:
                    pick[0] = k
                    pick[1] = k
                    break
            return self.all_trunks
        s = PyUnicode_AsUTF8AndSize(callee, &length)
        out = []
        idx = []
        for k in range(len(self.trunks)):
            pref = <tuple>self.prefixes[k]
            if pref:
                m = -1
                for item in pref:
                    pb = <bytes>item[0]
                    plen = PyBytes_GET_SIZE(pb)
                    if plen <= length and memcmp(s, PyBytes_AS_STRING(pb), plen) == 0 and <Py_ssize_t>item[1] > m:
                        m = item[1]
            else:
                m = 0
            if m < 0:
                continue
            if m > best:
                best = m
                out = [self.trunks[k]]
                idx = [k]
            elif m == best:
                out.append(self.trunks[k])
                idx.append(k)
        for m in range(len(out)):
            if out[m].up:
                pick[0] = idx[m]
                pick[1] = m
                break
        return out

    cdef char* _canon(self, char* o, const unsigned char* s, Py_ssize_t n) noexcept nogil:
        """proxy.canon of a header name: its usual spelling, else capitalised between hyphens."""
        cdef Py_ssize_t k
        cdef int e
        cdef unsigned char c
        for e in range(self.nexc):
            if self.exc_len[e] == n and _name_is(s, n, self.exc_lower[e], n):
                return _put(o, self.exc_canon[e], n)
        for k in range(n):
            c = s[k]
            if k == 0 or s[k - 1] == 45:
                if 97 <= c <= 122:
                    c -= 32
            elif 65 <= c <= 90:
                c += 32
            o[k] = <char>c
        return o + n

    # ------------------------------------------------------------ an allowed INVITE
    cdef int forward(self, FastPath fp, object ep, const unsigned char* p, Py_ssize_t n, Scan* sc, unsigned int i,
                     TxTable stx, const TxKey* tk, object key, object call_id, object ip, int port, double mono,
                     double now) except -1:
        """Forward an allowed INVITE as Proxy._forward_invite does; 0: the Python path must (nothing done)."""
        cdef Py_ssize_t pick[2]
        cdef Py_ssize_t t, k, ls, le, colon, vs, ne, body, blen, ours, iplen
        cdef bytes via_head, rr, fwd, trying, ipb, routes
        cdef char* o
        cdef char* o0
        cdef char* rs
        cdef const unsigned char* q
        cdef char digits[24]
        cdef cg_b2b st
        cdef FwdTx tx
        cdef bint mf_seen = False, route_seen = False
        if ep is not self.ep:
            return 0
        cands = self._candidates(fp.core._ce_s, pick)
        t = pick[0]
        if t < 0:
            return 0                # no route, or every trunk down: the Python path answers
        via_head = <bytes>self.via_heads[t]
        if via_head is None:
            return 0
        rr = <bytes>self.rr_lines[t]
        if 3 * n + 4096 > self.obuf_size:
            return 0
        ipb = ip.encode("ascii")
        iplen = PyBytes_GET_SIZE(ipb)
        # Our Via line first, at the start of the buffer: its branch is
        # OUR_MARK + _h(branch, sent-by, attempt) + "." + _h(uri, call-id, cseq, from tag, to tag).
        o0 = self.obuf
        o = _put(o0, PyBytes_AS_STRING(via_head), PyBytes_GET_SIZE(via_head))
        cg_b2b_init(&st, 6)
        _b2b_part(&st, p + sc.br_s, sc.br_e - sc.br_s, False)
        _b2b_lower(&st, p + sc.sent_s, sc.sent_e - sc.sent_s)
        _b2b_part(&st, <const unsigned char*>digits, _utoa(digits, <unsigned long>pick[1]), True)
        cg_b2b_hex(&st, 6, o)
        o += 12
        o[0] = 46
        o += 1
        cg_b2b_init(&st, 6)
        _b2b_part(&st, p + sc.uri_s, sc.uri_e - sc.uri_s, False)
        _b2b_part(&st, p + sc.cid_s, sc.cid_e - sc.cid_s, True)
        _b2b_part(&st, p + sc.cseq_s, sc.cseq_e - sc.cseq_s, True)
        if sc.ftag_s >= 0:
            _b2b_part(&st, p + sc.ftag_s, sc.ftag_e - sc.ftag_s, True)
        else:
            _b2b_part(&st, p, 0, True)
        _b2b_part(&st, p, 0, True)
        cg_b2b_hex(&st, 6, o)
        o += 12
        k = PyBytes_GET_SIZE(via_head) - 9
        branch = PyUnicode_DecodeASCII(o0 + k, (o - o0) - k, NULL)
        o = _put(o, b";rport\r\n", 8)
        ours = o - o0
        # The forwarded INVITE (Proxy._assemble of Proxy._forward_head): the request line, our Via,
        # Record-Route, the Vias (the top one stamped), the other headers, Content-Length, the body.
        o = _put(o, <const char*>p, sc.uri_e + 10)
        o = _put(o, o0, ours)
        o = _put(o, PyBytes_AS_STRING(rr), PyBytes_GET_SIZE(rr))
        o = _put(o, b"Via: ", 5)
        o = _stamp_top_via(o, p, sc, PyBytes_AS_STRING(ipb), iplen, port)
        o = _put(o, b"\r\n", 2)
        for k in range(1, sc.nvia):
            o = _put(o, b"Via: ", 5)
            o = _put(o, <const char*>p + sc.via_s[k], sc.via_e[k] - sc.via_s[k])
            o = _put(o, b"\r\n", 2)
        body = _head_end(p, n)
        blen = n - body
        ls = sc.uri_e + 10
        while ls < body - 2:
            q = <const unsigned char*>memchr(p + ls, 13, body - ls)
            le = q - p
            colon = <const unsigned char*>memchr(p + ls, 58, le - ls) - p
            ne = colon - ls
            if _name_is(p + ls, ne, "via", 3) or _name_is(p + ls, ne, "content-length", 14):
                ls = le + 2
                continue
            if _name_is(p + ls, ne, "route", 5):
                route_seen = True
            o = self._canon(o, p + ls, ne)
            o = _put(o, b": ", 2)
            if _name_is(p + ls, ne, "max-forwards", 12):
                mf_seen = True
                o += _utoa(o, <unsigned long>(sc.mf - 1))
            else:
                vs = skip_ws(p, colon + 1, le)
                o = _put(o, <const char*>p + vs, le - vs)
            o = _put(o, b"\r\n", 2)
            ls = le + 2
        if not mf_seen:
            o = _put(o, b"Max-Forwards: 70\r\n", 18)
        o = _put(o, b"Content-Length: ", 16)
        o += _utoa(o, <unsigned long>blen)
        o = _put(o, b"\r\n\r\n", 4)
        o = _put(o, <const char*>p + body, blen)
        fwd = PyBytes_FromStringAndSize(o0 + ours, (o - o0) - ours)
        routes = b""
        if route_seen:
            # Proxy._send_ack: "Route: <value>" for each Route line of the INVITE
            rs = o
            ls = sc.uri_e + 10
            while ls < body - 2:
                q = <const unsigned char*>memchr(p + ls, 13, body - ls)
                le = q - p
                colon = <const unsigned char*>memchr(p + ls, 58, le - ls) - p
                if _name_is(p + ls, colon - ls, "route", 5):
                    vs = skip_ws(p, colon + 1, le)
                    o = _put(o, b"Route: ", 7)
                    o = _put(o, <const char*>p + vs, le - vs)
                    o = _put(o, b"\r\n", 2)
                ls = le + 2
            routes = PyBytes_FromStringAndSize(rs, o - rs)
        trying = _trying(fp, p, sc)
        # The transaction, as Proxy._forward_invite and Proxy._try_next leave it.
        tx = FwdTx.__new__(FwdTx)
        tx.key = key
        tx.is_invite = True
        tx.up_ep = ep
        tx.up_addr = _addr_tuple(&fp.addrs[i], ip, port)
        memcpy(&tx.up_ss, &fp.addrs[i], fp.msgs[i].msg_hdr.msg_namelen)
        tx.up_len = fp.msgs[i].msg_hdr.msg_namelen
        tx.source = ip
        tx.started = now
        tx.caller = fp.core._cr_s
        tx.callee = fp.core._ce_s
        tx.call_id = call_id
        tx.candidates = cands
        tx.attempt = <int>pick[1]
        tx.trunk = self.trunks[t]
        tx.branch = branch
        tx._branch0 = branch
        tx.out = fwd
        tx.dest_ep = ep
        tx.dest_addr = tx.trunk.addr
        tx.last_resp = trying
        tx.interval = _T1
        tx.raw = PyBytes_FromStringAndSize(<const char*>p, n)
        tx.routes = routes
        tx.uri_s = sc.uri_s
        tx.uri_e = sc.uri_e
        tx.from_s = sc.from_s
        tx.from_e = sc.from_e
        tx.cid_s = sc.cid_s
        tx.cid_e = sc.cid_e
        tx.cseq_s = sc.cseq_s
        tx.cseq_e = sc.cseq_e
        stx.put(tk, tx, key)          # the key the fast path found nothing under, hashed once
        self.ctx[branch] = tx
        self.proxy.in_flight += 1
        fp._queue(trying, &tx.up_ss, tx.up_len)
        fp._queue(fwd, &self.rt_ss[t], self.rt_len[t])
        _count(fp.out_codes, 100)
        _count(fp.out_codes, "INVITE")
        # Untracked: an entry holds its transaction, which never refers back to it.
        self.q_trunk.append(_untracked((mono + self.trunk_timeout, next(self.seq), tx, tx.attempt, K_TRUNK)))
        self.q_retrans.append(_untracked((mono + _T1, next(self.seq), tx, tx.attempt, K_RETRANS)))
        return 1

    # ------------------------------------------------------------ a response from a trunk
    cdef int response(self, FastPath fp, object ep, const unsigned char* p, Py_ssize_t n, unsigned int i,
                      double mono) except -1:
        """A trunk's response to a FwdTx, handled as Proxy._on_response does; 0: the Python path handles it."""
        cdef Resp r
        cdef Scan sc
        cdef FwdTx tx
        cdef int code
        cdef bytes out
        if ep is not self.ep or _scan_response(p, n, &r) < 0:
            return 0
        if _top_via(p, r.via_s[0], r.via_e[0], &sc) < 0 or sc.br_e - sc.br_s < 9 \
                or memcmp(p + sc.br_s, b"z9hG4bKcg", 9) != 0:
            return 0
        if sc.br_e - sc.br_s >= 11 and p[sc.br_s + 9] == 107 and p[sc.br_s + 10] == 97:
            return 0                # a keepalive answer
        branch = PyUnicode_DecodeASCII(<const char*>p + sc.br_s, sc.br_e - sc.br_s, NULL)
        found = self.ctx.get(branch)
        if type(found) is not FwdTx:
            return 0
        tx = <FwdTx>found
        code = r.code
        if r.cm_e - r.cm_s == 6 and memcmp(p + r.cm_s, b"CANCEL", 6) == 0:
            _count(fp.in_codes, code)
            return 1                # our CANCEL answered hop by hop
        if not tx.is_invite or tx.branch != branch or tx.up_ep is not ep:
            return 0
        if code < 200:
            if tx.cancelled and not tx.provisional:
                return 0            # a CANCEL waits for this provisional: the Python path sends it
            _count(fp.in_codes, code)
            if not tx.provisional:
                tx.provisional = True
                self.q_timer_c.append(_untracked((mono + self.timer_c_first, next(self.seq), tx, tx.attempt, K_TIMER_C)))
            if code > 100 and not tx.final:
                tx.last_resp = self._relay(fp, tx, p, n, &r)
            return 1
        if code >= 300:
            if code == 503 and not tx.cancelled and not tx.final:
                return 0            # failover
            _count(fp.in_codes, code)
            self._ack(fp, tx, p, &r, i)
            if tx.final:
                return 1            # a retransmission of a final already passed on
            tx.last_resp = self._relay(fp, tx, p, n, &r)
            self._finish_failed(tx, code, mono)
            return 1
        _count(fp.in_codes, code)
        out = self._relay(fp, tx, p, n, &r)     # a 2xx: always relayed, the ACK is end to end
        if not tx.final:
            tx.last_resp = out
            self.proxy._finish(tx, code)
        return 1

    cdef bytes _relay(self, FastPath fp, FwdTx tx, const unsigned char* p, Py_ssize_t n, Resp* r):
        """Proxy._relay_response: our Via popped, the names in their usual spelling; queued to the caller."""
        cdef char* o = self.obuf
        cdef Py_ssize_t k, ls, le, colon, vs, ne
        cdef const unsigned char* q
        cdef bytes out
        if 2 * n + 1024 > self.obuf_size:
            raise ValueError("response larger than the buffer")
        o = _put(o, <const char*>p, r.line_e + 2)
        for k in range(1, r.nvia):
            o = _put(o, b"Via: ", 5)
            o = _put(o, <const char*>p + r.via_s[k], r.via_e[k] - r.via_s[k])
            o = _put(o, b"\r\n", 2)
        ls = r.head_s
        while ls < r.body - 2:
            q = <const unsigned char*>memchr(p + ls, 13, r.body - ls)
            le = q - p
            colon = <const unsigned char*>memchr(p + ls, 58, le - ls) - p
            ne = colon - ls
            if not (_name_is(p + ls, ne, "via", 3) or _name_is(p + ls, ne, "content-length", 14)):
                vs = skip_ws(p, colon + 1, le)
                o = self._canon(o, p + ls, ne)
                o = _put(o, b": ", 2)
                o = _put(o, <const char*>p + vs, le - vs)
                o = _put(o, b"\r\n", 2)
            ls = le + 2
        o = _put(o, b"Content-Length: ", 16)
        o += _utoa(o, <unsigned long>r.blen)
        o = _put(o, b"\r\n\r\n", 4)
        o = _put(o, <const char*>p + r.body, r.blen)
        out = PyBytes_FromStringAndSize(self.obuf, o - self.obuf)
        fp._queue(out, &tx.up_ss, tx.up_len)
        _count(fp.out_codes, r.code)
        return out

    cdef int _ack(self, FastPath fp, FwdTx tx, const unsigned char* p, Resp* r, unsigned int i) except -1:
        """Proxy._send_ack: our ACK to a non-2xx final, back to where the response came from."""
        cdef bytes raw = tx.raw, out = tx.out
        cdef const char* rp = PyBytes_AS_STRING(raw)
        cdef const char* op = PyBytes_AS_STRING(out)
        cdef const char* v0
        cdef const char* v1
        cdef char* o = self.obuf
        # our Via line, as sent: the second line of tx.out
        v0 = <const char*>memchr(op, 13, PyBytes_GET_SIZE(out))
        if v0 == NULL or v0 + 2 > op + PyBytes_GET_SIZE(out):
            raise ValueError("no Via line in the forwarded request")
        v0 += 2
        v1 = <const char*>memchr(v0, 13, PyBytes_GET_SIZE(out) - (v0 - op))
        if v1 == NULL or PyBytes_GET_SIZE(tx.routes) + (v1 - v0) + (r.to_e - r.to_s) + PyBytes_GET_SIZE(raw) \
                + PyBytes_GET_SIZE(self.ua_line) + 256 > self.obuf_size:
            raise ValueError("no Via line in the forwarded request")
        o = _put(o, b"ACK ", 4)
        o = _put(o, rp + tx.uri_s, tx.uri_e - tx.uri_s)
        o = _put(o, b" SIP/2.0\r\n", 10)
        o = _put(o, v0, v1 - v0)
        o = _put(o, b"\r\n", 2)
        o = _put(o, PyBytes_AS_STRING(tx.routes), PyBytes_GET_SIZE(tx.routes))
        o = _put(o, b"From: ", 6)
        o = _put(o, rp + tx.from_s, tx.from_e - tx.from_s)
        o = _put(o, b"\r\nTo: ", 6)
        o = _put(o, <const char*>p + r.to_s, r.to_e - r.to_s)
        o = _put(o, b"\r\nCall-ID: ", 11)
        o = _put(o, rp + tx.cid_s, tx.cid_e - tx.cid_s)
        o = _put(o, b"\r\nCSeq: ", 8)
        o = _put(o, rp + tx.cseq_s, tx.cseq_e - tx.cseq_s)
        o = _put(o, b" ACK\r\nMax-Forwards: 70\r\n", 24)
        o = _put(o, PyBytes_AS_STRING(self.ua_line), PyBytes_GET_SIZE(self.ua_line))
        o = _put(o, b"Content-Length: 0\r\n\r\n", 21)
        fp._queue(PyBytes_FromStringAndSize(self.obuf, o - self.obuf), &fp.addrs[i], fp.msgs[i].msg_hdr.msg_namelen)
        _count(fp.out_codes, "ACK")
        return 0

    cdef int _finish_failed(self, FwdTx tx, int code, double mono) except -1:
        """Proxy._finish for a non-2xx final."""
        proxy = self.proxy
        tx.final = code
        proxy.in_flight -= 1
        now = _clock(CLOCK_REALTIME)
        proxy.outcome(tx.call_id, code)      # behind the decision's record (Proxy.outcome)
        try:
            proxy.guard.observe(tx.caller, False, 0.0, tx.source, now)
        except Exception as exc:  # noqa - scoring input only, as in Proxy._finish
            proxy._fault(exc, None, None, None)
        deadline = mono + _TX_LINGER
        self.tx_linger.push(deadline, tx.key, tx)
        if tx._branches is None:
            self.branch_linger.push(deadline, tx._branch0, tx)
        else:
            for b in tx._branches:
                self.branch_linger.push(deadline, b, tx)
        return 0

    cdef int acked(self, object key, object prev, double mono) except -1:
        """Proxy._acked, for the ACK to a non-2xx final the fast path absorbed."""
        cdef FwdTx tx
        if type(prev) is not FwdTx:
            self.proxy._acked(key, prev)
            return 0
        tx = <FwdTx>prev
        if tx.expired_soon:
            return 0
        deadline = mono + _T4
        self.tx_acked.push(deadline, key, tx)
        tx.expired_soon = True
        # The TX_LINGER entries would keep the transaction alive 27 s past T4: let go of them.
        self.tx_linger.release(tx, RELEASE_SEARCH)
        if tx._branches is None:
            self.branch_acked.push(deadline, tx._branch0, tx)
            self.branch_linger.release(tx, RELEASE_SEARCH)
        else:
            for b in tx._branches:
                self.branch_acked.push(deadline, b, tx)
                self.branch_linger.release(tx, RELEASE_SEARCH)
        return 0


# ---------------------------------------------------------------- the proxy's queues, walked in C
def due_timers(q, double now, list out):
    """Pop the entries of one timer queue (deadline, seq, tx, attempt, kind) due at ``now``; append to
    ``out`` those still relevant (the transaction has no final and is at that attempt): Proxy._tick's loop."""
    cdef tuple e
    cdef FwdTx ftx
    popleft = q.popleft
    while q:
        e = <tuple>q[0]
        if <double>e[0] > now:
            break
        popleft()
        tx = e[2]
        if type(tx) is FwdTx:
            ftx = <FwdTx>tx
            if not ftx.final and ftx.attempt == <int>e[3]:
                out.append(e)
        elif not tx.final and tx.attempt == e[3]:
            out.append(e)

