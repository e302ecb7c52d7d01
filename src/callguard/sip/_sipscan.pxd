# The SIP byte-scanning primitives of the compiled parser (_sipcore) and of the proxy's fast path
# (_fastpath), kept in this one place so that the fast path accepts exactly what the parser accepts.
#
# Everything here is compiled into each module that cimports it (inline functions, static constant
# tables), so a call costs no more than it did when each module had its own copy: no cross-module
# function-pointer table, nothing to initialise at import.  The byte checks are equivalent to the
# pure-Python reference's checks on the decoded text (callguard.sip.message) because every SIP
# delimiter is ASCII.

from libc.string cimport memchr

# Character classes: one int per octet (the scans measured about 8% slower with byte tables), static
# constant data built by the C compiler (GNU range designators: gcc and clang), identical in every
# module that cimports this file.
cdef extern from *:
    """
    #ifndef CALLGUARD_SIPSCAN_TABLES
    #define CALLGUARD_SIPSCAN_TABLES
    #define CG_ALPHA ['a' ... 'z'] = 1, ['A' ... 'Z'] = 1
    #define CG_DIGIT ['0' ... '9'] = 1
    /* token (RFC 3261 25.1): alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~" */
    static const int cg_sip_token[256] = {
        CG_ALPHA, CG_DIGIT, ['-'] = 1, ['.'] = 1, ['!'] = 1, ['%'] = 1, ['*'] = 1, ['_'] = 1, ['+'] = 1,
        ['`'] = 1, [39] = 1, ['~'] = 1};
    /* host name characters of a Via sent-by */
    static const int cg_sip_hostc[256] = {CG_ALPHA, CG_DIGIT, ['-'] = 1, ['.'] = 1, ['_'] = 1};
    /* URI scheme: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ) */
    static const int cg_sip_scheme_start[256] = {CG_ALPHA};
    static const int cg_sip_scheme_c[256] = {CG_ALPHA, CG_DIGIT, ['+'] = 1, ['-'] = 1, ['.'] = 1};
    /* inside [...] of an IPv6 reference (an IPv4 tail included) */
    static const int cg_sip_hexc[256] = {
        CG_DIGIT, ['a' ... 'f'] = 1, ['A' ... 'F'] = 1, [':'] = 1, ['.'] = 1};
    /* Request-URI octets: 1 for those it may not hold (controls, space, DEL and above, '<', '>',
       '"'), 2 for '?' (headers in it, which the fast path leaves to the Python path) */
    static const int cg_sip_ruri[256] = {[0 ... 32] = 1, [127 ... 255] = 1, ['<'] = 1, ['>'] = 1,
        ['"'] = 1, ['?'] = 2};
    #undef CG_ALPHA
    #undef CG_DIGIT
    #endif
    """
    const int TOKEN "cg_sip_token"[256]
    const int HOSTC "cg_sip_hostc"[256]
    const int SCHEME_START "cg_sip_scheme_start"[256]
    const int SCHEME_C "cg_sip_scheme_c"[256]
    const int HEXC "cg_sip_hexc"[256]
    const int RURI "cg_sip_ruri"[256]

# Vector scans: sixteen octets per step with SSE2 (every x86-64 has it), one octet per step
# elsewhere.  Both forms are always compiled, so the tests compare them on the same inputs
# (`_fastpath.scan_probe`); the byte loops are the definitions, the vector forms the speed.
cdef extern from *:
    """
    #ifndef CALLGUARD_SIPSCAN_VECTOR
    #define CALLGUARD_SIPSCAN_VECTOR
    #include <string.h>
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #define CG_SSE2 1
    #else
    #define CG_SSE2 0
    #endif

    /* Where the first octet of s[0..n) outside printable ASCII and HT is (n when none), and in
       *colon the first ':' before it (-1 when none): a header line's end and its name's end. */
    static inline Py_ssize_t cg_line_end_bytes(const unsigned char *s, Py_ssize_t n, Py_ssize_t *colon) {
        Py_ssize_t i, c = -1;
        for (i = 0; i < n; i++) {
            unsigned char b = s[i];
            if (b == ':') { if (c < 0) c = i; }
            else if (!((b >= 32 && b <= 126) || b == 9)) break;
        }
        *colon = c;
        return i;
    }

    /* 0 when s[0..n) holds no octet <= 32, DEL, '<', '>' or '"' (with ``bare`` no '?' or ',' either):
       the octets check_uri refuses.  Octets above DEL pass (the parser takes UTF-8 there). */
    static inline int cg_uri_ok_bytes(const unsigned char *s, Py_ssize_t n, int bare) {
        Py_ssize_t i;
        for (i = 0; i < n; i++) {
            unsigned char c = s[i];
            if (c <= 32 || c == 60 || c == 62 || c == 34 || c == 127) return -1;
            if (bare && (c == 63 || c == 44)) return -1;
        }
        return 0;
    }

    #if CG_SSE2
    /* one 16-octet step of cg_line_end: bit k set where octet k ends the line / is a ':' */
    static inline unsigned int cg_line_step(__m128i x, unsigned int *colons) {
        __m128i bad = _mm_or_si128(_mm_cmplt_epi8(x, _mm_set1_epi8(32)),   /* signed: also >= 0x80 */
                                   _mm_cmpeq_epi8(x, _mm_set1_epi8(127)));
        bad = _mm_andnot_si128(_mm_cmpeq_epi8(x, _mm_set1_epi8(9)), bad);
        *colons = (unsigned int)_mm_movemask_epi8(_mm_cmpeq_epi8(x, _mm_set1_epi8(':')));
        return (unsigned int)_mm_movemask_epi8(bad);
    }
    #endif

    static inline Py_ssize_t cg_line_end(const unsigned char *s, Py_ssize_t n, Py_ssize_t *colon) {
    #if CG_SSE2
        Py_ssize_t i = 0, c = -1, e;
        unsigned int bad, colons;
        if (n < 16)
            return cg_line_end_bytes(s, n, colon);
        for (;;) {
            /* the last step overlaps the one before it rather than reading past s + n; the
               octets it sees again were clean, and held no ':' if c is still -1 */
            if (i + 16 > n)
                i = n - 16;
            bad = cg_line_step(_mm_loadu_si128((const __m128i *)(s + i)), &colons);
            if (c < 0 && colons)
                c = i + __builtin_ctz(colons);
            if (bad) {
                e = i + __builtin_ctz(bad);
                *colon = c < e ? c : -1;
                return e;
            }
            if (i + 16 >= n)
                break;
            i += 16;
        }
        *colon = c;
        return n;
    #else
        return cg_line_end_bytes(s, n, colon);
    #endif
    }

    static inline int cg_uri_ok(const unsigned char *s, Py_ssize_t n, int bare) {
    #if CG_SSE2
        Py_ssize_t i = 0;
        __m128i x, bad;
        if (n < 16)
            return cg_uri_ok_bytes(s, n, bare);
        for (;;) {
            if (i + 16 > n)
                i = n - 16;
            x = _mm_loadu_si128((const __m128i *)(s + i));
            bad = _mm_cmpeq_epi8(_mm_min_epu8(x, _mm_set1_epi8(32)), x);          /* <= 32 */
            bad = _mm_or_si128(bad, _mm_cmpeq_epi8(x, _mm_set1_epi8(60)));
            bad = _mm_or_si128(bad, _mm_cmpeq_epi8(x, _mm_set1_epi8(62)));
            bad = _mm_or_si128(bad, _mm_cmpeq_epi8(x, _mm_set1_epi8(34)));
            bad = _mm_or_si128(bad, _mm_cmpeq_epi8(x, _mm_set1_epi8(127)));
            if (bare)
                bad = _mm_or_si128(bad, _mm_or_si128(_mm_cmpeq_epi8(x, _mm_set1_epi8(63)),
                                                     _mm_cmpeq_epi8(x, _mm_set1_epi8(44))));
            if (_mm_movemask_epi8(bad))
                return -1;
            if (i + 16 >= n)
                return 0;
            i += 16;
        }
    #else
        return cg_uri_ok_bytes(s, n, bare);
    #endif
    }
    #endif
    """
    bint SSE2 "CG_SSE2"
    Py_ssize_t line_end "cg_line_end"(const unsigned char* s, Py_ssize_t n, Py_ssize_t* colon) noexcept nogil
    Py_ssize_t line_end_bytes "cg_line_end_bytes"(const unsigned char* s, Py_ssize_t n, Py_ssize_t* colon) noexcept nogil
    int uri_ok "cg_uri_ok"(const unsigned char* s, Py_ssize_t n, bint bare) noexcept nogil
    int uri_ok_bytes "cg_uri_ok_bytes"(const unsigned char* s, Py_ssize_t n, bint bare) noexcept nogil

cdef enum:
    MAX_CSEQ = 2147483647   # 2**31 - 1, the largest CSeq number (RFC 3261 8.1.1.5)


cdef inline bint is_ws(unsigned char c) noexcept nogil:
    return c == 32 or c == 9


cdef inline Py_ssize_t skip_ws(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    while i < n and (s[i] == 32 or s[i] == 9):
        i += 1
    return i


cdef inline Py_ssize_t token_end(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    while i < n and TOKEN[s[i]]:
        i += 1
    return i


cdef inline Py_ssize_t quoted_end(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Index after the closing quote of the quoted string at s[i] == '"', or -1."""
    i += 1
    while i < n:
        if s[i] == 92:  # backslash: quoted-pair
            i += 2
            continue
        if s[i] == 34:
            return i + 1
        i += 1
    return -1


cdef inline Py_ssize_t next_comma(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Index of the next comma outside quotes and <>, n at the end, -1 when unbalanced."""
    cdef const unsigned char* p
    while i < n:
        if s[i] == 34:
            i = quoted_end(s, i, n)
            if i < 0:
                return -1
            continue
        if s[i] == 60:
            p = <const unsigned char*>memchr(s + i + 1, 62, n - i - 1) if i + 1 < n else NULL
            if p == NULL:
                return -1
            i = (p - s) + 1
            continue
        if s[i] == 44:
            return i
        i += 1
    return n


cdef inline bint bad_request_uri_char(unsigned char c) noexcept nogil:
    """Octets a Request-URI may not hold: controls, space, non-ASCII, '<', '>' and '"'."""
    return RURI[c] == 1


cdef inline Py_ssize_t scheme_end(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """Where the ':' after a URI scheme (ALPHA *(ALPHA / DIGIT / "+" / "-" / ".")) is, with something
    after it; -1 when there is none."""
    cdef Py_ssize_t i
    if n == 0 or not SCHEME_START[s[0]]:
        return -1
    i = 1
    while i < n and SCHEME_C[s[i]]:
        i += 1
    if i >= n - 1 or s[i] != 58:
        return -1
    return i


cdef inline int check_uri(const unsigned char* s, Py_ssize_t n, bint bare) noexcept nogil:
    """A URI in an address (``bare``: outside <>, where '?' and ',' may not appear): 0 or -1."""
    if scheme_end(s, n) < 0:
        return -1
    return uri_ok(s, n, bare)


cdef inline int check_request_uri(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """The Request-URI's scheme, and for sip/sips a non-empty host part without '?': 0 or -1."""
    cdef Py_ssize_t i, at, h
    i = scheme_end(s, n)
    if i < 0:
        return -1
    if (i == 3 or i == 4) and (s[0] | 32) == 115 and (s[1] | 32) == 105 and (s[2] | 32) == 112 \
            and (i == 3 or (s[3] | 32) == 115):
        at = n - 1
        while at > i and s[at] != 64:
            at -= 1
        h = at + 1  # host part starts after the last '@', or after the ':' when there is none
        if h >= n or s[h] == 59 or s[h] == 58:
            return -1
        for at in range(h, n):
            if s[at] == 63:
                return -1
    return 0


cdef inline int parse_params(const unsigned char* s, Py_ssize_t i, Py_ssize_t n,
                             Py_ssize_t* tag_s, Py_ssize_t* tag_e) noexcept nogil:
    """*( SEMI generic-param ); records the first 'tag' value (tag_s stays -1 without one).

    Pass ``tag_s[0] == -2`` to look for a tag; NULL for no tag at all.
    """
    cdef Py_ssize_t j, name_s, name_e, vs, ve
    cdef const unsigned char* p
    while True:
        i = skip_ws(s, i, n)
        if i >= n:
            return 0
        if s[i] != 59:
            return -1
        i = skip_ws(s, i + 1, n)
        j = token_end(s, i, n)
        if j == i:
            return -1
        name_s = i
        name_e = j
        i = skip_ws(s, j, n)
        vs = -1
        ve = -1
        if i < n and s[i] == 61:
            i = skip_ws(s, i + 1, n)
            if i < n and s[i] == 34:
                j = quoted_end(s, i, n)
                if j < 0:
                    return -1
            elif i < n and s[i] == 91:
                p = <const unsigned char*>memchr(s + i, 93, n - i)
                if p == NULL:
                    return -1
                j = (p - s) + 1
            else:
                j = i
                while j < n and (TOKEN[s[j]] or s[j] == 58):
                    j += 1
                if j == i:
                    return -1
            vs = i
            ve = j
            i = j
        if tag_s != NULL and tag_s[0] == -2 and name_e - name_s == 3 and (s[name_s] | 32) == 116 \
                and (s[name_s + 1] | 32) == 97 and (s[name_s + 2] | 32) == 103:
            # first 'tag' parameter; a valueless one counts as present without a value
            tag_s[0] = vs
            tag_e[0] = ve


cdef inline int parse_addr(const unsigned char* s, Py_ssize_t n, Py_ssize_t* tag_s,
                           Py_ssize_t* tag_e) noexcept nogil:
    """name-addr / addr-spec *(SEMI param): 0 or -1 (the tag as parse_params finds it)."""
    cdef Py_ssize_t i, j, k, angle = -1
    cdef const unsigned char* p
    i = skip_ws(s, 0, n)
    if i >= n:
        return -1
    if s[i] == 34:
        j = quoted_end(s, i, n)
        if j < 0:
            return -1
        i = skip_ws(s, j, n)
        if i >= n or s[i] != 60:
            return -1
        angle = i
    else:
        j = i
        while j < n and (TOKEN[s[j]] or is_ws(s[j])):
            j += 1
        if j < n and s[j] == 60:
            angle = j
        elif j < n and s[j] == 58 and j > i and not is_ws(s[j - 1]):
            for k in range(i, j):
                if is_ws(s[k]):
                    return -1
        else:
            return -1
    if angle >= 0:
        p = <const unsigned char*>memchr(s + angle + 1, 62, n - angle - 1) if angle + 1 < n else NULL
        if p == NULL:
            return -1
        k = p - s
        if check_uri(s + angle + 1, k - angle - 1, False) < 0:
            return -1
        i = k + 1
    else:
        j = i
        while j < n and s[j] != 59 and not is_ws(s[j]):
            j += 1
        if check_uri(s + i, j - i, True) < 0:
            return -1
        i = j
    return parse_params(s, i, n, tag_s, tag_e)


cdef inline int check_via(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """One Via value (see message.parse_via): 0 or -1."""
    cdef Py_ssize_t i, j, k
    cdef Py_ssize_t ps[3]
    cdef Py_ssize_t pe[3]
    cdef const unsigned char* p
    cdef long port
    i = skip_ws(s, 0, n)
    for k in range(3):
        j = token_end(s, i, n)
        if j == i:
            return -1
        ps[k] = i
        pe[k] = j
        i = skip_ws(s, j, n)
        if k < 2:
            if i >= n or s[i] != 47:
                return -1
            i = skip_ws(s, i + 1, n)
    if pe[0] - ps[0] != 3 or (s[ps[0]] | 32) != 115 or (s[ps[0] + 1] | 32) != 105 or (s[ps[0] + 2] | 32) != 112:
        return -1
    if pe[1] - ps[1] != 3 or s[ps[1]] != 50 or s[ps[1] + 1] != 46 or s[ps[1] + 2] != 48:
        return -1
    if i == 0 or i >= n or not is_ws(s[i - 1]):
        return -1
    if s[i] == 91:
        p = <const unsigned char*>memchr(s + i, 93, n - i)
        if p == NULL:
            return -1
        j = p - s
        if j == i + 1:
            return -1
        for k in range(i + 1, j):
            if not HEXC[s[k]]:
                return -1
        j += 1
    else:
        j = i
        while j < n and HOSTC[s[j]]:
            j += 1
        if j == i:
            return -1
    i = skip_ws(s, j, n)
    if i < n and s[i] == 58:
        i = skip_ws(s, i + 1, n)
        j = i
        port = 0
        while j < n and 48 <= s[j] <= 57:
            if j - i < 6:
                port = port * 10 + (s[j] - 48)
            j += 1
        if j == i or j - i > 5 or port > 65535:
            return -1
        i = j
    return parse_params(s, i, n, NULL, NULL)


cdef inline long long parse_digits(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """Decimal value of 1*DIGIT; -1 when not digits; 1 << 40 when longer than 10 digits."""
    cdef long long v = 0
    cdef Py_ssize_t i
    if n == 0:
        return -1
    for i in range(n):
        if s[i] < 48 or s[i] > 57:
            return -1
    if n > 10:
        return 1LL << 40
    for i in range(n):
        v = v * 10 + (s[i] - 48)
    return v
