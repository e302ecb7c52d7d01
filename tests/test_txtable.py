"""The proxy's compiled server-transaction table against the dict it replaces.

``TxTable`` is used by the Python path as a dict keyed by ``proxy.tx_key`` and probed by the fast
path with the bytes of a datagram; both must find the same transactions, and as a mapping it must
behave as a dict does under any sequence of changes (growth, shrinking, deletion in the middle of
a probe chain).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callguard.sip import message as sipmsg
from callguard.sip.proxy import tx_key

fastpath = pytest.importorskip("callguard.sip._fastpath")
TxTable = fastpath.TxTable
LingerQueue = fastpath.LingerQueue

TOKEN = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~", min_size=1, max_size=24)
# keys as the Python path makes them: (branch, sent-by), the RFC 2543 fallback, and the odd ones
KEYS = st.one_of(
    st.tuples(TOKEN.map(lambda t: "z9hG4bK" + t), TOKEN.map(str.lower)),
    st.tuples(st.text(max_size=8), st.text(max_size=8)),                 # any text, non-ASCII included
    st.tuples(st.just("z9hG4bK"), st.text("\udc80\udcff", min_size=1, max_size=2)),   # not UTF-8
    st.tuples(st.just("z9hG4bK" + "x" * 600), st.just("host")),           # longer than the table takes
    st.tuples(TOKEN, st.integers(0, 9), TOKEN, TOKEN),                    # call-id, cseq, from tag, sent-by
)
OPS = st.lists(st.tuples(st.sampled_from(["set", "get", "del", "pop", "in", "len", "items"]), KEYS), max_size=80)


def _same(table: Any, model: dict[Any, Any]) -> None:
    assert len(table) == len(model)
    assert sorted(map(repr, table.keys())) == sorted(map(repr, model.keys()))
    assert sorted(map(repr, table.items())) == sorted(map(repr, model.items()))
    for k, v in model.items():
        assert table[k] is v and table.get(k) is v and k in table


@given(OPS)
@settings(max_examples=300, deadline=None)
def test_behaves_as_a_dict(ops: list[tuple[str, Any]]) -> None:
    table, model = TxTable(), {}
    for n, (op, key) in enumerate(ops):
        if op == "set":
            value = object()
            table[key] = value
            model[key] = value
        elif op == "get":
            assert table.get(key, "absent") is model.get(key, "absent")
        elif op == "del":
            if key in model:
                del table[key]
                del model[key]
            else:
                with pytest.raises(KeyError):
                    del table[key]
        elif op == "pop":
            assert table.pop(key, n) is model.pop(key, n)
        elif op == "in":
            assert (key in table) == (key in model)
        elif op == "len":
            assert len(table) == len(model) and bool(table) == bool(model)
        else:
            _same(table, model)
    _same(table, model)


def test_grows_shrinks_and_keeps_every_key() -> None:
    # Enough keys to grow the table several times, removed in an order that cuts probe chains
    # in the middle (backward-shift deletion), then the table shrinks back.
    table, model = TxTable(), {}
    keys = [(f"z9hG4bK{n:x}", f"10.0.{n % 7}.1:5060") for n in range(20000)]
    for k in keys:
        model[k] = table[k] = bytes(8)
    for k in keys[::3] + keys[1::3]:
        assert table.pop(k) is model.pop(k)
        if len(model) % 997 == 0:
            _same(table, model)
    _same(table, model)
    for k in keys[2::3]:
        del table[k], model[k]
    assert len(table) == 0 and not table and list(table) == []
    table[keys[0]] = b"again"
    assert table[keys[0]] == b"again"
    with pytest.raises(KeyError):
        table[keys[1]]


def test_clear_and_replace() -> None:
    table = TxTable()
    key = ("z9hG4bKa", "h:1")
    table[key] = first = b"1"
    table[key] = second = b"2"
    assert len(table) == 1 and table[key] is second and table.get(key) is not first
    table[(1, 2, 3, 4)] = first
    table.clear()
    assert len(table) == 0 and table.get(key) is None and (1, 2, 3, 4) not in table


def _invite(branch: str, sent_by: str) -> bytes:
    return ("INVITE sip:13800000000@127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {sent_by};branch={branch}\r\n"
            "From: <sip:13900000000@127.0.0.1>;tag=f1\r\nTo: <sip:13800000000@127.0.0.1>\r\n"
            "Call-ID: c1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()


HOST = st.sampled_from(["127.0.0.1", "Gw1.Example.NET", "gw1.example.net", "Trunk-A", "10.1.2.3"])


@given(TOKEN.filter(lambda t: not t.startswith("cg")), HOST, st.integers(1, 65535))   # z9hG4bKcg: our own Via
@settings(max_examples=200, deadline=None)
def test_the_fast_path_and_the_python_path_find_the_same_transaction(tok: str, host: str, port: int) -> None:
    data = _invite("z9hG4bK" + tok, f"{host}:{port}")
    key = tx_key(sipmsg.parse_message(data, datagram=True))
    # stored by the fast path, found by the Python path's key ...
    table = TxTable()
    resp = b"SIP/2.0 403 Forbidden\r\n"
    assert fastpath.tx_probe(table, data, resp) is resp
    assert table.get(key) is resp and list(table) == [key]
    # ... and the other way round
    other = TxTable()
    tx = object()
    other[key] = tx
    assert fastpath.tx_probe(other, data) is tx
    # another sent-by or branch is another transaction
    assert fastpath.tx_probe(other, _invite("z9hG4bK" + tok + "x", f"{host}:{port}")) is None
    assert fastpath.tx_probe(other, _invite("z9hG4bK" + tok, f"{host}x:{port}")) is None


def test_a_key_too_long_is_left_to_the_python_path() -> None:
    data = _invite("z9hG4bK" + "b" * 600, "127.0.0.1:5060")
    with pytest.raises(ValueError):
        fastpath.tx_probe(TxTable(), data)
    table = TxTable()
    key = tx_key(sipmsg.parse_message(data, datagram=True))
    table[key] = b"kept"
    assert table[key] == b"kept" and len(table) == 1


def test_linger_queue_forgets_only_what_the_table_still_holds() -> None:
    table = TxTable()
    q = LingerQueue()
    a, b, c = ("z9hG4bKa", "h:1"), ("z9hG4bKb", "h:1"), ("cid", "1", "tag", "h:1")
    table[a] = va = b"a"
    table[b] = b"old"
    table[c] = vc = b"c"
    q.append(1.0, a, va)
    q.append(1.0, b, b"old-but-another-object"[:3])   # the table holds another object under b
    q.append(2.0, c, vc)
    assert q.expire(1.5, table) == 2
    assert a not in table and b in table and c in table
    assert q.release(vc) and q.expire(3.0, table) == 1
    assert c in table       # released: its entry forgets nothing
