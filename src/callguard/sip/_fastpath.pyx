# cython: freethreading_compatible = False
"""The compiled hot path of ``callguard serve``: receive, scan, decide, answer, in batches.

A :class:`FastPath` reads up to ``capacity`` datagrams with one ``recvmmsg``.  Each one is
scanned once by a strict grammar that recognises exactly two kinds of message:

* a plain initial INVITE (no To tag, single-valued Via lines with an RFC 3261 branch, long
  header names, one Content-Length matching the body, Max-Forwards >= 1, no Proxy-Require,
  nothing that looks like our own Via), and
* an ACK whose transaction we answered with a final response of our own.

Such an INVITE is decided with the compiled core's C entry point (``Core._decide``: the
same rules and the same rate-limit state as ``check``, no Verdict object).  A rejection is
answered here: the response is assembled byte for byte as the proxy's Python path builds
it, stored in the proxy's server-transaction table (so a retransmission gets the same
bytes and the ACK is absorbed, with the same lingers) and sent with ``sendmmsg`` at
the end of the batch.  An allowed call is forwarded here too when its trunk is reached over
UDP through this listener, and the trunk's responses to it are relayed (and non-2xx finals
ACKed) here (``_forward.pxi``); otherwise it is handed to the proxy (``Proxy.fast_allowed``)
with its decision, to be forwarded there.  Everything else -- other responses, other
methods, compact headers, folding, a To tag, anything the scans are unsure of -- goes, in
arrival order, to the proxy's ordinary ``handle``: the Python path stays the reference.

Per decision the fast path appends one tuple (a call-record row plus the shadowed rules) and
counts the rule and the decision time in C; the proxy drains both once per batch into records,
metrics and logs.  What it answered itself it forgets by itself: each rejection (and, once ACKed,
its shorter linger) waits in a :class:`LingerQueue`, a C ring the proxy's timer tick empties with
:meth:`FastPath.expire` -- no tuple per call for the garbage collector to walk.

The syntax checks are those of ``_sipcore`` (the parser's Cython twin): both modules take
them from ``_sipscan.pxd``, so that nothing the fast path accepts could be refused by the parser.
The recvmmsg/sendmmsg loops are those of ``_sipcore.UdpBatch``, shared the same way through ``_udpio.pxd``.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_DelItem, PyDict_GetItem
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.errno cimport EINTR, errno
from libc.limits cimport LONG_MIN
from libc.stdint cimport uint32_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy, memset, strlen

from callguard._core cimport Core, Decision, Num
from callguard._rowpack cimport N_TEXT, Packed, RowHead, pack_row, reset_packed
from callguard.sip._sipscan cimport (
    MAX_CSEQ, RURI, SSE2, TOKEN, check_via, is_ws, line_end, line_end_bytes, parse_addr, parse_digits, skip_ws, uri_ok,
    uri_ok_bytes,
)
from callguard.sip._udpio cimport (
    AF_INET, AF_INET6, MSG_DONTWAIT, alloc_vectors, batch_family, free_vectors, inet_ntop, iovec, is_keepalive, mmsghdr,
    ntohl, ntohs, recv_batch, send_batch, sendmmsg, sockaddr_in, sockaddr_in6, sockaddr_storage, socklen_t,
)

cdef extern from "<string.h>" nogil:
    void* memmem(const void* haystack, size_t hlen, const void* needle, size_t nlen)

cdef extern from "Python.h":
    int PyUnicode_1BYTE_KIND
    void PyObject_GC_UnTrack(void* op)

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec* ts)
    int CLOCK_REALTIME
    int CLOCK_MONOTONIC


# ---------------------------------------------------------------- character classes of the fast path only
# (the SIP grammar's own classes and checks come from _sipscan, shared with the parser)
cdef extern from *:
    """
    /* Request-URI user characters the fast path takes as they are */
    static const int cg_fp_userc[256] = {
        ['a' ... 'z'] = 1, ['A' ... 'Z'] = 1, ['0' ... '9'] = 1,
        ['+'] = 1, ['-'] = 1, ['.'] = 1, ['_'] = 1, ['!'] = 1, ['~'] = 1, ['*'] = 1, ['#'] = 1};
    /* header line bytes the fast path accepts: printable ASCII and HT */
    static const int cg_fp_valc[256] = {[32 ... 126] = 1, [9] = 1};
    /* The header names the scan looks at, told apart by length and then by whole words compared
       in lower case (OR 0x20 maps only 'A'-'Z' onto 'a'-'z' and CR onto '-' among the octets of
       these names, and a header line holds no CR), so that a known name costs neither a loop
       over its octets nor a chain of comparisons. */
    enum {CG_H_OTHER, CG_H_VIA, CG_H_FROM, CG_H_TO, CG_H_CALLID, CG_H_CSEQ, CG_H_MF, CG_H_CL,
          CG_H_PAI, CG_H_PROXY_REQUIRE, CG_H_CONTACT};
    #include <stdint.h>
    #include <string.h>
    static inline uint64_t cg_w8(const void *s) { uint64_t w; memcpy(&w, s, 8); return w; }
    static inline uint32_t cg_w4(const void *s) { uint32_t w; memcpy(&w, s, 4); return w; }
    static inline uint16_t cg_w2(const void *s) { uint16_t w; memcpy(&w, s, 2); return w; }
    #define CG_LC8(s) (cg_w8(s) | 0x2020202020202020ULL)
    #define CG_LC4(s) (cg_w4(s) | 0x20202020U)
    #define CG_LC2(s) ((uint16_t)(cg_w2(s) | 0x2020U))
    static inline int cg_header_id(const unsigned char *s, Py_ssize_t n) {
        switch (n) {
        case 2: return CG_LC2(s) == cg_w2("to") ? CG_H_TO : CG_H_OTHER;
        case 3: return CG_LC2(s) == cg_w2("vi") && (s[2] | 32) == 'a' ? CG_H_VIA : CG_H_OTHER;
        case 4:
            if (CG_LC4(s) == cg_w4("from")) return CG_H_FROM;
            return CG_LC4(s) == cg_w4("cseq") ? CG_H_CSEQ : CG_H_OTHER;
        case 7:   /* two overlapping words: octets 0-3 and 3-6 */
            if (CG_LC4(s) == cg_w4("call") && CG_LC4(s + 3) == cg_w4("l-id")) return CG_H_CALLID;
            return CG_LC4(s) == cg_w4("cont") && CG_LC4(s + 3) == cg_w4("tact") ? CG_H_CONTACT : CG_H_OTHER;
        case 12:
            return CG_LC8(s) == cg_w8("max-forw") && CG_LC4(s + 8) == cg_w4("ards") ? CG_H_MF : CG_H_OTHER;
        case 13:
            return CG_LC8(s) == cg_w8("proxy-re") && CG_LC8(s + 5) == cg_w8("-require") ? CG_H_PROXY_REQUIRE
                                                                                          : CG_H_OTHER;
        case 14:
            return CG_LC8(s) == cg_w8("content-") && CG_LC8(s + 6) == cg_w8("t-length") ? CG_H_CL : CG_H_OTHER;
        case 19:
            return CG_LC8(s) == cg_w8("p-assert") && CG_LC8(s + 8) == cg_w8("ed-ident")
                   && CG_LC4(s + 15) == cg_w4("tity") ? CG_H_PAI : CG_H_OTHER;
        }
        return CG_H_OTHER;
    }

    /* s[0..n) holds our own branch mark "z9hG4bKcg" (memmem's general search cost more than the
       whole Via check; a Via has one or two 'z' at most) */
    static inline int cg_has_mark(const unsigned char *s, Py_ssize_t n) {
        const unsigned char *end = s + n, *z;
        while (end - s >= 9 && (z = memchr(s, 'z', (size_t)(end - s - 8))) != NULL) {
            if (memcmp(z, "z9hG4bKcg", 9) == 0) return 1;
            s = z + 1;
        }
        return 0;
    }
    """
    const int USERC "cg_fp_userc"[256]
    const int VALC "cg_fp_valc"[256]
    enum:
        H_OTHER "CG_H_OTHER"
        H_VIA "CG_H_VIA"
        H_FROM "CG_H_FROM"
        H_TO "CG_H_TO"
        H_CALLID "CG_H_CALLID"
        H_CSEQ "CG_H_CSEQ"
        H_MF "CG_H_MF"
        H_CL "CG_H_CL"
        H_PAI "CG_H_PAI"
        H_PROXY_REQUIRE "CG_H_PROXY_REQUIRE"
        H_CONTACT "CG_H_CONTACT"
    int header_id "cg_header_id"(const unsigned char* s, Py_ssize_t n) noexcept nogil
    bint has_mark "cg_has_mark"(const unsigned char* s, Py_ssize_t n) noexcept nogil


# ---------------------------------------------------------------- the strict scan
cpdef enum:                # FastPath.rows_mode, as proxy.py sets it (the tests check that they agree)
    ROWS_NONE = 0          # no call records (records and decision logs off)
    ROWS_TUPLES = 1        # a tuple per decision in FastPath.decisions (decision logs; records without the
                           # compiled writer)
    ROWS_PACKED = 2        # packed into RowBuffer's layout (take_packed)


# FastPath._run's headroom when pump calls it: ask the proxy (fast_headroom) if an INVITE comes
cdef long HEADROOM_ASK = LONG_MIN

cdef enum:
    PACKED_KEEP = 1 << 20  # bytes of packed rows kept between batches
    M_OTHER = 0
    M_INVITE = 1
    M_ACK = 2
    MAX_VIAS = 16
    MAX_RULES = 32
    MAX_BUCKETS = 32


cdef struct Scan:
    int method
    Py_ssize_t uri_s, uri_e
    Py_ssize_t user_s, user_e
    int nvia
    Py_ssize_t via_s[MAX_VIAS]
    Py_ssize_t via_e[MAX_VIAS]
    Py_ssize_t sent_s, sent_e          # sent-by of the top Via
    Py_ssize_t br_s, br_e              # its branch
    bint sent_upper                    # sent-by has upper-case letters (the key is lower-cased)
    Py_ssize_t from_s, from_e, ftag_s, ftag_e
    Py_ssize_t to_s, to_e
    bint to_tag
    Py_ssize_t cid_s, cid_e
    Py_ssize_t cseq_s, cseq_e          # the digits
    Py_ssize_t pai_s, pai_e
    int mf


cdef inline bint _name_is(const unsigned char* s, Py_ssize_t n, const char* lower, Py_ssize_t ln) noexcept nogil:
    cdef Py_ssize_t i
    if n != ln:
        return False
    for i in range(n):
        if (s[i] | 32) != <unsigned char>lower[i]:
            return False
    return True


cdef int _top_via(const unsigned char* p, Py_ssize_t vs, Py_ssize_t ve, Scan* sc) noexcept nogil:
    """Sent-by and branch of the top Via, the way proxy.tx_key finds them; -1: leave it to Python."""
    cdef Py_ssize_t i = vs, j, ns, ne
    # "SIP/2.0/XXX" then one space: anything looser goes to the slow path.
    if ve - vs < 12 or p[i] != 83 or p[i + 1] != 73 or p[i + 2] != 80 or p[i + 3] != 47 or p[i + 4] != 50 \
            or p[i + 5] != 46 or p[i + 6] != 48 or p[i + 7] != 47:
        return -1
    i += 8
    while i < ve and ((65 <= p[i] <= 90) or (97 <= p[i] <= 122)):
        i += 1
    if i >= ve or p[i] != 32:
        return -1
    i += 1
    sc.sent_s = i
    sc.sent_upper = False
    while i < ve and p[i] != 59 and not is_ws(p[i]) and p[i] != 44:
        if 65 <= p[i] <= 90:
            sc.sent_upper = True
        i += 1
    sc.sent_e = i
    if i == sc.sent_s:
        return -1
    sc.br_s = -1
    # params: no whitespace at all (the regexes allow it; the scan does not need to)
    while i < ve:
        if p[i] != 59:
            return -1
        i += 1
        ns = i
        while i < ve and p[i] != 61 and p[i] != 59:
            if is_ws(p[i]):
                return -1
            i += 1
        ne = i
        if i < ve and p[i] == 61:
            i += 1
            j = i
            while i < ve and p[i] != 59:
                if is_ws(p[i]):
                    return -1
                i += 1
            if sc.br_s < 0 and _name_is(p + ns, ne - ns, "branch", 6):
                if not (ne - ns == 6 and p[ns] == 98):   # any other spelling: leave it to Python
                    return -1
                sc.br_s = j
                sc.br_e = i
        elif _name_is(p + ns, ne - ns, "branch", 6):
            return -1
    if sc.br_s < 0 or sc.br_e - sc.br_s < 8:
        return -1
    if memcmp7(p + sc.br_s):
        return 0
    return -1


cdef inline bint memcmp7(const unsigned char* s) noexcept nogil:
    return s[0] == 122 and s[1] == 57 and s[2] == 104 and s[3] == 71 and s[4] == 52 and s[5] == 98 and s[6] == 75


cdef extern from *:
    """
    /* The header line at p[ls], for the request and the response scan (always inlined: a call
       per line cost some 3 % of a rejected call's instructions).  Returns the name's id
       (cg_header_id), CG_LINE_EMPTY or CG_LINE_REFUSED; *le is where its CR is, *vs where its value
       starts (it ends at *le).

       The strict grammar: CRLF, printable ASCII and HT only (one pass to the first other octet,
       which must be the CR, noting the first ':' on the way: cg_line_end, sixteen octets a step),
       no leading whitespace (folding), a name of two or more token characters, a value neither
       empty nor ending in whitespace. */
    enum {CG_LINE_REFUSED = -1, CG_LINE_EMPTY = -2};
    static inline __attribute__((always_inline)) int cg_header_line(
            const unsigned char *p, Py_ssize_t ls, Py_ssize_t end, Py_ssize_t *le, Py_ssize_t *vs) {
        Py_ssize_t e, colon, k, v;
        int hid;
        e = ls + cg_line_end(p + ls, end - ls, &colon);
        if (e + 1 >= end || p[e] != 13 || p[e + 1] != 10)
            return CG_LINE_REFUSED;
        *le = e;
        if (e == ls)
            return CG_LINE_EMPTY;
        if (p[ls] == ' ' || p[ls] == '\t' || colon < 2)
            return CG_LINE_REFUSED;
        colon += ls;
        hid = cg_header_id(p + ls, colon - ls);
        if (hid == CG_H_OTHER)      /* a known name is all token characters by construction */
            for (k = ls; k < colon; k++)
                if (!cg_sip_token[p[k]])
                    return CG_LINE_REFUSED;
        for (v = colon + 1; v < e && (p[v] == ' ' || p[v] == '\t'); v++)
            ;
        if (v == e || p[e - 1] == ' ' || p[e - 1] == '\t')
            return CG_LINE_REFUSED;
        *vs = v;
        return hid;
    }
    """
    enum:
        LINE_REFUSED "CG_LINE_REFUSED"
        LINE_EMPTY "CG_LINE_EMPTY"
    int header_line "cg_header_line"(const unsigned char* p, Py_ssize_t ls, Py_ssize_t end, Py_ssize_t* le,
                                     Py_ssize_t* vs) noexcept nogil


cdef int scan(const unsigned char* p, Py_ssize_t n, Scan* sc) noexcept nogil:
    """Fill ``sc`` for a plain INVITE or ACK; returns the method, M_OTHER for anything else."""
    cdef Py_ssize_t i, le, vs, ve, body, k, at
    cdef long long content_length
    cdef int hid
    cdef Py_ssize_t tag_s, tag_e
    cdef int method
    cdef bint seen_cl = False, seen_mf = False
    cdef long long num
    if n < 64:
        return M_OTHER
    if p[0] == 73 and p[1] == 78 and p[2] == 86 and p[3] == 73 and p[4] == 84 and p[5] == 69 and p[6] == 32:
        method = M_INVITE
        i = 7
    elif p[0] == 65 and p[1] == 67 and p[2] == 75 and p[3] == 32:
        method = M_ACK
        i = 4
    else:
        return M_OTHER
    # The message head ends at the first empty line, found by the line loop below (a search for
    # CRLFCRLF first was another pass over the head).
    body = -1
    content_length = -1
    # Request-URI: "sip:user@host..." (a user part as it is, no escapes, no '?'), then " SIP/2.0".
    # One pass finds its end, the space, and stops at any other octet of RURI: what the parser
    # refuses there (bad_request_uri_char) and '?'. The rest of the parser's check_request_uri
    # follows from the scheme being "sip" and the host part being checked after the last '@'.
    sc.uri_s = i
    while i < n and not RURI[p[i]]:
        i += 1
    if i >= n or p[i] != 32:
        return M_OTHER
    sc.uri_e = i
    if sc.uri_e - sc.uri_s < 6 or p[sc.uri_s] != 115 or p[sc.uri_s + 1] != 105 or p[sc.uri_s + 2] != 112 \
            or p[sc.uri_s + 3] != 58:
        return M_OTHER
    at = sc.uri_e - 1
    while at > sc.uri_s + 3 and p[at] != 64:
        at -= 1
    # a user part before that '@', a host part after it that starts with neither ';' nor ':'
    if at <= sc.uri_s + 3 or at + 1 >= sc.uri_e or p[at + 1] == 59 or p[at + 1] == 58:
        return M_OTHER
    # parse_uri_user: userinfo up to that '@', the user ends at the first ':'
    sc.user_s = sc.uri_s + 4
    k = sc.user_s
    while k < at and p[k] != 58:
        if not USERC[p[k]]:
            return M_OTHER
        k += 1
    sc.user_e = k
    if sc.user_e == sc.user_s:
        return M_OTHER
    if i + 9 >= n or p[i + 1] != 83 or p[i + 2] != 73 or p[i + 3] != 80 or p[i + 4] != 47 or p[i + 5] != 50 \
            or p[i + 6] != 46 or p[i + 7] != 48 or p[i + 8] != 13 or p[i + 9] != 10:
        return M_OTHER
    i += 10
    sc.nvia = 0
    sc.from_s = sc.to_s = sc.cid_s = sc.cseq_s = sc.pai_s = -1
    sc.mf = -1
    # header lines: "Name: value" with CRLF, no folding, no compact names, printable ASCII only
    while True:
        hid = header_line(p, i, n, &le, &vs)
        if hid == LINE_EMPTY:
            body = le + 2
            break
        if hid == LINE_REFUSED:
            return M_OTHER
        ve = le
        i = le + 2
        if hid == H_OTHER:
            continue
        if hid == H_VIA:
            if sc.nvia >= MAX_VIAS or memchr(p + vs, 44, ve - vs) != NULL or check_via(p + vs, ve - vs) < 0:
                return M_OTHER
            # our own branch mark in a Via: maybe a loop, which the Python path checks (482)
            if has_mark(p + vs, ve - vs):
                return M_OTHER
            if sc.nvia == 0 and _top_via(p, vs, ve, sc) < 0:
                return M_OTHER
            sc.via_s[sc.nvia] = vs
            sc.via_e[sc.nvia] = ve
            sc.nvia += 1
        elif hid == H_FROM:
            if sc.from_s >= 0:
                return M_OTHER
            tag_s = tag_e = -2
            if parse_addr(p + vs, ve - vs, &tag_s, &tag_e) < 0 or tag_s == -1:
                return M_OTHER
            sc.from_s, sc.from_e = vs, ve
            sc.ftag_s = vs + tag_s if tag_s >= 0 else -1
            sc.ftag_e = vs + tag_e if tag_s >= 0 else -1
        elif hid == H_TO:
            if sc.to_s >= 0:
                return M_OTHER
            tag_s = tag_e = -2
            if parse_addr(p + vs, ve - vs, &tag_s, &tag_e) < 0 or tag_s == -1:
                return M_OTHER
            sc.to_s, sc.to_e = vs, ve
            sc.to_tag = tag_s >= 0
        elif hid == H_CALLID:
            if sc.cid_s >= 0:
                return M_OTHER
            for k in range(vs, ve):
                if is_ws(p[k]):
                    return M_OTHER
            sc.cid_s, sc.cid_e = vs, ve
        elif hid == H_CSEQ:
            if sc.cseq_s >= 0:
                return M_OTHER
            # canonical "digits METHOD": the proxy writes the number back as an int
            k = vs
            while k < ve and 48 <= p[k] <= 57:
                k += 1
            if k == vs or k - vs > 10 or (p[vs] == 48 and k - vs > 1) or k >= ve or p[k] != 32:
                return M_OTHER
            if parse_digits(p + vs, k - vs) > MAX_CSEQ:
                return M_OTHER
            sc.cseq_s, sc.cseq_e = vs, k
            k += 1
            if method == M_INVITE:
                if ve - k != 6 or p[k] != 73 or p[k + 1] != 78 or p[k + 2] != 86 or p[k + 3] != 73 \
                        or p[k + 4] != 84 or p[k + 5] != 69:
                    return M_OTHER
            elif ve - k != 3 or p[k] != 65 or p[k + 1] != 67 or p[k + 2] != 75:
                return M_OTHER
        elif hid == H_MF:
            if seen_mf or ve - vs > 3:
                return M_OTHER
            seen_mf = True
            num = parse_digits(p + vs, ve - vs)   # -1 when not digits
            if num < 1 or num > 255:
                return M_OTHER
            sc.mf = <int>num
        elif hid == H_CL:
            if seen_cl or ve - vs > 6:
                return M_OTHER
            seen_cl = True
            content_length = parse_digits(p + vs, ve - vs)   # -1 when not digits; checked at the end
        elif hid == H_PAI:
            if sc.pai_s >= 0 or memchr(p + vs, 44, ve - vs) != NULL:
                return M_OTHER
            sc.pai_s, sc.pai_e = vs, ve
        elif hid == H_CONTACT:
            if not ((ve - vs == 1 and p[vs] == 42) or (memchr(p + vs, 44, ve - vs) == NULL
                                                       and parse_addr(p + vs, ve - vs, NULL, NULL) == 0)):
                return M_OTHER
        else:   # Proxy-Require
            return M_OTHER
    if content_length != n - body:
        return M_OTHER
    if sc.nvia == 0 or sc.from_s < 0 or sc.to_s < 0 or sc.cid_s < 0 or sc.cseq_s < 0 or not seen_cl:
        return M_OTHER
    if method == M_INVITE and sc.to_tag:
        return M_OTHER
    return method


# The text of the last IPv4 source seen: peers are few (callers' gateways, trunks), and
# inet_ntop goes through printf.
cdef unsigned int _last_ip4 = 0
cdef object _last_ip4_s = None


cdef object _ip_of(sockaddr_storage* ss, int* port):
    global _last_ip4, _last_ip4_s
    cdef char host[64]
    cdef sockaddr_in* a4
    cdef sockaddr_in6* a6
    if ss.ss_family == AF_INET:
        a4 = <sockaddr_in*>ss
        port[0] = ntohs(a4.sin_port)
        if _last_ip4_s is not None and a4.sin_addr.s_addr == _last_ip4:
            return _last_ip4_s
        inet_ntop(AF_INET, &a4.sin_addr, host, sizeof(host))
        _last_ip4 = a4.sin_addr.s_addr
        _last_ip4_s = PyUnicode_DecodeASCII(host, strlen(host), NULL)
        return _last_ip4_s
    else:
        a6 = <sockaddr_in6*>ss
        inet_ntop(AF_INET6, &a6.sin6_addr, host, sizeof(host))
        port[0] = ntohs(a6.sin6_port)
    return PyUnicode_DecodeASCII(host, strlen(host), NULL)


cdef object _addr_tuple(sockaddr_storage* ss, object ip, int port):
    cdef sockaddr_in6* a6
    if ss.ss_family == AF_INET:
        return _untracked((ip, port))
    a6 = <sockaddr_in6*>ss
    return _untracked((ip, port, ntohl(a6.sin6_flowinfo), a6.sin6_scope_id))


cdef inline object _untracked(object t):
    """``t`` (a tuple of strings, numbers and such tuples, or of objects it is never in a cycle with)
    taken out of the garbage collector's view.

    Such a tuple can never be part of a reference cycle, so the collector has nothing to find in it;
    Python would untrack it itself, but only after a young-generation pass had visited it.  With
    call records on, the per-call tuples (keys, addresses, decision rows, timer entries) made the
    young generation some 25,000 objects deep at 10k forwarded calls/s, and each pass over it
    stalled the event loop for 10-40 ms.
    """
    PyObject_GC_UnTrack(<void*>t)
    return t


cdef inline str _s(const unsigned char* p, Py_ssize_t a, Py_ssize_t b):
    return PyUnicode_DecodeUTF8(<const char*>p + a, b - a, "surrogateescape")


cdef inline double _clock(int clk) noexcept nogil:
    cdef timespec ts
    clock_gettime(clk, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


TX_LINGER = 32.0
T4 = 5.0


# ---------------------------------------------------------------- the server transactions
cdef extern from "Python.h":
    Py_hash_t _Py_HashBytes(const void* src, Py_ssize_t n)
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL


cdef struct TxEntry:
    PyObject* value
    PyObject* key          # the Python key, NULL until asked for (an entry the fast path made)
    Py_ssize_t blen        # kb: the branch, a NUL, the sent-by in lower case
    Py_ssize_t klen
    char kb[1]


cdef struct TxSlot:
    Py_hash_t h
    TxEntry* e             # NULL: empty


cdef enum:
    TX_KEY_MAX = 512       # longer (branch, sent-by) keys live in the table's dict (the Python path only)
    TX_MIN_SLOTS = 1024


# A transaction's key as the table holds it: the branch, a NUL, the sent-by in lower case, hashed.
cdef struct TxKey:
    Py_hash_t h
    Py_ssize_t blen
    Py_ssize_t klen
    char kb[TX_KEY_MAX]


cdef object _ABSENT = object()


cdef class TxTable:
    """The proxy's server transactions (``stx``), keyed by (Via branch, sent-by): a mapping the
    Python path uses as a dict, and the fast path probes with the bytes of a datagram.

    Every call the fast path rejects used to cost a key tuple, two strings and a dict entry, made,
    hashed and compared twice (the INVITE, then its ACK) and freed after the linger: at 10k calls/s
    some 50,000 of them alive, each lookup a chain of cache misses through the tuple and its
    strings.  Here a key is the branch and the sent-by as bytes, hashed with the interpreter's own
    keyed hash (SipHash, seeded at start: a hostile flood cannot aim at one chain), in an open
    addressing table of (hash, entry) slots: the fast path makes no Python object to find, store
    or forget a transaction.  Keys that are not two strings (the RFC 2543 fallback of
    ``proxy.tx_key``), or longer than ``TX_KEY_MAX`` bytes, live in an ordinary dict beside it;
    the fast path leaves such messages to the Python path.
    """

    cdef TxSlot* slots
    cdef Py_ssize_t mask, used
    cdef dict other

    def __cinit__(self):
        self.slots = <TxSlot*>malloc(TX_MIN_SLOTS * sizeof(TxSlot))
        if self.slots == NULL:
            raise MemoryError()
        memset(self.slots, 0, TX_MIN_SLOTS * sizeof(TxSlot))
        self.mask = TX_MIN_SLOTS - 1
        self.used = 0
        self.other = {}

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.slots != NULL:
            for i in range(self.mask + 1):
                if self.slots[i].e != NULL:
                    _tx_free(self.slots[i].e)
            free(self.slots)

    # ------------------------------------------------------------ C entry points
    cdef Py_ssize_t _find(self, const TxKey* k) noexcept:
        """The slot of the key, or -1."""
        cdef Py_ssize_t i = <Py_ssize_t>(<size_t>k.h & <size_t>self.mask)
        cdef TxEntry* e
        while True:
            e = self.slots[i].e
            if e == NULL:
                return -1
            if self.slots[i].h == k.h and e.klen == k.klen and e.blen == k.blen \
                    and memcmp(e.kb, k.kb, k.klen) == 0:
                return i
            i = (i + 1) & self.mask

    cdef PyObject* find(self, const TxKey* k) noexcept:
        """The value of the key (a borrowed reference), or NULL."""
        cdef Py_ssize_t i = self._find(k)
        return NULL if i < 0 else self.slots[i].e.value

    cdef int put(self, const TxKey* k, object value, object key) except -1:
        """Set the key's value (``key``: its Python form, or None to make it when asked for)."""
        cdef Py_ssize_t i = self._find(k)
        cdef TxEntry* e
        cdef PyObject* old
        if i >= 0:
            e = self.slots[i].e
            old = e.value
            Py_INCREF(value)
            e.value = <PyObject*>value
            if e.key == NULL and key is not None:
                Py_INCREF(key)
                e.key = <PyObject*>key
            Py_DECREF(<object>old)          # last: a finaliser sees the table whole
            return 0
        if (self.used + 1) * 2 > self.mask + 1:
            self._resize((self.mask + 1) * 2)
        e = <TxEntry*>malloc(sizeof(TxEntry) + k.klen)
        if e == NULL:
            raise MemoryError()
        memcpy(e.kb, k.kb, k.klen)
        e.blen = k.blen
        e.klen = k.klen
        Py_INCREF(value)
        e.value = <PyObject*>value
        if key is not None:
            Py_INCREF(key)
            e.key = <PyObject*>key
        else:
            e.key = NULL
        i = <Py_ssize_t>(<size_t>k.h & <size_t>self.mask)
        while self.slots[i].e != NULL:
            i = (i + 1) & self.mask
        self.slots[i].h = k.h
        self.slots[i].e = e
        self.used += 1
        return 0

    cdef int _resize(self, Py_ssize_t size) except -1:
        cdef TxSlot* grown = <TxSlot*>malloc(size * sizeof(TxSlot))
        cdef TxSlot* old = self.slots
        cdef Py_ssize_t i, j, oldsize = self.mask + 1, mask = size - 1
        if grown == NULL:
            raise MemoryError()
        memset(grown, 0, size * sizeof(TxSlot))
        for i in range(oldsize):
            if old[i].e != NULL:
                j = <Py_ssize_t>(<size_t>old[i].h & <size_t>mask)
                while grown[j].e != NULL:
                    j = (j + 1) & mask
                grown[j] = old[i]
        self.slots = grown
        self.mask = mask
        free(old)
        return 0

    cdef TxEntry* _unlink(self, Py_ssize_t i) noexcept:
        """Take the entry of slot ``i`` out (backward-shift deletion: no tombstones); the caller frees it."""
        cdef TxEntry* gone = self.slots[i].e
        cdef Py_ssize_t j = i, k
        while True:
            j = (j + 1) & self.mask
            if self.slots[j].e == NULL:
                break
            k = <Py_ssize_t>(<size_t>self.slots[j].h & <size_t>self.mask)
            # the entry at j may move to i unless its home slot k lies cyclically in (i, j]
            if (i <= j and i < k <= j) or (i > j and (k > i or k <= j)):
                continue
            self.slots[i] = self.slots[j]
            i = j
        self.slots[i].e = NULL
        self.used -= 1
        return gone

    cdef int _remove(self, Py_ssize_t i) except -1:
        cdef TxEntry* gone = self._unlink(i)
        try:
            if self.mask + 1 > TX_MIN_SLOTS and self.used * 8 < self.mask + 1:
                self._resize((self.mask + 1) // 2)
        finally:
            _tx_free(gone)      # last: whatever its value frees sees the table whole
        return 0

    cdef bint discard(self, Py_hash_t h, PyObject* value) except -1:
        """Forget the entry of hash ``h`` holding ``value`` (a linger is over); False when none does."""
        cdef Py_ssize_t i = <Py_ssize_t>(<size_t>h & <size_t>self.mask)
        cdef TxEntry* e
        while True:
            e = self.slots[i].e
            if e == NULL:
                return False
            if self.slots[i].h == h and e.value == value:
                self._remove(i)
                return True
            i = (i + 1) & self.mask

    cdef bint discard_key(self, object key, object value) except -1:
        """Forget ``key`` if it still holds ``value``."""
        cdef Py_ssize_t i = self._slot_of(key)
        if i == -3:
            if self.other.get(key) is value:
                del self.other[key]
                return True
            return False
        if i >= 0 and self.slots[i].e.value == <PyObject*>value:
            self._remove(i)
            return True
        return False

    # ------------------------------------------------------------ the mapping
    cdef Py_ssize_t _slot_of(self, object key) except -2:
        """The slot of a Python key in the C table, -1 when absent there, -3 when the key belongs to
        the dict beside it (``self.other``)."""
        cdef TxKey k
        if not _tx_pykey(key, &k):
            return -3
        return self._find(&k)

    def get(self, key, default=None):
        cdef Py_ssize_t i = self._slot_of(key)
        if i == -3:
            return self.other.get(key, default)
        if i < 0:
            return default
        return <object>self.slots[i].e.value

    def __getitem__(self, key):
        value = self.get(key, _ABSENT)
        if value is _ABSENT:
            raise KeyError(key)
        return value

    def __contains__(self, key) -> bool:
        cdef Py_ssize_t i = self._slot_of(key)
        if i == -3:
            return key in self.other
        return i >= 0

    def __setitem__(self, key, value) -> None:
        cdef TxKey k
        if _tx_pykey(key, &k):
            self.put(&k, value, key)
        else:
            self.other[key] = value

    def __delitem__(self, key) -> None:
        cdef Py_ssize_t i = self._slot_of(key)
        if i == -3:
            del self.other[key]
        elif i < 0:
            raise KeyError(key)
        else:
            self._remove(i)

    def pop(self, key, *default):
        cdef Py_ssize_t i = self._slot_of(key)
        if i == -3:
            return self.other.pop(key, *default)
        if i < 0:
            if default:
                return default[0]
            raise KeyError(key)
        value = <object>self.slots[i].e.value
        self._remove(i)
        return value

    def __len__(self) -> int:
        return self.used + len(self.other)

    cdef object _key_at(self, Py_ssize_t i):
        cdef TxEntry* e = self.slots[i].e
        if e.key == NULL:
            key = _untracked((_s(<const unsigned char*>e.kb, 0, e.blen),
                              _s(<const unsigned char*>e.kb, e.blen + 1, e.klen)))
            Py_INCREF(key)
            e.key = <PyObject*>key
        return <object>e.key

    def keys(self) -> list:
        """The keys, as a list (a snapshot: the table may change while it is walked)."""
        cdef Py_ssize_t i
        out = [self._key_at(i) for i in range(self.mask + 1) if self.slots[i].e != NULL]
        out.extend(self.other)
        return out

    def values(self) -> list:
        cdef Py_ssize_t i
        out = [<object>self.slots[i].e.value for i in range(self.mask + 1) if self.slots[i].e != NULL]
        out.extend(self.other.values())
        return out

    def items(self) -> list:
        cdef Py_ssize_t i
        out = [(self._key_at(i), <object>self.slots[i].e.value) for i in range(self.mask + 1)
               if self.slots[i].e != NULL]
        out.extend(self.other.items())
        return out

    def __iter__(self):
        return iter(self.keys())

    def clear(self) -> None:
        cdef Py_ssize_t i
        cdef TxEntry* e
        for i in range(self.mask + 1):
            e = self.slots[i].e
            if e != NULL:
                self.slots[i].e = NULL
                self.used -= 1
                _tx_free(e)     # after the slot is empty: whatever its value frees sees the table whole
        self.other.clear()

    def __repr__(self) -> str:
        return f"TxTable({len(self)} transactions)"


cdef void _tx_free(TxEntry* e) noexcept:
    cdef PyObject* value = e.value
    cdef PyObject* key = e.key
    free(e)
    if key != NULL:
        Py_DECREF(<object>key)
    Py_DECREF(<object>value)


cdef bint _tx_pykey(object key, TxKey* k) except -1:
    """``key`` = (branch, sent-by) as the fast path writes it; False when the key belongs to the
    table's dict (not two strings, not UTF-8, too long)."""
    cdef const char* b
    cdef const char* v
    cdef Py_ssize_t nb, nv
    if type(key) is not tuple or len(<tuple>key) != 2:
        return False
    kb = (<tuple>key)[0]
    ks = (<tuple>key)[1]
    if type(kb) is not str or type(ks) is not str:
        return False
    try:
        b = PyUnicode_AsUTF8AndSize(kb, &nb)
        v = PyUnicode_AsUTF8AndSize(ks, &nv)
    except UnicodeError:
        return False
    if nb + 1 + nv > TX_KEY_MAX:
        return False
    memcpy(k.kb, b, nb)
    k.kb[nb] = 0
    memcpy(k.kb + nb + 1, v, nv)
    k.blen = nb
    k.klen = nb + 1 + nv
    k.h = _Py_HashBytes(k.kb, k.klen)
    return True


cdef inline bint _tx_rawkey(const unsigned char* p, Scan* sc, TxKey* k) noexcept:
    """The key of a scanned request; False when longer than ``TX_KEY_MAX`` (the Python path takes the
    message)."""
    cdef Py_ssize_t nb = sc.br_e - sc.br_s, nv = sc.sent_e - sc.sent_s, j
    cdef unsigned char c
    if nb + 1 + nv > TX_KEY_MAX:
        return False
    memcpy(k.kb, p + sc.br_s, nb)
    k.kb[nb] = 0
    if sc.sent_upper:
        for j in range(nv):
            c = p[sc.sent_s + j]
            k.kb[nb + 1 + j] = <char>(c | 32) if 65 <= c <= 90 else <char>c
    else:
        memcpy(k.kb + nb + 1, p + sc.sent_s, nv)
    k.blen = nb
    k.klen = nb + 1 + nv
    k.h = _Py_HashBytes(k.kb, k.klen)
    return True


# ---------------------------------------------------------------- forgetting what we answered
cdef struct Linger:
    double deadline
    PyObject* key          # NULL: an entry of a TxTable the fast path made, known by its hash
    Py_hash_t h
    PyObject* value


cdef enum:
    # answered transactions one wake-up forgets at most: a wake-up at 45k calls/s finds about ten
    # due in each queue; the tick forgets whatever a burst left over
    EXPIRE_PER_WAKE = 64

cdef enum:
    RELEASE_SEARCH = 2048     # newest entries LingerQueue.release looks through (an ACK 45 ms late at 45k calls/s)


cdef class LingerQueue:
    """Entries of a transaction table to forget at their deadline, oldest first.

    Every entry of one queue waits the same time, so arrival order is deadline order and a ring
    suffices.  At 10k calls/s the proxy's deque of ``(deadline, table, key, value)`` tuples kept
    some 300k tuples alive, each walked by every garbage collection; here they are three C fields.
    """

    cdef Linger* ring
    cdef Py_ssize_t cap, head, count       # cap: a power of two (positions wrap with a mask, not a division)

    def __cinit__(self):
        self.cap = 1024
        self.ring = <Linger*>malloc(self.cap * sizeof(Linger))
        if self.ring == NULL:
            raise MemoryError()
        self.head = 0
        self.count = 0

    def __dealloc__(self):
        self._drop(self.count)
        free(self.ring)

    cdef int push(self, double deadline, object key, object value) except -1:
        return self._push(deadline, <PyObject*>key, 0, value)

    cdef int push_hashed(self, double deadline, Py_hash_t h, object value) except -1:
        """As :meth:`push`, for an entry of a :class:`TxTable` the fast path made (no key object)."""
        return self._push(deadline, NULL, h, value)

    cdef int _push(self, double deadline, PyObject* key, Py_hash_t h, object value) except -1:
        """Queue an entry (``key`` NULL: one of a TxTable, known by its hash ``h``)."""
        cdef Linger* grown
        cdef Py_ssize_t k, first
        if self.count == self.cap:
            grown = <Linger*>malloc(2 * self.cap * sizeof(Linger))
            if grown == NULL:
                raise MemoryError()
            first = self.cap - self.head       # the entries up to the end of the ring, then the rest
            memcpy(grown, self.ring + self.head, first * sizeof(Linger))
            memcpy(grown + first, self.ring, self.head * sizeof(Linger))
            free(self.ring)
            self.ring = grown
            self.head = 0
            self.cap *= 2
        k = (self.head + self.count) & (self.cap - 1)
        if key != NULL:
            Py_INCREF(<object>key)
        Py_INCREF(value)
        self.ring[k].deadline = deadline
        self.ring[k].key = key
        self.ring[k].h = h
        self.ring[k].value = <PyObject*>value
        self.count += 1
        return 0

    cdef void _drop(self, Py_ssize_t n):
        cdef Linger* e
        while n > 0 and self.count > 0:
            e = &self.ring[self.head]
            if e.key != NULL:
                Py_DECREF(<object>e.key)
            Py_DECREF(<object>e.value)
            self.head = (self.head + 1) & (self.cap - 1)
            self.count -= 1
            n -= 1

    def expire(self, double now, table, Py_ssize_t limit=-1) -> int:
        """Forget every entry due by ``now`` (at most ``limit`` of them, when not negative): removed from
        ``table`` (a dict or a :class:`TxTable`) if it still holds that value."""
        return self._expire(now, table, limit)

    cdef Py_ssize_t _expire(self, double now, table, Py_ssize_t limit) except -1:
        cdef Linger* e
        cdef PyObject* held
        cdef Py_ssize_t done = 0
        cdef TxTable tt = table if type(table) is TxTable else None
        cdef dict dt = None
        if tt is None:
            dt = <dict?>table
        while self.count > 0 and self.ring[self.head].deadline <= now and done != limit:
            e = &self.ring[self.head]
            if e.value != <PyObject*>None:     # None: released, another queue forgets it
                if tt is not None:
                    if e.key == NULL:
                        tt.discard(e.h, e.value)
                    else:
                        tt.discard_key(<object>e.key, <object>e.value)
                elif e.key != NULL:
                    held = PyDict_GetItem(dt, <object>e.key)
                    if held != NULL and held == e.value:
                        PyDict_DelItem(dt, <object>e.key)
            self._drop(1)
            done += 1
        return done

    cpdef bint release(self, object value, Py_ssize_t max_back=RELEASE_SEARCH) except -1:
        """Let go of the newest entry holding ``value`` (searching the ``max_back`` newest entries):
        its deadline stays, but it keeps nothing alive and forgets nothing.  False when not found.

        A rejection lingers 64*T1 in case its ACK never comes; once the ACK came, the ACKed queue
        forgets it after T4 and this entry would only keep its response and key alive for another
        27 seconds -- at 10k calls/s some 300 MB of memory.  The ACK comes a round trip after the
        rejection, so the entry is among the newest few.
        """
        cdef Py_ssize_t k, back = 0
        cdef Linger* e
        while back < self.count and back < max_back:
            k = (self.head + self.count - 1 - back) & (self.cap - 1)
            e = &self.ring[k]
            if e.value == <PyObject*>value:
                if e.key != NULL:
                    Py_DECREF(<object>e.key)
                Py_DECREF(<object>e.value)
                Py_INCREF(None)
                Py_INCREF(None)
                e.key = <PyObject*>None
                e.value = <PyObject*>None
                return True
            back += 1
        return False

    def append(self, double deadline, key, value) -> None:
        """Queue ``key`` to be forgotten at ``deadline`` if the table still holds ``value`` then
        (deadlines must not decrease: the queue is taken in arrival order)."""
        if self.count and deadline < self.ring[(self.head + self.count - 1) & (self.cap - 1)].deadline:
            raise ValueError("deadlines must not decrease")
        self.push(deadline, key, value)

    def clear(self) -> None:
        """Forget the queue itself (the table keeps its entries)."""
        self._drop(self.count)

    def __len__(self) -> int:
        return self.count


# ---------------------------------------------------------------- the To tag of our own rejections
cdef inline unsigned long long _fnv1a(const unsigned char* s, Py_ssize_t n,
                                      unsigned long long h) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ s[i]) * 1099511628211ULL
    return h


cdef unsigned long long FNV_OFFSET = 14695981039346656037ULL
cdef const char* HEXD = b"0123456789abcdef"


cdef inline void _hex12(unsigned long long h, char* out) noexcept nogil:
    cdef int i
    for i in range(12):
        out[11 - i] = HEXD[h & 15]
        h >>= 4


def tag_digest(bytes data) -> str:
    """12 hex digits of the 64-bit FNV-1a hash of ``data`` (its low 48 bits): the To tag of a response
    we generate is ``"cg"`` + the digest of Call-ID, CSeq number, From tag and top Via joined by NUL
    (``proxy.tag_digest`` is the pure-Python twin).  Not a secret: a tag only has to differ between
    calls, and FNV costs a few ns per byte where blake2 cost half a microsecond per response."""
    cdef char out[12]
    _hex12(_fnv1a(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), FNV_OFFSET), out)
    return PyUnicode_DecodeASCII(out, 12, NULL)


cdef class FastPath:
    """recvmmsg, scan, decide, answer, sendmmsg: one batch per :meth:`run` call.

    Args:
        fd: a bound non-blocking UDP socket (borrowed, not owned).
        capacity: datagrams per batch.
        bufsize: bytes per datagram buffer.
    """

    cdef int fd
    cdef int family
    cdef unsigned int capacity
    cdef size_t bufsize
    cdef char* bufs
    cdef mmsghdr* msgs
    cdef iovec* iovs
    cdef sockaddr_storage* addrs
    # send queue: responses of this batch, with the raw address they go back to
    cdef mmsghdr* smsgs
    cdef iovec* siovs
    cdef sockaddr_storage* saddrs
    cdef list sdata
    cdef unsigned int nsend
    cdef unsigned int scapacity      # forwarding sends up to two datagrams per datagram read
    cdef list soverflow              # what did not fit, as (data, addr), sent by the listener
    # configuration
    cdef Core core
    cdef bytes server_tail           # "Server: ...\r\nContent-Length: 0\r\n\r\n"
    cdef list status_lines           # per rule: b"SIP/2.0 <code> <reason>\r\n"
    cdef list reason_lines           # per rule: b"Reason: ...\r\n" or b""
    cdef list rule_names
    cdef int r_allow, r_emergency, r_untrusted
    cdef Py_ssize_t max_size
    cdef object trust_identity       # callable(ip) -> bool
    cdef public bint enabled
    # per batch, read and reset by the proxy: the call records of the decisions, as rows_mode says
    cdef public int rows_mode
    cdef public list decisions       # ROWS_TUPLES: call-record rows + (shadowed,)
    cdef Packed packed               # ROWS_PACKED: RowBuffer's layout (take_packed)
    cdef list rule_names_b           # per rule index, the name in UTF-8
    # decisions of the batch per rule index, and their core times by latency bucket (and summed)
    cdef unsigned long rule_n[MAX_RULES]
    cdef unsigned long lat_n[MAX_BUCKETS]
    cdef double lat_bounds[MAX_BUCKETS]
    cdef int n_bounds
    cdef double lat_sum
    cdef bint counted
    # what the fast path answered, forgotten after TX_LINGER (or T4 once ACKed)
    cdef readonly LingerQueue lingering, lingering_acked
    cdef public unsigned long invites_in, acks_in, retrans_out, slow
    cdef public dict out_codes
    cdef readonly unsigned long long dropped_keepalives
    # the compiled forward path (_forward.pxi); None: allowed calls and responses go to the proxy
    cdef Forwarder fwd
    cdef public dict in_codes        # responses handled here, by code
    # one wake-up of the listener (pump): batches per wake-up, datagrams per batch, and when the
    # decisions are drained (rows gathered, or seconds since the last drain at loop time kept_since)
    cdef public unsigned int max_rounds, max_batch
    cdef public Py_ssize_t bookkeeping_rows
    cdef public double bookkeeping_interval, kept_since
    # answered transactions each wake-up forgets, at most, once its answers are out (0: only the tick)
    cdef public Py_ssize_t expire_per_wake

    def __cinit__(self, int fd, unsigned int capacity=64, size_t bufsize=65535):
        self.family = batch_family(fd, capacity, bufsize)
        self.fd = fd
        self.capacity = capacity
        self.bufsize = bufsize
        self.bufs = <char*>malloc(capacity * bufsize)
        alloc_vectors(capacity, &self.msgs, &self.iovs, &self.addrs)
        alloc_vectors(capacity * 4, &self.smsgs, &self.siovs, &self.saddrs)
        if self.bufs == NULL:
            raise MemoryError()
        self.sdata = []
        self.nsend = 0
        self.scapacity = capacity * 4
        self.soverflow = []
        self.in_codes = {}
        self.decisions = []
        self.rows_mode = ROWS_TUPLES
        self.packed.data = NULL
        self.packed.cap = 0
        reset_packed(&self.packed)
        self.rule_names_b = []
        self.out_codes = {}
        self.lingering = LingerQueue()
        self.lingering_acked = LingerQueue()
        self.n_bounds = 0
        self._reset_counts()
        self.enabled = False
        self.max_size = 65535
        self.max_rounds = 8
        self.max_batch = capacity
        self.bookkeeping_rows = 256
        self.bookkeeping_interval = 0.05
        self.kept_since = 0.0
        self.expire_per_wake = EXPIRE_PER_WAKE

    def __dealloc__(self):
        free(self.packed.data)
        free(self.bufs)
        free_vectors(self.msgs, self.iovs, self.addrs)
        free_vectors(self.smsgs, self.siovs, self.saddrs)

    @property
    def fileno(self) -> int:
        return self.fd

    def configure(self, core, rule_names, codes, reasons, bint hide_reason, str server_line,
                  Py_ssize_t max_size, trust_identity, latency_bounds=()):
        """Take the decision core and the response texts; a core other than the compiled one disables the path.

        Args:
            core: the guard's core (``callguard._core.Core`` enables the fast path).
            rule_names: rule name per rule index (``settings.RULE_NAMES``).
            codes: rejection code per rule index.
            reasons: reason phrase per rule index.
            hide_reason: no Reason header in rejections.
            server_line: ``"Server: ..."`` as the proxy writes it.
            max_size: larger datagrams go to the slow path (it answers 513).
            trust_identity: ``ip -> bool``, whether P-Asserted-Identity of that source is the caller.
            latency_bounds: upper bounds (seconds) of the decision-time buckets counted per batch
                (``metrics.LATENCY_BUCKETS``); the last one should be infinity.
        """
        if len(latency_bounds) > MAX_BUCKETS:
            raise ValueError(f"at most {MAX_BUCKETS} latency buckets")
        self.n_bounds = len(latency_bounds)
        for k, bound in enumerate(latency_bounds):
            self.lat_bounds[k] = bound
        self._reset_counts()
        if not isinstance(core, Core):
            self.enabled = False
            self.core = None
            return
        if len(rule_names) > MAX_RULES:
            raise ValueError(f"at most {MAX_RULES} rules")
        self.core = <Core>core
        self.rule_names = list(rule_names)
        self.rule_names_b = [str(name).encode("utf-8") for name in self.rule_names]
        self.r_allow = self.rule_names.index("allow")
        self.r_emergency = self.rule_names.index("emergency")
        self.r_untrusted = self.rule_names.index("untrusted_source")
        self.status_lines = []
        self.reason_lines = []
        for i, name in enumerate(self.rule_names):
            code = int(codes[i]) if codes[i] else 0
            reason = reasons[i] or "Rejected"
            self.status_lines.append(f"SIP/2.0 {code} {_clean(reason)}\r\n".encode("utf-8", "surrogateescape"))
            if hide_reason:
                self.reason_lines.append(b"")
            else:
                text = f"{name}: {reasons[i]}".replace("\\", "\\\\").replace('"', '\\"')
                self.reason_lines.append(f'Reason: SIP;cause={code};text="{_clean(text)}"\r\n'.encode(
                    "utf-8", "surrogateescape"))
        self.server_tail = (server_line + "\r\nContent-Length: 0\r\n\r\n").encode("utf-8", "surrogateescape")
        self.max_size = max_size
        self.trust_identity = trust_identity
        self.enabled = True

    cdef void _queue(self, bytes data, sockaddr_storage* ss, socklen_t alen) except *:
        cdef unsigned int k = self.nsend
        cdef int port
        if k >= self.scapacity:
            self.soverflow.append((data, _addr_tuple(ss, _ip_of(ss, &port), port)))
            return
        self.sdata.append(data)
        memcpy(&self.saddrs[k], ss, alen)
        memset(&self.smsgs[k], 0, sizeof(mmsghdr))
        self.siovs[k].iov_base = <void*>PyBytes_AS_STRING(data)
        self.siovs[k].iov_len = PyBytes_GET_SIZE(data)
        self.smsgs[k].msg_hdr.msg_name = &self.saddrs[k]
        self.smsgs[k].msg_hdr.msg_namelen = alen
        self.smsgs[k].msg_hdr.msg_iov = &self.siovs[k]
        self.smsgs[k].msg_hdr.msg_iovlen = 1
        self.nsend = k + 1

    def send_many(self, list items):
        """Send ``[(data, addr), ...]`` (the proxy's own sends); returns how many left (as UdpBatch.send_many)."""
        if self.nsend:
            raise RuntimeError("flush() the fast path's answers first")
        return send_batch(self.fd, self.family, items, self.capacity, self.smsgs, self.siovs, self.saddrs)

    def flush(self):
        """Send the queued responses; returns those the socket did not take, as ``[(data, addr)]``."""
        rest = self._flush_out()
        return [] if rest is None else rest

    cdef list _flush_out(self):
        """Send the queued responses; those the socket did not take as ``[(data, addr)]``, or None."""
        cdef int sent = 0
        cdef unsigned int done = 0, k
        cdef int port
        cdef list rest = None
        while done < self.nsend:
            sent = sendmmsg(self.fd, self.smsgs + done, self.nsend - done, MSG_DONTWAIT)   # GIL held: see recv_batch
            if sent < 0:
                if errno == EINTR:
                    continue
                break
            done += sent
            if sent == 0:
                break
        if done < self.nsend:
            rest = []
            for k in range(done, self.nsend):
                ip = _ip_of(&self.saddrs[k], &port)
                rest.append((self.sdata[k], _addr_tuple(&self.saddrs[k], ip, port)))
        if self.nsend:
            self.nsend = 0
            self.sdata = []
        if self.soverflow:
            if rest is None:
                rest = []
            rest.extend(self.soverflow)
            self.soverflow = []
        return rest

    def pump(self, listener, proxy, loop):
        """One wake-up of ``listener`` (a transport.FastUdpListener): what its ``_on_readable`` did in Python.

        Up to ``max_rounds`` batches of ``max_batch`` datagrams, each handled by :meth:`run` and its
        answers sent at once (latency stays one batch); the proxy drains the decisions
        (``proxy.on_batch``) once ``bookkeeping_rows`` have gathered or ``bookkeeping_interval``
        has passed.  The loop calls this directly (``add_reader``), so a wake-up costs no Python
        frame: at 10k calls/s there are some 4000 of them a second.
        """
        cdef unsigned int round_
        cdef int got
        cdef double now
        cdef list rest
        cdef TxTable stx = proxy.stx
        listener.in_batch = True
        try:
            for round_ in range(self.max_rounds):
                try:
                    got = self._run(proxy, listener, stx, loop.time(), HEADROOM_ASK, self.max_batch)
                except OSError:
                    # An ICMP error (port or host unreachable) queued with IP_RECVERR, or a transient one.
                    listener.errors += 1
                    listener.read_errors()
                    continue
                except Exception as exc:  # noqa - the rest of the batch is lost, never the listener
                    fault = getattr(proxy, "_fault", None)
                    if fault is not None:
                        fault(exc, None, None, None)
                    got = self.max_batch
                if got == 0 and round_ == 0:
                    # Woken with nothing to read: a queued error keeps the socket signalled.
                    listener.read_errors()
                rest = self._flush_out()
                if rest is not None:
                    listener.out.extend(rest)
                now = loop.time()
                if len(self.decisions) + self.packed.rows >= self.bookkeeping_rows \
                        or now - self.kept_since >= self.bookkeeping_interval:
                    self.kept_since = now
                    proxy.on_batch(self)
                if listener.out:
                    listener._flush()
                if <unsigned int>got < self.max_batch:
                    break
            if self.expire_per_wake > 0:
                # What lingered out, forgotten while the loop is awake anyway and its answers are
                # out: at 30k calls/s the 20 ms tick forgot some 600 at once, 170 us (up to 0.55 ms)
                # that the next datagrams waited for.
                now = loop.time()
                self.lingering._expire(now, stx, self.expire_per_wake)
                self.lingering_acked._expire(now, stx, self.expire_per_wake)
        finally:
            listener.in_batch = False
            if listener.out:
                listener._flush()

    def configure_forward(self, proxy, ep, list routes, str user_agent, list canon_exc, tuple queues,
                          double trunk_timeout, double timer_c_first):
        """Forward allowed INVITEs and handle the trunks' responses here (``proxy`` None: leave them to it).

        Args:
            proxy: the proxy whose tables (``ctx``, the given ``stx``), timers and expiry queues are used.
            ep: the listener this fast path serves; only what comes in and goes out through it is handled.
            routes: per trunk of ``proxy.trunks``: ``(trunk, prefixes, via_head, record_route, addr)``,
                ``via_head`` being ``b"Via: SIP/2.0/UDP <sent-by>;branch=z9hG4bKcg"`` (None: the trunk is
                not reached through ``ep`` over UDP), ``record_route`` the Record-Route line or ``b""``.
            user_agent: ``sip.user_agent`` (the proxy's own ACK writes it as it is).
            canon_exc: ``(lower-case name, spelling)`` of the header names not spelled by capitalisation.
            queues: the proxy's timer queues for the trunk timeout, Timer A (T1) and the first stage of Timer C.
            trunk_timeout: ``sip.trunk_timeout``.
            timer_c_first: the first stage of Timer C (``proxy.timer_c_stages``), the delay of ``queues[2]``.
        """
        cdef Forwarder fwd
        if proxy is None or not self.enabled:
            self.fwd = None
            return
        fwd = Forwarder()
        fwd.setup(self.family, <Py_ssize_t>self.bufsize, proxy, ep, routes,
                  ("User-Agent: " + user_agent + "\r\n").encode("utf-8", "surrogateescape"), canon_exc, queues,
                  trunk_timeout, timer_c_first)
        self.fwd = fwd

    @property
    def forwarding(self) -> bool:
        """Whether allowed INVITEs and the trunks' responses are handled here."""
        return self.fwd is not None

    cdef void _reset_counts(self):
        memset(self.rule_n, 0, sizeof(self.rule_n))
        memset(self.lat_n, 0, sizeof(self.lat_n))
        self.lat_sum = 0.0
        self.counted = False

    def take_counts(self):
        """What the fast path counted since the last call, reset: ``None`` when nothing, else
        ``(INVITEs in, ACKs in, [(status sent, n), ...], [(rule, n), ...], [decisions per latency
        bucket], sum of decision times in seconds)`` -- ``Metrics.fast_batch`` takes it as it is."""
        cdef int k
        if not (self.counted or self.invites_in or self.acks_in or self.out_codes):
            return None
        if self.counted:
            by_rule = [(self.rule_names[k], self.rule_n[k]) for k in range(len(self.rule_names)) if self.rule_n[k]]
            buckets = [self.lat_n[k] for k in range(self.n_bounds)]
        else:
            by_rule = []
            buckets = [0] * self.n_bounds
        out = (self.invites_in, self.acks_in, list(self.out_codes.items()), by_rule, buckets, self.lat_sum)
        self.invites_in = self.acks_in = 0
        self.out_codes.clear()
        self._reset_counts()
        return out

    def expire(self, double now, stx) -> int:
        """Forget the answered transactions whose linger is over (the proxy's timer tick calls this)."""
        return self.lingering.expire(now, stx) + self.lingering_acked.expire(now, stx)

    def run(self, proxy, ep, TxTable stx, double mono, long headroom, unsigned int max_batch=64):
        """Receive and handle one batch; returns the number of datagrams read (raises OSError).

        ``headroom``: INVITEs that may still be forwarded before the proxy is at ``max_in_flight``
        (0 or less: every INVITE takes the slow path, which answers 503).
        """
        return self._run(proxy, ep, stx, mono, headroom, max_batch)

    cdef int _run(self, proxy, ep, TxTable stx, double mono, long headroom, unsigned int max_batch) except -1:
        cdef unsigned int i, count = max_batch if max_batch < self.capacity else self.capacity
        cdef int got, method, port, rule, src
        cdef unsigned int length, k
        cdef const unsigned char* p
        cdef Scan sc
        cdef Decision dec
        cdef Num cr, ce
        cdef double now, t0, lat
        cdef bint fast = self.enabled
        cdef socklen_t alen
        cdef TxKey tk
        cdef Py_ssize_t cr_s, cr_e
        cdef PyObject* prevp
        handler = proxy.handle
        got = recv_batch(self.fd, self.msgs, self.iovs, self.addrs, self.bufs, self.bufsize, count)
        for i in range(<unsigned int>got):
            length = self.msgs[i].msg_len
            alen = self.msgs[i].msg_hdr.msg_namelen
            p = <const unsigned char*>(self.bufs + i * self.bufsize)
            if is_keepalive(p, length):
                self.dropped_keepalives += 1
                continue
            method = scan(p, length, &sc) if fast and length <= self.max_size else M_OTHER
            ip = _ip_of(&self.addrs[i], &port)
            if method == M_OTHER and self.fwd is not None and length <= self.max_size and p[0] == 83:
                try:
                    done = self.fwd.response(self, ep, p, length, i, mono)
                except Exception as exc:  # noqa - as Proxy.handle: counted and logged, never lost silently
                    done = 1
                    proxy._fault(exc, None, ep, _addr_tuple(&self.addrs[i], ip, port))
                if done:
                    continue
            if method == M_INVITE and headroom == HEADROOM_ASK:
                # asked of the proxy at the batch's first INVITE: half the wake-ups bring ACKs only
                headroom = proxy.fast_headroom()
            if method == M_OTHER or (method == M_INVITE and headroom <= 0):
                self.slow += 1
                handler(PyBytes_FromStringAndSize(<const char*>p, length), _addr_tuple(&self.addrs[i], ip, port),
                        ep)
                continue
            # The server transaction, found from the datagram's bytes: no key object is made unless
            # a transaction object needs one (a forwarded call, an ACK to a relayed final).
            if not _tx_rawkey(p, &sc, &tk):
                self.slow += 1
                handler(PyBytes_FromStringAndSize(<const char*>p, length), _addr_tuple(&self.addrs[i], ip, port),
                        ep)
                continue
            prevp = stx.find(&tk)
            prev = None if prevp == NULL else <object>prevp
            if method == M_ACK:
                if type(prev) is bytes:
                    # The ACK to our own final: absorbed; the transaction goes after Timer I.
                    self.acks_in += 1
                    self.lingering_acked.push_hashed(mono + T4, tk.h, prev)
                    self.lingering.release(prev, RELEASE_SEARCH)
                elif prev is not None and (prev.final >= 300 or not prev.final):
                    # The ACK to a non-2xx final the proxy relayed (and ACKed itself): absorbed too.
                    self.acks_in += 1
                    if prev.final:
                        self._acked(proxy, prev.key, prev, mono)
                else:
                    self.slow += 1
                    handler(PyBytes_FromStringAndSize(<const char*>p, length),
                            _addr_tuple(&self.addrs[i], ip, port), ep)
                continue
            if prev is not None:
                if type(prev) is bytes:
                    # A retransmission: the same bytes again, no new attempt.
                    self.invites_in += 1
                    self.retrans_out += 1
                    self._queue(<bytes>prev, &self.addrs[i], alen)
                    code = int(prev[8:11])
                    n = self.out_codes.get(code)
                    self.out_codes[code] = 1 if n is None else n + 1
                else:
                    self.slow += 1
                    handler(PyBytes_FromStringAndSize(<const char*>p, length),
                            _addr_tuple(&self.addrs[i], ip, port), ep)
                continue
            # a new INVITE: decide
            # the numbers are read where they lie: the scan took only printable ASCII, which is
            # what a str of PyUnicode_1BYTE_KIND holds, so no string is made for either
            if sc.pai_s >= 0 and self.trust_identity(ip):
                cr_s, cr_e = sc.pai_s, sc.pai_e
            else:
                cr_s, cr_e = sc.from_s, sc.from_e
            now = _clock(CLOCK_REALTIME)
            t0 = _clock(CLOCK_MONOTONIC)
            try:
                self.core._decide_text(PyUnicode_1BYTE_KIND, p + cr_s, cr_e - cr_s, PyUnicode_1BYTE_KIND,
                                       p + sc.user_s, sc.user_e - sc.user_s, ip, now, &dec, &cr, &ce, &src,
                                       self.rows_mode == ROWS_TUPLES)
            except Exception:  # noqa - the slow path decides again and fails open there, counted
                self.slow += 1
                handler(PyBytes_FromStringAndSize(<const char*>p, length), _addr_tuple(&self.addrs[i], ip, port),
                        ep)
                continue
            lat = _clock(CLOCK_MONOTONIC) - t0
            self.invites_in += 1
            rule = dec.rule
            self.rule_n[rule] += 1
            self.lat_sum += lat
            for k in range(<unsigned int>self.n_bounds):
                if lat <= self.lat_bounds[k]:
                    self.lat_n[k] += 1
                    break
            self.counted = True
            allowed = rule == self.r_allow or rule == self.r_emergency
            code = 0 if allowed else self.core.codes[rule]
            # The call record: packed here, or a tuple for the proxy (decision logs); a rejection
            # then makes no Python object but its response.
            if self.rows_mode == ROWS_PACKED:
                self._pack(now, p, &sc, ip, &cr, &ce, rule, allowed, code, dec.score, <long>(lat * 1e6))
            shadowed = ()
            if dec.nshadow and (allowed or self.rows_mode == ROWS_TUPLES):
                shadowed = tuple([self.rule_names[dec.shadow[k]] for k in range(dec.nshadow)])
            call_id = None
            if allowed or self.rows_mode == ROWS_TUPLES:
                call_id = _s(p, sc.cid_s, sc.cid_e)
                if self.core._cr_s is None:
                    self.core._strings(&cr, &ce, src)
            if self.rows_mode == ROWS_TUPLES:
                self.decisions.append(_untracked((now, call_id, ip, self.core._cr_s, self.core._ce_s,
                                                  self.rule_names[rule], "allow" if allowed else "reject", code,
                                                  dec.score, <long>(lat * 1e6), shadowed)))
            if allowed:
                headroom -= 1
                if self.fwd is not None and "untrusted_source" not in shadowed:
                    key = _untracked((PyUnicode_DecodeASCII(tk.kb, tk.blen, NULL),
                                      PyUnicode_DecodeASCII(tk.kb + tk.blen + 1, tk.klen - tk.blen - 1, NULL)))
                    if self._forward(proxy, ep, p, length, &sc, i, stx, &tk, key, call_id, ip, port, mono, now):
                        continue
                proxy.fast_allowed(PyBytes_FromStringAndSize(<const char*>p, length),
                                   _addr_tuple(&self.addrs[i], ip, port), ep, self.core._cr_s, self.core._ce_s,
                                   shadowed)
                continue
            resp = self._reject(p, &sc, rule)
            stx.put(&tk, resp, None)
            self.lingering.push_hashed(mono + TX_LINGER, tk.h, resp)
            self._queue(resp, &self.addrs[i], alen)
            n = self.out_codes.get(code)
            self.out_codes[code] = 1 if n is None else n + 1
        return got

    cdef int _pack(self, double now, const unsigned char* p, Scan* sc, str ip, Num* cr, Num* ce, int rule,
                   bint allowed, int code, double score, long latency_us) except -1:
        """The decision's call record, packed as ``RowBuffer.append`` packs the proxy's tuple of it."""
        cdef RowHead head
        cdef const char* texts[N_TEXT]
        cdef Py_ssize_t n
        head.time = now
        head.code = code
        head.score = score
        head.latency_us = <double>latency_us
        texts[0] = <const char*>p + sc.cid_s           # printable ASCII: the scan took nothing else
        head.lens[0] = <uint32_t>(sc.cid_e - sc.cid_s)
        texts[1] = PyUnicode_AsUTF8AndSize(ip, &n)
        head.lens[1] = <uint32_t>n
        # the normalised numbers: their digits, or the strings the core made (an area not in ASCII)
        if self.core._cr_s is None:
            texts[2] = cr.d
            head.lens[2] = <uint32_t>cr.n
            texts[3] = ce.d
            head.lens[3] = <uint32_t>ce.n
        else:
            texts[2] = PyUnicode_AsUTF8AndSize(self.core._cr_s, &n)
            head.lens[2] = <uint32_t>n
            texts[3] = PyUnicode_AsUTF8AndSize(self.core._ce_s, &n)
            head.lens[3] = <uint32_t>n
        texts[4] = PyBytes_AS_STRING(<bytes>self.rule_names_b[rule])
        head.lens[4] = <uint32_t>PyBytes_GET_SIZE(<bytes>self.rule_names_b[rule])
        texts[5] = b"allow" if allowed else b"reject"
        head.lens[5] = 5 if allowed else 6
        return pack_row(&self.packed, &head, texts)

    def take_packed(self):
        """The call records packed since the last call, reset: ``None`` when none, else ``(data, rows,
        earliest time, latest time, odd)`` -- ``RecordStore.add_packed`` takes it as it is."""
        if self.packed.rows == 0:
            return None
        out = (PyBytes_FromStringAndSize(self.packed.data, self.packed.size), self.packed.rows, self.packed.tmin,
               self.packed.tmax, self.packed.odd)
        reset_packed(&self.packed)
        if self.packed.cap > PACKED_KEEP:     # a burst: give the memory back
            free(self.packed.data)
            self.packed.data = NULL
            self.packed.cap = 0
        return out

    cdef bint _forward(self, proxy, ep, const unsigned char* p, Py_ssize_t n, Scan* sc, unsigned int i, TxTable stx,
                       const TxKey* tk, key, call_id, ip, int port, double mono, double now) except -1:
        """The compiled forward path for an allowed INVITE; False: the proxy forwards it (fast_allowed)."""
        try:
            return self.fwd.forward(self, ep, p, n, sc, i, stx, tk, key, call_id, ip, port, mono, now) != 0
        except Exception as exc:  # noqa - an internal fault: counted and logged, the Python path forwards it
            proxy._fault(exc, None, ep, _addr_tuple(&self.addrs[i], ip, port))
            return False

    cdef int _acked(self, proxy, key, prev, double mono) except -1:
        if self.fwd is not None:
            return self.fwd.acked(key, prev, mono)
        proxy._acked(key, prev)
        return 0

    cdef bytes _reject(self, const unsigned char* p, Scan* sc, int rule):
        """The rejection, as Proxy._response builds it (the To tag as Proxy._respond derives it)."""
        cdef bytes status = <bytes>self.status_lines[rule]
        cdef bytes reason = <bytes>self.reason_lines[rule]
        cdef bytes tail = self.server_tail
        cdef Py_ssize_t size, k, cseq_n
        cdef char* o
        cdef bytes out
        cdef char tag[12]
        cdef unsigned long long h
        cdef const unsigned char* zero = b"\0"
        # "cg" + tag_digest(call_id \0 cseq \0 from_tag \0 top via), hashed in place
        cseq_n = sc.cseq_e - sc.cseq_s
        h = _fnv1a(p + sc.cid_s, sc.cid_e - sc.cid_s, FNV_OFFSET)
        h = _fnv1a(zero, 1, h)
        h = _fnv1a(p + sc.cseq_s, cseq_n, h)
        h = _fnv1a(zero, 1, h)
        if sc.ftag_s >= 0:
            h = _fnv1a(p + sc.ftag_s, sc.ftag_e - sc.ftag_s, h)
        h = _fnv1a(zero, 1, h)
        h = _fnv1a(p + sc.via_s[0], sc.via_e[0] - sc.via_s[0], h)
        _hex12(h, tag)
        size = PyBytes_GET_SIZE(status) + PyBytes_GET_SIZE(reason) + PyBytes_GET_SIZE(tail)
        for k in range(sc.nvia):
            size += 7 + sc.via_e[k] - sc.via_s[k]
        # "From: " "\r\nTo: " ";tag=cg" tag "\r\nCall-ID: " "\r\nCSeq: " " INVITE\r\n"
        size += (sc.from_e - sc.from_s) + (sc.to_e - sc.to_s) + (sc.cid_e - sc.cid_s) + cseq_n \
            + 6 + 6 + 7 + 12 + 11 + 8 + 9
        out = PyBytes_FromStringAndSize(NULL, size)
        o = PyBytes_AS_STRING(out)
        o = _put(o, PyBytes_AS_STRING(status), PyBytes_GET_SIZE(status))
        for k in range(sc.nvia):
            o = _put(o, b"Via: ", 5)
            o = _put(o, <const char*>p + sc.via_s[k], sc.via_e[k] - sc.via_s[k])
            o = _put(o, b"\r\n", 2)
        o = _put(o, b"From: ", 6)
        o = _put(o, <const char*>p + sc.from_s, sc.from_e - sc.from_s)
        o = _put(o, b"\r\nTo: ", 6)
        o = _put(o, <const char*>p + sc.to_s, sc.to_e - sc.to_s)
        o = _put(o, b";tag=cg", 7)
        o = _put(o, tag, 12)
        o = _put(o, b"\r\nCall-ID: ", 11)
        o = _put(o, <const char*>p + sc.cid_s, sc.cid_e - sc.cid_s)
        o = _put(o, b"\r\nCSeq: ", 8)
        o = _put(o, <const char*>p + sc.cseq_s, cseq_n)
        o = _put(o, b" INVITE\r\n", 9)
        o = _put(o, PyBytes_AS_STRING(reason), PyBytes_GET_SIZE(reason))
        o = _put(o, PyBytes_AS_STRING(tail), PyBytes_GET_SIZE(tail))
        return out


cdef inline char* _put(char* o, const char* s, Py_ssize_t n) noexcept nogil:
    memcpy(o, s, n)
    return o + n


def _clean(str text) -> str:
    """Text safe on one header line, as proxy.clean."""
    return "".join(" " if (ord(ch) < 32 and ch != "\t") or ord(ch) == 127 else ch for ch in text)


def tx_probe(TxTable table, bytes data, value=None):
    """The transaction the fast path finds in ``table`` for a request datagram (None: none); with
    ``value``, store it there first, as the fast path stores a rejection (for tests).  ValueError when
    the fast path would leave the datagram to the Python path."""
    cdef Scan sc
    cdef TxKey tk
    cdef PyObject* found
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    if scan(p, PyBytes_GET_SIZE(data), &sc) == M_OTHER:
        raise ValueError("not a request the fast path handles")
    if not _tx_rawkey(p, &sc, &tk):
        raise ValueError("transaction key too long for the fast path")
    if value is not None:
        table.put(&tk, value, None)
    found = table.find(&tk)
    return None if found == NULL else <object>found


def scan_probe(bytes data) -> tuple:
    """The vector scans and their byte-loop definitions on the same octets (for tests):
    ``((line end, colon), (line end, colon), uri_ok, uri_ok_bytes, bare uri_ok, bare uri_ok_bytes,
    header_id, has_mark)``; the pairs must agree, vectors or not (``sse2`` says which ran)."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data), c1 = -9, c2 = -9, e1, e2
    e1 = line_end(p, n, &c1)
    e2 = line_end_bytes(p, n, &c2)
    return ((e1, c1), (e2, c2), uri_ok(p, n, False), uri_ok_bytes(p, n, False), uri_ok(p, n, True),
            uri_ok_bytes(p, n, True), header_id(p, n), has_mark(p, n))


sse2 = bool(SSE2)
HEADER_IDS = {"via": H_VIA, "from": H_FROM, "to": H_TO, "call-id": H_CALLID, "cseq": H_CSEQ,
              "max-forwards": H_MF, "content-length": H_CL, "p-asserted-identity": H_PAI,
              "proxy-require": H_PROXY_REQUIRE, "contact": H_CONTACT}


def scan_kind(bytes data) -> int:
    """What the strict scan makes of one datagram: 0 other (slow path), 1 INVITE, 2 ACK (for tests)."""
    cdef Scan sc
    return scan(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), &sc)


include "_forward.pxi"

