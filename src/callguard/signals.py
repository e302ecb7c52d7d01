"""SIGHUP before a process is ready for it: remembered, not fatal.

``callguard serve`` and the decider set their SIGHUP handlers once they are up, after the lists
are loaded (seconds for millions of entries).  Until then SIGHUP had its default action, which
ends the process: a reload or logrotate hook that fired during a start took the proxy down
(exit 129).  :func:`hold_hangups` at the very start remembers one instead, and the process
reloads once it is up if :func:`hangups_held` says one came.
"""

from __future__ import annotations

import signal

_held_hangups: list[int] = []


def hold_hangups() -> None:
    """Until the loop's own handler is set, a SIGHUP is remembered, not fatal.

    Its default action ends the process: a reload or logrotate hook that fired while the lists
    were still loading (seconds for millions of entries) took the proxy down, exit 129.  The
    files are read again once the proxy is up (``hangups_held``).
    """
    _held_hangups.clear()
    try:
        signal.signal(signal.SIGHUP, lambda signum, frame: _held_hangups.append(signum))
    except ValueError:      # not the main thread
        pass


def hangups_held() -> bool:
    """Whether a SIGHUP came while starting (and forget it)."""
    held = bool(_held_hangups)
    _held_hangups.clear()
    return held
