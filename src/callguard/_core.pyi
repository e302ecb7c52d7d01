"""Compiled decision core (``_core.pyx``): the fast twin of :mod:`callguard._corepy`.

``_corepy.CorePy`` and :mod:`callguard.numbers` are the specification: for the same settings,
lists and calls, :class:`Core` gives the same verdicts bit for bit (scores are doubles added
in the same order).  ``CALLGUARD_NO_EXTENSIONS=1`` selects the pure-Python twin instead.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .lists import Blocklist, Lists, RowProblem
from .settings import EngineSettings

class Verdict:
    """The decision on one call (read-only)."""

    verdict: str
    """``"allow"`` or ``"reject"``."""
    code: int
    """SIP response code of a rejection; 0 when allowed."""
    rule: str
    """Rule id that decided (``"allow"`` when none fired)."""
    reason: str
    """Reason phrase of the rule."""
    detail: str
    """Extra detail: blocklist source and reason, rate-limit name, source name."""
    score: float
    """Risk score in [0, 1]."""
    caller: str
    """Normalised caller digits ("" when hidden)."""
    callee: str
    """Normalised callee digits ("" when hidden)."""
    caller_kind: str
    """Kind of the caller number (``numbers.KIND_NAMES``)."""
    source: str
    """Name of the source the call came from ("" when untrusted or offline)."""
    shadowed: tuple[str, ...]
    """Rules in shadow mode that would have fired, in decision order."""
    features: tuple[tuple[str, float], ...]
    """Score contributions above zero, in ``settings.FEATURES`` order."""

    def __init__(self, verdict: str, code: int, rule: str, reason: str, detail: str, score: float, caller: str,
                 callee: str, caller_kind: str, source: str, shadowed: tuple[str, ...],
                 features: tuple[tuple[str, float], ...]) -> None: ...
    def as_dict(self) -> dict[str, Any]:
        """All twelve fields, in the twin's ``__slots__`` order."""
    def __repr__(self) -> str: ...

class KeyIndex:
    """Open-addressing hash index over a sorted uint64 key array (key -> first index of its run)."""

class State:
    """Rate-limit state: per key kind (caller, source, customer) a table of tracks in C memory."""

class Core:
    """Decision core.

    Args:
        settings: the compiled config (:func:`callguard.settings.compile_settings`).
        lists: the loaded lists; the arrays are indexed in place, not copied.
    """

    settings: EngineSettings
    lists: Lists

    def __init__(self, settings: EngineSettings, lists: Lists) -> None: ...
    def set_lists(self, lists: Lists) -> None:
        """Swap the lists (a reload); rate-limit state is kept."""
    def adopt_state(self, other: Core) -> None:
        """Take over (share) another core's rate-limit state (config reload)."""
    def source_index(self, address: str | None) -> int:
        """Index of the source ``address`` belongs to; -1 untrusted, -2 none given (offline)."""
    def check(self, caller: str, callee: str, source: str | None, now: float) -> Verdict:
        """Decide on one call and count it as an attempt (SPEC §3).

        Raises:
            TypeError: caller or callee is not a str.
            OverflowError: ``now`` is not a usable time.
        """
    def check_batch(self, callers: Sequence[str], callees: Sequence[str], sources: Sequence[str | None],
                    times: npt.ArrayLike) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.uint8],
                                                  npt.NDArray[np.float64]]:
        """Decide a batch in order, like repeated :meth:`check`.

        Returns:
            (codes int16, rule indexes into ``RULE_NAMES`` uint8, scores float64).
        """
    def observe(self, caller: str, answered: bool, duration: float, source: str | None, now: float) -> None:
        """Feed the outcome of a finished call (answered? how long?) into the caller's score."""
    def note_attempt(self, caller: str, callee: str, source: str | None, now: float) -> bool:
        """Count one attempt in the rate-limit windows as ``check`` would, without deciding; False
        when ``check`` would not count it (untrusted source, hidden caller ID)."""
    def note_outcome(self, caller: str, answered: bool, duration: float, now: float) -> bool:
        """``observe`` for a normalised caller, as a verdict gives it; False when it is no number."""
    def tracked(self) -> tuple[int, int, int]:
        """Keys held per kind (caller, source, customer)."""
    def snapshot(self) -> dict[str, Any]:
        """Rate-limit state as plain data (the twin's format, version 1)."""
    def restore(self, data: dict[str, Any]) -> None:
        """Replace the rate-limit state by a snapshot.

        Raises:
            ValueError: unknown snapshot version or a key out of range.
        """

class BlocklistReader:
    """One run of the compiled blocklist loader (use :func:`load_blocklist`)."""

    def run(self, path: str, strict: bool, tz: dt.tzinfo, row_parser: Any) -> tuple[Blocklist,
                                                                                    list[RowProblem]] | None: ...

def normalize(raw: str, default_area: str = "") -> tuple[int, str, str]:
    """``numbers.normalize`` computed by the C code, as (kind, digits, area); for tests."""

def load_blocklist(path: str, strict: bool = False,
                   tz: dt.tzinfo | None = None) -> tuple[Blocklist, list[RowProblem]] | None:
    """Load a blocklist CSV like ``lists.load_blocklist_py``: same arrays, same problems.

    Returns:
        ``(blocklist, problems)``, or ``None`` when the file uses a CSV feature left to the Python
        reader (a quoted field across lines, bare CR line ends, invalid UTF-8, an unusual header)
        or cannot be opened; the caller then runs the Python loader, which also reports the error.

    Raises:
        ListError: strict mode and a broken row.
    """
