"""``callguard serve``: run the screening proxy in the foreground.

Start-up: load the config (``--listen`` / ``--trunk`` override it), the lists and the
rate-limit snapshot; start the metrics endpoint and the call-record writer; count again what the
records hold since the snapshot (after a crash, see :mod:`callguard.state`); bind every listener;
log ``listening``.  Signals: SIGHUP reloads config and lists (kept on error),
SIGTERM/SIGINT drain (new INVITEs get 503, in-flight transactions get ``sip.shutdown_grace``
seconds), flush records, write the snapshot and exit 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import signal
import sys
from typing import Any

from .. import config as config_mod
from ..config import Config, Trunk, parse_address
from ..errors import CallguardError, ConfigError, ListsBeingWritten, SipError
from ..log import QueuedStream, get_logger
from ..log import configure as configure_logging
from ..signals import hangups_held, hold_hangups
from ..state import rebuild_rate_state, restore_snapshot, write_snapshot
from .proxy import NullMetrics, NullRecords, Proxy, UnwrittenRecords, frame_stream
from .transport import TcpManager, open_tcp, open_udp

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2
RECORDS_FLUSH_INTERVAL = 1.0    # seconds between two writes of the call records


def _logger() -> Any:
    return get_logger("callguard.serve")


def _configure_logging(cfg: Config, stream: Any = None) -> None:
    configure_logging(cfg.logging.level, cfg.logging.format, stream)


def apply_overrides(cfg: Config, listen: list[str] | None, trunk: str | None) -> Config:
    """``--listen`` replaces ``sip.listen``; ``--trunk`` replaces ``trunks`` with one default trunk.

    Raises:
        ConfigError: an override is not ``udp:HOST:PORT`` / ``tcp:HOST:PORT``.
    """
    if listen:
        for item in listen:
            try:
                parse_address(item)
            except ValueError as exc:
                raise ConfigError("--listen", "", str(exc)) from None
        cfg = dataclasses.replace(cfg, sip=dataclasses.replace(cfg.sip, listen=tuple(listen)))
    if trunk:
        try:
            parse_address(trunk)
        except ValueError as exc:
            raise ConfigError("--trunk", "", str(exc)) from None
        cfg = dataclasses.replace(cfg, trunks=(Trunk(name="trunk", address=trunk),))
    return cfg


def _open_records(cfg: Config, log: Any, metrics: Any) -> Any:
    if not cfg.records.enabled:
        return NullRecords()
    try:
        from ..records import RecordStore
    except ImportError as exc:
        log.error("records_unavailable", error=str(exc))
        return UnwrittenRecords(cfg.records.path, str(exc), metrics, log)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.records.path)), exist_ok=True)
        # One writer transaction per second: each costs a WAL append, a commit and the catalog
        # updates, so bigger batches cost less per record.
        return RecordStore(cfg.records.path, cfg.records.retention_days,
                           partition_minutes=cfg.records.partition_minutes, flush_interval=RECORDS_FLUSH_INTERVAL,
                           on_written=metrics.record_written, on_dropped=metrics.record_dropped)
    except Exception as exc:  # noqa: BLE001 - calls keep flowing without records; said loudly
        log.error("records_failed", path=cfg.records.path, error=str(exc))
        return UnwrittenRecords(cfg.records.path, str(exc), metrics, log)


def _open_metrics(cfg: Config, log: Any) -> Any:
    if not cfg.metrics.enabled:
        return NullMetrics()
    try:
        from ..metrics import Metrics, parse_listen
    except ImportError as exc:
        log.warning("metrics_unavailable", error=str(exc))
        return NullMetrics()
    m = Metrics()
    try:
        host, port = parse_listen(cfg.metrics.listen)
        bound = m.start_server(host, port)
        log.info("metrics_listening", host=host, port=bound)
    except (OSError, ValueError) as exc:
        log.error("metrics_listen_failed", listen=cfg.metrics.listen, error=str(exc))
    return m


class Server:
    """The proxy with its listeners, signals, reload and shutdown."""

    def __init__(self, cfg: Config, guard: Any, config_path: str, listen_override: list[str],
                 trunk_override: str | None, snapshot_time: float | None = None) -> None:
        self.cfg = cfg
        self.guard = guard
        self.config_path = config_path
        self.listen_override = listen_override
        self.trunk_override = trunk_override
        self.log = _logger()
        self.stop_event: asyncio.Event | None = None
        self.reloading = False
        self.reload_again = False      # a SIGHUP came while reloading
        self._reload_task: asyncio.Task[None] | None = None
        self.log_stream: Any = None     # where the proxy writes its batched decision lines (None: stderr)
        self.udp: list[Any] = []
        self.tcp_servers: list[Any] = []
        self.snapshot_time = snapshot_time     # when the restored snapshot was written (None: none)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        self.metrics = _open_metrics(self.cfg, self.log)
        self.records = _open_records(self.cfg, self.log, self.metrics)
        rebuild_rate_state(self.guard, self.records, self.cfg, self.snapshot_time, self.log)
        proxy = self.proxy = Proxy(loop, self.cfg, self.guard, records=self.records, metrics=self.metrics,
                                   log=self.log)
        proxy.log_stream = self.log_stream

        def on_frame_error(conn: Any, exc: SipError) -> None:
            self.metrics.parse_error()
            # The stream cannot be resynchronised: the connection is closed.

        def on_overflow(conn: Any, queued: int) -> None:
            self.metrics.tcp_overflow()
            peer = f"{conn.peer[0]}:{conn.peer[1]}" if conn.peer else None
            self.log.warning("tcp_write_queue_overflow", peer=peer, outgoing=conn.outgoing, queued_bytes=queued,
                             limit=self.cfg.sip.tcp_write_queue_max)

        tcp = TcpManager(loop, proxy.handle, frame_stream, on_frame_error, proxy.on_connect_failed, on_overflow)
        sip = self.cfg.sip
        tcp.configure(sip.max_tcp_connections, sip.max_message_size, sip.tcp_idle_timeout, sip.tcp_partial_timeout,
                      sip.tcp_write_queue_max)
        proxy.tcp = tcp
        try:
            for spec in sip.listen:
                transport, host, port = parse_address(spec)
                if transport == "udp":
                    ep = await open_udp(loop, proxy.handle, host, port)
                    ep.on_unreachable = proxy.on_unreachable
                    self.udp.append(ep)
                    proxy.udp.append(ep)
                else:
                    server, info = await open_tcp(loop, tcp, host, port)
                    self.tcp_servers.append(server)
                    proxy.tcp_infos.append(info)
        except OSError as exc:
            print(f"error: cannot listen on {spec}: {exc.strerror or exc}", file=sys.stderr)
            self._close_listeners()
            self.records.close()
            return EXIT_RUNTIME
        proxy.start()
        udp = self.udp
        self.metrics.watch_udp_send_drops(lambda: sum(getattr(ep, "send_drops", 0) for ep in udp))
        listeners = [ep.listener.spec() for ep in self.udp] + [i.spec() for i in proxy.tcp_infos]
        self.log.info("listening", listeners=listeners, trunks=[t.address for t in self.cfg.trunks],
                      implementation=getattr(self.guard, "implementation", None) or _implementation())
        for t in proxy.trunks:
            self.metrics.trunk_state(t.name, t.up)
        for sig, fn in ((signal.SIGHUP, self._on_hup), (signal.SIGTERM, self._on_term), (signal.SIGINT, self._on_term)):
            try:
                loop.add_signal_handler(sig, fn)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests)
                pass
        if hangups_held():
            self.log.info("reload_after_start", reason="SIGHUP while starting")
            self._on_hup()
        await self.stop_event.wait()
        task = self._reload_task
        if task is not None and not task.done():
            # Stopping outweighs a reload under way; left pending, the task was reported on stderr
            # ("Task was destroyed but it is pending") outside the JSON log.
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                self.log.info("reload_abandoned", reason="stopping")
        await self._drain()
        return EXIT_OK

    # ------------------------------------------------------------ signals
    def _on_hup(self) -> None:
        if self.reloading:
            # The files may have changed again since the running reload read them: read them once
            # more when it is done (however many SIGHUPs come meanwhile), never drop the request.
            self.reload_again = True
            self.log.info("reload_queued")
            return
        self.reloading = True
        self._reload_task = asyncio.get_running_loop().create_task(self._reload_while_asked())

    async def _reload_while_asked(self) -> None:
        try:
            while True:
                self.reload_again = False
                await self.reload()
                if not self.reload_again:
                    return
        finally:
            self.reloading = False

    def _on_term(self) -> None:
        if self.stop_event is not None and not self.stop_event.is_set():
            self.log.info("stopping", in_flight=self.proxy.in_flight)
            self.proxy.draining = True
            self.stop_event.set()

    async def reload(self) -> bool:
        """Re-read config and lists in a worker thread, then swap them in between two messages.

        A list file that changes while it is read (written in place, not renamed into place) is
        read again after a second, up to RELOAD_TRIES times; the old lists stay meanwhile.
        """
        loop = asyncio.get_running_loop()
        try:
            from ..guard import RELOAD_RETRY_REASON, RELOAD_TRIES, Guard, load_lists_settled

            def build(wait: bool) -> tuple[Config, Any, list[Any]]:
                cfg = config_mod.load(self.config_path)
                cfg = apply_overrides(cfg, self.listen_override, self.trunk_override)
                lists = load_lists_settled(cfg, wait)
                guard = Guard(cfg, lists, implementation=getattr(self.guard, "implementation", None))
                return cfg, guard, self.proxy.trunk_states(cfg)   # names resolved here, off the loop

            for attempt in range(1, RELOAD_TRIES + 1):
                try:
                    cfg, new_guard, trunks = await loop.run_in_executor(None, build, attempt < RELOAD_TRIES)
                    break
                except ListsBeingWritten:
                    if attempt == RELOAD_TRIES:
                        raise
                    self.log.warning("reload_retry", config=self.config_path, attempt=attempt,
                                     reason=RELOAD_RETRY_REASON)
                    await asyncio.sleep(1.0)
            # Adopting the rate-limit state happens here, on the loop thread, so no attempt is lost.
            new_guard.core.adopt_state(self.guard.core)
            old = self.cfg
            self.proxy.apply_config(cfg, new_guard, trunks)
            self.proxy.start()
            self.guard = new_guard
            self.cfg = cfg
            if cfg.sip.listen != old.sip.listen:
                self.log.warning("reload_listeners_changed", old=list(old.sip.listen), new=list(cfg.sip.listen),
                                 note="listeners are not rebound; restart to apply")
            if cfg.records != old.records or cfg.metrics != old.metrics or cfg.logging != old.logging:
                self.log.warning("reload_restart_needed", note="records, metrics and logging settings apply "
                                 "after a restart")
            for p in new_guard.problems[:20]:
                self.log.warning("list_row_skipped", problem=str(p))
            lists = new_guard.lists
            self.log.info("reloaded", config=self.config_path, trunks=[t.address for t in cfg.trunks],
                          blocklist=len(lists.blocklist), filings=len(lists.filings), allowlist=len(lists.allowlist),
                          broken_rows=len(lists.problems))
            return True
        except (CallguardError, OSError, ValueError) as exc:
            self.log.error("reload_failed", config=self.config_path, error=str(exc))
            return False
        except Exception as exc:  # noqa: BLE001 - a reload must never take the proxy down
            self.log.error("reload_failed", config=self.config_path, error=repr(exc))
            return False

    # ------------------------------------------------------------ shutdown
    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.sip.shutdown_grace
        while self.proxy.in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.proxy.stop_timers()
        self._close_listeners()
        if self.proxy.tcp is not None:
            self.proxy.tcp.close_all()
        try:
            await loop.run_in_executor(None, self.records.close)
        except Exception as exc:  # noqa: BLE001 - keep going: the snapshot still matters
            self.log.error("records_close_failed", error=repr(exc))
        state = self.cfg.records.state_path
        if state:
            try:
                write_snapshot(state, self.guard)
                self.log.info("snapshot_written", path=state)
            except Exception as exc:  # noqa: BLE001
                self.log.error("snapshot_failed", path=state, error=repr(exc))
        stop_metrics = getattr(self.metrics, "stop_server", None)
        if stop_metrics is not None:
            stop_metrics()
        self.log.info("stopped", unfinished=self.proxy.in_flight)

    def _close_listeners(self) -> None:
        for ep in self.udp:
            ep.close()
        for s in self.tcp_servers:
            s.close()


def _implementation() -> str:
    try:
        from ..guard import IMPLEMENTATION

        return str(IMPLEMENTATION)
    except ImportError:  # pragma: no cover
        return "unknown"


def _new_loop() -> asyncio.AbstractEventLoop:
    if not os.environ.get("CALLGUARD_NO_UVLOOP"):
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            pass
    return asyncio.new_event_loop()


def tune_gc() -> None:
    """Fewer garbage-collector passes for a long-running proxy.

    The lists and the config (large, never freed) move to the permanent generation, and the
    young generation is collected after 10,000 allocations instead of 700: at 10k calls/s the
    default thresholds spent a few microseconds per call walking transaction tuples that live
    for the whole transaction linger.  ``CALLGUARD_DEFAULT_GC=1`` keeps Python's defaults.
    """
    # The records writer thread holds the GIL while it turns a batch into insert parameters: the
    # loop thread takes it back after 0.5 ms instead of 5 ms, which bounds the stall of an answer.
    sys.setswitchinterval(0.0005)
    if os.environ.get("CALLGUARD_DEFAULT_GC"):
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 20)


def serve_main(args: Any) -> int:
    """Entry point of ``callguard serve`` (args: ``config``, ``listen``, ``trunk``); returns the exit code."""
    from ..guard import Guard

    listen = list(getattr(args, "listen", None) or [])
    trunk = getattr(args, "trunk", None)
    path = args.config or config_mod.default_config_path()
    log_stream: QueuedStream | None = None
    hold_hangups()
    try:
        cfg = apply_overrides(config_mod.load(path), listen, trunk)
        # Logs leave through a thread of their own: a stalled reader of stderr never stalls calls.
        log_stream = QueuedStream(sys.stderr)
        _configure_logging(cfg, log_stream)
        guard = Guard(cfg)
    except CallguardError as exc:
        if log_stream is not None:
            log_stream.close()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return _serve(cfg, guard, path, listen, trunk, log_stream)
    finally:
        log_stream.close()


def _serve(cfg: Config, guard: Any, path: str, listen: list[str], trunk: str | None,
           log_stream: QueuedStream) -> int:
    log = _logger()
    for p in guard.problems[:20]:
        log.warning("list_row_skipped", problem=str(p))
    snapshot_time = restore_snapshot(guard, cfg.records.state_path, log)
    server = Server(cfg, guard, path, listen, trunk, snapshot_time)
    server.log_stream = log_stream
    tune_gc()
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(server.run())
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
