# cython: freethreading_compatible = False
"""Compiled decision core: the fast twin of ``_corepy.CorePy``.

``_corepy.py`` and ``numbers.py`` are the specification; this module gives the
same verdicts bit for bit.  Numbers are normalised in C straight from the str
buffer, list lookups go through open-addressing hash indexes over the sorted
list arrays, and rate-limit state lives in C memory.  API docs: ``_core.pyi``.
"""

from cpython.dict cimport PyDict_GetItem
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.unicode cimport PyUnicode_Check
from libc.math cimport floor, isfinite
from libc.stdint cimport INT64_MAX, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset

cimport cython
cimport numpy as cnp

import numpy as np

from .lists import MAX_EPOCH, NEVER, P_ABSENT, P_EPSILON, P_SCALE, SOURCE_BIG_DATA, SOURCES
from .numbers import KIND_NAMES
from .settings import FEATURES, RULE_NAMES, resolve_source

cnp.import_array()

cdef extern from *:
    void __builtin_prefetch(const void* addr) nogil
    bint __builtin_mul_overflow(uint64_t a, uint64_t b, uint64_t* res) nogil
    bint __builtin_add_overflow(uint64_t a, uint64_t b, uint64_t* res) nogil


cdef extern from "Python.h":
    int PyUnicode_KIND(object)
    void* PyUnicode_DATA(object)
    Py_ssize_t PyUnicode_GET_LENGTH(object)
    Py_UCS4 PyUnicode_READ(int kind, const void* data, Py_ssize_t index) nogil
    bint Py_UNICODE_ISSPACE(Py_UCS4 ch) nogil
    object PyUnicode_FromKindAndData(int kind, const void* buffer, Py_ssize_t size)
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    int PyUnicode_1BYTE_KIND


cdef enum:
    HIDDEN = 0
    MOBILE = 1
    FIXED = 2
    SERVICE95 = 3
    SERVICE96 = 4
    SHORT = 5
    FREEPHONE = 6
    OTHER = 7
    INTERNATIONAL = 8

cdef enum:
    R_EMERGENCY = 0
    R_UNTRUSTED = 1
    R_ANONYMOUS = 2
    R_BANNED = 3
    R_UNFILED = 4
    R_EXPIRED = 5
    R_OUTBOUND = 6
    R_MISMATCH = 7
    R_FREQUENCY = 8
    R_SCORE = 9
    R_ALLOW = 10

cdef enum:
    SOURCE_OFFLINE = -2
    SOURCE_UNTRUSTED = -1
    MAX_DIGITS = 18
    SOURCE_CACHE_MAX = 65536

cdef uint64_t C_NEVER = NEVER
cdef uint16_t C_P_ABSENT = P_ABSENT
cdef double C_P_SCALE = P_SCALE
cdef double C_P_EPSILON = P_EPSILON
cdef double C_MAX_EPOCH = MAX_EPOCH
cdef int C_BIG_DATA = SOURCE_BIG_DATA

# Interned strings so a verdict costs no formatting.
cdef tuple _KIND_NAMES = tuple(KIND_NAMES)
cdef tuple _RULE_NAMES = tuple(RULE_NAMES)
cdef tuple _FEATURES = tuple(FEATURES)
cdef tuple _SOURCES = tuple(SOURCES)
cdef tuple _EMPTY = ()
cdef str _ALLOW = "allow"
cdef str _REJECT = "reject"
cdef str _NOTHING = ""
cdef dict _RULE_INDEX = {name: i for i, name in enumerate(RULE_NAMES)}
cdef tuple _SLOTS = ("verdict", "code", "rule", "reason", "detail", "score", "caller", "callee",
                     "caller_kind", "source", "shadowed", "features")


# ====================================================================== Verdict
@cython.freelist(64)
@cython.no_gc                   # holds only strings and tuples of them: no cycles, so no GC tracking
cdef class Verdict:
    """The decision on one call."""

    def __init__(self, str verdict, int code, str rule, str reason, str detail, double score, str caller,
                 str callee, str caller_kind, str source, tuple shadowed, tuple features):
        self.verdict = verdict
        self.code = code
        self.rule = rule
        self.reason = reason
        self.detail = detail
        self.score = score
        self.caller = caller
        self.callee = callee
        self.caller_kind = caller_kind
        self.source = source
        self.shadowed = shadowed
        self.features = features

    def as_dict(self):
        return {"verdict": self.verdict, "code": self.code, "rule": self.rule, "reason": self.reason,
                "detail": self.detail, "score": self.score, "caller": self.caller, "callee": self.callee,
                "caller_kind": self.caller_kind, "source": self.source, "shadowed": self.shadowed,
                "features": self.features}

    def __repr__(self):
        return (f"Verdict({self.verdict} {self.code} {self.rule} score={self.score:.3f} "
                f"caller={self.caller!r} callee={self.callee!r})")

    def __reduce__(self):
        return (Verdict, (self.verdict, self.code, self.rule, self.reason, self.detail, self.score, self.caller,
                          self.callee, self.caller_kind, self.source, self.shadowed, self.features))


# ====================================================================== hashing
cdef inline uint64_t _mix64(uint64_t k) nogil:
    k ^= k >> 33
    k *= <uint64_t>0xff51afd7ed558ccdULL
    k ^= k >> 33
    k *= <uint64_t>0xc4ceb9fe1a85ec53ULL
    k ^= k >> 33
    return k


cdef inline uint64_t _mix128(u128 k) nogil:
    return _mix64(<uint64_t>k ^ _mix64(<uint64_t>(k >> 64) + <uint64_t>0x9e3779b97f4a7c15ULL))


cdef inline int _key_digits(uint64_t key) nogil:
    """Digits behind a key int("1" + digits)."""
    cdef int n = 0
    while key >= 10:
        key //= 10
        n += 1
    return n


cdef class KeyIndex:
    """Open-addressing hash index over a sorted uint64 key array: key -> first index of its run."""

    def __cinit__(self):
        self.table = NULL
        self.n = 0

    def __dealloc__(self):
        if self.table != NULL:
            free(self.table)

    cdef int build(self, object keys, object prefix) except -1:
        cdef cnp.ndarray arr = np.ascontiguousarray(keys, dtype=np.uint64)
        cdef cnp.ndarray parr
        cdef const uint8_t* pf = NULL
        cdef Py_ssize_t n = arr.shape[0]
        cdef Py_ssize_t i, distinct = 0
        cdef uint64_t cap = 8, h, pos, k
        cdef int idx_bits = 1, L
        self.array = arr
        self.keys = <const uint64_t*>cnp.PyArray_DATA(arr)
        self.n = n
        if prefix is not None:
            parr = np.ascontiguousarray(prefix, dtype=np.bool_)
            if parr.shape[0] != n:
                raise ValueError("prefix and keys differ in length")
            pf = <const uint8_t*>cnp.PyArray_DATA(parr)
        if n >= 0xFFFFFFFF:
            raise ValueError("too many list entries for one index")
        with nogil:
            for i in range(n):
                if i == 0 or self.keys[i] != self.keys[i - 1]:
                    distinct += 1
        while cap * 7 < <uint64_t>distinct * 10 + 7:
            cap <<= 1
        while (<uint64_t>1 << idx_bits) <= <uint64_t>n + 1:
            idx_bits += 1
        self.tag_bits = 32 - idx_bits if idx_bits < 32 else 0
        self.tag_mask = (<uint32_t>1 << self.tag_bits) - 1 if self.tag_bits else 0
        if self.table != NULL:
            free(self.table)
        self.table = <uint32_t*>calloc(cap, sizeof(uint32_t))
        if self.table == NULL:
            raise MemoryError()
        self.mask = cap - 1
        self.len_any = 0
        self.len_prefix = 0
        with nogil:
            for i in range(n):
                k = self.keys[i]
                L = _key_digits(k)
                if L > 31:
                    L = 31
                self.len_any |= <uint32_t>1 << L
                if pf != NULL and pf[i]:
                    self.len_prefix |= <uint32_t>1 << L
                if i and k == self.keys[i - 1]:
                    continue
                h = _mix64(k)
                pos = h & self.mask
                while self.table[pos] != 0:
                    pos = (pos + 1) & self.mask
                self.table[pos] = ((<uint32_t>(i + 1)) << self.tag_bits) | (<uint32_t>(h >> 40) & self.tag_mask)
        return 0

    cdef Py_ssize_t find(self, uint64_t key) noexcept nogil:
        cdef uint64_t h, pos
        cdef uint32_t s, tag
        cdef Py_ssize_t i
        if self.n == 0:
            return -1
        h = _mix64(key)
        pos = h & self.mask
        tag = <uint32_t>(h >> 40) & self.tag_mask
        while True:
            s = self.table[pos]
            if s == 0:
                return -1
            if (s & self.tag_mask) == tag:
                i = <Py_ssize_t>(s >> self.tag_bits) - 1
                if self.keys[i] == key:
                    return i
            pos = (pos + 1) & self.mask


# ====================================================================== rate-limit tables
cdef void _track_free(Track* tr) noexcept nogil:
    if tr.times != NULL:
        free(tr.times)
        tr.times = NULL
    if tr.ckeys != NULL:
        free(tr.ckeys)
        tr.ckeys = NULL
        tr.ctimes = NULL


cdef void _table_clear(Table* tb) noexcept nogil:
    cdef Py_ssize_t i
    if tb.entries != NULL:
        for i in range(tb.n):
            _track_free(&tb.entries[i])
        free(tb.entries)
    if tb.index != NULL:
        free(tb.index)
    tb.entries = NULL
    tb.index = NULL
    tb.n = 0
    tb.cap = 0
    tb.icap = 0


cdef inline uint64_t _slot(uint64_t h, Py_ssize_t i) noexcept nogil:
    """An index slot: entry index + 1 below, 32 bits of the key's hash above (skips most entry reads)."""
    return (h & <uint64_t>0xFFFFFFFF00000000ULL) | <uint64_t>(i + 1)


cdef int _table_reindex(Table* tb, Py_ssize_t want) except -1 nogil:
    """(Re)build the hash index for at least ``want`` entries."""
    cdef Py_ssize_t cap = 16, i
    cdef uint64_t pos, h
    while cap < want * 2:
        cap <<= 1
    if cap != tb.icap:
        if tb.index != NULL:
            free(tb.index)
        tb.index = <uint64_t*>malloc(cap * sizeof(uint64_t))
        if tb.index == NULL:
            tb.icap = 0
            with gil:
                raise MemoryError()
        tb.icap = cap
    memset(tb.index, 0, cap * sizeof(uint64_t))
    for i in range(tb.n):
        h = _mix128(tb.entries[i].key)
        pos = h & <uint64_t>(cap - 1)
        while tb.index[pos] != 0:
            pos = (pos + 1) & <uint64_t>(cap - 1)
        tb.index[pos] = _slot(h, i)
    return 0


cdef inline Py_ssize_t _table_find(Table* tb, u128 key) noexcept nogil:
    cdef uint64_t pos, m, h, s, tag
    cdef Py_ssize_t i
    if tb.n == 0:
        return -1
    m = <uint64_t>(tb.icap - 1)
    h = _mix128(key)
    tag = h & <uint64_t>0xFFFFFFFF00000000ULL
    pos = h & m
    while True:
        s = tb.index[pos]
        if s == 0:
            return -1
        if (s & <uint64_t>0xFFFFFFFF00000000ULL) == tag:
            i = <Py_ssize_t>(s & <uint64_t>0xFFFFFFFFULL) - 1
            if tb.entries[i].key == key:
                return i
        pos = (pos + 1) & m


cdef Py_ssize_t _table_add(Table* tb, u128 key, int64_t t) except -1 nogil:
    """Append a new (absent) key; returns its entry index."""
    cdef Py_ssize_t ncap
    cdef Track* grown
    cdef uint64_t pos, m, h
    cdef Track* tr
    if tb.n >= tb.cap:
        ncap = tb.cap * 2 if tb.cap else 64
        grown = <Track*>realloc(tb.entries, ncap * sizeof(Track))
        if grown == NULL:
            with gil:
                raise MemoryError()
        tb.entries = grown
        tb.cap = ncap
    tr = &tb.entries[tb.n]
    memset(tr, 0, sizeof(Track))
    tr.key = key
    tr.last = t
    tb.n += 1
    if tb.icap < tb.n * 2:
        _table_reindex(tb, tb.n)
    else:
        m = <uint64_t>(tb.icap - 1)
        h = _mix128(key)
        pos = h & m
        while tb.index[pos] != 0:
            pos = (pos + 1) & m
        tb.index[pos] = _slot(h, tb.n - 1)
    return tb.n - 1


cdef int _table_compact(Table* tb, uint8_t* drop) except -1 nogil:
    """Remove the entries flagged in ``drop``, keeping insertion order."""
    cdef Py_ssize_t i, j = 0
    for i in range(tb.n):
        if drop[i]:
            _track_free(&tb.entries[i])
        else:
            if j != i:
                tb.entries[j] = tb.entries[i]
            j += 1
    tb.n = j
    _table_reindex(tb, tb.n)
    return 0


cdef struct _Order:
    int64_t last
    u128 key
    Py_ssize_t i


cdef int _order_cmp(const void* a, const void* b) noexcept nogil:
    cdef const _Order* x = <const _Order*>a
    cdef const _Order* y = <const _Order*>b
    if x.last != y.last:
        return -1 if x.last < y.last else 1
    if x.key != y.key:
        return -1 if x.key < y.key else 1
    return 0


cdef extern from "stdlib.h":
    void qsort(void* base, size_t nmemb, size_t size, int (*compar)(const void*, const void*) noexcept nogil) nogil


cdef int _table_evict(Table* tb, int64_t t, int64_t max_window_ms, Py_ssize_t max_tracked) except -1 nogil:
    """Make room like the twin: idle keys first, then least recently seen (ties: smaller key), down to 90%."""
    cdef int64_t horizon = t - max_window_ms
    cdef Py_ssize_t i, remaining = 0, keep, j
    cdef uint8_t* drop = <uint8_t*>calloc(tb.n + 1, 1)
    cdef _Order* order
    if drop == NULL:
        with gil:
            raise MemoryError()
    for i in range(tb.n):
        if tb.entries[i].last <= horizon:
            drop[i] = 1
        else:
            remaining += 1
    if remaining >= max_tracked:
        keep = max_tracked * 9 // 10
        order = <_Order*>malloc((remaining + 1) * sizeof(_Order))
        if order == NULL:
            free(drop)
            with gil:
                raise MemoryError()
        j = 0
        for i in range(tb.n):
            if not drop[i]:
                order[j].last = tb.entries[i].last
                order[j].key = tb.entries[i].key
                order[j].i = i
                j += 1
        qsort(order, remaining, sizeof(_Order), _order_cmp)
        for j in range(remaining - keep):
            drop[order[j].i] = 1
        free(order)
    _table_compact(tb, drop)
    free(drop)
    return 0


cdef int _times_push(Track* tr, int64_t t, int ring) except -1 nogil:
    """Append an attempt time; drop the oldest first when the ring is full (twin: del times[0])."""
    cdef int32_t ncap, k
    cdef int64_t* grown
    if tr.tcount >= ring and tr.tcount > 0:
        if tr.tcount >= 2 and tr.times[(tr.thead + 1) % tr.tcap] < tr.times[tr.thead]:
            tr.desc -= 1
        tr.thead = (tr.thead + 1) % tr.tcap
        tr.tcount -= 1
    if tr.tcount > 0 and t < tr.times[(tr.thead + tr.tcount - 1) % tr.tcap]:
        tr.desc += 1
    if tr.tcount >= tr.tcap:
        # grow (and unroll) the ring on demand so most callers cost little
        ncap = tr.tcap * 2 if tr.tcap else 4
        if ncap < tr.tcount + 1:
            ncap = tr.tcount + 1
        grown = <int64_t*>malloc(ncap * sizeof(int64_t))
        if grown == NULL:
            with gil:
                raise MemoryError()
        for k in range(tr.tcount):
            grown[k] = tr.times[(tr.thead + k) % tr.tcap]
        if tr.times != NULL:
            free(tr.times)
        tr.times = grown
        tr.tcap = ncap
        tr.thead = 0
    tr.times[(tr.thead + tr.tcount) % tr.tcap] = t
    tr.tcount += 1
    return 0


cdef inline int32_t _upper(const Track* tr, int64_t v) noexcept nogil:
    """In a sorted ring: how many times are <= v."""
    cdef int32_t lo = 0, hi = tr.tcount, mid, k
    while lo < hi:
        mid = (lo + hi) >> 1
        k = tr.thead + mid
        if k >= tr.tcap:
            k -= tr.tcap
        if tr.times[k] <= v:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline int64_t _count_times(const Track* tr, int64_t lo, int64_t t) noexcept nogil:
    """Attempts in (lo, t]: binary search while the ring is in time order, else a scan."""
    cdef int64_t count = 0, x
    cdef int32_t k, end = tr.thead + tr.tcount
    cdef const int64_t* times = tr.times
    if tr.desc == 0:
        if lo >= t:
            return 0
        return _upper(tr, t) - _upper(tr, lo)
    if end <= tr.tcap:
        for k in range(tr.thead, end):
            x = times[k]
            count += (lo < x) & (x <= t)
    else:
        for k in range(tr.thead, tr.tcap):
            x = times[k]
            count += (lo < x) & (x <= t)
        for k in range(end - tr.tcap):
            x = times[k]
            count += (lo < x) & (x <= t)
    return count


cdef int _callee_reserve(Track* tr, int32_t need) except -1 nogil:
    cdef int32_t ncap
    cdef u128* keys
    cdef int64_t* times
    if need <= tr.ccap:
        return 0
    ncap = tr.ccap * 2 if tr.ccap else 4
    if ncap < need:
        ncap = need
    keys = <u128*>malloc(ncap * (sizeof(u128) + sizeof(int64_t)))
    if keys == NULL:
        with gil:
            raise MemoryError()
    times = <int64_t*>(keys + ncap)
    if tr.ccount:
        memcpy(keys, tr.ckeys, tr.ccount * sizeof(u128))
        memcpy(times, tr.ctimes, tr.ccount * sizeof(int64_t))
    if tr.ckeys != NULL:
        free(tr.ckeys)
    tr.ckeys = keys
    tr.ctimes = times
    tr.ccap = ncap
    return 0


cdef int _callee_seen(Track* tr, u128 callee, int64_t t, int cap) except -1 nogil:
    """The twin's distinct-callee update: refresh a known callee, else evict the oldest when full."""
    cdef int32_t j, oldest
    for j in range(tr.ccount):
        if tr.ckeys[j] == callee:
            if t > tr.ctimes[j]:
                tr.ctimes[j] = t
            return 0
    if tr.ccount >= cap and tr.ccount > 0:
        oldest = 0
        for j in range(1, tr.ccount):
            if tr.ctimes[j] < tr.ctimes[oldest]:
                oldest = j
        memmove(&tr.ckeys[oldest], &tr.ckeys[oldest + 1], (tr.ccount - oldest - 1) * sizeof(u128))
        memmove(&tr.ctimes[oldest], &tr.ctimes[oldest + 1], (tr.ccount - oldest - 1) * sizeof(int64_t))
        tr.ccount -= 1
    _callee_reserve(tr, tr.ccount + 1)
    tr.ckeys[tr.ccount] = callee
    tr.ctimes[tr.ccount] = t
    tr.ccount += 1
    return 0


cdef object _u128_to_py(u128 k):
    cdef uint64_t hi = <uint64_t>(k >> 64)
    cdef uint64_t lo = <uint64_t>k
    if hi == 0:
        return lo
    return (int(hi) << 64) | int(lo)


cdef u128 _py_to_u128(object value) except? 0:
    cdef object k = int(value)
    if k < 0 or k >= (1 << 128):
        raise ValueError(f"key out of range: {k!r}")
    cdef uint64_t lo = k & 0xFFFFFFFFFFFFFFFF
    cdef uint64_t hi = k >> 64
    return ((<u128>hi) << 64) | <u128>lo


cdef class State:
    """Rate-limit state: three tables (caller, source, customer) of tracks."""

    def __dealloc__(self):
        cdef int k
        for k in range(3):
            _table_clear(&self.tables[k])


# ====================================================================== normalisation
cdef inline bint _is_sep(Py_UCS4 c) noexcept nogil:
    return c == 32 or c == 45 or c == 46 or c == 40 or c == 41 or c == 9 or c == 47


cdef inline uint32_t _lower_ascii(Py_UCS4 c) noexcept nogil:
    cdef uint32_t x = c
    if 65 <= x <= 90:
        return x + 32
    return x


cdef void _set(Num* out, int kind, const char* d, int n, int area_len, const char* area) noexcept nogil:
    if area_len:
        memcpy(out.area, area, area_len)
    out.kind = kind
    memmove(out.d, d, n)
    out.n = n
    out.area_len = area_len
    out.default_area = False


cdef void _classify(Num* out, const char* d, int n, const char* area, int alen_default,
                    bint from_cc) noexcept nogil:
    cdef char tmp[BUF]
    cdef char c0
    cdef int alen, r
    if from_cc and n > 0 and d[0] != 48:
        if n == 11 and d[0] == 49 and 51 <= d[1] <= 57:
            _set(out, MOBILE, d, n, 0, NULL)
            return
        if ((n == 10 and d[0] == 49 and d[1] == 48) or (d[0] == 50 and n == 10)
                or (51 <= d[0] <= 57 and 10 <= n <= 11)):
            tmp[0] = 48
            memcpy(tmp + 1, d, n)
            _classify(out, tmp, n + 1, area, alen_default, False)
            return
    if n < 3 or n > MAX_DIGITS:
        out.kind = HIDDEN
        out.n = 0
        out.area_len = 0
        out.default_area = False
        return
    c0 = d[0]
    if c0 == 49:
        if n == 11 and 51 <= d[1] <= 57:
            _set(out, MOBILE, d, n, 0, NULL)
        elif n <= 8:
            _set(out, SHORT, d, n, 0, NULL)
        else:
            _set(out, OTHER, d, n, 0, NULL)
        return
    if c0 == 57:
        if n >= 5 and d[1] == 53:
            _set(out, SERVICE95, d, n, 0, NULL)
        elif n >= 5 and d[1] == 54:
            if alen_default:
                memmove(out.d + alen_default, d, n)
                memcpy(out.d, area, alen_default)
                memcpy(out.area, area, alen_default)
                out.kind = SERVICE96
                out.n = n + alen_default
                out.area_len = alen_default
                out.default_area = True
            else:
                _set(out, SERVICE96, d, n, 0, NULL)
        else:
            _set(out, OTHER, d, n, 0, NULL)
        return
    if (c0 == 52 or c0 == 56) and n == 10 and d[1] == 48 and d[2] == 48:
        _set(out, FREEPHONE, d, n, 0, NULL)
        return
    if c0 == 48:
        if n < 4:
            _set(out, OTHER, d, n, 0, NULL)
            return
        alen = 3 if (d[1] == 49 or d[1] == 50) else 4
        r = n - alen
        if r >= 5 and d[alen] == 57 and d[alen + 1] == 54:
            _set(out, SERVICE96, d, n, alen, d)
        elif r >= 5 and d[alen] == 57 and d[alen + 1] == 53:
            _set(out, SERVICE95, d + alen, r, 0, NULL)
        elif 3 <= r <= 8 and d[alen] == 49 and r != 7 and r != 8:
            _set(out, SHORT, d + alen, r, alen, d)
        elif 7 <= r <= 8:
            _set(out, FIXED, d, n, alen, d)
        else:
            _set(out, OTHER, d, n, 0, NULL)
        return
    _set(out, OTHER, d, n, 0, NULL)


cdef void _international(Num* out, const char* s, int n) noexcept nogil:
    if n < 3 or n + 2 > MAX_DIGITS:
        out.kind = HIDDEN
        out.n = 0
        out.area_len = 0
        out.default_area = False
        return
    memmove(out.d + 2, s, n)
    out.d[0] = 48
    out.d[1] = 48
    out.kind = INTERNATIONAL
    out.n = n + 2
    out.area_len = 0
    out.default_area = False


cdef int _normalize(object raw, const char* area, int alen, Num* out) except -1:
    """numbers.normalize over the str's characters, without building Python objects."""
    if not PyUnicode_Check(raw):
        raise TypeError(f"expected a str, got {type(raw).__name__}")
    _normalize_buf(PyUnicode_KIND(raw), PyUnicode_DATA(raw), PyUnicode_GET_LENGTH(raw), area, alen, out)
    return 0


cdef inline int _hex(Py_UCS4 c) noexcept nogil:
    if 48 <= c <= 57:
        return <int>c - 48
    if 97 <= c <= 102:
        return <int>c - 87
    if 65 <= c <= 70:
        return <int>c - 55
    return -1


cdef void _normalize_buf(int kind, const void* data, Py_ssize_t length, const char* area, int alen,
                         Num* out) noexcept nogil:
    cdef Py_ssize_t a, b, i, lt = -1
    cdef Py_UCS4 c
    cdef char d[BUF]
    cdef int n = 0
    cdef bint plus = False, first = True, scheme = False, tel = False, quoted = False, escaped = False
    cdef int sl = 0
    out.kind = HIDDEN
    out.n = 0
    out.area_len = 0
    out.default_area = False
    a = 0
    b = length
    while a < b and Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, a)):
        a += 1
    while b > a and Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, b - 1)):
        b -= 1
    # the name-addr's '<': the first outside a quoted display name (numbers._angle)
    for i in range(a, b):
        c = PyUnicode_READ(kind, data, i)
        if quoted:
            if escaped:
                escaped = False
            elif c == 92:                            # '\\'
                escaped = True
            elif c == 34:                            # '"'
                quoted = False
        elif c == 34:
            quoted = True
        elif c == 60:                                # '<'
            lt = i
            break
    if lt >= 0:
        a = lt + 1
        for i in range(a, b):
            if PyUnicode_READ(kind, data, i) == 62:  # '>'
                b = i
                break
    # scheme, case-insensitive (only ASCII letters can lower-case into "sip:", "sips:", "tel:")
    if b - a >= 4:
        c = _lower_ascii(PyUnicode_READ(kind, data, a))
        if c == 115 and _lower_ascii(PyUnicode_READ(kind, data, a + 1)) == 105 \
                and _lower_ascii(PyUnicode_READ(kind, data, a + 2)) == 112:
            c = PyUnicode_READ(kind, data, a + 3)
            if c == 58:
                scheme = True
                sl = 4
            elif b - a >= 5 and _lower_ascii(c) == 115 and PyUnicode_READ(kind, data, a + 4) == 58:
                scheme = True
                sl = 5
        elif c == 116 and _lower_ascii(PyUnicode_READ(kind, data, a + 1)) == 101 \
                and _lower_ascii(PyUnicode_READ(kind, data, a + 2)) == 108 \
                and PyUnicode_READ(kind, data, a + 3) == 58:
            scheme = True
            tel = True
            sl = 4
    if scheme:
        a += sl
        if not tel:
            lt = -1
            for i in range(a, b):
                if PyUnicode_READ(kind, data, i) == 64:  # '@'
                    lt = i
                    break
            if lt < 0:
                return
            b = lt
        for i in range(a, b):
            c = PyUnicode_READ(kind, data, i)
            if c == 59 or c == 63:   # ';' '?'
                b = i
                break
    i = a
    while i < b:
        c = PyUnicode_READ(kind, data, i)
        i += 1
        if scheme and c == 37 and i + 1 < b and _hex(PyUnicode_READ(kind, data, i)) >= 0 \
                and _hex(PyUnicode_READ(kind, data, i + 1)) >= 0:
            # %XX in a URI's user part is that character (RFC 3261 §19.1.4), once: numbers.extract_user
            c = <Py_UCS4>(_hex(PyUnicode_READ(kind, data, i)) * 16 + _hex(PyUnicode_READ(kind, data, i + 1)))
            i += 2
        if _is_sep(c):
            continue
        if first:
            first = False
            if c == 43:
                plus = True
                continue
        if 48 <= c <= 57:
            if n >= 23:
                return              # longer than any number form: not a number
            d[n] = <char>c
            n += 1
        else:
            return
    if n == 0:
        return
    if plus:
        if n >= 2 and d[0] == 56 and d[1] == 54:
            _classify(out, d + 2, n - 2, area, alen, True)
        else:
            _international(out, d, n)
    elif n >= 4 and d[0] == 48 and d[1] == 48 and d[2] == 56 and d[3] == 54:
        _classify(out, d + 4, n - 4, area, alen, True)
    elif n >= 2 and d[0] == 48 and d[1] == 48:
        _international(out, d + 2, n - 2)
    elif n == 13 and d[0] == 56 and d[1] == 54 and d[2] == 49 and 51 <= d[3] <= 57:
        _set(out, MOBILE, d + 2, 11, 0, NULL)
    else:
        _classify(out, d, n, area, alen, False)
    return


cdef inline u128 _full_key(const Num* num) noexcept nogil:
    cdef u128 k = 1
    cdef int i
    for i in range(num.n):
        k = k * 10 + <u128>(num.d[i] - 48)
    return k


cdef bint _digits_key(object number, u128* key):
    """key_of(number) for a normalised number as a verdict gives it (1-38 ASCII digits; else
    False and ``key`` untouched): what _full_key gives for the Num it came from."""
    cdef str s
    cdef Py_ssize_t i, n
    cdef Py_UCS4 c
    cdef unsigned int digit
    cdef u128 k = 1
    if type(number) is not str:
        return False
    s = <str>number
    n = len(s)
    if n == 0 or n > 38:
        return False
    for i in range(n):
        c = s[i]
        if c < 48 or c > 57:
            return False
        digit = <unsigned int>c - 48
        k = k * 10 + digit
    key[0] = k
    return True


cdef inline int _prefix_keys(const Num* num, uint64_t* pk) noexcept nogil:
    """pk[L] = key_of(digits[:L]) while it fits in 64 bits; returns the longest L that fits."""
    cdef uint64_t k = 1, nk
    cdef int i
    for i in range(num.n):
        if __builtin_mul_overflow(k, <uint64_t>10, &nk) or __builtin_add_overflow(nk, <uint64_t>(num.d[i] - 48), &nk):
            return i
        k = nk
        pk[i + 1] = k
    return num.n



def normalize(str raw, str default_area=""):
    """numbers.normalize computed by the C code: (kind, digits, area) for equivalence tests."""
    cdef Num num
    cdef bytes ab = _area_bytes(default_area)
    _normalize(raw, ab, len(ab), &num)
    if num.kind == HIDDEN:
        return (0, "", "")
    digits = _digits_str(&num, default_area)
    if num.default_area:
        return (num.kind, digits, default_area)
    return (num.kind, digits, num.area[:num.area_len].decode("ascii"))


cdef bytes _area_bytes(str area):
    """An area's digits as ASCII (its decimal values, so keys match int())."""
    cdef list out = []
    for ch in area:
        out.append(chr(48 + int(ch)))
    return "".join(out).encode("ascii")


cdef inline str _digits_str(const Num* num, str area):
    if num.n == 0:
        return _NOTHING
    if num.default_area and not area.isascii():
        return area + <str>PyUnicode_FromKindAndData(PyUnicode_1BYTE_KIND, num.d + num.area_len,
                                                     num.n - num.area_len)
    cdef str out = <str>PyUnicode_New(num.n, 127)
    memcpy(PyUnicode_DATA(out), num.d, num.n)
    return out


# ====================================================================== the core
class _Columns:
    """Sorted copies of a list's columns (for lists handed over unsorted)."""

    def __init__(self, src, names, order):
        for name in names:
            setattr(self, name, np.asarray(getattr(src, name))[order])
        self.reasons = getattr(src, "reasons", None)


def _by_key(table, names):
    """The list itself when its keys are sorted (the loaders sort), else stably sorted copies.

    The indexes find an equal-key run by its first entry; a stable sort keeps the twin's
    first-in-array-order semantics among equal keys.
    """
    keys = np.asarray(table.keys, dtype=np.uint64)
    n = keys.shape[0]
    if n < 2 or not (keys[1:n] < keys[0:n - 1]).any():
        return table
    return _Columns(table, names, np.argsort(keys, kind="stable"))


cdef class Core:
    """Decision core (compiled); see ``_core.pyi``."""

    def __cinit__(self):
        self.l_kind = NULL
        self.l_window = NULL
        self.l_calls = NULL
        self.l_distinct = NULL
        self.srcs = NULL
        self.emergency_keys = NULL

    def __dealloc__(self):
        cdef int i
        for i in range(64):
            Py_XDECREF(self.fcache[i].features)
            self.fcache[i].features = NULL
        PyMem_Free(self.l_kind)
        PyMem_Free(self.l_window)
        PyMem_Free(self.l_calls)
        PyMem_Free(self.l_distinct)
        PyMem_Free(self.srcs)
        PyMem_Free(self.emergency_keys)

    def __init__(self, settings, lists):
        cdef int i, k
        cdef Num num
        self.settings = settings
        self.state = State()
        self._source_cache = {}
        self._resolve = resolve_source
        s = settings
        for i in range(11):
            self.enforce[i] = bool(s.enforce[i])
            self.codes[i] = int(s.codes[i])
        self._reasons = list(s.reasons)
        self._rule_names = list(RULE_NAMES)
        self.n_limits = len(s.limits)
        n = max(self.n_limits, 1)
        self.l_kind = <int*>PyMem_Malloc(n * sizeof(int))
        self.l_window = <int64_t*>PyMem_Malloc(n * sizeof(int64_t))
        self.l_calls = <int64_t*>PyMem_Malloc(n * sizeof(int64_t))
        self.l_distinct = <int64_t*>PyMem_Malloc(n * sizeof(int64_t))
        if self.l_kind == NULL or self.l_window == NULL or self.l_calls == NULL or self.l_distinct == NULL:
            raise MemoryError()
        self._limit_detail = []
        for i, lm in enumerate(s.limits):
            self.l_kind[i] = lm.kind
            self.l_window[i] = lm.window_ms
            self.l_calls[i] = lm.max_calls
            self.l_distinct[i] = lm.max_distinct
            self._limit_detail.append(f"limit {lm.name}")
        for k in range(3):
            self.ring_size[k] = s.ring_size[k]
            self.callee_cap[k] = s.callee_cap[k]
            self.kind_used[k] = bool(s.kind_used[k])
        self.max_window_ms = s.max_window_ms
        self.max_tracked = s.max_tracked
        self.threshold = s.threshold
        for i in range(9):
            self.weights[i] = s.weights[i]
        self.complaint_saturation = s.complaint_saturation
        self.min_attempts = s.min_attempts
        self.min_outcomes = s.min_outcomes
        self.short_call_ms = s.short_call_ms
        self.n_sources = len(s.sources)
        self.srcs = <SrcInfo*>PyMem_Malloc(max(self.n_sources, 1) * sizeof(SrcInfo))
        if self.srcs == NULL:
            raise MemoryError()
        self._src_area = []
        self._src_name = []
        self._src_detail = []
        self._src_ranges = []
        self._src_ranges_ascii = []
        for i, src in enumerate(s.sources):
            area_b = _area_bytes(src.area)
            if len(area_b) > 7:
                raise ValueError(f"source {src.name}: area too long: {src.area!r}")
            self.srcs[i].customer = src.customer
            self.srcs[i].alen = len(area_b)
            self.srcs[i].exotic = not src.area.isascii()
            self.srcs[i].has_ranges = bool(src.ranges)
            memcpy(self.srcs[i].area, <const char*>area_b, len(area_b))
            self._src_area.append(src.area)
            self._src_name.append(src.name)
            self._src_detail.append(f"source {src.name}")
            ranges = tuple(src.ranges)
            self._src_ranges.append(ranges)
            self._src_ranges_ascii.append(
                tuple(r.encode("ascii") for r in ranges) if all(r.isascii() for r in ranges) else None)
        self._emergency = frozenset(s.emergency)
        # emergency numbers as keys; a callee equals one of them iff its key does (ASCII digits only)
        ascii_em = [e for e in self._emergency if e.isascii() and e.isdigit() and len(e) <= 38]
        self.n_emergency = len(ascii_em)
        self.emergency_keys = <u128*>PyMem_Malloc(max(self.n_emergency, 1) * sizeof(u128))
        if self.emergency_keys == NULL:
            raise MemoryError()
        self.emergency_lens = 0
        for i, e in enumerate(ascii_em):
            self.emergency_keys[i] = _py_to_u128(int("1" + e))
            if len(e) < 64:
                self.emergency_lens |= (<uint64_t>1) << len(e)
        self.set_lists(lists)

    # ------------------------------------------------------------ lists
    def set_lists(self, lists):
        """Swap the lists (a reload); rate-limit state is kept."""
        bl = _by_key(lists.blocklist, ("keys", "prefix", "source", "expires", "p", "complaints", "reason"))
        arrays = []

        def col(a, dtype):
            arr = np.ascontiguousarray(a, dtype=dtype)
            if arr.shape[0] != bl.keys.shape[0]:
                raise ValueError("blocklist columns differ in length")
            arrays.append(arr)
            return arr

        cdef KeyIndex bli = KeyIndex()
        bli.build(bl.keys, bl.prefix)
        cdef cnp.ndarray a_prefix = col(bl.prefix, np.bool_)
        cdef cnp.ndarray a_source = col(bl.source, np.uint8)
        cdef cnp.ndarray a_expires = col(bl.expires, np.uint32)
        cdef cnp.ndarray a_p = col(bl.p, np.uint16)
        cdef cnp.ndarray a_compl = col(bl.complaints, np.uint16)
        cdef cnp.ndarray a_reason = col(bl.reason, np.uint32)
        fl = _by_key(lists.filings, ("keys", "outbound", "valid_from", "valid_until"))
        cdef KeyIndex fli = KeyIndex()
        fli.build(fl.keys, None)
        cdef cnp.ndarray f_out = np.ascontiguousarray(fl.outbound, dtype=np.bool_)
        cdef cnp.ndarray f_from = np.ascontiguousarray(fl.valid_from, dtype=np.float64)
        cdef cnp.ndarray f_until = np.ascontiguousarray(fl.valid_until, dtype=np.float64)
        al = _by_key(lists.allowlist, ("keys", "prefix"))
        cdef KeyIndex ali = KeyIndex()
        ali.build(al.keys, al.prefix)
        cdef cnp.ndarray a_alp = np.ascontiguousarray(al.prefix, dtype=np.bool_)
        # commit only once everything is built
        self._bl = bli
        self._bl_arrays = (arrays, f_out, f_from, f_until, a_alp)
        self._bl_prefix = <const uint8_t*>cnp.PyArray_DATA(a_prefix)
        self._bl_source = <const uint8_t*>cnp.PyArray_DATA(a_source)
        self._bl_expires = <const uint32_t*>cnp.PyArray_DATA(a_expires)
        self._bl_p = <const uint16_t*>cnp.PyArray_DATA(a_p)
        self._bl_complaints = <const uint16_t*>cnp.PyArray_DATA(a_compl)
        self._bl_reason = <const uint32_t*>cnp.PyArray_DATA(a_reason)
        self._bl_reasons = list(bl.reasons)
        self._fl = fli
        self._fl_outbound = <const uint8_t*>cnp.PyArray_DATA(f_out)
        self._fl_from = <const double*>cnp.PyArray_DATA(f_from)
        self._fl_until = <const double*>cnp.PyArray_DATA(f_until)
        self._al = ali
        self._al_prefix = <const uint8_t*>cnp.PyArray_DATA(a_alp)
        self._al_has_prefix = bool(a_alp.any()) if a_alp.shape[0] else False
        self.lists = lists

    def adopt_state(self, Core other):
        """Take over another core's rate-limit state (config reload)."""
        self.state = other.state

    # ------------------------------------------------------------ helpers
    def source_index(self, address):
        return self._source(address)

    cdef int _source(self, object address) except -3:
        cdef PyObject* hit
        if address is None:
            return SOURCE_OFFLINE
        hit = PyDict_GetItem(self._source_cache, address)
        if hit != NULL:
            return <int><object>hit
        idx = self._resolve(self.settings, address)
        if len(self._source_cache) >= SOURCE_CACHE_MAX:
            self._source_cache.clear()
        self._source_cache[address] = idx
        return idx

    cdef Track* _track(self, int kind, u128 key, int64_t t) except NULL:
        cdef Table* tb = &self.state.tables[kind]
        cdef Py_ssize_t i = _table_find(tb, key)
        if i < 0:
            if tb.n >= self.max_tracked:
                _table_evict(tb, t, self.max_window_ms, self.max_tracked)
            i = _table_add(tb, key, t)
        return &tb.entries[i]

    cdef int _record(self, u128* keys, bint* has, u128 callee_key, int64_t t) except -1:
        cdef int kind
        cdef Track* tr
        for kind in range(3):
            if not has[kind] or not self.kind_used[kind]:
                continue
            tr = self._track(kind, keys[kind], t)
            tr.last = t
            _times_push(tr, t, self.ring_size[kind])
            if self.callee_cap[kind]:
                _callee_seen(tr, callee_key, t, self.callee_cap[kind])
        return 0

    cdef int _bl_candidates(self, Num* cr, int* cand) noexcept:
        """Prefix lengths that can match, longest first; their index slots are prefetched."""
        cdef int n = cr.n, L, ncand = 0
        cdef KeyIndex idx = self._bl
        if idx.n == 0:
            return 0
        for L in range(n, 0, -1):
            if L > cr.fit or L > 31:
                continue
            if (idx.len_any if L == n else idx.len_prefix) >> L & 1:
                cand[ncand] = L
                ncand += 1
                __builtin_prefetch(&idx.table[_mix64(cr.pk[L]) & idx.mask])
        return ncand

    cdef int _blocklist(self, Num* cr, int* cand, int ncand, double now, int* ban, bint* listed, double* p_max,
                        int* complaints, bint* expired) noexcept:
        """The twin's _blocklist over the candidate lengths."""
        cdef int n = cr.n, L, c
        cdef Py_ssize_t i, j
        cdef KeyIndex idx = self._bl
        cdef uint64_t key
        cdef uint32_t exp
        cdef double p
        ban[0] = -1
        listed[0] = False
        p_max[0] = -1.0
        complaints[0] = 0
        expired[0] = False
        for c in range(ncand):
            L = cand[c]
            key = cr.pk[L]
            i = idx.find(key)
            if i >= 0:
                j = i
                while j < idx.n and idx.keys[j] == key:
                    if L < n and not self._bl_prefix[j]:
                        j += 1
                        continue
                    if self._bl_complaints[j] > complaints[0]:
                        complaints[0] = self._bl_complaints[j]
                    exp = self._bl_expires[j]
                    if exp != C_NEVER and now >= <double>exp:
                        expired[0] = True
                        j += 1
                        continue
                    if self._bl_source[j] == C_BIG_DATA:
                        p = -1.0 if self._bl_p[j] == C_P_ABSENT else self._bl_p[j] / C_P_SCALE
                        if p > p_max[0]:
                            p_max[0] = p
                        if p < self.threshold:
                            j += 1
                            continue
                    else:
                        listed[0] = True
                    if ban[0] < 0:
                        ban[0] = <int>j
                    j += 1
        return 0

    cdef int _filing_rule(self, Num* cr, double now) noexcept:
        cdef int n = cr.n, fit, L, stop = cr.area_len + 2
        cdef Py_ssize_t i, found
        fit = cr.fit
        L = n
        while L >= stop:
            if L <= fit and self._fl.n:
                i = self._fl.find(cr.pk[L])
                if i >= 0:
                    # A number filed more than once (a renewal beside the expired filing): the
                    # filing in force decides, the last in the file when several are.
                    found = -1
                    while i < self._fl.n and self._fl.keys[i] == cr.pk[L]:
                        if self._fl_from[i] <= now < self._fl_until[i]:
                            found = i
                        i += 1
                    if found < 0:
                        return R_EXPIRED
                    if not self._fl_outbound[found]:
                        return R_OUTBOUND
                    return -1
            L -= 1
        return R_UNFILED

    cdef bint _allowlisted(self, Num* cr) noexcept:
        cdef int n = cr.n, fit, L
        cdef Py_ssize_t i, j
        cdef KeyIndex idx = self._al
        if idx.n == 0:
            return False
        fit = cr.fit
        if fit == n and (idx.len_any >> n) & 1:
            i = idx.find(cr.pk[n])
            if i >= 0:
                j = i
                while j < idx.n and idx.keys[j] == cr.pk[n]:
                    if not self._al_prefix[j]:
                        return True
                    j += 1
        if self._al_has_prefix:
            L = n
            while L >= 1:
                if L <= fit and L <= 31 and (idx.len_prefix >> L) & 1:
                    i = idx.find(cr.pk[L])
                    if i >= 0:
                        j = i
                        while j < idx.n and idx.keys[j] == cr.pk[L]:
                            if self._al_prefix[j]:
                                return True
                            j += 1
                L -= 1
        return False

    cdef int _rates(self, Track** trs, int64_t t, double* rate_ratio, double* distinct_ratio) noexcept:
        cdef int i, kind, fired = -1
        cdef Py_ssize_t e
        cdef Track* tr
        cdef Table* tb
        cdef int64_t lo, attempts, distinct, x
        cdef int32_t k
        cdef double r
        rate_ratio[0] = 0.0
        distinct_ratio[0] = 0.0
        for i in range(self.n_limits):
            tr = trs[self.l_kind[i]]
            if tr == NULL:
                continue
            lo = t - self.l_window[i]
            attempts = _count_times(tr, lo, t)
            if self.l_calls[i]:
                if attempts >= self.l_calls[i] and fired < 0:
                    fired = i
                if attempts >= self.min_attempts:
                    r = <double>attempts / <double>self.l_calls[i]
                    if r > rate_ratio[0]:
                        rate_ratio[0] = r
            if self.l_distinct[i]:
                distinct = 0
                for k in range(tr.ccount):
                    x = tr.ctimes[k]
                    distinct += (lo < x) & (x <= t)
                if distinct >= self.l_distinct[i] and fired < 0:
                    fired = i
                if attempts >= self.min_attempts:
                    r = <double>distinct / <double>(attempts if attempts > distinct else distinct)
                    if r > distinct_ratio[0]:
                        distinct_ratio[0] = r
        return fired

    cdef double _score(self, int kind, bint listed, double p_max, int complaints, bint expired, double rate_ratio,
                       double distinct_ratio, bint has_outcome, int64_t total, int64_t answered, int64_t short_,
                       Decision* dec) noexcept nogil:
        cdef double* w = self.weights
        cdef double* parts = dec.parts
        cdef double x, tot = 0.0
        cdef int i
        for i in range(9):
            parts[i] = 0.0
        if listed:
            parts[0] = w[0]
        if p_max >= 0.0:
            parts[1] = w[1] * p_max
        if complaints:
            x = <double>complaints / self.complaint_saturation
            parts[2] = w[2] * (x if x < 1.0 else 1.0)
        if expired:
            parts[3] = w[3]
        parts[4] = w[4] * (rate_ratio if rate_ratio < 1.0 else 1.0)
        parts[5] = w[5] * distinct_ratio
        if has_outcome:
            if total >= self.min_outcomes:
                parts[6] = w[6] * (<double>(total - answered) / <double>total)
            if answered >= self.min_outcomes:
                parts[7] = w[7] * (<double>short_ / <double>answered)
        if kind == FREEPHONE:
            parts[8] = w[8]
        dec.nfeat = 0
        for i in range(9):
            tot += parts[i]
            if parts[i] > 0.0:
                dec.feat[dec.nfeat] = i
                dec.nfeat += 1
        return tot if tot < 1.0 else 1.0

    cdef bint _in_ranges(self, int src, str cr_digits, Num* cr) except -1:
        cdef object ranges_ascii = self._src_ranges_ascii[src]
        cdef bytes r
        if ranges_ascii is not None and not (cr.default_area and self.srcs[src].exotic):
            for r in ranges_ascii:
                if len(r) <= cr.n and memcmp(<const char*>r, cr.d, len(r)) == 0:
                    return True
            return False
        for rs in self._src_ranges[src]:
            if cr_digits.startswith(rs):
                return True
        return False

    cdef bint _is_emergency(self, Num* ce, bint exotic) except -1:
        cdef u128 k
        cdef int i
        if ce.kind == HIDDEN:
            return False
        if ce.default_area and exotic:
            return self._ce_s in self._emergency
        if ce.n >= 64 or not (self.emergency_lens >> ce.n) & 1:
            return False
        k = _full_key(ce)
        for i in range(self.n_emergency):
            if self.emergency_keys[i] == k:
                return True
        return False

    cdef int _strings(self, Num* cr, Num* ce, int src) except -1:
        """``_cr_s`` and ``_ce_s`` of the last decision, when ``_decide`` was not asked to make them."""
        cdef str area_s = _NOTHING
        if src >= 0 and self.srcs[src].exotic:
            area_s = self._src_area[src]
        self._ce_s = _digits_str(ce, area_s)
        self._cr_s = _digits_str(cr, area_s)
        return 0

    cdef int _decide(self, object caller, object callee, object source, double now, Decision* dec,
                     Num* cr, Num* ce, int* src_out, bint make_strings) except -1:
        """The twin's check() without the Verdict: fills ``dec``; returns 0."""
        if not PyUnicode_Check(caller):
            raise TypeError(f"expected a str, got {type(caller).__name__}")
        if not PyUnicode_Check(callee):
            raise TypeError(f"expected a str, got {type(callee).__name__}")
        return self._decide_text(PyUnicode_KIND(caller), PyUnicode_DATA(caller), PyUnicode_GET_LENGTH(caller),
                                 PyUnicode_KIND(callee), PyUnicode_DATA(callee), PyUnicode_GET_LENGTH(callee),
                                 source, now, dec, cr, ce, src_out, make_strings)

    cdef int _decide_text(self, int cr_kind, const void* cr_data, Py_ssize_t cr_len, int ce_kind,
                          const void* ce_data, Py_ssize_t ce_len, object source, double now, Decision* dec,
                          Num* cr, Num* ce, int* src_out, bint make_strings) except -1:
        """_decide over the numbers' characters where they lie (a str's data, or a datagram's octets
        as PyUnicode_1BYTE_KIND): the fast path makes no string for either number."""
        cdef int64_t t
        cdef double tf = now * 1000.0
        cdef int src, fired, rule, i
        cdef str area_s = _NOTHING
        cdef const char* area = b""
        cdef int alen = 0
        cdef bint exotic = False
        cdef u128 keys[3]
        cdef bint has[3]
        cdef u128 caller_key, callee_key
        cdef int ban = -1, complaints = 0
        cdef bint listed = False, expired = False, has_outcome = False
        cdef double p_max = -1.0, rate_ratio = 0.0, distinct_ratio = 0.0, score
        cdef int64_t o_total = 0, o_answered = 0, o_short = 0
        cdef Table* tb
        cdef Track* trs[3]
        cdef int cand[BUF]
        cdef int ncand
        cdef Py_ssize_t e
        if not isfinite(tf) or tf >= 9.2e18 or tf <= -9.2e18:
            raise OverflowError(f"time out of range: {now!r}")
        t = <int64_t>tf
        src = self._source(source)
        src_out[0] = src
        if src >= 0:
            area = self.srcs[src].area
            alen = self.srcs[src].alen
            exotic = self.srcs[src].exotic
            if exotic:
                area_s = self._src_area[src]
        _normalize_buf(ce_kind, ce_data, ce_len, area, alen, ce)
        _normalize_buf(cr_kind, cr_data, cr_len, area, alen, cr)
        self._cr_s = None
        self._ce_s = None
        if make_strings or (exotic and (ce.default_area or cr.default_area)):
            self._strings(cr, ce, src)
        dec.nshadow = 0
        dec.nfeat = 0
        dec.score = 0.0
        dec.ban = -1
        dec.fired = -1
        has[0] = has[1] = has[2] = False
        # 1. emergency: always through; the attempt still counts.
        if self._is_emergency(ce, exotic):
            if src != SOURCE_UNTRUSTED and cr.kind != HIDDEN:
                self._keys(_full_key(cr), src, keys, has)
                self._record(keys, has, _full_key(ce), t)
            dec.rule = R_EMERGENCY
            return 0
        # 2. untrusted source: never an open relay.
        if src == SOURCE_UNTRUSTED:
            if self.enforce[R_UNTRUSTED]:
                dec.rule = R_UNTRUSTED
                return 0
            dec.shadow[dec.nshadow] = R_UNTRUSTED
            dec.nshadow += 1
        # 3. hidden caller ID
        if cr.kind == HIDDEN:
            if self.enforce[R_ANONYMOUS]:
                dec.rule = R_ANONYMOUS
                return 0
            dec.shadow[dec.nshadow] = R_ANONYMOUS
            dec.nshadow += 1
            dec.rule = R_ALLOW
            return 0
        caller_key = _full_key(cr)
        callee_key = _full_key(ce) if ce.kind != HIDDEN else 0
        cr.fit = _prefix_keys(cr, cr.pk)
        ncand = self._bl_candidates(cr, cand)
        self._keys(caller_key, src, keys, has)
        # Each key's track is looked up once (_record below may move tracks, so read them first),
        # and its ring is fetched while the blocklist probes wait on memory: both are pure reads.
        for i in range(3):
            trs[i] = NULL
            if has[i]:
                tb = &self.state.tables[i]
                e = _table_find(tb, keys[i])
                if e >= 0:
                    trs[i] = &tb.entries[e]
                    if trs[i].tcount:
                        __builtin_prefetch(&trs[i].times[trs[i].thead])
                        __builtin_prefetch(&trs[i].times[(trs[i].thead + trs[i].tcount // 2) % trs[i].tcap])
                    if trs[i].ccount:
                        __builtin_prefetch(trs[i].ctimes)
        self._blocklist(cr, cand, ncand, now, &ban, &listed, &p_max, &complaints, &expired)
        fired = self._rates(trs, t, &rate_ratio, &distinct_ratio)
        if trs[0] != NULL:
            has_outcome = True
            o_total = trs[0].total
            o_answered = trs[0].answered
            o_short = trs[0].short_
        if src != SOURCE_UNTRUSTED:
            self._record(keys, has, callee_key, t)
        score = self._score(cr.kind, listed, p_max, complaints, expired, rate_ratio, distinct_ratio, has_outcome,
                            o_total, o_answered, o_short, dec)
        dec.score = score
        dec.ban = ban
        dec.fired = fired
        # 4. banned
        if ban >= 0:
            if self.enforce[R_BANNED]:
                dec.rule = R_BANNED
                return 0
            dec.shadow[dec.nshadow] = R_BANNED
            dec.nshadow += 1
        # 5-7. 95/96 call-centre numbers
        if cr.kind == SERVICE95 or cr.kind == SERVICE96:
            rule = self._filing_rule(cr, now)
            if rule >= 0:
                if self.enforce[rule]:
                    dec.rule = rule
                    return 0
                dec.shadow[dec.nshadow] = rule
                dec.nshadow += 1
        # 8. caller ID outside the numbers allocated to the source
        if src >= 0 and self.srcs[src].has_ranges:
            if self._cr_s is None:
                self._cr_s = _digits_str(cr, area_s)
            if not self._in_ranges(src, self._cr_s, cr):
                if self.enforce[R_MISMATCH]:
                    dec.rule = R_MISMATCH
                    return 0
                dec.shadow[dec.nshadow] = R_MISMATCH
                dec.nshadow += 1
        if not self._allowlisted(cr):
            # 9. high frequency
            if fired >= 0:
                if self.enforce[R_FREQUENCY]:
                    dec.rule = R_FREQUENCY
                    return 0
                dec.shadow[dec.nshadow] = R_FREQUENCY
                dec.nshadow += 1
            # 10. risk score
            if score >= self.threshold:
                if self.enforce[R_SCORE]:
                    dec.rule = R_SCORE
                    return 0
                dec.shadow[dec.nshadow] = R_SCORE
                dec.nshadow += 1
        dec.rule = R_ALLOW
        return 0

    cdef tuple _features(self, Decision* dec):
        """The features tuple, shared with an earlier verdict when the values are the same."""
        cdef uint64_t h = <uint64_t>dec.nfeat, bits
        cdef int i, f
        cdef FeatEntry* e
        cdef double x
        cdef tuple features
        for i in range(dec.nfeat):
            x = dec.parts[dec.feat[i]]
            memcpy(&bits, &x, 8)
            h = _mix64(h ^ bits ^ (<uint64_t>dec.feat[i] << 59))
        e = &self.fcache[h & 63]
        if e.features != NULL and e.nfeat == dec.nfeat:
            for i in range(dec.nfeat):
                f = dec.feat[i]
                if e.feat[i] != f or e.value[i] != dec.parts[f]:
                    break
            else:
                return <tuple>e.features
        features = PyTuple_New(dec.nfeat)
        for i in range(dec.nfeat):
            pair = (_FEATURES[dec.feat[i]], dec.parts[dec.feat[i]])
            Py_INCREF(pair)
            PyTuple_SET_ITEM(features, i, pair)
        Py_XDECREF(e.features)
        Py_INCREF(features)
        e.features = <PyObject*>features
        e.nfeat = dec.nfeat
        for i in range(dec.nfeat):
            e.feat[i] = dec.feat[i]
            e.value[i] = dec.parts[dec.feat[i]]
        return features

    cdef void _keys(self, u128 caller_key, int src, u128* keys, bint* has) noexcept:
        keys[0] = caller_key
        has[0] = True
        if src >= 0:
            keys[1] = <u128>src
            keys[2] = <u128>self.srcs[src].customer
            has[1] = True
            has[2] = True
        else:
            has[1] = False
            has[2] = False

    # ------------------------------------------------------------ the decision
    def check(self, caller, callee, source, double now):
        """Decide on one call and count it as an attempt (SPEC §3)."""
        cdef Decision dec
        cdef Num cr, ce
        cdef int src, rule, i
        cdef Verdict v
        cdef bint allow
        cdef tuple shadowed, features
        self._decide(caller, callee, source, now, &dec, &cr, &ce, &src, True)
        rule = dec.rule
        allow = rule == R_EMERGENCY or rule == R_ALLOW
        v = Verdict.__new__(Verdict)
        v.verdict = _ALLOW if allow else _REJECT
        v.code = 0 if allow else self.codes[rule]
        v.rule = <str>_RULE_NAMES[rule]
        v.reason = <str>self._reasons[rule]
        v.score = dec.score
        v.caller = self._cr_s
        v.callee = self._ce_s
        v.caller_kind = <str>_KIND_NAMES[cr.kind]
        v.source = <str>self._src_name[src] if src >= 0 else _NOTHING
        if dec.nshadow:
            shadowed = PyTuple_New(dec.nshadow)
            for i in range(dec.nshadow):
                name = _RULE_NAMES[dec.shadow[i]]
                Py_INCREF(name)
                PyTuple_SET_ITEM(shadowed, i, name)
            v.shadowed = shadowed
        else:
            v.shadowed = _EMPTY
        if dec.nfeat and rule != R_EMERGENCY and rule != R_UNTRUSTED and rule != R_ANONYMOUS:
            v.features = self._features(&dec)
        else:
            v.features = _EMPTY
        if rule == R_BANNED:
            v.detail = f"{_SOURCES[self._bl_source[dec.ban]]}: {self._bl_reasons[self._bl_reason[dec.ban]]}"
        elif rule == R_MISMATCH:
            v.detail = <str>self._src_detail[src]
        elif rule == R_FREQUENCY:
            v.detail = <str>self._limit_detail[dec.fired]
        else:
            v.detail = _NOTHING
        return v

    def check_batch(self, callers, callees, sources, times):
        """Decide a batch in order; returns (codes int16, rule indexes uint8, scores float64)."""
        cdef Py_ssize_t n = len(callers), i
        cdef cnp.ndarray[cnp.int16_t, ndim=1] codes = np.zeros(n, dtype=np.int16)
        cdef cnp.ndarray[cnp.uint8_t, ndim=1] rules = np.zeros(n, dtype=np.uint8)
        cdef cnp.ndarray[cnp.float64_t, ndim=1] scores = np.zeros(n, dtype=np.float64)
        cdef cnp.ndarray[cnp.float64_t, ndim=1] tarr = np.ascontiguousarray(times, dtype=np.float64)
        cdef Decision dec
        cdef Num cr, ce
        cdef int src, rule
        if len(callees) != n or len(sources) != n or tarr.shape[0] != n:
            raise ValueError("check_batch: callers, callees, sources and times differ in length")
        for i in range(n):
            self._decide(callers[i], callees[i], sources[i], tarr[i], &dec, &cr, &ce, &src, False)
            rule = dec.rule
            codes[i] = 0 if (rule == R_EMERGENCY or rule == R_ALLOW) else self.codes[rule]
            rules[i] = rule
            scores[i] = dec.score
        return codes, rules, scores

    # ------------------------------------------------------------ outcomes
    def observe(self, caller, answered, double duration, source, double now):
        """Feed the outcome of a finished call (answered? how long?) into the caller's score."""
        cdef int src = self._source(source)
        cdef Num cr
        cdef Track* tr
        cdef double tf = now * 1000.0
        if src >= 0:
            _normalize(caller, self.srcs[src].area, self.srcs[src].alen, &cr)
        else:
            _normalize(caller, b"", 0, &cr)
        if cr.kind == HIDDEN:
            return
        if not isfinite(tf) or tf >= 9.2e18 or tf <= -9.2e18:
            raise OverflowError(f"time out of range: {now!r}")
        self._outcome(_full_key(&cr), answered, duration, <int64_t>tf)

    cdef int _outcome(self, u128 caller_key, bint answered, double duration, int64_t t) except -1:
        """One finished call in the caller's answer and short-call counts."""
        cdef Track* tr = self._track(0, caller_key, t)
        tr.total += 1
        if answered:
            tr.answered += 1
            if duration * 1000.0 < self.short_call_ms:
                tr.short_ += 1
        return 0

    def note_attempt(self, caller, callee, source, double now):
        """The twin's note_attempt: count one attempt as _decide counted it, from the normalised
        numbers its verdict gave (no normalising again: the digits are the key)."""
        cdef int src = self._source(source)
        cdef u128 keys[3]
        cdef bint has[3]
        cdef u128 caller_key, callee_key = 0
        cdef double tf = now * 1000.0
        if not isfinite(tf) or tf >= 9.2e18 or tf <= -9.2e18:
            raise OverflowError(f"time out of range: {now!r}")
        if src == SOURCE_UNTRUSTED or not _digits_key(caller, &caller_key):
            return False
        _digits_key(callee, &callee_key)
        self._keys(caller_key, src, keys, has)
        self._record(keys, has, callee_key, <int64_t>tf)
        return True

    def note_outcome(self, caller, answered, double duration, double now):
        """The twin's note_outcome: observe() for a normalised caller (the digits are the key)."""
        cdef u128 key
        cdef double tf = now * 1000.0
        if not isfinite(tf) or tf >= 9.2e18 or tf <= -9.2e18:
            raise OverflowError(f"time out of range: {now!r}")
        if not _digits_key(caller, &key):
            return False
        self._outcome(key, answered, duration, <int64_t>tf)
        return True

    def tracked(self):
        return (self.state.tables[0].n, self.state.tables[1].n, self.state.tables[2].n)

    # ------------------------------------------------------------ snapshot
    def snapshot(self):
        """Rate-limit state as plain data (written on stop, read on start)."""
        cdef int kind
        cdef Py_ssize_t i
        cdef int32_t k
        cdef Track* tr
        cdef Table* tb
        tables = []
        for kind in range(3):
            tb = &self.state.tables[kind]
            rows = []
            for i in range(tb.n):
                tr = &tb.entries[i]
                times = [tr.times[(tr.thead + k) % tr.tcap] for k in range(tr.tcount)]
                callees = [[_u128_to_py(tr.ckeys[k]), tr.ctimes[k]] for k in range(tr.ccount)]
                rows.append([_u128_to_py(tr.key), tr.last, times, callees, tr.total, tr.answered, tr.short_])
            tables.append(rows)
        return {"version": 1, "tracks": tables}

    def restore(self, data):
        cdef State st
        cdef int kind, ring, cap
        cdef Table* tb
        cdef Track* tr
        cdef Py_ssize_t i
        cdef u128 key
        if data.get("version") != 1:
            raise ValueError("unknown snapshot version")
        st = State()
        for kind, rows in enumerate(data["tracks"][:3]):
            tb = &st.tables[kind]
            ring = self.ring_size[kind]
            cap = self.callee_cap[kind]
            for k, last, times, callees, total, answered, short in rows:
                key = _py_to_u128(k)
                last_i = int(last)
                times_l = [int(x) for x in times][-ring:]
                callees_l = [(_py_to_u128(a), int(b)) for a, b in callees][-cap:] if cap else []
                counts = (int(total), int(answered), int(short))
                i = _table_find(tb, key)
                if i < 0:
                    i = _table_add(tb, key, last_i)
                else:
                    _track_free(&tb.entries[i])
                    memset(&tb.entries[i], 0, sizeof(Track))
                    tb.entries[i].key = key
                tr = &tb.entries[i]
                tr.last = last_i
                tr.total = counts[0]
                tr.answered = counts[1]
                tr.short_ = counts[2]
                for x in times_l:
                    _times_push(tr, x, len(times_l) + 1)
                for a, b in callees_l:
                    _callee_append(tr, a, b)
        self.state = st


cdef int _callee_append(Track* tr, u128 key, int64_t t) except -1:
    _callee_reserve(tr, tr.ccount + 1)
    tr.ckeys[tr.ccount] = key
    tr.ctimes[tr.ccount] = t
    tr.ccount += 1
    return 0


# ====================================================================== fast blocklist loader
# Reads the CSV in big chunks and parses the common row shapes in C; any row it is unsure
# of goes through lists.blocklist_row (so messages and values cannot drift), and any CSV
# feature it does not handle hands the whole file back to the Python reader.

import codecs
import os

from cython cimport view
from libc.stdlib cimport strtod
from libc.string cimport memchr

cdef extern from "Python.h":
    object PyUnicode_DecodeUTF8(const char* s, Py_ssize_t size, const char* errors)
    object PyBytes_FromStringAndSize(const char* v, Py_ssize_t len)
    char* PyBytes_AS_STRING(object)
    Py_ssize_t PyBytes_GET_SIZE(object)

cdef enum:
    CHUNK = 16 << 20
    FIELD_LIMIT = 131072      # csv.field_size_limit(): longer lines go to the Python reader
    MAX_FIELDS = 256

cdef struct Field:
    Py_ssize_t start
    Py_ssize_t length
    bint escaped              # quoted with "" inside: needs unescaping


class _Fallback(Exception):
    """The file uses a CSV feature the compiled loader leaves to the Python reader."""


class _StrictStop(Exception):
    """Strict mode met a broken row (raised as ListError once the rest of the file is known to decode)."""


cdef inline bint _ascii_space(char c) noexcept nogil:
    return c == 32 or (9 <= c <= 13) or (28 <= c <= 31)


cdef inline bint _ci_equal(const char* s, Py_ssize_t n, const char* word) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if word[i] == 0:
            return False
        if _lower_ascii(<unsigned char>s[i]) != <unsigned char>word[i]:
            return False
    return word[n] == 0


cdef int64_t _days_from_civil(int64_t y, int64_t m, int64_t d) noexcept nogil:
    cdef int64_t era, yoe, doy, doe
    if m <= 2:
        y -= 1
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef bint _fast_time(const char* s, Py_ssize_t n, bint end_of_day, bint tz_ok, int64_t tz_off,
                     double* out) noexcept nogil:
    """lists.parse_time for plain epoch numbers and YYYY-MM-DD; False: leave it to Python."""
    cdef char tmp[32]
    cdef Py_ssize_t i, dots = 0, digits = 0
    cdef int64_t y, m, d, dim
    for i in range(n):
        if s[i] == 46:
            dots += 1
        elif 48 <= s[i] <= 57:
            digits += 1
        else:
            break
    if n and dots + digits == n:
        # eight or fourteen digits are ISO 8601's basic date (and time): Python reads them
        if dots > 1 or digits == 0 or n > 15 or (dots == 0 and (n == 8 or n == 14)):
            return False
        memcpy(tmp, s, n)
        tmp[n] = 0
        out[0] = strtod(tmp, NULL)
        return out[0] <= C_MAX_EPOCH     # later is refused by Python, with the message
    if not tz_ok or n != 10 or s[4] != 45 or s[7] != 45:
        return False
    for i in range(10):
        if i != 4 and i != 7 and not (48 <= s[i] <= 57):
            return False
    y = (s[0] - 48) * 1000 + (s[1] - 48) * 100 + (s[2] - 48) * 10 + (s[3] - 48)
    m = (s[5] - 48) * 10 + (s[6] - 48)
    d = (s[8] - 48) * 10 + (s[9] - 48)
    if y < 1 or y > 9998 or m < 1 or m > 12 or d < 1:
        return False
    if m == 2:
        dim = 29 if (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)) else 28
    elif m == 4 or m == 6 or m == 9 or m == 11:
        dim = 30
    else:
        dim = 31
    if d > dim:
        return False
    out[0] = <double>(_days_from_civil(y, m, d) * 86400 - tz_off + (86400 if end_of_day else 0))
    return True


cdef bint _fast_p(const char* s, Py_ssize_t n, double* out) noexcept nogil:
    cdef char tmp[40]
    cdef Py_ssize_t i, dots = 0, digits = 0
    if n == 0 or n > 30:
        return False
    for i in range(n):
        if s[i] == 46:
            dots += 1
        elif 48 <= s[i] <= 57:
            digits += 1
        else:
            return False
    if dots > 1 or digits == 0:
        return False
    memcpy(tmp, s, n)
    tmp[n] = 0
    out[0] = strtod(tmp, NULL)
    return True


cdef bint _fast_prefix(const char* s, Py_ssize_t n, uint64_t* key) noexcept nogil:
    """numbers.normalize_prefix + key_of for ASCII text; False when it is not a digit prefix."""
    cdef char t[48]
    cdef Py_ssize_t i, m = 0, a = 0
    cdef uint64_t k = 1
    for i in range(n):
        if _is_sep(<unsigned char>s[i]):
            continue
        if m >= 40:
            return False
        t[m] = s[i]
        m += 1
    if m >= 3 and t[0] == 43 and t[1] == 56 and t[2] == 54:
        a = 3
    elif m >= 4 and t[0] == 48 and t[1] == 48 and t[2] == 56 and t[3] == 54:
        a = 4
    if m - a < 1 or m - a > MAX_DIGITS:
        return False
    for i in range(a, m):
        if not (48 <= t[i] <= 57):
            return False
        k = k * 10 + <uint64_t>(t[i] - 48)
    key[0] = k
    return True


cdef uint32_t* _argsort(const uint64_t* keys, Py_ssize_t n) except NULL:
    """Stable argsort of uint64 keys (LSD radix, 11 bits a pass, passes with one digit skipped)."""
    cdef uint32_t* idx = <uint32_t*>malloc((n + 1) * sizeof(uint32_t))
    cdef uint32_t* tmp = <uint32_t*>malloc((n + 1) * sizeof(uint32_t))
    cdef uint32_t* swap
    cdef Py_ssize_t* counts = <Py_ssize_t*>calloc(6 * 2048, sizeof(Py_ssize_t))
    cdef Py_ssize_t i, total, c
    cdef int p, shift, dgt
    if idx == NULL or tmp == NULL or counts == NULL:
        free(idx)
        free(tmp)
        free(counts)
        raise MemoryError()
    with nogil:
        for i in range(n):
            idx[i] = <uint32_t>i
            for p in range(6):
                counts[p * 2048 + ((keys[i] >> (p * 11)) & 2047)] += 1
        for p in range(6):
            shift = p * 11
            if n == 0 or counts[p * 2048 + ((keys[0] >> shift) & 2047)] == n:
                continue
            total = 0
            for dgt in range(2048):
                c = counts[p * 2048 + dgt]
                counts[p * 2048 + dgt] = total
                total += c
            for i in range(n):
                dgt = (keys[idx[i]] >> shift) & 2047
                tmp[counts[p * 2048 + dgt]] = idx[i]
                counts[p * 2048 + dgt] += 1
            swap = idx
            idx = tmp
            tmp = swap
    free(tmp)
    free(counts)
    return idx



cdef void* _grown(void* block, size_t size) except NULL:
    """realloc that raises MemoryError instead of returning NULL (the old block stays valid)."""
    cdef void* q = realloc(block, size)
    if q == NULL:
        raise MemoryError()
    return q


cdef class BlocklistReader:
    """One run of the compiled blocklist loader (use :func:`load_blocklist`)."""

    cdef uint64_t* keys
    cdef uint8_t* prefix
    cdef uint8_t* source
    cdef uint32_t* expires
    cdef uint16_t* p
    cdef uint16_t* complaints
    cdef uint32_t* reason
    cdef Py_ssize_t n, cap
    cdef str path
    cdef bint strict
    cdef object tz
    cdef bint tz_ok
    cdef int64_t tz_off
    cdef object row_parser
    cdef list problems
    cdef list names
    cdef list reasons
    cdef dict reason_of
    cdef dict raw_reason
    cdef int width
    cdef int c_number, c_match, c_source, c_reason, c_added, c_expires, c_p, c_complaints
    cdef list source_words
    cdef Field fields[MAX_FIELDS]
    cdef bytes last_reason
    cdef uint32_t last_reason_idx

    def __cinit__(self):
        self.n = 0
        self.cap = 0
        self.keys = NULL
        self.prefix = NULL
        self.source = NULL
        self.expires = NULL
        self.p = NULL
        self.complaints = NULL
        self.reason = NULL

    def __dealloc__(self):
        self._free()

    cdef void _free(self) noexcept:
        free(self.keys)
        free(self.prefix)
        free(self.source)
        free(self.expires)
        free(self.p)
        free(self.complaints)
        free(self.reason)
        self.keys = NULL
        self.prefix = NULL
        self.source = NULL
        self.expires = NULL
        self.p = NULL
        self.complaints = NULL
        self.reason = NULL

    cdef int _grow(self) except -1:
        return self._reserve(self.cap * 2 if self.cap else 65536)

    cdef int _reserve(self, Py_ssize_t cap) except -1:
        if cap <= self.cap:
            return 0
        # Each column grows in place; a failed realloc leaves the old block (and self.cap) intact.
        self.keys = <uint64_t*>_grown(self.keys, cap * 8)
        self.prefix = <uint8_t*>_grown(self.prefix, cap)
        self.source = <uint8_t*>_grown(self.source, cap)
        self.expires = <uint32_t*>_grown(self.expires, cap * 4)
        self.p = <uint16_t*>_grown(self.p, cap * 2)
        self.complaints = <uint16_t*>_grown(self.complaints, cap * 2)
        self.reason = <uint32_t*>_grown(self.reason, cap * 4)
        self.cap = cap
        return 0

    cdef int _add(self, uint64_t key, bint is_prefix, int src, uint32_t exp, uint16_t prob, uint16_t count,
                  uint32_t reason) except -1:
        cdef Py_ssize_t i = self.n
        if i >= self.cap:
            self._grow()
        self.keys[i] = key
        self.prefix[i] = is_prefix
        self.source[i] = <uint8_t>src
        self.expires[i] = exp
        self.p[i] = prob
        self.complaints[i] = count
        self.reason[i] = reason
        self.n = i + 1
        return 0

    cdef int _problem(self, Py_ssize_t line, str message) except -1:
        from .errors import ListError
        from .lists import RowProblem
        if self.strict:
            raise _StrictStop(line, message)
        self.problems.append(RowProblem(self.path, line, message))
        return 0

    cdef uint32_t _reason_text(self, str text) except? 0xFFFFFFFF:
        idx = self.reason_of.get(text)
        if idx is None:
            idx = self.reason_of[text] = len(self.reasons)
            self.reasons.append(text)
        return idx

    cdef bytes _field_bytes(self, const char* line, Field* f):
        cdef bytes raw = PyBytes_FromStringAndSize(line + f.start, f.length)
        if f.escaped:
            raw = raw.replace(b'""', b'"')
        return raw

    cdef str _field_str(self, const char* line, Field* f):
        raw = self._field_bytes(line, f)
        try:
            return PyUnicode_DecodeUTF8(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), "strict")
        except UnicodeDecodeError:
            raise _Fallback() from None

    cdef int _delegate(self, const char* line, int nf, Py_ssize_t lineno) except -1:
        """Parse the row exactly as the Python loader does (any row the C path is unsure of)."""
        cdef int i
        row = {}
        for i in range(nf):
            row[self.names[i]] = self._field_str(line, &self.fields[i]).strip()
        try:
            key, is_prefix, src, exp, prob, count, text = self.row_parser(row, self.tz)
        except ValueError as exc:
            return self._problem(lineno, str(exc))
        self._add(key, is_prefix, src, exp, prob, count, self._reason_text(text))
        return 0

    cdef int _line(self, const char* s, Py_ssize_t n, Py_ssize_t lineno) except -1:
        cdef Py_ssize_t i, j, q
        cdef int nf = 0, total_fields = 0
        cdef const char* hit
        cdef bint high = False
        cdef Field* f
        if n and s[n - 1] == 13:
            n -= 1
        if n == 0:
            return 0
        if n > FIELD_LIMIT or memchr(s, 13, n) != NULL:
            raise _Fallback()
        for i in range(n):
            if <unsigned char>s[i] >= 0x80:
                high = True
                break
        if high:
            try:
                PyUnicode_DecodeUTF8(s, n, "strict")
            except UnicodeDecodeError:
                raise _Fallback() from None
        # split into fields (csv excel dialect); quotes only as whole fields on one line
        i = 0
        while True:
            if nf < MAX_FIELDS:
                f = &self.fields[nf]
            else:
                f = &self.fields[MAX_FIELDS - 1]
            f.escaped = False
            if i < n and s[i] == 34:
                j = i + 1
                while True:
                    hit = <const char*>memchr(s + j, 34, n - j) if j < n else NULL
                    if hit == NULL:
                        raise _Fallback()          # the quoted field goes on past this line
                    q = hit - s
                    if q + 1 < n and s[q + 1] == 34:
                        f.escaped = True
                        j = q + 2
                        continue
                    break
                f.start = i + 1
                f.length = q - i - 1
                i = q + 1
                nf += 1
                if i == n:
                    break
                if s[i] != 44:
                    raise _Fallback()              # text after a closing quote
                i += 1
            else:
                hit = <const char*>memchr(s + i, 44, n - i) if i < n else NULL
                j = (hit - s) if hit != NULL else n
                f.start = i
                f.length = j - i
                nf += 1
                if j == n:
                    break
                i = j + 1
        f = &self.fields[0]
        if nf == 1:
            for i in range(f.start, f.start + f.length):
                if not _ascii_space(s[i]):
                    break
            else:
                return 0                           # blank row
            if high and not self._field_str(s, f).strip():
                return 0
        if f.length and s[f.start] == 35:          # '#' comment row
            return 0
        if nf != self.width:
            return self._problem(lineno, f"expected {self.width} fields, got {nf}")
        if self._fast_row(s, lineno) == 0:
            return self._delegate(s, nf, lineno)
        return 0

    cdef inline bint _plain(self, const char* s, int col, const char** out, Py_ssize_t* length) noexcept:
        """The stripped ASCII text of a column; False when it needs the Python path."""
        cdef Field* f = &self.fields[col]
        cdef Py_ssize_t a = f.start, b = f.start + f.length, i
        if f.escaped:
            return False
        while a < b and _ascii_space(s[a]):
            a += 1
        while b > a and _ascii_space(s[b - 1]):
            b -= 1
        for i in range(a, b):
            if <unsigned char>s[i] >= 0x80:
                return False
        out[0] = s + a
        length[0] = b - a
        return True

    cdef int _fast_row(self, const char* s, Py_ssize_t lineno) except -1:
        """Parse a plain row in C; 0 when it must go through the Python row parser."""
        cdef const char* v
        cdef Py_ssize_t n, i
        cdef bint is_prefix
        cdef uint64_t key
        cdef Num num
        cdef int src = -1
        cdef double x
        cdef int64_t e
        cdef uint32_t exp = <uint32_t>C_NEVER
        cdef uint16_t prob = C_P_ABSENT
        cdef uint32_t count = 0
        cdef bytes word
        cdef Field* f
        cdef uint32_t ridx
        # match
        if not self._plain(s, self.c_match, &v, &n):
            return 0
        if n == 0 or _ci_equal(v, n, b"exact"):
            is_prefix = False
        elif _ci_equal(v, n, b"prefix"):
            is_prefix = True
        else:
            return 0
        # number
        if not self._plain(s, self.c_number, &v, &n):
            return 0
        if is_prefix:
            if not _fast_prefix(v, n, &key):
                return 0
        else:
            _normalize_buf(PyUnicode_1BYTE_KIND, v, n, NULL, 0, &num)
            if num.kind == HIDDEN or num.n > MAX_DIGITS:
                return 0
            key = <uint64_t>_full_key(&num)
        # source
        if not self._plain(s, self.c_source, &v, &n):
            return 0
        for i, word in enumerate(self.source_words):
            if _ci_equal(v, n, word):
                src = i
                break
        if src < 0:
            return 0
        # added, expires
        if not self._plain(s, self.c_added, &v, &n):
            return 0
        if n and not _fast_time(v, n, False, self.tz_ok, self.tz_off, &x):
            return 0
        if not self._plain(s, self.c_expires, &v, &n):
            return 0
        if n:
            if not _fast_time(v, n, True, self.tz_ok, self.tz_off, &x):
                return 0
            if not (-9.2e18 < x < 9.2e18):
                return 0
            e = <int64_t>x
            if e < 0:
                e = 0
            if e > <int64_t>C_NEVER - 1:
                e = <int64_t>C_NEVER - 1
            exp = <uint32_t>e
        # p
        if not self._plain(s, self.c_p, &v, &n):
            return 0
        if n:
            if not _fast_p(v, n, &x) or not (0.0 <= x <= 1.0):
                return 0
            prob = <uint16_t>floor(x * C_P_SCALE + C_P_EPSILON)   # truncated, as lists.blocklist_row
        elif src == C_BIG_DATA:
            return 0
        # complaints (optional column)
        if self.c_complaints >= 0:
            if not self._plain(s, self.c_complaints, &v, &n):
                return 0
            for i in range(n):
                if not (48 <= v[i] <= 57):
                    return 0
                if count <= 65535:
                    count = count * 10 + <uint32_t>(v[i] - 48)
            if count > 65535:
                count = 65535
        # reason: interned by its raw bytes
        f = &self.fields[self.c_reason]
        if (self.last_reason is not None and not f.escaped and PyBytes_GET_SIZE(self.last_reason) == f.length
                and memcmp(PyBytes_AS_STRING(self.last_reason), s + f.start, f.length) == 0):
            ridx = self.last_reason_idx
        else:
            raw = self._field_bytes(s, f)
            hit = self.raw_reason.get(raw)
            if hit is None:
                text = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), "strict").strip()
                hit = self.raw_reason[raw] = self._reason_text(text)
            ridx = hit
            if not f.escaped:
                self.last_reason = raw
                self.last_reason_idx = ridx
        self._add(key, is_prefix, src, exp, prob, <uint16_t>count, ridx)
        return 1

    cdef object _header(self, bytes line):
        """Column positions from the header; None when the Python reader should handle the file."""
        from .lists import BLOCKLIST_COLUMNS
        cdef Py_ssize_t n = len(line)
        if n and line[n - 1] == 13:
            line = line[:n - 1]
        if not line or b'"' in line or b"\r" in line or not line.isascii():
            return None
        names = [h.strip().lower() for h in line.decode("ascii").split(",")]
        if len(names) > MAX_FIELDS or any(names.count(c) != 1 for c in BLOCKLIST_COLUMNS):
            return None     # a column missing or named twice: the Python reader says which
        col = {name: i for i, name in enumerate(names)}
        self.names = names
        self.width = len(names)
        self.c_number = col["number"]
        self.c_match = col["match"]
        self.c_source = col["source"]
        self.c_reason = col["reason"]
        self.c_added = col["added"]
        self.c_expires = col["expires"]
        self.c_p = col["p"]
        self.c_complaints = col.get("complaints", -1)
        return True

    def run(self, str path, bint strict, tz, row_parser):
        cdef bytes data, leftover = b""
        cdef const char* s
        cdef Py_ssize_t n, start = 0, lineno = 1
        cdef const char* nl
        import datetime as dt
        from .lists import SOURCES
        self.path = path
        self.strict = strict
        self.tz = tz
        self.row_parser = row_parser
        self.problems = []
        self.reasons = []
        self.reason_of = {}
        self.raw_reason = {}
        self.source_words = [w.encode("ascii") for w in SOURCES]
        self.tz_ok = False
        self.tz_off = 0
        if isinstance(tz, dt.timezone):
            off = tz.utcoffset(None)
            if off.microseconds == 0:
                self.tz_ok = True
                self.tz_off = off.days * 86400 + off.seconds
        try:
            handle = open(path, "rb")
        except OSError:
            return None
        with handle:
            try:
                # every stored row takes at least a dozen bytes of the file: reserve once, so the
                # columns never move (untouched reserved pages cost no memory)
                self._reserve(os.fstat(handle.fileno()).st_size // 12 + 1024)
            except MemoryError:
                pass
            data = handle.read(CHUNK)
            if data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            while b"\n" not in data:
                more = handle.read(CHUNK)
                if not more:
                    break
                data += more
            cut = data.find(b"\n")
            if cut < 0:
                cut = len(data)
            if self._header(data[:cut]) is None:
                return None
            leftover = data[cut + 1:] if cut < len(data) else b""
            try:
                while True:
                    chunk = handle.read(CHUNK)
                    data = leftover + chunk if leftover else chunk
                    s = data
                    n = len(data)
                    start = 0
                    while True:
                        nl = <const char*>memchr(s + start, 10, n - start)
                        if nl == NULL:
                            break
                        lineno += 1
                        self._line(s + start, nl - (s + start), lineno)
                        start = nl - s + 1
                    if not chunk:
                        if start < n:
                            lineno += 1
                            self._line(s + start, n - start, lineno)
                        break
                    leftover = data[start:]
            except _Fallback:
                return None
            except _StrictStop as stop:
                # The Python reader decodes ahead of the row it parses, so invalid UTF-8 further on
                # can surface before this row's error: leave such files to it.
                decoder = codecs.getincrementaldecoder("utf-8")("strict")
                try:
                    decoder.decode(data[start:])
                    while True:
                        chunk = handle.read(CHUNK)
                        decoder.decode(chunk, final=not chunk)
                        if not chunk:
                            break
                except UnicodeDecodeError:
                    return None
                from .errors import ListError
                raise ListError(self.path, stop.args[0], stop.args[1]) from None
        return self._finish()

    cdef object _finish(self):
        from .lists import Blocklist
        cdef Py_ssize_t n = self.n
        cdef uint32_t* order = _argsort(self.keys, n)
        try:
            # one column at a time, so at most one small column is doubled at any moment
            _gather(<void**>&self.prefix, 1, order, n)
            _gather(<void**>&self.source, 1, order, n)
            _gather(<void**>&self.expires, 4, order, n)
            _gather(<void**>&self.reason, 4, order, n)
            _gather(<void**>&self.p, 2, order, n)
            _gather(<void**>&self.complaints, 2, order, n)
        finally:
            free(order)
        keys = _own(<void**>&self.keys, n, 8, "Q", np.uint64)
        keys.sort()             # in place; equal keys are equal values, so stability does not matter here
        prefix = _own(<void**>&self.prefix, n, 1, "?", np.bool_)
        source = _own(<void**>&self.source, n, 1, "B", np.uint8)
        expires = _own(<void**>&self.expires, n, 4, "I", np.uint32)
        p = _own(<void**>&self.p, n, 2, "H", np.uint16)
        complaints = _own(<void**>&self.complaints, n, 2, "H", np.uint16)
        reason = _own(<void**>&self.reason, n, 4, "I", np.uint32)
        self._free()
        return Blocklist(keys=keys, prefix=prefix, source=source, expires=expires, p=p, complaints=complaints,
                         reason=reason, reasons=self.reasons), self.problems


cdef int _gather(void** slot, int size, const uint32_t* order, Py_ssize_t n) except -1:
    """Replace a column by column[order] (a new exact-size buffer; the old one is freed)."""
    cdef char* src = <char*>slot[0]
    cdef char* out = <char*>malloc(n * size + 1)
    cdef Py_ssize_t i
    if out == NULL:
        raise MemoryError()
    with nogil:
        if size == 1:
            for i in range(n):
                out[i] = src[order[i]]
        elif size == 2:
            for i in range(n):
                (<uint16_t*>out)[i] = (<uint16_t*>src)[order[i]]
        else:
            for i in range(n):
                (<uint32_t*>out)[i] = (<uint32_t*>src)[order[i]]
    free(src)
    slot[0] = out
    return 0


cdef object _own(void** slot, Py_ssize_t n, int size, str fmt, object dtype):
    """A numpy array that takes over a malloc'd column (freed with the array)."""
    cdef view.array arr
    cdef void* q
    if n == 0:
        return np.empty(0, dtype=dtype)
    q = realloc(slot[0], n * size)          # give back the unused reservation
    if q != NULL:
        slot[0] = q
    arr = view.array(shape=(n,), itemsize=size, format=fmt, mode="c", allocate_buffer=False)
    arr.data = <char*>slot[0]
    arr.callback_free_data = free
    slot[0] = NULL
    return np.asarray(arr)


def load_blocklist(str path, bint strict=False, tz=None):
    """The compiled blocklist loader: (Blocklist, problems), or None to use the Python reader."""
    import datetime as dt

    from .lists import blocklist_row
    if tz is None:
        tz = dt.timezone.utc
    return BlocklistReader().run(path, strict, tz, blocklist_row)
