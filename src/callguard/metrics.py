"""Prometheus metrics of callguard.

Each :class:`Metrics` owns its own ``CollectorRegistry`` (not the process-global one), so a
proxy, a test and a benchmark can each have theirs in one process.

The families counted on every call -- decisions, messages in and out, decision latency --
are collectors of our own (:class:`LabelledCounter`, :class:`LatencyHistogram`): an
increment is a dict update under one lock, and a batch of the compiled fast path is added at
once; the rest are prometheus-client's own.  Label values from the network are folded into a
fixed set (unknown methods count as ``other``) so a hostile peer cannot grow the number of series.

Families (all prefixed ``callguard_``):

=========================================  =======================================================
``decisions_total{rule}``                  decisions by rule id (``allow`` when nothing fired)
``decision_latency_seconds``               histogram of the core's decision time (µs-scale buckets)
``sip_messages_in_total{method}``          SIP messages received: requests by method, responses by
                                           status class ``1xx`` … ``6xx``
``sip_messages_out_total{method}``         SIP messages sent, labelled the same way
``sip_parse_errors_total``                 messages that could not be parsed
``trunk_up{trunk}``                        1 while the trunk answers, 0 while it is marked down
``records_written_total``                  call records stored
``records_dropped_total``                  call records lost (queue full or write failure)
``overload_rejections_total``              INVITEs answered 503 because too many were in flight
``internal_faults_total``                  internal faults that failed open (the call passed)
``metrics_connections_refused_total``      connections to this endpoint closed at once (too many open)
=========================================  =======================================================
"""

from __future__ import annotations

import bisect
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from .config import RULE_IDS

#: Label values of ``method`` for requests; anything else is counted as ``other``.
SIP_METHODS: tuple[str, ...] = ("INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "UPDATE",
                                "INFO", "SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE", "PUBLISH")
#: Label values of ``method`` for responses: the status class.
RESPONSE_CLASSES: tuple[str, ...] = ("1xx", "2xx", "3xx", "4xx", "5xx", "6xx")
OTHER = "other"

#: Decision latency buckets in seconds: 1 µs … 100 ms, dense where the core lives (1-100 µs).
LATENCY_BUCKETS: tuple[float, ...] = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3,
                                      1e-2, 1e-1, float("inf"))

_RULES: tuple[str, ...] = RULE_IDS + ("allow",)


def method_label(method: str | int) -> str:
    """The ``method`` label for a request method or a response status.

    Requests keep their method (unknown ones become ``other``); a response is given as its
    status code (``200`` or ``"200"``) or class (``"2xx"``) and is labelled by its class.
    """
    if isinstance(method, int):
        return f"{method // 100}xx" if 100 <= method <= 699 else OTHER
    if len(method) == 3 and method[0] in "123456":
        if method[1:] == "xx":
            return method
        if method.isdigit():
            return method[0] + "xx"
    up = method.upper()
    return up if up in SIP_METHODS else OTHER


class LatencyHistogram:
    """A histogram with fixed buckets that also takes whole batches of observations.

    prometheus-client's ``Histogram`` costs a lock and a bucket search per observation; the
    compiled fast path already sorts a batch's decision times into these buckets, so the batch
    is added here at once (:meth:`add_locked`, one lock per batch).  Exposed as an ordinary
    histogram family.
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float],
                 lock: threading.Lock | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds: tuple[float, ...] = tuple(buckets)
        if not self.bounds or self.bounds[-1] != float("inf"):
            self.bounds += (float("inf"),)
        self.counts = [0] * len(self.bounds)      # per bucket, not cumulative
        self.sum = 0.0
        self._lock = lock or threading.Lock()

    def observe(self, amount: float) -> None:
        """One observation (seconds)."""
        i = bisect.bisect_left(self.bounds, amount)
        with self._lock:
            self.counts[min(i, len(self.counts) - 1)] += 1
            self.sum += amount

    def add_locked(self, counts: Sequence[int], total: float) -> None:
        """A batch, for a caller holding the histogram's lock (``Metrics.fast_batch`` does): ``counts[i]``
        observations fell in bucket ``i`` (``value <= bounds[i]``, first such bucket), ``total`` their sum."""
        if len(counts) != len(self.counts):
            raise ValueError(f"expected {len(self.counts)} bucket counts, got {len(counts)}")
        mine = self.counts
        for i, n in enumerate(counts):
            if n:
                mine[i] += n
        self.sum += total

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts = list(self.counts)
            total = self.sum
        cumulative = []
        running = 0
        for bound, n in zip(self.bounds, counts, strict=True):
            running += n
            cumulative.append(("+Inf" if bound == float("inf") else _float_label(bound), running))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=cumulative, sum_value=total)

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation)


class LabelledCounter:
    """A counter family with one label, its children plain numbers behind one lock.

    prometheus-client's ``Counter`` child costs a chain of Python calls and a lock per increment;
    the proxy counts messages and decisions once per batch, several families each time, so its
    hot families are these: an increment is one dict update under the lock.
    """

    def __init__(self, name: str, documentation: str, label: str, values: Sequence[str] = (),
                 lock: threading.Lock | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.counts: dict[str, float] = dict.fromkeys(values, 0)
        self._lock = lock or threading.Lock()

    def inc(self, value: str, n: float = 1) -> None:
        """Add ``n`` (>= 0) to the child labelled ``value``."""
        if n < 0:
            raise ValueError("counters only go up")
        with self._lock:
            self.counts[value] = self.counts.get(value, 0) + n

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            items = list(self.counts.items())
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, n in items:
            family.add_metric([value], float(n))
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=[self.label])


def _float_label(value: float) -> str:
    # prometheus-client's own spelling of bucket bounds ("1e-05", "0.0001", "2.5e-06")
    return repr(float(value))


class Metrics:
    """The metric families of one proxy (or test), in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        labels = SIP_METHODS + RESPONSE_CLASSES + (OTHER,)
        # One lock for the families counted on every call, so a batch takes it once.
        self._hot = threading.Lock()
        self._decisions = LabelledCounter("callguard_decisions_total", "Decisions by rule id (allow: nothing fired)",
                                          "rule", _RULES, self._hot)
        reg.register(self._decisions)
        self._latency = LatencyHistogram("callguard_decision_latency_seconds", "Time the core took for one decision",
                                         LATENCY_BUCKETS, self._hot)
        reg.register(self._latency)
        self._msg_in = LabelledCounter("callguard_sip_messages_in_total",
                                       "SIP messages received: requests by method, responses by status class",
                                       "method", labels, self._hot)
        self._msg_out = LabelledCounter("callguard_sip_messages_out_total",
                                        "SIP messages sent: requests by method, responses by status class",
                                        "method", labels, self._hot)
        reg.register(self._msg_in)
        reg.register(self._msg_out)
        self._parse_errors = Counter("callguard_sip_parse_errors_total", "SIP messages that could not be parsed",
                                     registry=reg)
        self._trunk_up = Gauge("callguard_trunk_up", "1 while the trunk answers, 0 while it is marked down",
                               ["trunk"], registry=reg)
        self._written = Counter("callguard_records_written_total", "Call records stored", registry=reg)
        self._dropped = Counter("callguard_records_dropped_total",
                                "Call records lost (queue full or failed write)", registry=reg)
        self._overload = Counter("callguard_overload_rejections_total",
                                 "INVITEs answered 503 because too many transactions were in flight", registry=reg)
        self._faults = Counter("callguard_internal_faults_total",
                               "Internal faults that failed open (the call passed)", registry=reg)
        self._tcp_overflows = Counter("callguard_tcp_write_overflows_total",
                                      "TCP connections aborted because the peer left more than "
                                      "sip.tcp_write_queue_max bytes unread", registry=reg)
        # Label of each method or status seen (statuses are remembered: at most 600 of them).
        self._method_labels: dict[str | int, str] = {m: m for m in labels}
        self._trunks: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._server: Any = None
        self._server_thread: threading.Thread | None = None
        self._refused_before = 0     # by the endpoint's earlier servers (stop_server, start_server)
        reg.register(_CallbackCounter("callguard_metrics_connections_refused_total",
                                      f"Connections to this endpoint closed at once: "
                                      f"{MetricsHTTPServer.max_connections} were open",
                                      self._metrics_refused))

    # ------------------------------------------------------------ per call
    def decision(self, rule: str, latency_seconds: float) -> None:
        """Count one decision of ``rule`` and observe how long the core took."""
        self._decisions.inc(rule)
        self._latency.observe(latency_seconds)

    def message_in(self, method: str | int, n: int = 1) -> None:
        """Count ``n`` received messages: a request method, or a response status / class (``2xx``)."""
        label = self._method_labels.get(method)
        self._msg_in.inc(label if label is not None else self._label_of(method), n)

    def message_out(self, method: str | int, n: int = 1) -> None:
        """Count ``n`` sent messages, labelled like :meth:`message_in`."""
        label = self._method_labels.get(method)
        self._msg_out.inc(label if label is not None else self._label_of(method), n)

    def fast_batch(self, invites: int, acks: int, out: Sequence[tuple[int, int]], by_rule: Sequence[tuple[str, int]],
                   latency_counts: Sequence[int], latency_sum: float) -> None:
        """What one batch of the compiled fast path counted (``FastPath.take_counts``), under one lock:
        INVITEs and ACKs received, responses sent by status, decisions by rule and their times by
        latency bucket with their sum."""
        if len(latency_counts) != len(LATENCY_BUCKETS):     # checked before anything is counted
            raise ValueError(f"expected {len(LATENCY_BUCKETS)} bucket counts, got {len(latency_counts)}")
        labels = self._method_labels
        out_labels = [(labels.get(code) or self._label_of(code), n) for code, n in out]
        with self._hot:
            received = self._msg_in.counts
            received["INVITE"] += invites
            received["ACK"] += acks
            sent = self._msg_out.counts
            for label, n in out_labels:
                sent[label] = sent.get(label, 0) + n
            decided = self._decisions.counts
            # Rule ids come from the core, not the network, so the set of labels stays small.
            for rule, n in by_rule:
                decided[rule] = decided.get(rule, 0) + n
            self._latency.add_locked(latency_counts, latency_sum)

    def _label_of(self, method: str | int) -> str:
        label = method_label(method)
        if isinstance(method, int) and 100 <= method <= 699:
            self._method_labels[method] = label   # at most 600 status codes: safe to remember
        return label

    def parse_error(self) -> None:
        """Count a message that could not be parsed."""
        self._parse_errors.inc()

    def trunk_state(self, name: str, up: bool) -> None:
        """Set whether trunk ``name`` is up."""
        child = self._trunks.get(name)
        if child is None:
            with self._lock:
                child = self._trunks.setdefault(name, self._trunk_up.labels(name))
        child.set(1 if up else 0)

    def record_written(self, n: int = 1) -> None:
        """Count ``n`` stored call records (``RecordStore(on_written=...)`` calls this per batch)."""
        self._written.inc(n)

    def record_dropped(self, n: int = 1) -> None:
        """Count ``n`` lost call records (``RecordStore(on_dropped=...)``)."""
        self._dropped.inc(n)

    def overload(self) -> None:
        """Count an INVITE rejected with 503 for overload."""
        self._overload.inc()

    def fault(self) -> None:
        """Count an internal fault that failed open."""
        self._faults.inc()

    def tcp_overflow(self) -> None:
        """Count a TCP connection aborted because its peer did not read what it was sent."""
        self._tcp_overflows.inc()

    def watch_udp_send_drops(self, read: Callable[[], int]) -> None:
        """Export ``read()`` as ``callguard_udp_send_drops_total``, read at each scrape.

        The listeners count datagrams the kernel would not take (a full socket buffer, an
        unreachable address) on the SIP thread; reading the count when scraped keeps the metric
        off the hot path.
        """
        self.registry.register(_CallbackCounter("callguard_udp_send_drops_total",
                                                "UDP datagrams the kernel refused to send (full buffer, bad address)",
                                                read))

    # ------------------------------------------------------------ exposition
    def render(self) -> bytes:
        """The Prometheus text exposition of every family."""
        return generate_latest(self.registry)

    def start_server(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP from a daemon thread; returns the bound port (0: a free one).

        Only one server per :class:`Metrics`; a second call returns the port already bound.
        """
        with self._lock:
            if self._server is not None:
                return int(self._server.server_port)
            server = MetricsHTTPServer(host, port)
            server.set_app(make_wsgi_app(self.registry))
            thread = threading.Thread(target=server.serve_forever, name="cg-metrics", daemon=True)
            thread.start()
            self._server, self._server_thread = server, thread
            return int(server.server_port)

    def _metrics_refused(self) -> int:
        server = self._server
        return self._refused_before + (server.refused if server is not None else 0)

    def stop_server(self) -> None:
        """Stop the HTTP server started by :meth:`start_server`, if any."""
        with self._lock:
            server, thread = self._server, self._server_thread
            self._server = self._server_thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
            self._refused_before += server.refused
            if thread is not None:
                thread.join(timeout=5.0)


class _QuietHandler(WSGIRequestHandler):
    # A client that sends nothing for this long is dropped (the socket timeout of each read):
    # without it an idle connection held its thread for ever.
    timeout = 5.0

    def log_message(self, format: str, *args: Any) -> None:   # noqa: A002 - the stdlib's name
        pass    # one stderr line per scrape is noise; the proxy logs through structlog


class MetricsHTTPServer(socketserver.ThreadingMixIn, WSGIServer):
    """The ``/metrics`` endpoint: a thread per connection, as prometheus-client's own server, but
    at most ``max_connections`` at once and none idle for more than ``_QuietHandler.timeout``.

    prometheus-client's ``start_http_server`` starts a thread for every connection and lets it
    wait for a request for ever: 500 idle connections to the port were 500 threads, each taking
    the interpreter lock from the SIP loop when it woke.  Past the bound a connection is closed at
    once and counted (``callguard_metrics_connections_refused_total``); a scraper opens one at a
    time.
    """

    daemon_threads = True
    max_connections = 64
    request_queue_size = 128     # the listen backlog (socketserver's 5 left connecting clients retrying SYNs)

    def __init__(self, host: str, port: int) -> None:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
        self.address_family = family
        self.refused = 0
        self.client_errors = 0      # clients that timed out or went away mid-request
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().__init__(addr, _QuietHandler)    # type: ignore[arg-type]  # an AF_INET/AF_INET6 address

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)   # starts the connection's thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr for each client that timed out or went away
        # mid-request: on an exposed port that is whoever cares to, as often as they care to.
        self.client_errors += 1


class _CallbackCounter:
    """A counter whose value a callback reads at scrape time."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self.name = name
        self.documentation = documentation
        self.read = read

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name.removesuffix("_total"), self.documentation)

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name.removesuffix("_total"), self.documentation, value=self.read())


def parse_listen(text: str) -> tuple[str, int]:
    """Split the ``metrics.listen`` option (``HOST:PORT``, ``[::1]:PORT``) into host and port.

    Raises:
        ValueError: not HOST:PORT or the port is out of range.
    """
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT (got {text!r})")
    port = int(port_text)
    if not 0 <= port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return host.strip("[]"), port
