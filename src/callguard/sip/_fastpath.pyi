# Type stub of the compiled fast path (_fastpath.pyx).
from typing import Any

TX_LINGER: float
T4: float

def scan_kind(data: bytes) -> int: ...

class FastPath:
    enabled: bool
    decisions: list[tuple[Any, ...]]
    invites_in: int
    acks_in: int
    retrans_out: int
    slow: int
    out_codes: dict[int, int]
    @property
    def dropped_keepalives(self) -> int: ...
    def __init__(self, fd: int, capacity: int = 64, bufsize: int = 65535) -> None: ...
    @property
    def fileno(self) -> int: ...
    def configure(self, core: Any, rule_names: Any, codes: Any, reasons: Any, hide_reason: bool, server_line: str,
                  max_size: int, trust_identity: Any) -> None: ...
    def send_many(self, items: list[tuple[bytes, Any]]) -> int: ...
    def flush(self) -> list[tuple[bytes, Any]]: ...
    def run(self, proxy: Any, ep: Any, stx: dict[Any, Any], expiry: Any, expiry_acked: Any, mono: float,
            headroom: int, max_batch: int = 64) -> int: ...
