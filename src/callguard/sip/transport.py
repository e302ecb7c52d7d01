"""SIP transports for ``callguard serve``: UDP and TCP listeners on asyncio (uvloop when installed).

The proxy sees every transport through one small interface, an *endpoint*: an object with
``kind`` (``"udp"`` or ``"tcp"``), ``listener`` (the :class:`ListenerInfo` whose address goes
into our Via) and ``send(data, addr)``.  A UDP listener is one endpoint for all its peers;
a TCP connection is an endpoint of its own (``addr`` is ignored: it has one peer).

Inbound messages reach the proxy as ``handler(data, addr, endpoint)``: UDP datagrams as they
arrive, TCP byte streams cut into messages by Content-Length (``frame_stream`` of the parser).

UDP has two implementations behind the same interface: :class:`BatchUdpListener` reads and
writes with recvmmsg/sendmmsg through the compiled ``_sipcore.UdpBatch`` (one system call for
up to 64 datagrams each way), and :class:`UdpListener`, the plain asyncio datagram protocol and
the reference.  The batched one serves the stdlib loop when the extension is built.  On uvloop
the plain one serves by default: uvloop's own UDP path is already lean, and uvloop stops a
file-descriptor watcher for good on POLLERR, which a socket with queued ICMP errors raises --
so batched I/O on uvloop (``CALLGUARD_UDP_BATCH=1``) goes without ICMP-driven trunk failover.
``CALLGUARD_NO_UDP_BATCH=1`` or ``CALLGUARD_NO_EXTENSIONS=1`` always selects the plain one.

When the compiled fast path (``_fastpath.FastPath``) is built, :class:`FastUdpListener` serves
UDP on either loop: plain INVITEs are scanned, decided and rejected in C within the batch, and
the rest goes to the proxy as before (see ``_fastpath.pyx``).  On uvloop it keeps IP_RECVERR: the
loop watches an epoll instance holding the socket, which uvloop never sees as POLLERR, so
ICMP-driven failover works there too.
``CALLGUARD_NO_FAST_PATH=1`` selects the listeners above instead.

ICMP errors (port or host unreachable) are read from the socket's error queue (IP_RECVERR),
which names the destination that failed; the proxy fails the INVITEs waiting on it over.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from ..errors import SipError

Handler = Callable[[bytes, Any, Any], None]

# Large socket buffers: at tens of thousands of messages per second the kernel's default
# 200 KB drops bursts (see BENCH-NOTES: 4 MB is this machine's limit).
SOCKET_BUFFER = 4 * 1024 * 1024


@dataclass(slots=True)
class ListenerInfo:
    """One configured listener and the address it is actually bound to."""

    transport: str          # "udp" or "tcp"
    host: str               # bound host (IPv6 without brackets)
    port: int
    family: int

    @property
    def sent_by(self) -> str:
        """host:port as it appears in a Via or a Record-Route (IPv6 in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def spec(self) -> str:
        return f"{self.transport}:{self.sent_by}"


# Linux: ICMP errors for an unconnected UDP socket are queued with the destination that failed.
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
Unreachable = Callable[[Any], None]


def enable_recverr(sock: socket.socket) -> bool:
    """Ask the kernel to queue ICMP errors (port/host unreachable) with the address they concern."""
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        return True
    except OSError:  # not Linux: trunk timeouts still cover a dead next hop
        return False


def drain_errors(sock: socket.socket, on_unreachable: Unreachable | None) -> int:
    """Read the socket's error queue; report each destination an ICMP error named."""
    n = 0
    while n < 1024:
        try:
            _, _, _, addr = sock.recvmsg(1, 1024, socket.MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break
        n += 1
        if on_unreachable is not None and addr:
            on_unreachable(addr)
    return n


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _tune(sock: socket.socket | None) -> None:
    if sock is None:
        return
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:  # pragma: no cover - a kernel limit; the default still works
            pass


# ---------------------------------------------------------------- UDP
class UdpListener(asyncio.DatagramProtocol):
    """A UDP listener: one endpoint shared by all peers."""

    kind = "udp"

    def __init__(self, handler: Handler, listener: ListenerInfo, sock: socket.socket | None = None) -> None:
        self.handler = handler
        self.listener = listener
        self.sock = sock
        self.on_unreachable: Unreachable | None = None
        self.recverr = False
        self.transport: asyncio.DatagramTransport | None = None
        self.errors = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _tune(transport.get_extra_info("socket"))
        sockname = transport.get_extra_info("sockname")
        if sockname:
            self.listener.port = sockname[1]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.handler(data, addr, self)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error: the exception names no peer, the error queue does (IP_RECVERR).
        self.errors += 1
        if self.sock is not None:
            drain_errors(self.sock, self.on_unreachable)

    def send(self, data: bytes, addr: Any) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _is_uvloop(loop: asyncio.AbstractEventLoop) -> bool:
    return type(loop).__module__.startswith("uvloop")


def _fast_class() -> Any:
    """``_fastpath.FastPath`` when it may be used, else None."""
    if os.environ.get("CALLGUARD_NO_EXTENSIONS") or os.environ.get("CALLGUARD_NO_UDP_BATCH") \
            or os.environ.get("CALLGUARD_NO_FAST_PATH"):
        return None
    try:
        from ._fastpath import FastPath
    except ImportError:
        return None
    return FastPath


def _batch_class(loop: asyncio.AbstractEventLoop) -> Any:
    """``_sipcore.UdpBatch`` when it may be used, else None."""
    if os.environ.get("CALLGUARD_NO_EXTENSIONS") or os.environ.get("CALLGUARD_NO_UDP_BATCH"):
        return None
    if _is_uvloop(loop) and not os.environ.get("CALLGUARD_UDP_BATCH"):
        return None
    try:
        from ._sipcore import UdpBatch
    except ImportError:
        return None
    return UdpBatch


class BatchUdpListener:
    """A UDP listener reading and writing datagrams in batches (recvmmsg/sendmmsg).

    Datagrams that arrive together are handled together; what the proxy sends while handling
    them is queued and leaves in one sendmmsg at the end of the batch.  Sends from timers are
    flushed on the next loop iteration.
    """

    kind = "udp"
    MAX_BATCH = 64
    MAX_ROUNDS = 8      # batches per wake-up, so timers and TCP are not starved under load

    def __init__(self, loop: asyncio.AbstractEventLoop, handler: Handler, listener: ListenerInfo,
                 sock: socket.socket, batch_cls: Any) -> None:
        self.loop = loop
        self.handler = handler
        self.listener = listener
        self.sock = sock
        self.batch = batch_cls(sock.fileno(), self.MAX_BATCH)
        self.out: list[tuple[bytes, Any]] = []
        self.flush_pending = False
        self.in_batch = False
        self.errors = 0
        self.send_drops = 0
        self.closed = False
        self.on_unreachable: Unreachable | None = None
        self.recverr = False
        self.watched = self._watch_fd()
        loop.add_reader(self.watched, *self._reader())

    def _watch_fd(self) -> int:
        """The descriptor the loop watches for this listener."""
        return self.sock.fileno()

    def _reader(self) -> tuple[Any, ...]:
        """What the loop calls when the socket is readable: a callback and its arguments."""
        return (self._on_readable,)

    def read_errors(self) -> int:
        """Read the socket's error queue (ICMP errors with IP_RECVERR); how many there were."""
        return drain_errors(self.sock, self.on_unreachable)

    def _on_readable(self) -> None:
        self.in_batch = True
        try:
            for round_ in range(self.MAX_ROUNDS):
                try:
                    items = self.batch.recv(self.MAX_BATCH)
                except OSError:
                    # An ICMP error; the error queue names the destination that failed.
                    self.errors += 1
                    drain_errors(self.sock, self.on_unreachable)
                    continue
                if not items and round_ == 0:
                    # Woken with nothing to read: a queued error keeps the socket signalled.
                    drain_errors(self.sock, self.on_unreachable)
                for data, addr in items:
                    self.handler(data, addr, self)
                # Answers leave after each batch, not after the whole wake-up: latency stays one batch.
                self._flush()
                if len(items) < self.MAX_BATCH:
                    break
        finally:
            self.in_batch = False
            self._flush()

    def send(self, data: bytes, addr: Any) -> None:
        self.out.append((data, addr))
        if not self.in_batch and not self.flush_pending:
            self.flush_pending = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_pending = False
        out = self.out
        if not out or self.closed:
            return
        self.out = []
        try:
            sent = self.batch.send_many(out)
        except (OSError, ValueError):
            sent = 0
        for data, addr in out[sent:]:
            # The rest one by one: a full buffer or one bad address must not lose the others.
            try:
                self.sock.sendto(data, addr)
            except OSError:
                self.send_drops += 1

    def close(self) -> None:
        if not self.closed:
            self._flush()
            self.closed = True
            self.loop.remove_reader(self.watched)
            self.sock.close()


class _PlainOwner:
    """What FastPath.run needs from a proxy, for a plain handler: every datagram to the handler."""

    def __init__(self, handler: Handler) -> None:
        from ._fastpath import TxTable  # FastPath.run probes the compiled table, never a dict
        self.handle = handler
        self.stx = TxTable()

    def fast_headroom(self) -> int:
        return 0

    def on_batch(self, fast: Any) -> None:
        fast.decisions.clear()


class FastUdpListener(BatchUdpListener):
    """A batched UDP listener whose batches go through the compiled fast path first.

    A wake-up is ``FastPath.pump``, which the loop calls directly: it receives batches with
    ``FastPath.run``, which answers what it can in C and calls the proxy for the rest in arrival
    order; the proxy drains the decisions (records, metrics, logs) through ``on_batch`` once
    ``BOOKKEEPING_ROWS`` have gathered or ``BOOKKEEPING_INTERVAL`` has passed (its timer tick
    drains what an idle one left), not after every wake-up: at 10k calls/s a wake-up brings about
    four calls, and the bookkeeping cost as much as answering them.  One drain costs some 60 us
    on a VM whatever it carries (its objects are cold by then): every 5 ms, as before, that was
    1.3 us a call at 10k calls/s; every 50 ms or 256 rows it is a tenth.  Nothing waits on it:
    outcomes are held back behind it (``Proxy.outcome``), metrics are scraped in seconds.
    """

    BOOKKEEPING_ROWS = 256
    BOOKKEEPING_INTERVAL = 0.05     # seconds

    def __init__(self, loop: asyncio.AbstractEventLoop, handler: Handler, listener: ListenerInfo,
                 sock: socket.socket, fast_cls: Any) -> None:
        self.uvloop = _is_uvloop(loop)
        self.inner: select.epoll | None = None
        # The proxy whose handle() is the handler also drains the batches; any other handler
        # gets every datagram through the slow path (the fast path stays disabled).
        owner = getattr(handler, "__self__", None)
        self.proxy: Any = owner if hasattr(owner, "on_batch") else _PlainOwner(handler)
        self.fast = fast_cls(sock.fileno(), self.MAX_BATCH)
        self.fast.max_rounds = self.MAX_ROUNDS
        self.fast.max_batch = self.MAX_BATCH
        self.fast.bookkeeping_rows = self.BOOKKEEPING_ROWS
        self.fast.bookkeeping_interval = self.BOOKKEEPING_INTERVAL
        super().__init__(loop, handler, listener, sock, lambda fd, capacity: self.fast)

    def _reader(self) -> tuple[Any, ...]:
        # No Python frame per wake-up: the loop calls the compiled pump with its arguments.
        return (self.fast.pump, self, self.proxy, self.loop)

    def _watch_fd(self) -> int:
        # uvloop stops watching a descriptor for good once it reports POLLERR, which a socket with a
        # queued ICMP error (IP_RECVERR) raises.  So on uvloop the loop watches an epoll instance that
        # holds the socket: an error makes it readable like data does, recvmmsg then raises it and
        # the error queue is read -- no extra system call per batch to look for errors, no re-arming.
        if not self.uvloop:
            return self.sock.fileno()
        self.inner = select.epoll()
        self.inner.register(self.sock.fileno(), select.EPOLLIN)
        return self.inner.fileno()

    def _on_readable(self) -> None:
        self.fast.pump(self, self.proxy, self.loop)

    def close(self) -> None:
        super().close()
        if self.inner is not None:
            self.inner.close()
            self.inner = None


# ---------------------------------------------------------------- TCP
class TcpConnection(asyncio.Protocol):
    """One TCP connection (accepted or opened towards a trunk): an endpoint with one peer.

    What the peer does not read stays in the transport's write buffer.  An accepted connection
    whose buffer passes the transport's high-water mark stops being read until it drains, so a
    caller that sends without reading is slowed down to its own pace; one whose buffer still grows
    past ``manager.write_queue_max`` (what was read before the pause gets its answers) is aborted,
    as is an outgoing one (we do not stop reading a trunk's responses because it is slow to read
    our requests), and what waited on that trunk fails over.  Without this a peer that never reads
    made the proxy's memory grow by every answer it was sent.
    """

    kind = "tcp"

    def __init__(self, manager: TcpManager, listener: ListenerInfo, outgoing: tuple[str, int] | None = None
                 ) -> None:
        self.manager = manager
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.peer: Any = outgoing
        self.outgoing = outgoing is not None
        self.buf = bytearray()
        self.pending: list[bytes] = []     # written before an outgoing connection is up
        self.pending_bytes = 0
        self.last = manager.loop.time()
        self.partial_since = 0.0           # 0: no partial message buffered
        self.read_paused = False           # not read while the peer does not read (pause_writing)
        self.closed = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)     # uvloop's are not subclasses of it
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if not self.outgoing:
            self.peer = (peer[0], peer[1]) if peer else None
            if not self.manager.admit(self):
                transport.close()
                return
        elif self.closed:
            # Given up (its queue overflowed) while the connection was being opened.
            transport.abort()
            return
        pending, self.pending, self.pending_bytes = self.pending, [], 0
        for data in pending:
            self.send(data)
        self.last = self.manager.loop.time()

    def pause_writing(self) -> None:
        # Past the transport's high-water mark: an accepted peer that does not read is not read.
        if not self.outgoing and self.transport is not None and not self.closed:
            self.transport.pause_reading()
            self.read_paused = True

    def resume_writing(self) -> None:
        if self.read_paused and not self.closed and self.transport is not None:
            self.transport.resume_reading()
            # What we did not read while paused was not the peer's delay.
            self.last = self.manager.loop.time()
            if self.partial_since:
                self.partial_since = self.last
        self.read_paused = False

    def data_received(self, data: bytes) -> None:
        self.last = self.manager.loop.time()
        buf = self.buf
        buf += data
        framed = False
        while buf:
            try:
                msg = self.manager.frame(buf, self.manager.max_size)
            except SipError as exc:
                self.manager.on_frame_error(self, exc)
                self.close()
                return
            if msg is None:
                break
            framed = True
            self.manager.handler(msg, self.peer, self)
            if self.closed:
                return
        # The partial-message clock runs from when the message now buffered began to arrive: on a
        # busy connection reads seldom end on a message boundary, and that is no reason to close it.
        if not buf:
            self.partial_since = 0.0
        elif framed or not self.partial_since:
            self.partial_since = self.last

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.manager.forget(self, exc)

    # endpoint interface
    def send(self, data: bytes, addr: Any = None) -> None:
        if self.closed:
            return
        if self.transport is None:
            self.pending.append(data)
            self.pending_bytes += len(data)
            queued = self.pending_bytes
        else:
            self.transport.write(data)
            queued = self.transport.get_write_buffer_size()
        if queued > self.manager.write_queue_max:
            self.manager.overflowed(self, queued)

    def close(self) -> None:
        """Close the connection: gracefully, unless what was written to it is still not read.

        A transport that is closed with a full write buffer waits for the peer to read it, for
        ever if the peer never does; so such a connection is aborted (RST) instead.
        """
        if not self.closed:
            self.closed = True
            self.pending, self.pending_bytes = [], 0
            if self.transport is not None:
                if self.transport.get_write_buffer_size():
                    self.transport.abort()
                else:
                    self.transport.close()
            self.manager.forget(self, None)


class TcpManager:
    """Accepted and outgoing TCP connections: limits, timeouts and connection reuse."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handler: Handler, frame: Callable[..., bytes | None],
                 on_frame_error: Callable[[TcpConnection, SipError], None],
                 on_connect_failed: Callable[[tuple[str, int]], None],
                 on_overflow: Callable[[TcpConnection, int], None] | None = None) -> None:
        self.loop = loop
        self.handler = handler
        self.frame = frame
        self.on_frame_error = on_frame_error
        self.on_connect_failed = on_connect_failed
        self.on_overflow = on_overflow
        self.by_peer: dict[Any, TcpConnection] = {}
        self.accepted = 0
        self.max_connections = 1024
        self.max_size = 16384
        self.idle_timeout = 300.0
        self.partial_timeout = 10.0
        self.write_queue_max = 1024 * 1024
        self.rejected = 0
        self.overflows = 0
        self._sweeper: asyncio.TimerHandle | None = None

    def configure(self, max_connections: int, max_size: int, idle_timeout: float, partial_timeout: float,
                  write_queue_max: int | None = None) -> None:
        self.max_connections = max_connections
        self.max_size = max_size
        self.idle_timeout = idle_timeout
        self.partial_timeout = partial_timeout
        if write_queue_max is not None:
            self.write_queue_max = write_queue_max

    def overflowed(self, conn: TcpConnection, queued: int) -> None:
        """``conn`` holds more unread bytes than ``write_queue_max``: abort it, count it, tell the owner."""
        self.overflows += 1
        conn.close()        # aborts: the write buffer is not empty
        if self.on_overflow is not None:
            self.on_overflow(conn, queued)
        if conn.outgoing:
            # Later, not from inside the send that overflowed: failing over sends again.
            self.loop.call_soon(self.on_connect_failed, conn.peer)

    def admit(self, conn: TcpConnection) -> bool:
        if self.accepted >= self.max_connections:
            self.rejected += 1
            conn.closed = True
            return False
        self.accepted += 1
        self.by_peer[conn.peer] = conn
        self._arm()
        return True

    def forget(self, conn: TcpConnection, exc: Exception | None) -> None:
        if self.by_peer.get(conn.peer) is conn:
            del self.by_peer[conn.peer]
            if not conn.outgoing:
                self.accepted -= 1

    def get(self, peer: Any) -> TcpConnection | None:
        conn = self.by_peer.get(peer)
        return None if conn is None or conn.closed else conn

    def connect(self, host: str, port: int, listener: ListenerInfo) -> TcpConnection:
        """The open (or opening) connection to host:port; messages sent meanwhile are queued."""
        key = (host, port)
        conn = self.get(key)
        if conn is not None:
            return conn
        conn = TcpConnection(self, listener, outgoing=key)
        self.by_peer[key] = conn
        self._arm()

        async def opener() -> None:
            try:
                await self.loop.create_connection(lambda: conn, host, port)
            except OSError:
                conn.closed = True
                self.forget(conn, None)
                self.on_connect_failed(key)

        self.loop.create_task(opener())
        return conn

    def _arm(self) -> None:
        if self._sweeper is None:
            interval = max(0.05, min(1.0, self.partial_timeout / 4, self.idle_timeout / 4))
            self._sweeper = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        """Close idle connections and those sitting on a partial message too long."""
        self._sweeper = None
        now = self.loop.time()
        for conn in list(self.by_peer.values()):
            if conn.transport is None:
                continue
            if now - conn.last > self.idle_timeout:
                conn.close()
            elif conn.partial_since and not conn.read_paused and now - conn.partial_since > self.partial_timeout:
                conn.close()
        if self.by_peer:
            self._arm()

    def close_all(self) -> None:
        for conn in list(self.by_peer.values()):
            conn.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


# ---------------------------------------------------------------- opening listeners
async def open_udp(loop: asyncio.AbstractEventLoop, handler: Handler, host: str, port: int
                   ) -> UdpListener | BatchUdpListener | FastUdpListener:
    """Bind a UDP listener (IPv4 or IPv6), batched when the compiled extension allows."""
    info = ListenerInfo("udp", host, port, _family(host))
    sock = socket.socket(info.family, socket.SOCK_DGRAM)
    try:
        if info.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    fast_cls = _fast_class()
    if fast_cls is not None:
        recverr = enable_recverr(sock)
        _tune(sock)
        info.port = sock.getsockname()[1]
        fast = FastUdpListener(loop, handler, info, sock, fast_cls)
        fast.recverr = recverr
        return fast
    batch_cls = _batch_class(loop)
    if batch_cls is not None:
        # uvloop would stop watching the socket at the first queued ICMP error (POLLERR).
        recverr = not _is_uvloop(loop) and enable_recverr(sock)
        _tune(sock)
        info.port = sock.getsockname()[1]
        batch = BatchUdpListener(loop, handler, info, sock, batch_cls)
        batch.recverr = recverr
        return batch
    recverr = enable_recverr(sock)
    proto = UdpListener(handler, info, sock)
    proto.recverr = recverr
    await loop.create_datagram_endpoint(lambda: proto, sock=sock)
    return proto


async def open_tcp(loop: asyncio.AbstractEventLoop, manager: TcpManager, host: str, port: int
                   ) -> tuple[asyncio.AbstractServer, ListenerInfo]:
    """Bind a TCP listener (IPv4 or IPv6)."""
    info = ListenerInfo("tcp", host, port, _family(host))
    sock = socket.socket(info.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if info.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    info.port = sock.getsockname()[1]
    server = await loop.create_server(lambda: TcpConnection(manager, info), sock=sock)
    return server, info


def local_address_towards(host: str, port: int, family: int) -> str:
    """The local IP the kernel would use to reach host:port (for Vias of wildcard listeners)."""
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.connect((host, port))
        return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1" if family == socket.AF_INET else "::1"
    finally:
        s.close()


def is_refused(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)
