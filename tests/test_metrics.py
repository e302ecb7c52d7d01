"""Prometheus metrics: counters move, registries are separate, /metrics is served over HTTP."""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from callguard.metrics import Metrics, method_label, parse_listen
from callguard.records import RecordStore


def value(m: Metrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_a_batch_of_decisions_counts_as_the_same_decisions_one_by_one() -> None:
    from callguard.metrics import LATENCY_BUCKETS

    times = [0.5e-6, 1e-6, 3e-6, 3e-6, 7e-6, 40e-6, 2e-3, 0.5]
    one, batch = Metrics(), Metrics()
    for t in times:
        one.decision("banned", t)
    counts = [0] * len(LATENCY_BUCKETS)
    for t in times:
        counts[next(i for i, b in enumerate(LATENCY_BUCKETS) if t <= b)] += 1
    batch.fast_batch(0, 0, [], [("banned", len(times))], counts, sum(times))
    for m in (one, batch):
        assert value(m, "callguard_decisions_total", rule="banned") == len(times)
    for le in ("1e-06", "2.5e-06", "5e-06", "1e-05", "5e-05", "0.0025", "0.1", "+Inf"):
        assert value(batch, "callguard_decision_latency_seconds_bucket", le=le) == \
            value(one, "callguard_decision_latency_seconds_bucket", le=le), le
    assert value(one, "callguard_decision_latency_seconds_bucket", le="1e-06") == 2   # <= bound: 0.5 µs and 1 µs
    assert value(batch, "callguard_decision_latency_seconds_sum") == pytest.approx(sum(times))
    with pytest.raises(ValueError):
        batch.fast_batch(5, 0, [], [("banned", 5)], [1, 2], 0.0)   # not one count per bucket: nothing counted
    assert value(batch, "callguard_sip_messages_in_total", method="INVITE") == 0
    assert value(batch, "callguard_decisions_total", rule="banned") == len(times)


def test_fast_batch_counts_what_the_per_call_methods_count() -> None:
    from callguard.metrics import LATENCY_BUCKETS

    one, batch = Metrics(), Metrics()
    one.message_in("INVITE", 3)
    one.message_in("ACK", 2)
    one.message_out(403, 3)
    one.message_out(486)
    for t in (3e-6, 4e-6, 2e-3):
        one.decision("banned", t)
    buckets = [0] * len(LATENCY_BUCKETS)
    buckets[2] += 2          # 3 µs and 4 µs: <= 5e-06
    buckets[10] += 1         # 2 ms: <= 2.5e-03
    batch.fast_batch(3, 2, [(403, 3), (486, 1)], [("banned", 3)], buckets, 3e-6 + 4e-6 + 2e-3)
    def samples(m: Metrics) -> list[bytes]:   # creation times differ between the two registries
        return [line for line in m.render().splitlines() if b"_created" not in line]

    assert samples(batch) == samples(one)
    assert value(batch, "callguard_sip_messages_out_total", method="4xx") == 4


def test_counters_change() -> None:
    m = Metrics()
    m.decision("banned", 12e-6)
    m.decision("banned", 30e-6)
    m.decision("allow", 8e-6)
    m.decision("some_future_rule", 1e-6)     # not pre-bound: still counted
    assert value(m, "callguard_decisions_total", rule="banned") == 2
    assert value(m, "callguard_decisions_total", rule="allow") == 1
    assert value(m, "callguard_decisions_total", rule="some_future_rule") == 1
    assert value(m, "callguard_decisions_total", rule="score") == 0   # pre-bound, exported as 0
    assert value(m, "callguard_decision_latency_seconds_count") == 4
    assert value(m, "callguard_decision_latency_seconds_bucket", le="1e-05") == 2
    assert value(m, "callguard_decision_latency_seconds_bucket", le="2.5e-05") == 3
    assert value(m, "callguard_decision_latency_seconds_sum") == pytest.approx(51e-6)

    m.message_in("INVITE")
    m.message_in("invite")
    m.message_in(200)
    m.message_in("180")
    m.message_in("4xx")
    m.message_in("XYZZY")                    # unknown methods fold into "other"
    m.message_out(403)
    m.message_out("INVITE")
    assert value(m, "callguard_sip_messages_in_total", method="INVITE") == 2
    assert value(m, "callguard_sip_messages_in_total", method="2xx") == 1
    assert value(m, "callguard_sip_messages_in_total", method="1xx") == 1
    assert value(m, "callguard_sip_messages_in_total", method="4xx") == 1
    assert value(m, "callguard_sip_messages_in_total", method="other") == 1
    assert m.registry.get_sample_value("callguard_sip_messages_in_total", {"method": "XYZZY"}) is None
    assert value(m, "callguard_sip_messages_out_total", method="4xx") == 1
    assert value(m, "callguard_sip_messages_out_total", method="INVITE") == 1

    m.parse_error()
    m.overload()
    m.overload()
    m.fault()
    m.tcp_overflow()
    m.record_written(250)
    m.record_written()
    m.record_dropped(3)
    m.trunk_state("trunk-a", True)
    m.trunk_state("trunk-b", True)
    m.trunk_state("trunk-b", False)
    assert value(m, "callguard_sip_parse_errors_total") == 1
    assert value(m, "callguard_overload_rejections_total") == 2
    assert value(m, "callguard_internal_faults_total") == 1
    assert value(m, "callguard_tcp_write_overflows_total") == 1
    assert value(m, "callguard_records_written_total") == 251
    assert value(m, "callguard_records_dropped_total") == 3
    assert value(m, "callguard_trunk_up", trunk="trunk-a") == 1
    assert m.registry.get_sample_value("callguard_trunk_up", {"trunk": "trunk-b"}) == 0


def test_udp_send_drops_are_read_at_each_scrape() -> None:
    m = Metrics()
    drops = [0]
    m.watch_udp_send_drops(lambda: drops[0])
    assert value(m, "callguard_udp_send_drops_total") == 0
    drops[0] = 7
    assert value(m, "callguard_udp_send_drops_total") == 7
    assert "callguard_udp_send_drops_total 7.0" in m.render().decode()


def test_registries_are_separate() -> None:
    a, b = Metrics(), Metrics()
    a.fault()
    assert value(a, "callguard_internal_faults_total") == 1
    assert value(b, "callguard_internal_faults_total") == 0


@pytest.mark.parametrize("given, label", [
    ("INVITE", "INVITE"), ("bye", "BYE"), ("FOO", "other"), ("", "other"), (100, "1xx"), (699, "6xx"),
    (99, "other"), (700, "other"), ("486", "4xx"), ("6xx", "6xx"), ("7xx", "other"), ("2x9", "other"),
])
def test_method_label(given: str | int, label: str) -> None:
    assert method_label(given) == label


def test_render_has_every_family() -> None:
    text = Metrics().render().decode()
    for family in ("callguard_decisions_total", "callguard_decision_latency_seconds",
                   "callguard_sip_messages_in_total", "callguard_sip_messages_out_total",
                   "callguard_sip_parse_errors_total", "callguard_trunk_up", "callguard_records_written_total",
                   "callguard_records_dropped_total", "callguard_overload_rejections_total",
                   "callguard_internal_faults_total", "callguard_tcp_write_overflows_total"):
        assert f"# TYPE {family.removesuffix('_total')}" in text, family


def test_http_endpoint_on_a_free_port() -> None:
    m = Metrics()
    port = m.start_server("127.0.0.1", 0)
    try:
        assert port > 0
        assert m.start_server("127.0.0.1", 0) == port     # one server per Metrics
        m.decision("high_frequency", 20e-6)
        m.trunk_state("trunk", True)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            body = resp.read().decode()
        assert 'callguard_decisions_total{rule="high_frequency"} 1.0' in body
        assert 'callguard_trunk_up{trunk="trunk"} 1.0' in body
        assert "callguard_decision_latency_seconds_bucket" in body
    finally:
        m.stop_server()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_record_store_reports_into_metrics(tmp_path: Path) -> None:
    m = Metrics()
    with RecordStore(str(tmp_path / "r.sqlite3"), flush_interval=0.02, on_written=m.record_written,
                     on_dropped=m.record_dropped) as store:
        for i in range(120):
            store.add({"time": 1_780_000_000.0 + i, "call_id": f"c{i}", "caller": "13800000000", "rule": "allow"})
        store.flush()
        assert value(m, "callguard_records_written_total") == 120
    store.add({"time": 1.0})                                 # after close: dropped
    assert store.dropped == 1


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9090") == ("127.0.0.1", 9090)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("9090", "host:", "host:99999", ":80"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_per_call_methods_do_not_grow_series() -> None:
    m = Metrics()

    def series() -> int:
        return sum(len(f.samples) for f in m.registry.collect() if f.name == "callguard_sip_messages_in")

    before = series()
    for i in range(2000):
        m.message_in(f"M{i}")
        m.message_in(f"{i}")
    assert series() == before
    assert value(m, "callguard_sip_messages_in_total", method="other") > 2000 - 600


def test_idle_connections_to_the_endpoint_are_bounded_and_dropped() -> None:
    """An exposed /metrics port: connections that send nothing hold at most max_connections threads
    (the rest are closed at once and counted), each is dropped after the handler's timeout, and a
    scrape works again once they are gone."""
    from callguard.metrics import MetricsHTTPServer

    m = Metrics()
    port = m.start_server("127.0.0.1", 0)
    idle: list[socket.socket] = []
    try:
        threads_before = threading.active_count()
        limit = MetricsHTTPServer.max_connections
        for _ in range(limit + 20):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=30))
        # The first connection refused past the bound reads end-of-file at once.
        closed = None
        for s in reversed(idle):
            s.settimeout(0.2)
            try:
                if s.recv(1) == b"":
                    closed = s
                    break
            except TimeoutError:
                continue
        assert closed is not None, "no connection past the bound was closed"
        assert threading.active_count() <= threads_before + limit
        # One the server kept is dropped once it has sent nothing for the handler's timeout.
        idle[0].settimeout(30)
        assert idle[0].recv(1) == b""
        for s in idle:
            s.close()
        idle.clear()
        deadline = time.monotonic() + 30
        while True:     # the kept connections' threads are leaving; a scrape gets through once one has
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                    body = resp.read().decode()
                break
            except (OSError, http.client.HTTPException):
                if time.monotonic() > deadline:
                    raise
        refused = [line for line in body.splitlines() if line.startswith("callguard_metrics_connections_refused_total")]
        assert refused and float(refused[0].split()[1]) >= 1
    finally:
        for s in idle:
            s.close()
        m.stop_server()
