# The packed call-record row of the records writer (_recwriter.RowBuffer) and of the proxy's fast
# path (sip/_fastpath), kept in this one place so that both write the very same bytes.
#
# Everything here is compiled into each module that cimports it (a struct, an enum, inline
# functions), as with sip/_udpio.pxd: the fast path packs its decisions without importing the
# records writer, which is an optional module.

from libc.math cimport INFINITY, isfinite
from libc.stdint cimport int64_t, uint32_t
from libc.stdlib cimport realloc
from libc.string cimport memcpy

cdef enum:
    N_TEXT = 6           # call_id, source, caller, callee, rule, verdict
    N_FIELDS = 10        # records.RECORD_FIELDS


# One packed row: time, code, score, latency_us, then the six texts as (length, bytes).
cdef struct RowHead:
    double time
    double score
    double latency_us
    int64_t code
    uint32_t lens[N_TEXT]


# A growing buffer of packed rows, with the earliest and latest time packed (``odd`` when a time
# was not a finite number): the writer tells the partition of a whole buffer without its rows.
cdef struct Packed:
    char* data
    Py_ssize_t size
    Py_ssize_t cap
    Py_ssize_t rows
    double tmin
    double tmax
    bint odd


cdef inline void reset_packed(Packed* b) noexcept:
    """Empty the buffer (its memory stays)."""
    b.size = 0
    b.rows = 0
    b.tmin = INFINITY
    b.tmax = -INFINITY
    b.odd = False


cdef inline int pack_row(Packed* b, RowHead* head, const char** texts) except -1:
    """Append one row (``head.lens`` holds the texts' lengths); MemoryError when it cannot grow."""
    cdef Py_ssize_t total = sizeof(RowHead), want, cap
    cdef char* grown
    cdef int k
    for k in range(N_TEXT):
        total += head.lens[k]
    want = b.size + total
    if want > b.cap:
        cap = b.cap if b.cap >= 256 else 256
        while cap < want:
            cap *= 2
        grown = <char*>realloc(b.data, cap)
        if grown == NULL:
            raise MemoryError()
        b.data = grown
        b.cap = cap
    if not isfinite(head.time):
        b.odd = True        # the writer sorts such a row out by itself (stored with time 0, or refused)
    if head.time < b.tmin:
        b.tmin = head.time
    if head.time > b.tmax:
        b.tmax = head.time
    memcpy(b.data + b.size, head, sizeof(RowHead))
    b.size += sizeof(RowHead)
    for k in range(N_TEXT):
        memcpy(b.data + b.size, texts[k], head.lens[k])
        b.size += head.lens[k]
    b.rows += 1
    return 0
