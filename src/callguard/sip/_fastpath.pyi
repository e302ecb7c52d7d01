# Type stub of the compiled fast path (_fastpath.pyx).
from typing import Any

TX_LINGER: float
T4: float

def scan_kind(data: bytes) -> int: ...
def tag_digest(data: bytes) -> str: ...

class LingerQueue:
    def append(self, deadline: float, key: Any, value: Any) -> None: ...
    def expire(self, now: float, table: dict[Any, Any]) -> int: ...
    def release(self, value: Any, max_back: int = 2048) -> bool: ...
    def clear(self) -> None: ...
    def __len__(self) -> int: ...

class FastPath:
    enabled: bool
    decisions: list[tuple[Any, ...]]
    invites_in: int
    acks_in: int
    retrans_out: int
    slow: int
    out_codes: dict[int | str, int]
    @property
    def lingering(self) -> LingerQueue: ...
    @property
    def lingering_acked(self) -> LingerQueue: ...
    @property
    def dropped_keepalives(self) -> int: ...
    def __init__(self, fd: int, capacity: int = 64, bufsize: int = 65535) -> None: ...
    @property
    def fileno(self) -> int: ...
    def configure(self, core: Any, rule_names: Any, codes: Any, reasons: Any, hide_reason: bool, server_line: str,
                  max_size: int, trust_identity: Any, latency_bounds: Any = ()) -> None: ...
    def take_counts(self) -> tuple[int, int, list[tuple[int, int]], list[tuple[str, int]], list[int], float] | None: ...
    def expire(self, now: float, stx: dict[Any, Any]) -> int: ...
    def send_many(self, items: list[tuple[bytes, Any]]) -> int: ...
    def flush(self) -> list[tuple[bytes, Any]]: ...
    max_rounds: int
    max_batch: int
    bookkeeping_rows: int
    bookkeeping_interval: float
    kept_since: float
    def pump(self, listener: Any, proxy: Any, loop: Any) -> None: ...
    def run(self, proxy: Any, ep: Any, stx: dict[Any, Any], mono: float, headroom: int,
            max_batch: int = 64) -> int: ...
    in_codes: dict[int, int]
    @property
    def forwarding(self) -> bool: ...
    def configure_forward(self, proxy: Any, ep: Any, routes: list[Any], user_agent: str, canon_exc: list[Any],
                          queues: tuple[Any, ...], trunk_timeout: float, timer_c_first: float) -> None: ...

T1: float
K_RETRANS: int
K_TRUNK: int
K_TIMER_C: int

def blake2b_hex6(data: bytes) -> str: ...
def due_timers(q: Any, now: float, out: list[Any]) -> None: ...

class FwdTx:
    key: Any
    up_ep: Any
    up_addr: Any
    branch: Any
    out: Any
    dest_ep: Any
    dest_addr: Any
    trunk: Any
    candidates: Any
    last_resp: Any
    caller: Any
    callee: Any
    source: Any
    call_id: Any
    is_invite: bool
    provisional: bool
    cancelled: bool
    expired_soon: bool
    attempt: int
    final: int
    interval: float
    started: float
    out_head: Any
    to_tag: Any
    @property
    def msg(self) -> Any: ...
    @property
    def branches(self) -> list[str]: ...
