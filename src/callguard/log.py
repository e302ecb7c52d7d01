"""structlog set-up: one JSON object per line on stderr (or human-readable console output).

A filtering bound logger is used so calls below the configured level cost almost
nothing, and loggers are cached on first use (structlog's performance advice).
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import sys
import threading
import time
from typing import Any

import structlog
from structlog._config import BoundLoggerLazyProxy

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", fmt: str = "json", stream: Any = None) -> None:
    """Configure structlog for the whole process.

    Args:
        level: debug, info, warning or error.
        fmt: ``json`` (one object per line) or ``console``.
        stream: where to write; stderr by default (stdout is left to command output).
    """
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str = "callguard") -> Any:
    """A structlog logger carrying ``logger=name``.

    The logger is a lazy proxy: binding happens on first use, so a module-level
    logger created at import time still renders as :func:`configure` later sets up.
    """
    # ``logger`` is also wrap_logger()'s own parameter name, so the initial value goes
    # through the lazy proxy's initial_values rather than as a keyword.
    return BoundLoggerLazyProxy(None, initial_values={"logger": name}, logger_factory_args=())


class QueuedStream:
    """A write-only text stream whose writes a thread of its own carries to ``target``.

    ``callguard serve`` logs through one: a reader of its stderr that stalls (a full pipe, a
    terminal over a slow link, a throttling journal) must not stall the SIP loop that wrote the
    line.  At most ``max_pending`` characters wait; past that, writes are dropped and counted, and
    once the target takes lines again a ``log_lines_dropped`` line says how many were lost.  The
    call records, not the log, are the record of every decision, so losing log lines under such a
    stall is the lesser harm.  :meth:`close` writes out what is pending (serve calls it on exit).
    """

    def __init__(self, target: Any, max_pending: int = 8 * 1024 * 1024) -> None:
        self.target = target
        self.max_pending = max_pending
        self.pending = 0                  # characters queued, not yet written
        self.dropped = 0                  # lines (or writes without a newline) dropped
        self._queue: collections.deque[str] = collections.deque()
        self._cv = threading.Condition(threading.Lock())
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="cg-log", daemon=True)
        self._thread.start()

    def write(self, text: str) -> int:
        n = len(text)
        with self._cv:
            if self._closed or self.pending + n > self.max_pending:
                self.dropped += text.count("\n") or 1
                return n
            self._queue.append(text)
            self.pending += n
            self._cv.notify()
        return n

    def flush(self) -> None:
        """Nothing: the writer thread flushes after every write it makes."""

    def _run(self) -> None:
        from .osthread import set_os_thread_name

        set_os_thread_name("cg-log")
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                items = list(self._queue)
                self._queue.clear()
                dropped, self.dropped = self.dropped, 0
            data = "".join(items)
            if dropped:
                data = json.dumps({"logger": "callguard.log", "count": dropped, "event": "log_lines_dropped",
                                   "level": "warning", "timestamp": _utc_now()}) + "\n" + data
            try:
                self.target.write(data)
                self.target.flush()
            except (OSError, ValueError):     # a closed log sink: the lines are gone, the proxy goes on
                pass
            with self._cv:
                self.pending -= sum(len(x) for x in items)
                self._cv.notify_all()

    def drained(self, timeout: float) -> bool:
        """Wait until everything written so far has gone to the target; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write out what is pending (for at most ``timeout`` seconds) and stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)


def _utc_now() -> str:
    """Now as structlog's ``TimeStamper(fmt="iso", utc=True)`` writes it, like the lines around it."""
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
