# Batched UDP I/O (recvmmsg/sendmmsg) of the compiled parser module's UdpBatch (_sipcore) and of the
# proxy's fast path (_fastpath), kept in this one place so that both read and write the socket alike.
#
# Everything here is compiled into each module that cimports it (extern declarations, inline
# functions), as with _sipscan.pxd: no cross-module function-pointer table, nothing to initialise
# at import.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdlib cimport free, malloc
from libc.string cimport memset

cdef extern from "<errno.h>" nogil:
    int EWOULDBLOCK

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    struct sockaddr:
        sa_family_t sa_family
    struct sockaddr_storage:
        sa_family_t ss_family
    struct iovec:
        void* iov_base
        size_t iov_len
    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int recvmmsg(int fd, mmsghdr* vec, unsigned int vlen, int flags, void* timeout)
    int sendmmsg(int fd, mmsghdr* vec, unsigned int vlen, int flags)
    int getsockname(int fd, sockaddr* addr, socklen_t* len)
    int AF_INET
    int AF_INET6
    int MSG_DONTWAIT

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        unsigned int s_addr
    struct in6_addr:
        unsigned char s6_addr[16]
    struct sockaddr_in:
        sa_family_t sin_family
        unsigned short sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        sa_family_t sin6_family
        unsigned short sin6_port
        unsigned int sin6_flowinfo
        in6_addr sin6_addr
        unsigned int sin6_scope_id
    unsigned short ntohs(unsigned short)
    unsigned short htons(unsigned short)
    unsigned int ntohl(unsigned int)
    unsigned int htonl(unsigned int)

cdef extern from "<arpa/inet.h>" nogil:
    const char* inet_ntop(int af, const void* src, char* dst, socklen_t size)
    int inet_pton(int af, const char* src, void* dst)


cdef inline int raise_errno() except -1:
    """OSError for the current errno (read before anything else can change it)."""
    cdef int err = errno
    import os
    raise OSError(err, os.strerror(err))


cdef inline int batch_family(int fd, unsigned int capacity, size_t bufsize) except -1:
    """AF_INET or AF_INET6 of a bound socket, for a batch of ``capacity`` buffers of ``bufsize`` bytes.

    ValueError for an empty batch or a socket of another family, OSError when ``fd`` is no socket.
    """
    cdef sockaddr_storage ss
    cdef socklen_t length = sizeof(ss)
    if capacity == 0 or bufsize == 0:
        raise ValueError("capacity and bufsize must be positive")
    if getsockname(fd, <sockaddr*>&ss, &length) != 0:
        raise_errno()
    if ss.ss_family != AF_INET and ss.ss_family != AF_INET6:
        raise ValueError("not an IPv4 or IPv6 socket")
    return ss.ss_family


cdef inline int alloc_vectors(unsigned int capacity, mmsghdr** msgs, iovec** iovs,
                              sockaddr_storage** addrs) except -1:
    """``capacity`` message headers, iovecs and addresses (MemoryError; what was allocated is left to free)."""
    msgs[0] = <mmsghdr*>malloc(capacity * sizeof(mmsghdr))
    iovs[0] = <iovec*>malloc(capacity * sizeof(iovec))
    addrs[0] = <sockaddr_storage*>malloc(capacity * sizeof(sockaddr_storage))
    if msgs[0] == NULL or iovs[0] == NULL or addrs[0] == NULL:
        raise MemoryError()
    return 0


cdef inline void free_vectors(mmsghdr* msgs, iovec* iovs, sockaddr_storage* addrs) noexcept nogil:
    free(msgs)
    free(iovs)
    free(addrs)


cdef inline int fill_addr(int family, object addr, sockaddr_storage* ss, socklen_t* length) except -1:
    """A ``socket.sendto`` address (``(host, port)`` or ``(host, port, flowinfo, scope_id)``) as a sockaddr."""
    cdef sockaddr_in* a4
    cdef sockaddr_in6* a6
    host = addr[0].encode("ascii")
    port = int(addr[1])
    if not 0 <= port <= 65535:
        raise ValueError(f"bad port {port}")
    memset(ss, 0, sizeof(sockaddr_storage))
    if family == AF_INET:
        a4 = <sockaddr_in*>ss
        a4.sin_family = AF_INET
        a4.sin_port = htons(port)
        if inet_pton(AF_INET, host, &a4.sin_addr) != 1:
            raise ValueError(f"not an IPv4 address: {addr[0]!r}")
        length[0] = sizeof(sockaddr_in)
    else:
        a6 = <sockaddr_in6*>ss
        a6.sin6_family = AF_INET6
        a6.sin6_port = htons(port)
        if inet_pton(AF_INET6, host, &a6.sin6_addr) != 1:
            raise ValueError(f"not an IPv6 address: {addr[0]!r}")
        if len(addr) >= 4:
            a6.sin6_flowinfo = htonl(int(addr[2]))
            a6.sin6_scope_id = int(addr[3])
        length[0] = sizeof(sockaddr_in6)
    return 0


cdef inline int recv_batch(int fd, mmsghdr* msgs, iovec* iovs, sockaddr_storage* addrs, char* bufs, size_t bufsize,
                           unsigned int count) except -1:
    """Up to ``count`` datagrams into ``bufs`` (``bufsize`` bytes each): how many, 0 when none is waiting.

    Retries on EINTR; raises OSError for any error other than EAGAIN/EWOULDBLOCK.
    """
    cdef unsigned int i
    cdef int got
    for i in range(count):
        iovs[i].iov_base = bufs + i * bufsize
        iovs[i].iov_len = bufsize
        memset(&msgs[i], 0, sizeof(mmsghdr))
        msgs[i].msg_hdr.msg_iov = &iovs[i]
        msgs[i].msg_hdr.msg_iovlen = 1
        msgs[i].msg_hdr.msg_name = &addrs[i]
        msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
    while True:
        # With the GIL held: MSG_DONTWAIT never blocks, and a release here would let the records
        # writer take the GIL, which the loop then waits a switch interval to get back.
        got = recvmmsg(fd, msgs, count, MSG_DONTWAIT, NULL)
        if got >= 0:
            return got
        if errno == EINTR:
            continue
        if errno == EAGAIN or errno == EWOULDBLOCK:
            return 0
        raise_errno()


cdef inline bint is_keepalive(const unsigned char* p, unsigned int length) noexcept nogil:
    """Empty, or CR/LF only: a keep-alive (RFC 5626 4.4.1), which needs no answer."""
    cdef unsigned int k = 0
    while k < length and (p[k] == 13 or p[k] == 10):
        k += 1
    return k == length


cdef inline Py_ssize_t send_batch(int fd, int family, list items, unsigned int capacity, mmsghdr* msgs, iovec* iovs,
                                  sockaddr_storage* addrs) except -1:
    """Sends ``[(data, addr), ...]`` in chunks of ``capacity`` with sendmmsg; returns how many were sent.

    Fewer than given only when the socket buffer is full (EAGAIN); ValueError for a bad address,
    OSError for other failures.
    """
    cdef Py_ssize_t total = len(items), done = 0, chunk, i
    cdef int sent
    cdef list keep   # holds the bytes the iovecs point into until they are sent
    while done < total:
        chunk = total - done
        if chunk > capacity:
            chunk = capacity
        keep = []
        for i in range(chunk):
            data, addr = items[done + i]
            if type(data) is not bytes:
                data = bytes(data)
            keep.append(data)
            memset(&msgs[i], 0, sizeof(mmsghdr))
            iovs[i].iov_base = <void*>PyBytes_AS_STRING(data)
            iovs[i].iov_len = PyBytes_GET_SIZE(data)
            fill_addr(family, addr, &addrs[i], &msgs[i].msg_hdr.msg_namelen)
            msgs[i].msg_hdr.msg_name = &addrs[i]
            msgs[i].msg_hdr.msg_iov = &iovs[i]
            msgs[i].msg_hdr.msg_iovlen = 1
        while True:
            sent = sendmmsg(fd, msgs, <unsigned int>chunk, MSG_DONTWAIT)    # GIL held: see recv_batch
            if sent >= 0 or errno != EINTR:
                break
        if sent < 0:
            if errno == EAGAIN or errno == EWOULDBLOCK:
                return done
            raise_errno()
        done += sent
        if sent < chunk:
            return done
    return done
