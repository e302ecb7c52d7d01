"""Names of our threads as the operating system shows them (``top -H``, ``ps -L``, /proc).

Python 3.11 names its threads only for Python: every thread of ``callguard serve`` shows as
``python`` in the system's tools.  Naming the records writer and the list loader lets an operator
tell at a glance which thread burns the CPU.  Linux only; elsewhere nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_PR_SET_NAME = 15
_libc: ctypes.CDLL | None = None


def set_os_thread_name(name: str) -> bool:
    """Name the calling thread (at most 15 bytes are kept); True if the system took it."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return int(_libc.prctl(_PR_SET_NAME, name.encode("utf-8", "replace")[:15], 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False
