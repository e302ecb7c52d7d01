# cython: freethreading_compatible = False
"""Call-record rows packed in C and inserted into SQLite without holding the GIL.

The proxy stores a row per decision; the records writer thread used to turn every row into
``executemany`` parameters, holding the GIL for each one and handing it back and forth with
the event loop's thread thousands of times a second -- on a 2-core machine that handoff, not
the CPU, made the slowest answers wait a millisecond or more.  Here the loop thread packs the
rows into a :class:`RowBuffer` (a few hundred nanoseconds each, values copied as UTF-8) and the
writer thread inserts a whole buffer with :meth:`Inserter.insert`, which releases the GIL for
the entire transaction and speaks to SQLite's C API directly.

The module links the system's ``libsqlite3.so.0`` (the library Python's own ``sqlite3`` module
uses on Debian).  It is optional: when it cannot be built, ``records.py`` writes with
``executemany`` as before -- that path is also the reference the tests compare against.

An :class:`Inserter` either owns a connection (one transaction per :meth:`Inserter.insert`) or
shares a ``sqlite3.Connection`` (:meth:`Inserter.sharing`), inserting inside the transaction
that connection has open: then the records writer keeps its own transaction, catalog and id
bookkeeping in Python and only the rows go through here.  Sharing reads the ``sqlite3 *`` of the
Python connection, the first field after the object header of CPython's connection object, and is
only allowed when that module and this one use the very same loaded SQLite library (checked by
symbol address): otherwise :meth:`Inserter.sharing` raises and the writer keeps ``executemany``.
"""

import sqlite3 as _sqlite3_module
import sys

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint32_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

from callguard._rowpack cimport N_FIELDS, N_TEXT, Packed, RowHead, pack_row, reset_packed

cdef extern from *:
    """
    typedef struct sqlite3 sqlite3;
    typedef struct sqlite3_stmt sqlite3_stmt;
    int sqlite3_open_v2(const char *filename, sqlite3 **db, int flags, const char *vfs);
    int sqlite3_close_v2(sqlite3 *db);
    int sqlite3_busy_timeout(sqlite3 *db, int ms);
    int sqlite3_exec(sqlite3 *db, const char *sql, void *callback, void *arg, char **errmsg);
    void sqlite3_free(void *p);
    int sqlite3_prepare_v2(sqlite3 *db, const char *sql, int n, sqlite3_stmt **stmt, const char **tail);
    int sqlite3_bind_double(sqlite3_stmt *stmt, int i, double v);
    int sqlite3_bind_int64(sqlite3_stmt *stmt, int i, long long v);
    int sqlite3_bind_text(sqlite3_stmt *stmt, int i, const char *s, int n, void (*destructor)(void *));
    int sqlite3_bind_parameter_count(sqlite3_stmt *stmt);
    int sqlite3_step(sqlite3_stmt *stmt);
    int sqlite3_reset(sqlite3_stmt *stmt);
    int sqlite3_finalize(sqlite3_stmt *stmt);
    const char *sqlite3_errmsg(sqlite3 *db);
    long long sqlite3_last_insert_rowid(sqlite3 *db);
    int sqlite3_get_autocommit(sqlite3 *db);
    int sqlite3_libversion_number(void);
    #define CG_SQLITE_STATIC ((void (*)(void *))0)
    /* CPython's sqlite3.Connection starts with the sqlite3 handle (Modules/_sqlite/connection.h) */
    typedef struct { PyObject_HEAD sqlite3 *db; } cg_pysqlite_connection;
    #include <dlfcn.h>
    static void *cg_sqlite_symbol(void) { return (void *)&sqlite3_libversion_number; }
    """
    ctypedef struct sqlite3
    ctypedef struct sqlite3_stmt
    int sqlite3_open_v2(const char* filename, sqlite3** db, int flags, const char* vfs) nogil
    int sqlite3_close_v2(sqlite3* db) nogil
    int sqlite3_busy_timeout(sqlite3* db, int ms) nogil
    int sqlite3_exec(sqlite3* db, const char* sql, void* callback, void* arg, char** errmsg) nogil
    void sqlite3_free(void* p) nogil
    int sqlite3_prepare_v2(sqlite3* db, const char* sql, int n, sqlite3_stmt** stmt, const char** tail) nogil
    int sqlite3_bind_double(sqlite3_stmt* stmt, int i, double v) nogil
    int sqlite3_bind_int64(sqlite3_stmt* stmt, int i, long long v) nogil
    int sqlite3_bind_text(sqlite3_stmt* stmt, int i, const char* s, int n, void (*destructor)(void*)) nogil
    int sqlite3_bind_parameter_count(sqlite3_stmt* stmt) nogil
    int sqlite3_step(sqlite3_stmt* stmt) nogil
    int sqlite3_reset(sqlite3_stmt* stmt) nogil
    int sqlite3_finalize(sqlite3_stmt* stmt) nogil
    const char* sqlite3_errmsg(sqlite3* db) nogil
    long long sqlite3_last_insert_rowid(sqlite3* db) nogil
    int sqlite3_get_autocommit(sqlite3* db) nogil
    void (*SQLITE_STATIC "CG_SQLITE_STATIC")(void*)
    ctypedef struct cg_pysqlite_connection:
        sqlite3* db
    void* dlopen(const char* path, int flags)
    void* dlsym(void* handle, const char* name)
    int dlclose(void* handle)
    int RTLD_NOW
    int RTLD_NOLOAD
    void* cg_sqlite_symbol()

cdef enum:
    SQLITE_OK = 0
    SQLITE_CONSTRAINT = 19
    SQLITE_DONE = 101
    SQLITE_OPEN_READWRITE = 0x00000002


cdef class RowBuffer:
    """Decision rows packed back to back in one growing C buffer (``records.RECORD_FIELDS`` order).

    It also keeps the earliest and latest time packed (``tmin``, ``tmax``; ``odd`` when a time was
    not a finite number), so the writer can tell the partition of a whole buffer without its rows.
    The layout is ``_rowpack.pxd``'s, which the proxy's fast path packs its decisions into as well.
    """

    cdef Packed buf

    def __cinit__(self, Py_ssize_t capacity=1 << 16):
        self.buf.cap = capacity if capacity > 256 else 256
        self.buf.data = <char*>malloc(self.buf.cap)
        if self.buf.data == NULL:
            raise MemoryError()
        reset_packed(&self.buf)

    def __dealloc__(self):
        free(self.buf.data)

    @property
    def rows(self) -> int:
        return self.buf.rows

    @property
    def tmin(self) -> float:
        return self.buf.tmin

    @property
    def tmax(self) -> float:
        return self.buf.tmax

    @property
    def odd(self) -> bool:
        return self.buf.odd

    @staticmethod
    def adopt(bytes data, Py_ssize_t rows, double tmin, double tmax, bint odd) -> RowBuffer:
        """A buffer holding ``data``: ``rows`` rows packed elsewhere in this layout (the fast path's)."""
        cdef RowBuffer rb = RowBuffer(len(data))
        memcpy(rb.buf.data, <const char*>data, len(data))
        rb.buf.size = len(data)
        rb.buf.rows = rows
        rb.buf.tmin = tmin
        rb.buf.tmax = tmax
        rb.buf.odd = odd
        return rb

    cpdef void append(self, tuple row) except *:
        """Pack one row: a tuple of at least the ten ``RECORD_FIELDS`` values (later items are ignored).

        None stores the column default (empty text, zero); text that is not valid UTF-8 (lone
        surrogates from a peer's bytes) is stored with "?" in their place rather than lost.
        """
        cdef RowHead head
        cdef const char* texts[N_TEXT]
        cdef Py_ssize_t n
        cdef int k
        cdef list keep = []
        if len(row) < N_FIELDS:
            raise TypeError(f"a record row has {N_FIELDS} values, got {len(row)}")
        head.time = _num(row[0])
        head.code = <int64_t>_num(row[7])
        head.score = _num(row[8])
        head.latency_us = _num(row[9])
        for k in range(N_TEXT):
            value = row[1 + k]      # RECORD_FIELDS: time, six texts, code, score, latency_us
            if value is None:
                texts[k] = b""
                n = 0
            elif isinstance(value, str):
                try:
                    texts[k] = PyUnicode_AsUTF8AndSize(value, &n)
                except UnicodeEncodeError:
                    encoded = (<str>value).encode("utf-8", "replace")
                    keep.append(encoded)
                    texts[k] = <bytes>encoded
                    n = len(<bytes>encoded)
            else:
                encoded = str(value).encode("utf-8", "replace")
                keep.append(encoded)
                texts[k] = <bytes>encoded
                n = len(<bytes>encoded)
            if n > 0xFFFFFFF:
                raise ValueError("record text too long")
            head.lens[k] = <uint32_t>n
        if row[0] is None:
            self.buf.odd = True     # stored with time 0 by the writer's own rules, as a non-finite time
        pack_row(&self.buf, &head, texts)

    def extend(self, rows) -> None:
        """Pack every row of an iterable (see :meth:`append`)."""
        for row in rows:
            self.append(<tuple?>row)

    def clear(self) -> None:
        reset_packed(&self.buf)

    def __len__(self) -> int:
        return self.buf.rows

    def packed(self) -> bytes:
        """The packed rows, as :meth:`adopt` takes them."""
        return PyBytes_FromStringAndSize(self.buf.data, self.buf.size)

    def to_rows(self) -> list:
        """The packed rows as tuples again (the ``executemany`` fallback after a failed insert)."""
        cdef list out = []
        cdef Py_ssize_t at = 0
        cdef RowHead head
        cdef int k
        cdef list texts
        while at < self.buf.size:
            memcpy(&head, self.buf.data + at, sizeof(RowHead))
            at += sizeof(RowHead)
            texts = []
            for k in range(N_TEXT):
                texts.append(PyUnicode_DecodeUTF8(self.buf.data + at, head.lens[k], "replace"))
                at += head.lens[k]
            out.append((head.time, texts[0], texts[1], texts[2], texts[3], texts[4], texts[5], head.code,
                        head.score, head.latency_us))
        return out


cdef inline double _num(object v) except? -1.0:
    if v is None:
        return 0.0
    return <double>v


cdef class Inserter:
    """A connection of its own to the records file that inserts whole :class:`RowBuffer` s.

    Args:
        path: the SQLite file (created and given its schema by ``records.py`` first).
        busy_timeout_ms: how long a locked database is waited for.
    """

    cdef sqlite3* db
    cdef sqlite3_stmt* stmt
    cdef readonly str sql
    cdef readonly str path
    cdef readonly bint owned          # our own connection (else a shared sqlite3.Connection)
    cdef object shared                # the sqlite3.Connection kept alive while we use its handle

    def __cinit__(self, str path, int busy_timeout_ms=10000, *, _shared=None):
        cdef bytes p = path.encode("utf-8", "surrogateescape")
        cdef int rc
        self.db = NULL
        self.stmt = NULL
        self.sql = None
        self.path = path
        self.owned = _shared is None
        self.shared = _shared
        if _shared is not None:
            self.db = (<cg_pysqlite_connection*><void*>_shared).db
            if self.db == NULL:
                raise ValueError("the connection is closed")
            return
        rc = sqlite3_open_v2(p, &self.db, SQLITE_OPEN_READWRITE, NULL)
        if rc != SQLITE_OK:
            msg = self._error()
            sqlite3_close_v2(self.db)
            self.db = NULL
            raise OSError(f"{path}: cannot open for records: {msg}")
        sqlite3_busy_timeout(self.db, busy_timeout_ms)
        self._exec("PRAGMA synchronous = NORMAL")

    def __dealloc__(self):
        if self.stmt != NULL:
            sqlite3_finalize(self.stmt)
        if self.db != NULL and self.owned:
            sqlite3_close_v2(self.db)

    @staticmethod
    def sharing(conn) -> Inserter:
        """An inserter working inside the transactions of ``conn``, a ``sqlite3.Connection``.

        Raises:
            TypeError: ``conn`` is not a ``sqlite3.Connection``.
            RuntimeError: Python's sqlite3 module does not use the SQLite library this module uses.
        """
        cdef void* handle
        cdef void* theirs
        if not isinstance(conn, _sqlite3_module.Connection):
            raise TypeError(f"expected a sqlite3.Connection, got {type(conn).__name__}")
        if sys.implementation.name != "cpython" or sys.version_info >= (3, 14):
            # the handle's place in the object is CPython's (3.11 to 3.13); elsewhere: executemany
            raise RuntimeError("the sqlite3.Connection layout of this Python is not known to the records inserter")
        module_file = __import__("_sqlite3").__file__.encode()
        handle = dlopen(module_file, RTLD_NOW | RTLD_NOLOAD)
        if handle == NULL:
            raise RuntimeError("cannot look into Python's _sqlite3 module")
        theirs = dlsym(handle, b"sqlite3_libversion_number")
        dlclose(handle)
        if theirs == NULL or theirs != cg_sqlite_symbol():
            raise RuntimeError("Python's sqlite3 module uses another SQLite library than the records inserter")
        path = conn.execute("PRAGMA database_list").fetchone()[2]
        return Inserter(path or "", _shared=conn)

    cdef str _error(self):
        cdef bytes msg
        if self.db == NULL:
            return "out of memory"
        msg = sqlite3_errmsg(self.db)
        return msg.decode("utf-8", "replace")

    cdef int _exec(self, str sql) except -1:
        cdef bytes q = sql.encode("utf-8")
        cdef const char* cq = q
        cdef char* err = NULL
        cdef int rc
        with nogil:
            rc = sqlite3_exec(self.db, cq, NULL, NULL, &err)
        if rc != SQLITE_OK:
            msg = (<bytes>err).decode("utf-8", "replace") if err != NULL else str(rc)
            sqlite3_free(err)
            raise OSError(f"{self.path}: {sql.split()[0]} failed: {msg}")
        return 0

    def prepare(self, str sql) -> None:
        """Use ``sql``, an INSERT with ten parameters in ``RECORD_FIELDS`` order, from now on."""
        cdef bytes q = sql.encode("utf-8")
        cdef sqlite3_stmt* stmt = NULL
        if self.db == NULL:
            raise RuntimeError("the inserter is closed")
        if sql == self.sql:
            return
        if sqlite3_prepare_v2(self.db, q, -1, &stmt, NULL) != SQLITE_OK:
            raise OSError(f"{self.path}: cannot prepare {sql!r}: {self._error()}")
        if sqlite3_bind_parameter_count(stmt) != N_FIELDS:
            sqlite3_finalize(stmt)
            raise ValueError(f"expected {N_FIELDS} parameters in {sql!r}")
        if self.stmt != NULL:
            sqlite3_finalize(self.stmt)
        self.stmt = stmt
        self.sql = sql

    def insert(self, RowBuffer rows) -> int:
        """Insert every row of ``rows`` without the GIL; returns the rowid of the last one.

        Owning its connection, the inserter wraps the rows in one transaction and rolls it back on
        any failure (nothing of the buffer is stored).  Sharing one, it inserts inside the
        transaction the connection must have open, and leaves the rollback to its owner.  Either
        way a failure raises ``sqlite3.IntegrityError`` (a constraint) or ``sqlite3.OperationalError``
        and the buffer is left as it was.
        """
        if self.stmt == NULL:
            raise RuntimeError("prepare() an INSERT first")
        if not self.owned and sqlite3_get_autocommit(self.db):
            raise RuntimeError("the shared connection has no transaction open")
        if rows.buf.rows == 0:
            return 0
        return self.insert_many([rows])

    def insert_many(self, list buffers) -> int:
        """Insert the rows of every :class:`RowBuffer` in ``buffers``, in order, without the GIL; returns
        the rowid of the last one.

        As :meth:`insert` for one buffer, but the GIL is let go once for them all: the writer thread
        takes it back once per batch, not once per buffer (each time it does, the event loop's
        thread may have to hand it over in the middle of its work).
        """
        cdef Py_ssize_t n = len(buffers), i, at, end
        cdef const char** datas
        cdef Py_ssize_t* sizes
        cdef RowBuffer buf
        cdef RowHead head
        cdef int k, rc = SQLITE_DONE
        cdef long long last = 0
        cdef const char* text
        cdef const char* data
        cdef char* err = NULL
        cdef bint owned = self.owned
        if self.stmt == NULL:
            raise RuntimeError("prepare() an INSERT first")
        if not owned and sqlite3_get_autocommit(self.db):
            raise RuntimeError("the shared connection has no transaction open")
        for i in range(n):
            if not isinstance(buffers[i], RowBuffer):
                raise TypeError(f"expected RowBuffer, got {type(buffers[i]).__name__}")
        if n == 0:
            return 0
        datas = <const char**>malloc(n * sizeof(char*))
        sizes = <Py_ssize_t*>malloc(n * sizeof(Py_ssize_t))
        if datas == NULL or sizes == NULL:
            free(datas)
            free(sizes)
            raise MemoryError()
        for i in range(n):      # the list holds the buffers (and their data) until we return
            buf = <RowBuffer>buffers[i]
            datas[i] = buf.buf.data
            sizes[i] = buf.buf.size
        try:
            with nogil:
                if owned:
                    rc = sqlite3_exec(self.db, b"BEGIN", NULL, NULL, &err)
                    rc = SQLITE_DONE if rc == SQLITE_OK else rc
                i = 0
                while rc == SQLITE_DONE and i < n:
                    data = datas[i]
                    end = sizes[i]
                    at = 0
                    while rc == SQLITE_DONE and at < end:
                        memcpy(&head, data + at, sizeof(RowHead))
                        at += sizeof(RowHead)
                        sqlite3_bind_double(self.stmt, 1, head.time)
                        for k in range(N_TEXT):
                            text = data + at
                            at += head.lens[k]
                            sqlite3_bind_text(self.stmt, 2 + k, text, <int>head.lens[k], SQLITE_STATIC)
                        sqlite3_bind_int64(self.stmt, 8, head.code)
                        sqlite3_bind_double(self.stmt, 9, head.score)
                        sqlite3_bind_double(self.stmt, 10, head.latency_us)
                        rc = sqlite3_step(self.stmt)
                        sqlite3_reset(self.stmt)
                    i += 1
                if rc == SQLITE_DONE:
                    last = sqlite3_last_insert_rowid(self.db)
                    if owned:
                        rc = sqlite3_exec(self.db, b"COMMIT", NULL, NULL, &err)
                        rc = SQLITE_DONE if rc == SQLITE_OK else rc
        finally:
            free(datas)
            free(sizes)
        if rc != SQLITE_DONE:
            msg = (<bytes>err).decode("utf-8", "replace") if err != NULL else self._error()
            sqlite3_free(err)
            if owned:
                with nogil:
                    sqlite3_exec(self.db, b"ROLLBACK", NULL, NULL, NULL)
            kind = _sqlite3_module.IntegrityError if (rc & 0xFF) == SQLITE_CONSTRAINT else _sqlite3_module.OperationalError
            raise kind(f"{self.path}: inserting records failed: {msg}")
        return last

    def close(self) -> None:
        """Finalize the statement; close the connection if it is ours (a shared one stays open)."""
        if self.stmt != NULL:
            sqlite3_finalize(self.stmt)
            self.stmt = NULL
        if self.db != NULL and self.owned:
            sqlite3_close_v2(self.db)
        self.db = NULL
        self.shared = None
