"""The worker's side of the decider protocol: ask, wait a bounded time, or fail open."""

from __future__ import annotations

import os
import socket
import struct
import time

from . import protocol as proto
from .protocol import CheckReply, CheckRequest

PROBE_TIMEOUT = 0.005     # seconds to wait while the decider is known to be unresponsive
DOWN_AFTER = 3            # consecutive timeouts before the decider is treated as unresponsive


class DeciderUnavailable(Exception):
    """The decider did not answer (not running, timed out, or answered garbage): the call fails open."""


class _Downgrade(Exception):
    """The decider speaks an older protocol version; the request is sent again in that version."""


class DeciderClient:
    """One datagram socket per process, connected to the decider.

    Kamailio forks its workers after the plug-in is loaded, so the socket is created lazily
    and re-created when the process id changes.  A reply is matched by request id, so a late
    answer to an earlier, timed-out request is skipped.  After a few consecutive timeouts the
    client waits only :data:`PROBE_TIMEOUT` per call (instead of the full timeout) until the
    decider answers again: a stalled decider must not stall every worker.

    The client speaks protocol version 2; a decider that only speaks version 1 refuses the
    first CHECK, and from then on the client asks in version 1 (without the Call-ID, and
    without outcomes, which version 1 does not know).

    Args:
        path: the decider's socket path.
        timeout: seconds to wait for an answer.
    """

    def __init__(self, path: str, timeout: float = 0.1) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._pid = 0
        self._next_id = 1
        self.version = proto.VERSION
        self.timeouts = 0
        self.consecutive_timeouts = 0
        self.outcomes_sent = 0
        self.outcome_failures = 0
        self._wait = 0.0   # the receive timeout (SO_RCVTIMEO) the socket has now

    @property
    def down(self) -> bool:
        """True while the decider is treated as unresponsive."""
        return self.consecutive_timeouts >= DOWN_AFTER

    def _socket(self) -> socket.socket:
        if self._sock is None or self._pid != os.getpid():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind("")          # Linux autobind: an abstract address, nothing to clean up
            sock.connect(self.path)
            # A blocking socket whose receive timeout is kept by the kernel (SO_RCVTIMEO): one
            # recv() system call per answer, where Python's own timeouts poll() before every
            # recv() and switch the descriptor's blocking mode on every settimeout().
            self._wait = 0.0
            # A CHECK waits for room in the decider's queue (net.unix.max_dgram_qlen datagrams, 10 by
            # default, shared by every worker) at most the answer's timeout; then the call fails open.
            usec = max(1, int(self.timeout * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", usec // 1_000_000,
                                                                                usec % 1_000_000))
            self._sock = sock
            self._pid = os.getpid()
            self._next_id = (os.getpid() << 16) & 0xFFFFFFFF or 1
        return self._sock

    def _set_wait(self, sock: socket.socket, seconds: float) -> None:
        if seconds != self._wait:
            usec = max(1, int(seconds * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", usec // 1_000_000,
                                                                                usec % 1_000_000))
            self._wait = seconds

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def outcome(self, kind: int, code: int, when: float, call_id: str) -> bool:
        """Tell the decider what became of a call; one datagram, never waits for an answer.

        Returns False (and counts it in :attr:`outcome_failures`) when the datagram could not be
        sent: no decider, a full socket buffer, or a decider too old to understand outcomes.
        """
        if self.version < 2:
            self.outcome_failures += 1
            return False
        data = proto.encode_outcome(kind, code, when, call_id)
        try:
            sock = self._socket()
            try:
                sock.send(data, socket.MSG_DONTWAIT)
            except (ConnectionRefusedError, FileNotFoundError):
                self.close()   # the decider restarted: reconnect once
                self._socket().send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            self.outcome_failures += 1   # the decider is behind: drop this one, keep the socket
            return False
        except OSError:
            self.close()
            self.outcome_failures += 1
            return False
        self.outcomes_sent += 1
        return True

    def check(self, req: CheckRequest) -> CheckReply:
        """Ask for one verdict.

        Raises:
            DeciderUnavailable: no answer in time, no decider listening, or a reply that makes no sense.
        """
        try:
            return self._check(req)
        except _Downgrade:
            return self._check(req)

    def _check(self, req: CheckRequest) -> CheckReply:
        rid = self._next_id
        self._next_id = (rid + 1) & 0xFFFFFFFF
        data = proto.encode_check(rid, req, self.version)
        try:
            sock = self._socket()
            try:
                sock.send(data)
            except BlockingIOError:
                raise   # the decider's queue stayed full for the whole timeout: fail open, keep the socket
            except OSError:
                # The decider restarted (new socket inode) or is gone: reconnect once.
                self.close()
                sock = self._socket()
                sock.send(data)
        except BlockingIOError:
            self.timeouts += 1
            self.consecutive_timeouts += 1
            raise DeciderUnavailable(f"the decider's queue stayed full for {self.timeout * 1000:.0f} ms") from None
        except OSError as exc:
            self.close()
            raise DeciderUnavailable(f"cannot reach the decider at {self.path}: {exc.strerror or exc}") from None
        wait = PROBE_TIMEOUT if self.down else self.timeout
        deadline = time.monotonic() + wait
        remaining = wait
        while True:
            try:
                self._set_wait(sock, remaining)
                reply = sock.recv(proto.MAX_DATAGRAM)
            except BlockingIOError:   # SO_RCVTIMEO expired
                self.timeouts += 1
                self.consecutive_timeouts += 1
                raise DeciderUnavailable(f"no answer from the decider within {wait * 1000:.0f} ms") from None
            except OSError as exc:
                self.close()
                raise DeciderUnavailable(f"decider socket error: {exc.strerror or exc}") from None
            try:
                version, op, got = proto.parse_header(reply)
            except proto.ProtocolError:
                got = -1
            if got != rid:
                # Garbage, or a late answer to an earlier request that already failed open:
                # wait for ours for what is left of the time.
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.timeouts += 1
                    self.consecutive_timeouts += 1
                    raise DeciderUnavailable(f"no answer from the decider within {wait * 1000:.0f} ms")
                continue
            self.consecutive_timeouts = 0
            if op == proto.OP_ERROR:
                if version < self.version and version in proto.VERSIONS:
                    self.version = version   # an older decider: ask again in its version
                    raise _Downgrade()
                raise DeciderUnavailable("decider refused the request: "
                                         + reply[proto.HEADER_SIZE:].decode("utf-8", "replace"))
            if version != self.version or op != proto.OP_CHECK:
                raise DeciderUnavailable(f"unexpected reply (version {version}, op {op})")
            try:
                return proto.decode_reply(reply)
            except proto.ProtocolError as exc:
                raise DeciderUnavailable(f"malformed reply: {exc}") from None
