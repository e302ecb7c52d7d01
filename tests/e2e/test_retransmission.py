"""Retransmitted INVITEs are not new attempts: the rate limit counts transactions, not datagrams."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from .helpers import (
    ProxyProcess,
    RawUac,
    UdpSink,
    free_udp_port,
    header,
    make_config,
    options_ping,
    status_of,
    wait_until,
)

pytestmark = pytest.mark.e2e

LIMIT = 3


@pytest.fixture(scope="module")
def sink() -> Iterator[UdpSink]:
    s = UdpSink()  # a trunk that records and never answers
    yield s
    s.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, sink: UdpSink,
          proxy_starter: Callable[..., ProxyProcess]) -> ProxyProcess:
    port = free_udp_port()
    cfg = make_config(tmp_path_factory.mktemp("retrans"), listen_port=port, trunk_port=sink.port,
                      max_calls=LIMIT, window=600, sip={"trunk_timeout": 30, "transaction_timeout": 40})
    return proxy_starter(cfg, port)


def _seen_at_trunk(sink: UdpSink, call_id: str) -> list[str]:
    return [m for m in sink.messages() if call_id in " ".join(header(m, "Call-ID", "i"))]


def test_retransmissions_do_not_count_as_attempts(proxy: ProxyProcess, sink: UdpSink) -> None:
    caller = "13566660000"
    uac = RawUac(proxy.port)
    try:
        for i in range(LIMIT):
            data, ids = uac.invite_bytes(caller, f"1390000010{i}")
            uac.send(data)
            wait_until(lambda ids=ids: _seen_at_trunk(sink, ids["call_id"]), 5, f"INVITE {i} at the trunk")
            # two retransmissions of the same transaction (same bytes, same branch)
            uac.send(data)
            uac.send(data)
            # the proxy handles datagrams in order: once OPTIONS is answered, the copies were handled
            resp = options_ping(proxy.port, 2.0)
            assert resp is not None and status_of(resp) == 200
        forwarded = {header(m, "Call-ID", "i")[0] for m in sink.messages() if m.startswith("INVITE ")}
        assert len([c for c in forwarded if c]) >= LIMIT

        # the next new attempt is one too many: declined, and not forwarded
        data, ids = uac.invite_bytes(caller, "13900000199")
        uac.send(data)
        final = uac.final(ids["call_id"], 5.0)
        assert status_of(final) == 603, final
        assert "high_frequency" in " ".join(header(final, "Reason")), final
        uac.ack(ids, final)
        assert options_ping(proxy.port, 2.0) is not None
        assert not _seen_at_trunk(sink, ids["call_id"]), "a declined INVITE reached the trunk"
    finally:
        uac.close()
