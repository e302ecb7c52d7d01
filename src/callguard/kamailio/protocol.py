"""The decider's wire format: compact, versioned datagrams over a Unix socket.

Every datagram starts with an 8-byte header ``<2sBBI``: the magic ``b"CG"``, the
protocol version, the operation and a request id chosen by the client (the reply
carries it back, so a late reply to a request that already timed out is recognised
and dropped).  Strings are UTF-8 with a 2-byte little-endian length in front.

``CHECK`` request body: caller, callee, source, identity (P-Asserted-Identity, may be
empty), transaction key (Call-ID + CSeq + Via branch, may be empty) and, from version 2,
the Call-ID (the key of the call record).  A version 1 CHECK (no Call-ID) is still
decoded: its Call-ID is taken from the transaction key.  A reply carries the version of
the request it answers, so a worker of either version understands it.
``CHECK`` reply body: ``<HBBf`` code (0: allow), rule index into ``RULE_NAMES``,
flags, score; then the reason phrase and the trunk address (``udp:HOST:PORT``).
Control operations (``PING``, ``STATS``, ``RELOAD``) carry a JSON object in the reply.
An ``ERROR`` reply carries a UTF-8 message.

``OUTCOME`` (version 2, one-way: never answered) tells the decider what became of a call
it let through: ``<BHd`` kind (``ANSWERED``, ``FAILED``, ``ENDED``), final response code
(0 for ``ENDED``), the worker's clock (epoch seconds); then the Call-ID.

A typical CHECK is about 100 bytes each way; an OUTCOME about 40.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, NamedTuple

from ..settings import RULE_NAMES

MAGIC = b"CG"
VERSION = 2
VERSIONS = (1, 2)   # what a decider decodes: version 1 workers keep working during an upgrade

OP_CHECK = 1
OP_PING = 2
OP_STATS = 3
OP_RELOAD = 4
OP_OUTCOME = 5
OP_ERROR = 255

FLAG_HIDE_REASON = 1   # the config asks to leave the Reason header out
FLAG_FAILED_OPEN = 2   # the decision raised inside the decider and failed open

OUTCOME_ANSWERED = 1   # a 2xx final response to the INVITE was relayed
OUTCOME_FAILED = 2     # a negative final response (from the trunk or tm's own timeout) was relayed
OUTCOME_ENDED = 3      # a BYE of the dialog passed

_HEADER = struct.Struct("<2sBBI")
_STR = struct.Struct("<H")
_VERDICT = struct.Struct("<HBBf")
_OUTCOME = struct.Struct("<BHd")
HEADER_SIZE = _HEADER.size
MAX_DATAGRAM = 65507
MAX_FIELD = 4096   # longer fields are cut (and end in a digest of the whole, see _fit)


class ProtocolError(ValueError):
    """A datagram that does not follow the wire format."""


class CheckRequest(NamedTuple):
    """What a worker asks about one INVITE."""

    caller: str
    callee: str
    source: str
    identity: str
    txkey: str
    call_id: str = ""


class CheckReply(NamedTuple):
    """The decider's answer to one CHECK."""

    code: int
    rule: str
    flags: int
    score: float
    reason: str
    trunk: str


def _fit(text: str) -> bytes:
    """A field as sent: UTF-8, at most MAX_FIELD bytes.  A longer one keeps its start and ends in
    a digest of the whole, so two fields that differ past the cut stay different: cut bare, the
    Call-IDs of a flood sharing their first 4 KiB were one transaction to the decider (its later
    INVITEs taken for retransmissions, uncounted, and one call record for all)."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_FIELD:
        return raw
    return raw[:MAX_FIELD - 41] + b"#" + hashlib.sha1(raw).hexdigest().encode()


def _pack_str(text: str) -> bytes:
    raw = _fit(text)
    return _STR.pack(len(raw)) + raw


def _unpack_strs(data: bytes, offset: int, count: int) -> list[str]:
    out = []
    size = len(data)
    for _ in range(count):
        if offset + 2 > size:
            raise ProtocolError("truncated string length")
        n = data[offset] | data[offset + 1] << 8   # little-endian length, no struct call
        offset += 2
        end = offset + n
        if end > size:
            raise ProtocolError("truncated string")
        out.append(data[offset:end].decode("utf-8", "replace"))
        offset = end
    return out


def header(op: int, request_id: int) -> bytes:
    """The 8-byte header of a datagram (this version)."""
    return _HEADER.pack(MAGIC, VERSION, op, request_id & 0xFFFFFFFF)


def parse_header(data: bytes) -> tuple[int, int, int]:
    """Return (version, op, request id); raise ProtocolError for a datagram that is not ours."""
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"datagram of {len(data)} bytes is shorter than the header")
    magic, version, op, request_id = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise ProtocolError("bad magic")
    return version, op, request_id


class Outcome(NamedTuple):
    """What became of a call the decider let through."""

    kind: int
    code: int
    time: float
    call_id: str


def header_v(version: int, op: int, request_id: int) -> bytes:
    """The header of a datagram of a given protocol version (a reply echoes its request's)."""
    return _HEADER.pack(MAGIC, version, op, request_id & 0xFFFFFFFF)


def encode_check(request_id: int, req: CheckRequest, version: int = VERSION) -> bytes:
    """A CHECK request datagram (``version=1`` leaves the Call-ID out, for a decider that predates it)."""
    fields = req if version >= 2 else req[:5]
    parts = [_HEADER.pack(MAGIC, version, OP_CHECK, request_id & 0xFFFFFFFF)]
    for text in fields:
        raw = _fit(text)
        parts.append(_STR.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def call_id_of_txkey(txkey: str) -> str:
    """The Call-ID inside a transaction key ``Call-ID|CSeq|branch`` (a Call-ID never contains ``|``)."""
    return txkey.rsplit("|", 2)[0] if txkey.count("|") >= 2 else ""


def decode_check(data: bytes, version: int = VERSION) -> CheckRequest:
    """The body of a CHECK request of the given version (header already checked)."""
    if version >= 2:
        return CheckRequest(*_unpack_strs(data, HEADER_SIZE, 6))
    caller, callee, source, identity, txkey = _unpack_strs(data, HEADER_SIZE, 5)
    return CheckRequest(caller, callee, source, identity, txkey, call_id_of_txkey(txkey))


def encode_outcome(kind: int, code: int, when: float, call_id: str) -> bytes:
    """A one-way OUTCOME datagram (request id 0: nobody waits for an answer)."""
    return header(OP_OUTCOME, 0) + _OUTCOME.pack(kind, code, when) + _pack_str(call_id)


def decode_outcome(data: bytes) -> Outcome:
    """The body of an OUTCOME datagram (header already checked)."""
    if len(data) < HEADER_SIZE + _OUTCOME.size:
        raise ProtocolError("truncated outcome")
    kind, code, when = _OUTCOME.unpack_from(data, HEADER_SIZE)
    if kind not in (OUTCOME_ANSWERED, OUTCOME_FAILED, OUTCOME_ENDED):
        raise ProtocolError(f"unknown outcome kind {kind}")
    (call_id,) = _unpack_strs(data, HEADER_SIZE + _OUTCOME.size, 1)
    return Outcome(kind, code, when, call_id)


_RULE_INDEX = {name: i for i, name in enumerate(RULE_NAMES)}
_ALLOW_INDEX = _RULE_INDEX["allow"]


def rule_index(rule: str) -> int:
    """Index of a rule id in ``RULE_NAMES`` (the reply carries the index, not the name)."""
    return _RULE_INDEX.get(rule, _ALLOW_INDEX)


def encode_reply_body(code: int, rule: str, flags: int, score: float, reason: str, trunk: str) -> bytes:
    """A CHECK reply without its header (the decider caches it for retransmissions)."""
    r = _fit(reason)
    t = _fit(trunk)
    return b"".join((_VERDICT.pack(code, _RULE_INDEX.get(rule, _ALLOW_INDEX), flags, score),
                     _STR.pack(len(r)), r, _STR.pack(len(t)), t))


def decode_reply(data: bytes) -> CheckReply:
    """The body of a CHECK reply (header already checked)."""
    if len(data) < HEADER_SIZE + _VERDICT.size:
        raise ProtocolError("truncated verdict")
    code, rule, flags, score = _VERDICT.unpack_from(data, HEADER_SIZE)
    if rule >= len(RULE_NAMES):
        raise ProtocolError(f"rule index {rule} out of range")
    reason, trunk = _unpack_strs(data, HEADER_SIZE + _VERDICT.size, 2)
    return CheckReply(code, RULE_NAMES[rule], flags, score, reason, trunk)


def encode_json(op: int, request_id: int, obj: Any) -> bytes:
    """A control request or reply carrying a JSON object."""
    return header(op, request_id) + json.dumps(obj, separators=(",", ":"), default=str).encode()[:MAX_DATAGRAM - 8]


def decode_json(data: bytes) -> Any:
    """The JSON body of a control datagram (``{}`` when empty)."""
    body = data[HEADER_SIZE:]
    return json.loads(body) if body else {}
