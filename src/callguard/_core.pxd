# Declarations of the compiled decision core (see _core.pyx, _core.pyi for the API).

from cpython.object cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from *:
    # Rate-limit keys are int("1" + digits); a 96 number with its area can reach 22 digits.
    ctypedef unsigned long long u128 "unsigned __int128"


cdef enum:
    BUF = 48


cdef struct Num:
    int kind
    int n                   # digits in d
    int area_len            # len(Number.area)
    bint default_area       # d starts with the source's default area
    char d[BUF]             # ASCII digits (a non-ASCII default area is stored by its decimal values)
    char area[8]            # Number.area (ASCII)
    int fit                 # pk[1..fit] are set: key_of(digits[:L]) while it fits in 64 bits
    uint64_t pk[BUF]


cdef struct Decision:
    int rule
    double score
    int ban                 # first firing blocklist entry or -1
    int fired               # first firing rate limit or -1
    int nshadow
    int shadow[8]           # rule ids of shadowed rules, in the order they fired
    int nfeat
    int feat[9]
    double parts[9]


cdef struct SrcInfo:
    int customer
    int alen                # len(area)
    bint exotic             # the area has non-ASCII digits
    bint has_ranges
    char area[8]            # the area as ASCII digits (decimal values of its characters)


cdef struct Track:
    u128 key
    int64_t last
    int64_t total
    int64_t answered
    int64_t short_
    int64_t* times          # FIFO ring of attempt times, oldest at thead
    int32_t thead
    int32_t tcount
    int32_t tcap
    int32_t desc            # places where the ring goes back in time (0: sorted, binary search works)
    int32_t ccount
    int32_t ccap
    u128* ckeys             # distinct callees in insertion order: keys ...
    int64_t* ctimes         # ... and last times (one allocation, keys first)


cdef struct Table:
    Track* entries          # in insertion order (like a dict)
    Py_ssize_t n
    Py_ssize_t cap
    uint64_t* index         # open addressing: hash tag << 32 | entry index + 1; 0 = empty
    Py_ssize_t icap


cdef struct FeatEntry:
    int nfeat
    int feat[9]
    double value[9]
    PyObject* features      # the features tuple for exactly these values (owned reference)


cdef class Verdict:
    cdef readonly str verdict
    cdef readonly int code
    cdef readonly str rule
    cdef readonly str reason
    cdef readonly str detail
    cdef readonly double score
    cdef readonly str caller
    cdef readonly str callee
    cdef readonly str caller_kind
    cdef readonly str source
    cdef readonly tuple shadowed
    cdef readonly tuple features


cdef class KeyIndex:
    cdef object array
    cdef const uint64_t* keys
    cdef Py_ssize_t n
    cdef uint32_t* table
    cdef uint64_t mask
    cdef int tag_bits
    cdef uint32_t tag_mask
    cdef uint32_t len_any           # bit L: some key has L digits
    cdef uint32_t len_prefix        # bit L: some prefix entry has L digits

    cdef int build(self, object keys, object prefix) except -1
    cdef Py_ssize_t find(self, uint64_t key) noexcept nogil


cdef class State:
    cdef Table tables[3]


cdef class Core:
    cdef readonly object settings
    cdef readonly object lists
    cdef State state
    cdef dict _source_cache
    cdef object _resolve
    # blocklist
    cdef KeyIndex _bl
    cdef object _bl_arrays
    cdef const uint8_t* _bl_prefix
    cdef const uint8_t* _bl_source
    cdef const uint32_t* _bl_expires
    cdef const uint16_t* _bl_p
    cdef const uint16_t* _bl_complaints
    cdef const uint32_t* _bl_reason
    cdef list _bl_reasons
    # filings (first index per key)
    cdef KeyIndex _fl
    cdef const uint8_t* _fl_outbound
    cdef const double* _fl_from
    cdef const double* _fl_until
    # allowlist
    cdef KeyIndex _al
    cdef const uint8_t* _al_prefix
    cdef bint _al_has_prefix
    # settings, flattened
    cdef bint enforce[11]
    cdef int codes[11]
    cdef list _reasons
    cdef list _rule_names
    cdef int n_limits
    cdef int* l_kind
    cdef int64_t* l_window
    cdef int64_t* l_calls
    cdef int64_t* l_distinct
    cdef list _limit_detail
    cdef int ring_size[3]
    cdef int callee_cap[3]
    cdef bint kind_used[3]
    cdef int64_t max_window_ms
    cdef Py_ssize_t max_tracked
    cdef double threshold
    cdef double weights[9]
    cdef double complaint_saturation
    cdef int64_t min_attempts
    cdef int64_t min_outcomes
    cdef double short_call_ms
    cdef int n_sources
    cdef SrcInfo* srcs
    cdef list _src_area             # per source: the area str
    cdef list _src_name
    cdef list _src_detail
    cdef list _src_ranges           # per source: tuple of str
    cdef list _src_ranges_ascii     # per source: tuple of bytes or None when not all ASCII
    cdef object _emergency          # frozenset of str
    cdef int n_emergency
    cdef u128* emergency_keys
    cdef uint64_t emergency_lens    # bit L: an emergency number has L digits
    cdef FeatEntry fcache[64]       # recent features tuples: the values repeat (ratios of small counts)
    cdef str _cr_s                  # digits of the last decision (set by _decide)
    cdef str _ce_s

    cdef int _source(self, object address) except -3
    cdef Track* _track(self, int kind, u128 key, int64_t t) except NULL
    cdef int _record(self, u128* keys, bint* has, u128 callee_key, int64_t t) except -1
    cdef int _outcome(self, u128 caller_key, bint answered, double duration, int64_t t) except -1
    cdef int _bl_candidates(self, Num* cr, int* cand) noexcept
    cdef int _blocklist(self, Num* cr, int* cand, int ncand, double now, int* ban, bint* listed, double* p_max,
                        int* complaints, bint* expired) noexcept
    cdef int _filing_rule(self, Num* cr, double now) noexcept
    cdef bint _allowlisted(self, Num* cr) noexcept
    cdef int _rates(self, Track** trs, int64_t t, double* rate_ratio, double* distinct_ratio) noexcept
    cdef double _score(self, int kind, bint listed, double p_max, int complaints, bint expired, double rate_ratio,
                       double distinct_ratio, bint has_outcome, int64_t total, int64_t answered, int64_t short_,
                       Decision* dec) noexcept nogil
    cdef bint _in_ranges(self, int src, str cr_digits, Num* cr) except -1
    cdef bint _is_emergency(self, Num* ce, bint exotic) except -1
    cdef int _strings(self, Num* cr, Num* ce, int src) except -1
    cdef int _decide(self, object caller, object callee, object source, double now, Decision* dec,
                     Num* cr, Num* ce, int* src_out, bint make_strings) except -1
    cdef int _decide_text(self, int cr_kind, const void* cr_data, Py_ssize_t cr_len, int ce_kind,
                          const void* ce_data, Py_ssize_t ce_len, object source, double now, Decision* dec,
                          Num* cr, Num* ce, int* src_out, bint make_strings) except -1
    cdef void _keys(self, u128 caller_key, int src, u128* keys, bint* has) noexcept
    cdef tuple _features(self, Decision* dec)
