"""The one exception hierarchy of callguard.

Every error callguard raises on purpose derives from :class:`CallguardError`, so
callers (the CLI, the proxy, the Kamailio plug-in) can catch one type and tell an
operator's mistake from a bug.
"""

from __future__ import annotations


class CallguardError(Exception):
    """Root of every error callguard raises on purpose."""


class ConfigError(CallguardError):
    """An invalid configuration: names the file, the key and what is wrong."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}")


class ListError(CallguardError):
    """A list file that cannot be used at all (missing, unreadable, no header).

    A single broken row is not a ListError: it is reported as a :class:`RowProblem`
    and skipped, unless the list is loaded in strict mode.
    """

    def __init__(self, file: str, line: int, problem: str) -> None:
        self.file = file
        self.line = line
        self.problem = problem
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {problem}")


class ListsBeingWritten(CallguardError):
    """A list file changed while it was read, or its last line is not finished: a writer is not
    done with it (a reload reads it again a second later, see ``guard.load_lists_settled``)."""

    def __init__(self) -> None:
        super().__init__("a list file kept changing while it was read; write lists to a temporary file "
                         "and rename it into place")


class InputError(CallguardError):
    """Bad input on the command line or in a call log (not the config)."""


class SipError(CallguardError):
    """A SIP message that cannot be handled; knows the response it deserves.

    ``code`` is the SIP status to answer with (400, 505, 501, 416, 420, 483, ...)
    or 0 when the message must be dropped silently (e.g. a malformed response).
    """

    def __init__(self, code: int, reason: str, detail: str = "") -> None:
        self.code = code
        self.reason = reason
        self.detail = detail
        super().__init__(f"{code} {reason}" + (f": {detail}" if detail else ""))
