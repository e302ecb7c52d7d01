"""structlog set-up: one JSON object per line on stderr (or human-readable console output).

A filtering bound logger is used so calls below the configured level cost almost
nothing, and loggers are cached on first use (structlog's performance advice).
"""

from __future__ import annotations

import logging
import sys
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
