"""The compiled fast path of ``callguard serve`` against the Python path it shortcuts.

Two proxies run side by side with the same config: one with the fast path (the default when
it is built), one with ``CALLGUARD_NO_FAST_PATH=1``.  The same datagrams from the same peer
must get the same answers, byte for byte; what the fast path leaves alone must still be
answered by the Python path; records and metrics must still be written.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .test_fastpath_forward import mutate
from .test_proxy_basic import (
    BANNED,
    CALLEE,
    CALLER,
    InProcess,
    Peer,
    ack_for,
    answer,
    free_port,
    headers,
    is_method,
    is_status,
    make_config,
    request,
    status,
    wait_until,
)

fastpath = pytest.importorskip("callguard.sip._fastpath")

URI = f"sip:{CALLEE}@127.0.0.1"


def _fast(ip: InProcess) -> Any:
    fast = getattr(ip.proxy.udp[0], "fast", None)
    assert fast is not None, "the fast path is not serving this listener"
    return fast


@pytest.fixture
def pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple[InProcess, InProcess]]]:
    """pair(trunk_port, **config) -> (proxy with the fast path, proxy without it)."""
    running: list[InProcess] = []

    def make(trunk_port: int, **over: Any) -> tuple[InProcess, InProcess]:
        out = []
        for name in ("fast", "slow"):
            folder = tmp_path / f"{name}{len(running)}"
            folder.mkdir()
            port = free_port()
            trunks = [{"name": "t", "address": f"udp:127.0.0.1:{trunk_port}"}]
            if name == "slow":
                monkeypatch.setenv("CALLGUARD_NO_FAST_PATH", "1")
            ip = InProcess(make_config(folder, [f"udp:127.0.0.1:{port}"], trunks, **over))
            monkeypatch.delenv("CALLGUARD_NO_FAST_PATH", raising=False)
            running.append(ip)
            out.append(ip)
        assert getattr(out[1].proxy.udp[0], "fast", None) is None
        _fast(out[0])
        return out[0], out[1]

    yield make
    for ip in running:
        ip.stop()


def port_of(ip: InProcess) -> int:
    return int(ip.proxy.udp[0].listener.port)


def exchange(peer: Peer, ip: InProcess, data: str | bytes, match: Callable[[str], bool] | None = None) -> bytes:
    """Send data, return the raw bytes of the first final response."""
    peer.send(data, port_of(ip))
    text = peer.recv(match=match or (lambda m: status(m) >= 200))
    return text.encode("utf-8")


def raw_recv(peer: Peer) -> bytes:
    data, _ = peer.sock.recvfrom(65535)
    return bytes(data)


def same_answer(fast: InProcess, slow: InProcess, data: bytes) -> tuple[bytes, bytes]:
    """The raw final answers of both proxies to the same datagram from the same peer."""
    peer = Peer()
    try:
        peer.sock.settimeout(3.0)
        answers = []
        for ip in (fast, slow):
            peer.send(data, port_of(ip))
            while True:
                got = raw_recv(peer)
                if status(got.decode("utf-8", "replace")) >= 200:
                    answers.append(got)
                    break
        return answers[0], answers[1]
    finally:
        peer.close()


def invite(caller: str = BANNED, *, extra: str = "", branch: str | None = None, call_id: str | None = None,
           body: str = "", **kw: Any) -> bytes:
    return request("INVITE", 5999, 0, caller=caller, uri=URI, extra=extra, branch=branch, call_id=call_id,
                   body=body, **kw).encode()


# ---------------------------------------------------------------- the scan
def test_scan_recognises_plain_invite_and_ack() -> None:
    assert fastpath.scan_kind(invite(body="v=0\r\n")) == 1
    ack = ("ACK sip:1@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5;branch=z9hG4bKx1\r\nFrom: <sip:a@b>;tag=1\r\n"
           "To: <sip:1@b>;tag=cg1\r\nCall-ID: c1\r\nCSeq: 1 ACK\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
    assert fastpath.scan_kind(ack.encode()) == 2


@pytest.mark.parametrize("change", [
    lambda m: m.replace(b"To: <sip:02150001234@127.0.0.1>", b"To: <sip:02150001234@127.0.0.1>;tag=x"),
    lambda m: m.replace(b"Call-ID:", b"i:"),
    lambda m: m.replace(b";rport\r\n", b";rport, SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKzz\r\n"),
    lambda m: m.replace(b"Max-Forwards: 70", b"Max-Forwards: 0"),
    lambda m: m.replace(b"Content-Length: 0", b"Content-Length: 5"),
    lambda m: m.replace(b"Content-Length: 0\r\n", b"Content-Length: 0\r\nContent-Length: 0\r\n"),
    lambda m: m.replace(b"CSeq: 1 INVITE", b"CSeq: 01 INVITE"),
    lambda m: m.replace(b"branch=z9hG4bK", b"branch=old"),
    lambda m: m.replace(b"branch=z9hG4bK", b"branch=z9hG4bKcg"),
    lambda m: m.replace(b"From: <sip:", b"From:\r\n <sip:"),
    lambda m: m.replace(b"SIP/2.0\r\n", b"SIP/2.0\r\nProxy-Require: foo\r\n", 1),
    lambda m: m.replace(b"sip:02150001234@127.0.0.1 SIP", b"sip:021%3550001234@127.0.0.1 SIP"),
    lambda m: m.replace(b"Via: SIP/2.0/UDP", b"Via: SIP / 2.0 / UDP"),
    lambda m: m.replace(b"Call-ID: ", b"Call-ID: \xff"),
    lambda m: m[:40],
    lambda m: m.replace(b"\r\n", b"\n"),
    # bytes outside printable ASCII anywhere in a header line (the scan checks eight at a time)
    lambda m: m.replace(b"Call-ID: ", b"Call-ID: abcdefghijklmnop\x01"),
    lambda m: m.replace(b"Call-ID: ", b"Call-ID: abcdefg\x7f"),
    lambda m: m.replace(b"Call-ID: ", b"Call-ID: a\x80"),
    lambda m: m.replace(b"CSeq: 1 INVITE", b"CSeq: 1 INVITE\x00"),
    lambda m: m.replace(b"\r\n\r\n", b"\r\n"),                 # no empty line: no end of the head
    lambda m: m.replace(b"\r\n\r\n", b"\r\n\r"),                # a CR with no LF
    lambda m: m.replace(b"Content-Length: 0\r\n", b""),           # no Content-Length over UDP
    lambda m: m.replace(b"SIP/2.0\r\n", b"SIP/2.0\r\nVia: SIP/2.0/UDP 10.9.9.9;branch=z9hG4bKcg1.x\r\n", 1),
])
def test_scan_leaves_anything_unusual_to_the_python_path(change: Callable[[bytes], bytes]) -> None:
    assert fastpath.scan_kind(change(invite())) == 0


@pytest.mark.parametrize("change", [
    lambda m: m.replace(b"SIP/2.0\r\n", b"SIP/2.0\r\nSubject: a tab\tinside a long header value\r\n", 1),
    lambda m: m.replace(b"SIP/2.0\r\n", b"SIP/2.0\r\nSubject: z9hG4bKcg is only a loop in a Via\r\n", 1),
    lambda m: m.replace(b"Content-Length: 0", b"Content-Length: 5") + b"v=0\r\n",
])
def test_scan_takes_plain_variants(change: Callable[[bytes], bytes]) -> None:
    assert fastpath.scan_kind(change(invite())) == 1


# ---------------------------------------------------------------- the vector scans
# Octets around every class boundary the scans draw, so that short random strings hit them.
EDGES = bytes([0, 8, 9, 10, 13, 31, 32, 33, 34, 44, 58, 59, 60, 62, 63, 64, 126, 127, 128, 200, 255]) + b"aZ:z9hG4bKcg"


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(EDGES) | st.integers(0, 255), max_size=70).map(bytes))
def test_vector_scans_are_their_byte_loops(data: bytes) -> None:
    line, line_ref, uri, uri_ref, bare, bare_ref, _, mark = fastpath.scan_probe(data)
    assert line == line_ref
    assert (uri, bare) == (uri_ref, bare_ref)
    assert mark == (b"z9hG4bKcg" in data)


@pytest.mark.parametrize("size", [1, 15, 16, 17, 31, 32, 33, 47, 48, 49, 100])
@pytest.mark.parametrize("at", ["start", "middle", "end"])
def test_vector_scans_find_the_octet_in_every_position(size: int, at: str) -> None:
    # the SSE2 form reads sixteen at a time and overlaps its last step: the octet that ends a line
    # or refuses a URI must be found wherever it falls, and never looked for past the end
    clean = b"a" * size
    for odd in (b"\r", b"\x7f", b"\x80", b"\x00", b"<", b" "):
        k = {"start": 0, "middle": size // 2, "end": size - 1}[at]
        data = clean[:k] + odd + clean[k + 1:]
        line, line_ref, uri, uri_ref, *_ = fastpath.scan_probe(data)
        assert line == line_ref
        assert line[0] == (size if odd in (b"<", b" ") else k)     # '<' and space are printable
        assert uri == uri_ref == (0 if odd == b"\x80" else -1)   # a URI may hold UTF-8
    for colon_at in range(size):
        data = clean[:colon_at] + b":" + clean[colon_at + 1:]
        assert fastpath.scan_probe(data)[0] == (size, colon_at)
        assert fastpath.scan_probe(data + b"\r\n")[0] == (size, colon_at)


@pytest.mark.parametrize("name", sorted(fastpath.HEADER_IDS))
def test_header_names_told_apart_in_any_case_and_nothing_else(name: str) -> None:
    known = fastpath.HEADER_IDS[name]
    for spelling in (name, name.upper(), name.title(), name.swapcase()):
        assert fastpath.scan_probe(spelling.encode())[6] == known
    # each octet changed to a neighbour or to its other case bit
    raw = name.encode()
    for i in range(len(raw)):
        for other in {raw[i] + 1, raw[i] - 1, raw[i] ^ 0x40}:
            assert fastpath.scan_probe(raw[:i] + bytes([other]) + raw[i + 1:])[6] == 0
    assert fastpath.scan_probe(raw + b"s")[6] == 0
    assert fastpath.scan_probe(raw[:-1])[6] == 0
    # CR is the one octet that OR 0x20 maps onto '-': the name compares equal, but a header line
    # ends at its first CR, so the scan never sees such a name
    if b"-" in raw:
        with_cr = raw.replace(b"-", b"\r", 1)
        assert fastpath.scan_probe(with_cr)[6] == known
        line = invite(extra="X-Pad: 1").replace(b"X-Pad", with_cr, 1)
        assert fastpath.scan_kind(line) == 0


# ---------------------------------------------------------------- byte for byte
@pytest.mark.parametrize("over", [{}, {"sip": {"hide_reason": True}}, {"sip": {"user_agent": "edge\x01gw"}}])
def test_rejection_is_byte_for_byte_the_python_one(pair: Any, over: dict[str, Any]) -> None:
    trunk = Peer()
    fast, slow = pair(trunk.port, **over)
    for data in (invite(), invite(body="v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n"),
                 invite(caller="999", extra=f"P-Asserted-Identity: <sip:{BANNED}@127.0.0.1>"),
                 invite(extra="Via: SIP/2.0/UDP 10.1.1.1:5070;branch=z9hG4bKdeeper;received=10.0.0.9")):
        a, b = same_answer(fast, slow, data)
        assert status(a.decode()) == 403
        assert a == b
    assert _fast(fast).slow == 0          # all of them were answered in C
    assert trunk.silent(0.2, is_method("INVITE"))
    trunk.close()


def test_unusual_invites_get_the_python_answer(pair: Any) -> None:
    trunk = Peer()
    fast, slow = pair(trunk.port)
    variants = [
        invite().replace(b"Call-ID:", b"i:"),                                         # compact header
        invite().replace(b";rport\r\n", b";rport, SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKzz\r\n"),  # Via list
        invite().replace(b"CSeq: 1 INVITE", b"CSeq: 1 REGISTER"),                    # method mismatch: 501
        invite().replace(b"Content-Length: 0", b"Content-Length: 99"),                # malformed: 400
    ]
    for data in variants:
        a, b = same_answer(fast, slow, data)
        assert a == b
    assert _fast(fast).slow >= len(variants)
    # A quoted display name with escapes is within the scan: answered in C, the same bytes.
    a, b = same_answer(fast, slow, invite().replace(b"From: <sip:", b'From: "A \\"B\\"" <sip:'))
    assert a == b and status(a.decode()) == 403
    trunk.close()


# ---------------------------------------------------------------- transactions
def test_retransmission_answered_from_the_table_and_ack_absorbed(pair: Any) -> None:
    trunk, caller = Peer(), Peer()
    fast, _ = pair(trunk.port, records={"enabled": True})
    port = port_of(fast)
    inv = request("INVITE", caller.port, port, caller=BANNED)
    first = exchange(caller, fast, inv)
    again = exchange(caller, fast, inv)
    assert status(first.decode()) == 403 and first == again
    key = (re.search(r"branch=([^;\s]+)", inv).group(1), f"127.0.0.1:{caller.port}")  # type: ignore[union-attr]
    assert fast.call(lambda: fast.proxy.stx.get(key)) == first
    caller.send(ack_for(inv, first.decode(), caller.port, port), port)
    wait_until(lambda: fast.call(lambda: fast.proxy.lingering_acked()) == 1, 5, "the ACK to be absorbed")
    assert trunk.silent(0.2)
    assert caller.silent(0.2)
    records = fast.server.records
    records.flush()
    rows = records.query(caller=BANNED)
    assert len(rows) == 1                   # the retransmission was no new attempt
    assert rows[0]["rule"] == "banned" and rows[0]["code"] == 403 and rows[0]["verdict"] == "reject"
    assert _fast(fast).slow == 0
    trunk.close()
    caller.close()


def test_allowed_invite_decided_in_c_is_forwarded_once(pair: Any) -> None:
    trunk, caller = Peer(), Peer()
    fast, _ = pair(trunk.port, records={"enabled": True})
    port = port_of(fast)
    inv = request("INVITE", caller.port, port, caller=CALLER, body="v=0\r\n")
    caller.send(inv, port)
    fwd = trunk.recv(match=is_method("INVITE"))
    assert headers(fwd, "Max-Forwards") == ["69"]
    assert headers(fwd, "Via")[0].startswith(f"SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKcg")
    caller.send(inv, port)                  # a retransmission goes to the Python transaction
    assert trunk.silent(0.3, is_method("INVITE"))
    records = fast.server.records
    records.flush()
    rows = records.query(caller=CALLER)
    assert [(r["rule"], r["verdict"]) for r in rows] == [("allow", "allow")]
    assert fast.call(lambda: fast.proxy.in_flight) == 1
    trunk.close()
    caller.close()


def test_a_quick_outcome_waits_for_the_record_it_completes(pair: Any) -> None:
    """A trunk's 486 that comes before the fast path handed its decision over: the outcome must not
    reach the store first (it applies only to records written before it, and would be lost)."""
    trunk = Peer()
    fast, slow = pair(trunk.port, records={"enabled": True})
    fp = _fast(fast)

    def hold() -> None:
        fp.bookkeeping_interval = 1e9               # no hand-over until the test asks for one
        fp.kept_since = fast.proxy.loop.time()
    fast.call(hold)
    for n, ip in enumerate((fast, slow)):
        caller = Peer()
        inv = request("INVITE", caller.port, port_of(ip), caller=CALLER, call_id=f"quick{n}")
        caller.send(inv, port_of(ip))
        fwd = trunk.recv(match=is_method("INVITE"))
        trunk.send(answer(fwd, 486, "Busy Here"), port_of(ip))
        caller.recv(match=is_status(486))
        ip.server.records.flush()                   # the store writes all it was given so far
        if ip is fast:
            assert fast.call(lambda: len(fast.proxy._outcomes)) == 1     # held behind the record
            assert ip.server.records.query(caller=CALLER) == []
            fast.call(lambda: fast.proxy.on_batch(fp))
            ip.server.records.flush()
        rows = ip.server.records.query(caller=CALLER)
        assert [(r["call_id"], r["rule"], r["final_code"]) for r in rows] == [(f"quick{n}", "allow", 486)]
        caller.close()
    trunk.close()


def test_call_records_packed_by_the_fast_path_are_those_of_the_python_path(pair: Any) -> None:
    # The fast path packs its decisions' records in C (no tuple per call); the Python path stores
    # the same decisions through add(): every field but the clock readings must agree.
    trunk = Peer()
    fast, slow = pair(trunk.port, records={"enabled": True})
    assert _fast(fast).rows_mode == 2       # packed: records on, decision logs off
    calls = [(BANNED, CALLEE), (CALLER, CALLEE), ("95999", CALLEE), ("+8613912345679", "110"),
             ("sip:13812345678@example.com", "sip:021-5000-1234@127.0.0.1")]
    got = []
    for ip in (fast, slow):
        caller = Peer()
        for n, (frm, to) in enumerate(calls):
            uri = to if to.startswith("sip:") else None
            callee = CALLEE if uri else to
            caller.send(request("INVITE", caller.port, port_of(ip), caller=frm.removeprefix("sip:").split("@")[0],
                                callee=callee, uri=uri, call_id=f"rec{n}"), port_of(ip))
        wait_until(lambda ip=ip: ip.server.records.flush() is None and len(ip.server.records.query(limit=100))
                   == len(calls), 5, "every call recorded")
        rows = ip.server.records.query(limit=100)
        got.append(sorted((r["call_id"], r["source"], r["caller"], r["callee"], r["rule"], r["verdict"], r["code"],
                           round(r["score"], 9)) for r in rows))
        caller.close()
    assert got[0] == got[1]
    assert {r[4] for r in got[0]} >= {"banned", "allow", "emergency", "unfiled_service_number"}
    assert _fast(fast).slow == 0            # every one of them decided in C
    trunk.close()


def test_metrics_counted_per_batch(pair: Any) -> None:
    trunk, caller = Peer(), Peer()
    fast, _ = pair(trunk.port, metrics={"enabled": True, "listen": "127.0.0.1:0"})
    port = port_of(fast)
    for _ in range(3):
        exchange(caller, fast, request("INVITE", caller.port, port, caller=BANNED, call_id=uuid.uuid4().hex))
    # The answers leave before the batch's bookkeeping: wait for it.
    wait_until(lambda: re.search(r'callguard_decisions_total\{rule="banned"\} 3\.0',
                                 fast.server.metrics.render().decode()), 5, "three banned decisions counted")
    text = fast.server.metrics.render().decode()
    assert re.search(r'callguard_sip_messages_in_total\{method="INVITE"\} 3\.0', text), text
    # the decision times, sorted into buckets in C, reach the histogram: three, and a positive sum
    assert re.search(r'callguard_decision_latency_seconds_bucket\{le="\+Inf"\} 3\.0', text), text
    total = re.search(r"callguard_decision_latency_seconds_sum (\S+)", text)
    assert total and 0 < float(total.group(1)) < 1, text
    # what the listeners could not send is read from them at each scrape
    assert "callguard_udp_send_drops_total 0.0" in text, text
    fast.call(lambda: setattr(fast.proxy.udp[0], "send_drops", fast.proxy.udp[0].send_drops + 5))
    assert "callguard_udp_send_drops_total 5.0" in fast.server.metrics.render().decode()
    trunk.close()
    caller.close()


# ---------------------------------------------------------------- pieces of the fast path on their own
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_tag_digest_is_its_python_twin(data: bytes) -> None:
    from callguard.sip.proxy import tag_digest_py

    assert fastpath.tag_digest(data) == tag_digest_py(data)
    assert re.fullmatch(r"[0-9a-f]{12}", tag_digest_py(data))


def test_tag_digest_known_value() -> None:
    from callguard.sip.proxy import tag_digest_py

    # FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c (the published test vector); the digest is its low 48 bits.
    assert tag_digest_py(b"a") == fastpath.tag_digest(b"a") == "dc4c8601ec8c"
    assert tag_digest_py(b"") == "9ce484222325"


def test_linger_queue_forgets_only_what_the_table_still_holds() -> None:
    queue = fastpath.LingerQueue()
    table: dict[Any, Any] = {}
    values = []
    for i in range(3000):                      # past the ring's first size: it grows in order
        key = (f"z9hG4bK{i}", "127.0.0.1:5060")
        values.append(f"response {i}".encode())
        table[key] = values[-1]
        queue.append(float(i), key, values[-1])
    replaced = ("z9hG4bK5", "127.0.0.1:5060")
    table[replaced] = b"a newer transaction"    # same key, new value: must survive its old linger
    assert len(queue) == 3000
    assert queue.expire(9.5, table) == 10
    assert len(table) == 2991 and table[replaced] == b"a newer transaction"
    assert ("z9hG4bK9", "127.0.0.1:5060") not in table and ("z9hG4bK10", "127.0.0.1:5060") in table
    assert queue.expire(9.9, table) == 0
    assert queue.expire(2999.0, table) == 2990
    assert table == {replaced: b"a newer transaction"} and len(queue) == 0
    with pytest.raises(ValueError):
        queue.append(5.0, replaced, b"x")
        queue.append(4.0, replaced, b"x")


def test_linger_queue_holds_and_releases_references() -> None:
    import sys

    queue = fastpath.LingerQueue()
    key, value = ("k" * 20 + "1", "h"), bytearray(b"v")
    before = sys.getrefcount(key), sys.getrefcount(value)
    for t in range(5):
        queue.append(float(t), key, value)
    assert (sys.getrefcount(key), sys.getrefcount(value)) == (before[0] + 5, before[1] + 5)
    queue.expire(1.0, {})
    assert (sys.getrefcount(key), sys.getrefcount(value)) == (before[0] + 3, before[1] + 3)
    queue.clear()
    assert (sys.getrefcount(key), sys.getrefcount(value)) == before


def test_linger_queue_release_lets_go_of_the_newest_holder() -> None:
    import sys

    queue = fastpath.LingerQueue()
    table: dict[Any, Any] = {}
    values = [bytearray(f"response {i}".encode()) for i in range(10)]
    keys = [(f"z9hG4bK{i}", "127.0.0.1:5060") for i in range(10)]
    for i in range(10):
        table[keys[i]] = values[i]
        queue.append(float(i), keys[i], values[i])
    before = sys.getrefcount(values[8]), sys.getrefcount(keys[8])
    assert queue.release(values[8]) is True
    assert (sys.getrefcount(values[8]), sys.getrefcount(keys[8])) == (before[0] - 1, before[1] - 1)
    assert queue.release(values[8]) is False              # once only
    assert queue.release(values[2], max_back=5) is False  # older than the entries searched
    assert len(queue) == 10                               # the entry keeps its place and deadline
    assert queue.expire(9.0, table) == 10
    assert table == {keys[8]: values[8]}                  # released: left to whoever released it


def test_acked_rejection_is_not_held_for_the_whole_linger(pair: Any) -> None:
    """After the ACK, the response and its key live T4 (Timer I), not 64*T1: the linger entry lets go."""
    import sys

    trunk, caller = Peer(), Peer()
    fast, _ = pair(trunk.port)
    port = port_of(fast)
    inv = request("INVITE", caller.port, port, caller=BANNED)
    first = exchange(caller, fast, inv)
    fp = _fast(fast)
    key = (re.search(r"branch=([^;\s]+)", inv).group(1), f"127.0.0.1:{caller.port}")  # type: ignore[union-attr]
    held = fast.call(lambda: fast.proxy.stx[key])
    assert held == first
    caller.send(ack_for(inv, first.decode(), caller.port, port), port)
    wait_until(lambda: fast.call(lambda: fast.proxy.lingering_acked()) == 1, 5, "the ACK to be absorbed")
    fast.call(lambda: fast.proxy._forget_due(fast.proxy.loop.time() + fastpath.T4 + 1))
    assert fast.call(lambda: (key in fast.proxy.stx, len(fp.lingering), len(fp.lingering_acked))) == (False, 1, 0)
    # only this test (and getrefcount's argument) still refers to the response
    assert sys.getrefcount(held) == 2
    trunk.close()
    caller.close()


def test_acked_rejection_of_the_python_path_is_not_held_for_the_whole_linger(pair: Any) -> None:
    """The same on the Python path (TCP, or the fast path off): the response goes T4 after the ACK."""
    import sys

    trunk, caller = Peer(), Peer()
    _, slow = pair(trunk.port)
    port = port_of(slow)
    inv = request("INVITE", caller.port, port, caller=BANNED)
    first = exchange(caller, slow, inv)
    key = (re.search(r"branch=([^;\s]+)", inv).group(1), f"127.0.0.1:{caller.port}")  # type: ignore[union-attr]
    held = slow.call(lambda: slow.proxy.stx[key])
    assert held == first
    assert slow.call(lambda: len(slow.proxy.resp_linger)) == 1
    caller.send(ack_for(inv, first.decode(), caller.port, port), port)
    wait_until(lambda: slow.call(lambda: slow.proxy.lingering_acked()) == 1, 5, "the ACK to be absorbed")
    slow.call(lambda: slow.proxy._forget_due(slow.proxy.loop.time() + fastpath.T4 + 1))
    assert slow.call(lambda: (key in slow.proxy.stx, len(slow.proxy.resp_linger), slow.proxy.lingering_acked())) \
        == (False, 1, 0)
    assert sys.getrefcount(held) == 2   # the linger entry let go of it
    # an unACKed rejection still waits out TX_LINGER (its retransmissions are answered meanwhile)
    inv2 = request("INVITE", caller.port, port, caller=BANNED)
    exchange(caller, slow, inv2)
    slow.call(lambda: slow.proxy._forget_due(slow.proxy.loop.time() + fastpath.T4 + 1))
    assert slow.call(lambda: len(slow.proxy.stx)) == 1
    slow.call(lambda: slow.proxy._forget_due(slow.proxy.loop.time() + fastpath.TX_LINGER + 1))
    assert slow.call(lambda: (len(slow.proxy.stx), len(slow.proxy.resp_linger))) == (0, 0)
    trunk.close()
    caller.close()


def test_rejections_are_forgotten_after_their_linger(pair: Any) -> None:
    trunk, caller = Peer(), Peer()
    fast, _ = pair(trunk.port)
    port = port_of(fast)
    inv = request("INVITE", caller.port, port, caller=BANNED)
    exchange(caller, fast, inv)
    fp = _fast(fast)
    wait_until(lambda: fast.call(lambda: len(fp.lingering)) == 1, 5, "the rejection to linger")
    assert fast.call(lambda: len(fast.proxy.stx)) == 1
    # the proxy's tick forgets it once the linger is over: run it as if TX_LINGER had passed
    fast.call(lambda: fast.proxy._forget_due(fast.proxy.loop.time() + fastpath.TX_LINGER + 1))
    assert fast.call(lambda: (len(fast.proxy.stx), len(fp.lingering))) == (0, 0)
    trunk.close()
    caller.close()


def test_a_wake_up_forgets_what_lingered_out_without_the_tick(pair: Any) -> None:
    """Each wake-up forgets at most ``expire_per_wake`` due entries once its answers are out; the tick
    is not needed for it (and 0 leaves it all to the tick)."""
    trunk, caller = Peer(), Peer()
    fast, _ = pair(trunk.port)
    port = port_of(fast)
    fp = _fast(fast)
    fast.call(lambda: fast.proxy._tick_handle.cancel())     # only wake-ups forget from here on
    keys = [(f"z9hG4bKdue{i}", f"127.0.0.1:{caller.port}") for i in range(100)]

    def linger_out(n: int) -> None:
        def put() -> None:
            past = fast.proxy.loop.time() - 1.0
            for key in keys[:n]:
                fast.proxy.stx[key] = b"SIP/2.0 403 Forbidden\r\n\r\n"
                fp.lingering.append(past, key, fast.proxy.stx[key])
        fast.call(put)

    def ping() -> None:
        caller.send(request("OPTIONS", caller.port, port, uri=f"sip:127.0.0.1:{port}"), port)
        assert status(caller.recv(match=lambda m: "OPTIONS" in headers(m, "CSeq")[0])) == 200

    def left() -> tuple[int, int]:
        # run on the loop after the wake-up that sent the answer has returned
        return fast.call(lambda: (len(fp.lingering), sum(k in fast.proxy.stx for k in keys)))

    assert fp.expire_per_wake == 64
    linger_out(100)
    ping()
    assert left() == (36, 36)
    assert all(k not in fast.proxy.stx for k in keys[:64])
    ping()
    assert left() == (0, 0)
    fp.expire_per_wake = 0
    linger_out(5)
    ping()
    assert left() == (5, 5)
    fast.call(lambda: fast.proxy._forget_due(fast.proxy.loop.time()))    # what the tick does
    assert left() == (0, 0)
    trunk.close()
    caller.close()


def test_linger_queue_expire_stops_at_its_limit() -> None:
    queue = fastpath.LingerQueue()
    table = {(f"b{i}", "h"): bytes([i]) for i in range(10)}
    for i in range(10):
        queue.append(float(i), (f"b{i}", "h"), table[(f"b{i}", "h")])
    assert queue.expire(100.0, table, 3) == 3 and len(table) == 7 and ("b3", "h") in table
    assert queue.expire(100.0, table, 0) == 0 and len(queue) == 7
    assert queue.expire(5.0, table, -1) == 3 and len(queue) == 4
    assert queue.expire(100.0, table) == 4 and table == {}


def test_decision_log_lines_written_per_batch(pair: Any) -> None:
    import io
    import json

    trunk, caller = Peer(), Peer()
    fast, _ = pair(trunk.port, logging={"level": "info", "format": "json"})
    sink = io.StringIO()
    fast.call(lambda: setattr(fast.proxy, "log_stream", sink))
    port = port_of(fast)
    inv = request("INVITE", caller.port, port, caller=BANNED)
    exchange(caller, fast, inv)
    line = wait_until(lambda: fast.call(sink.getvalue), 5, "the decision line")
    rec = json.loads(line.splitlines()[0])
    # The keys and their order are those of the structlog JSON renderer for log.info("decision", ...).
    assert list(rec) == ["logger", "call_id", "caller", "callee", "rule", "code", "score", "latency_us", "source",
                         "shadowed", "event", "level", "timestamp"]
    assert rec["event"] == "decision" and rec["rule"] == "banned" and rec["code"] == 403
    assert rec["call_id"] == headers(inv, "Call-ID")[0] and rec["caller"] == BANNED
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", rec["timestamp"])
    trunk.close()
    caller.close()


def test_ack_to_a_relayed_rejection_absorbed_in_c(pair: Any) -> None:
    from .test_proxy_basic import answer, is_status

    trunk, caller = Peer(), Peer()
    fast, _ = pair(trunk.port)
    port = port_of(fast)
    inv = request("INVITE", caller.port, port, caller=CALLER)
    caller.send(inv, port)
    fwd = trunk.recv(match=is_method("INVITE"))
    trunk.send(answer(fwd, 486, "Busy Here"), port)
    busy = caller.recv(match=is_status(486))
    assert trunk.recv(match=is_method("ACK"))          # the proxy's own hop-by-hop ACK
    slow_before = fast.call(lambda: _fast(fast).slow)
    caller.send(ack_for(inv, busy, caller.port, port), port)
    wait_until(lambda: fast.call(lambda: fast.proxy.lingering_acked()) >= 2, 5, "the caller's ACK absorbed")
    assert fast.call(lambda: _fast(fast).slow) == slow_before
    assert trunk.silent(0.3, is_method("ACK"))
    trunk.close()
    caller.close()


def test_a_plain_handler_gets_every_datagram_through_the_fast_listener() -> None:
    """A listener whose handler is not a proxy: the fast path stays off and hands every datagram over
    (its wake-up probed a dict as the transaction table and raised at every datagram)."""
    import asyncio
    import socket

    from callguard.sip import transport

    sent = [invite(), b"OPTIONS sip:127.0.0.1 SIP/2.0\r\n\r\n"]

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        got: list[bytes] = []
        done = loop.create_future()

        def handler(data: bytes, addr: Any, ep: Any) -> None:
            got.append(data)
            if len(got) == 2:
                done.set_result(None)

        ep = await transport.open_udp(loop, handler, "127.0.0.1", 0)
        assert isinstance(ep, transport.FastUdpListener) and not ep.fast.enabled
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for data in sent:
                sock.sendto(data, ("127.0.0.1", ep.listener.port))
            await asyncio.wait_for(done, 5)
        finally:
            sock.close()
            ep.close()
        return got

    assert asyncio.run(main()) == sent


# ---------------------------------------------------------------- mutated INVITEs, both paths
def _answers_until_probe(peer: Peer, port: int, data: bytes) -> list[bytes]:
    """What ``data`` got from the proxy: every datagram that came back before the answer to an
    OPTIONS sent right after it (the proxy handles one peer's datagrams in order, so the probe's
    200 marks the end of whatever ``data`` was answered with, and an empty list means dropped)."""
    probe_id = "probe-" + uuid.uuid4().hex
    peer.send(data, port)
    peer.send(request("OPTIONS", peer.port, port, call_id=probe_id, uri=f"sip:127.0.0.1:{port}"), port)
    got: list[bytes] = []
    while True:
        raw = raw_recv(peer)
        if probe_id.encode() in raw and raw.startswith(b"SIP/2.0 200 "):
            return got
        got.append(raw)


def _forwarded(trunk: Peer, by_port: dict[int, set[bytes]]) -> dict[int, set[bytes]]:
    """Adds the Call-ID lines of the requests queued at the trunk to ``by_port``, under the port of the
    proxy whose Via is on top (sets: the trunk never answers, so the proxies retransmit whenever
    their timers say)."""
    trunk.sock.setblocking(False)
    try:
        while True:
            try:
                data, _ = trunk.sock.recvfrom(65535)
            except BlockingIOError:
                return by_port
            lines = data.split(b"\r\n")
            top_via = next(line for line in lines if line.startswith(b"Via: "))
            port = int(re.match(rb"Via: SIP/2\.0/UDP 127\.0\.0\.1:(\d+);", top_via).group(1))  # type: ignore[union-attr]
            by_port[port].update(line for line in lines if line.lower().startswith(b"call-id:"))
    finally:
        trunk.sock.setblocking(True)


def test_mutated_invites_get_the_same_answers_from_both_paths(pair: Any) -> None:
    # Whatever an octet-level edit of a plain INVITE makes of it, the fast path answers it as the
    # Python path does, or leaves it to it: the same datagrams back, byte for byte, the same
    # dropped, the same forwarded.
    trunk = Peer()
    fast, slow = pair(trunk.port)
    octet = (st.sampled_from(EDGES) | st.integers(0, 255)).map(lambda o: bytes([o]))
    edits_of = st.lists(st.tuples(st.sampled_from(["set", "ins", "del", "dup"]), st.integers(0, 10_000), octet),
                        min_size=1, max_size=3)
    seen = {"answered": 0, "dropped": 0, "sent": 0}
    forwarded: dict[int, set[bytes]] = {port_of(fast): set(), port_of(slow): set()}

    @settings(max_examples=int(os.environ.get("CALLGUARD_FUZZ_EXAMPLES", "250")), deadline=None,
              derandomize="CALLGUARD_FUZZ_EXAMPLES" not in os.environ)
    @given(st.sampled_from([BANNED, CALLER, "95588123"]), st.booleans(), edits_of)
    def check(caller: str, edit_ack: bool, edits: list[tuple[str, int, bytes]]) -> None:
        # edit_ack: the INVITE goes as it is and the ACK to its final answer is edited
        call_id = uuid.uuid4().hex
        branch = "z9hG4bK" + uuid.uuid4().hex[:12]
        got: dict[str, list[bytes]] = {}
        peer = Peer()          # one caller for both: the To-tag digests the caller's Via
        peer.sock.settimeout(3.0)
        try:
            for name, ip in (("fast", fast), ("slow", slow)):
                port = port_of(ip)
                inv = request("INVITE", peer.port, port, caller=caller, uri=URI, branch=branch, call_id=call_id)
                if edit_ack:
                    first = _answers_until_probe(peer, port, inv.encode())
                    texts = [r.decode("utf-8", "replace") for r in first]
                    finals = [t for t in texts if status(t) >= 300]
                    ack = ack_for(inv, finals[0], peer.port, port) if finals else ack_for(inv, inv, peer.port, port)
                    got[name] = first + [b"--"] + _answers_until_probe(peer, port, mutate(ack.encode(), edits))
                else:
                    got[name] = _answers_until_probe(peer, port, mutate(inv.encode(), edits))
        finally:
            peer.close()
        assert got["fast"] == got["slow"]
        # a forwarded INVITE leaves within the batch that decided it, before the probe's answer
        _forwarded(trunk, forwarded)
        assert forwarded[port_of(fast)] == forwarded[port_of(slow)]
        edited = got["fast"][got["fast"].index(b"--") + 1:] if edit_ack else got["fast"]
        seen["answered" if edited else "dropped"] += 1
        seen["sent"] += 4 if edit_ack else 2       # to the fast proxy, probes included

    slow_before = _fast(fast).slow
    check()
    # the edits reached both outcomes, and the fast path handled some of the datagrams itself
    assert seen["answered"] and seen["dropped"] and forwarded[port_of(fast)]
    assert _fast(fast).slow - slow_before < seen["sent"] - 10
    trunk.close()
