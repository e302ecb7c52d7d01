"""Stub of the Cython twin of :mod:`callguard.sip.message` (same API, same results)."""

class SipMessage:
    """A parsed SIP request or response; see :class:`callguard.sip.message.SipMessagePy`."""

    raw: bytes
    is_request: bool
    method: str
    uri: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    call_id: str
    cseq: int
    cseq_method: str
    from_value: str
    to_value: str
    from_tag: str | None
    to_tag: str | None
    vias: list[str]
    max_forwards: int | None
    content_length: int | None
    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive, compact form accepted), or None."""
    def header_all(self, name: str) -> list[str]:
        """Every value of header ``name`` in wire order (one entry per header line)."""

def parse_message(data: bytes | bytearray | memoryview, *, datagram: bool = True) -> SipMessage:
    """Parses one SIP message; raises SipError (400, 505, or 0 = drop)."""

def frame_stream(buf: bytearray, max_size: int) -> bytes | None:
    """Pops one complete message from a stream buffer, None if incomplete; raises SipError on bad framing."""

class UdpBatch:
    """Batched datagram I/O on a bound non-blocking UDP socket (recvmmsg/sendmmsg).

    ``recv`` drops empty datagrams and CRLF keep-alives (counted in
    ``dropped_keepalives``) and returns the rest with ``socket.recvfrom``-style
    addresses.  The socket stays owned by the caller.
    """

    dropped_keepalives: int
    def __init__(self, fd: int, capacity: int = 64, bufsize: int = 65535) -> None: ...
    @property
    def fileno(self) -> int:
        """The borrowed file descriptor."""
    def recv(self, max_batch: int = 64) -> list[tuple[bytes, tuple[str, int] | tuple[str, int, int, int]]]:
        """Up to ``max_batch`` waiting datagrams, [] when none; raises OSError."""
    def send_many(self, items: list[tuple[bytes, tuple[str, int] | tuple[str, int, int, int]]]) -> int:
        """Sends the datagrams; returns how many were sent (fewer only on EAGAIN)."""
