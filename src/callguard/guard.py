"""The public decision API (SPEC §7): :class:`Guard`."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import config as config_mod
from . import lists as lists_mod
from ._corepy import CorePy
from .config import Config
from .errors import ListsBeingWritten
from .lists import Lists
from .log import get_logger
from .settings import RULE_NAMES, compile_settings

NO_EXTENSIONS = bool(os.environ.get("CALLGUARD_NO_EXTENSIONS"))

if NO_EXTENSIONS:
    from ._corepy import CorePy as Core
    from ._corepy import Verdict
else:
    try:
        from ._core import Core, Verdict  # type: ignore[assignment]
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ImportError(f"callguard's compiled core is missing ({exc}); reinstall with `pip install .` "
                          "or set CALLGUARD_NO_EXTENSIONS=1 for the pure-Python core") from exc

IMPLEMENTATION = "python" if NO_EXTENSIONS else "cython"


def load_lists(cfg: Config, strict: bool | None = None) -> Lists:
    """Load the lists a config names (with its allowlist numbers)."""
    return lists_mod.load_lists(cfg.lists.blocklist, cfg.lists.service_numbers, cfg.lists.allowlist,
                                extra_allow=cfg.allowlist_numbers,
                                strict=cfg.lists.strict if strict is None else strict,
                                tz=lists_mod.parse_tz(cfg.lists.timezone))


RELOAD_TRIES = 5    # reads of lists still being written before a reload gives up (a second apart)
RELOAD_RETRY_REASON = "a list file is being written (it changed while read, or its last line is not finished)"


def _list_paths(cfg: Config) -> tuple[str, ...]:
    return tuple(p for p in (cfg.lists.blocklist, cfg.lists.service_numbers, cfg.lists.allowlist) if p)


def lists_being_written(cfg: Config) -> bool:
    """Whether a list file of ``cfg`` does not end its last line: most likely a writer is not done."""
    return any(lists_mod.unfinished_file(p) for p in _list_paths(cfg))


def load_lists_settled(cfg: Config, wait: bool) -> Lists:
    """load_lists for a reload: raises ListsBeingWritten when a file changed while it was read,
    or (``wait``) when one does not end its last line yet -- a reload that swapped such a file in
    took half a blocklist, bans lost.  The last try passes ``wait=False``, as a start would."""
    paths = _list_paths(cfg)
    before = lists_mod.file_stamp(*paths)
    if wait and lists_being_written(cfg):
        raise ListsBeingWritten()
    lists = load_lists(cfg)
    if lists_mod.file_stamp(*paths) != before:
        raise ListsBeingWritten()
    return lists


def _fail_open(caller: str, callee: str, source: str | None) -> Any:
    """The verdict for a call whose decision raised: let it through (safety first)."""
    return Verdict("allow", 0, "allow", "internal fault: failed open", "internal fault", 0.0, str(caller),
                   str(callee), "hidden", "", (), ())


class Guard:
    """Screens calls: one :meth:`check` per call setup.

    Example:
        >>> guard = Guard.from_config("config/callguard.yaml")
        >>> v = guard.check("sip:+8613800138000@gw", "02150001234", source="127.0.0.1")
        >>> v.verdict, v.code, v.rule
    """

    def __init__(self, config: Config, lists: Lists | None = None, implementation: str | None = None) -> None:
        """Build a guard from a loaded config.

        Args:
            config: the frozen config.
            lists: lists already loaded (default: load the files the config names).
            implementation: ``"cython"`` or ``"python"`` (the reference twin); default as selected by
                ``CALLGUARD_NO_EXTENSIONS``.
        """
        self.config = config
        self.lists = lists if lists is not None else load_lists(config)
        self.settings = compile_settings(config)
        self.implementation = implementation or IMPLEMENTATION
        core_cls = CorePy if self.implementation == "python" else Core
        self.core = core_cls(self.settings, self.lists)
        self.faults = 0
        self.last_fault: BaseException | None = None

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None) -> Guard:
        """Load a YAML config and the lists it names.

        Raises:
            ConfigError: the config is invalid (names file, key and problem).
            ListError: a list file cannot be read, or has a broken row in strict mode.
        """
        return cls(config_mod.load(path or config_mod.default_config_path()))

    @property
    def problems(self) -> list[lists_mod.RowProblem]:
        """Broken list rows that were skipped at load."""
        return self.lists.problems

    def check(self, caller: str, callee: str, source: str | None = None, now: float | None = None) -> Any:
        """Decide on one call and count it as an attempt.

        Args:
            caller: caller as it arrived (URI, name-addr or digits).
            callee: callee as it arrived.
            source: the sender's IP address; ``None`` for an offline check (untrusted_source skipped).
            now: epoch seconds; defaults to the current time.

        Returns:
            A ``Verdict`` with ``verdict``, ``code``, ``rule``, ``reason``, ``score`` and more.
            An internal fault never blocks a call: it fails open, is counted in ``faults``.
        """
        try:
            return self.core.check(caller, callee, source, time.time() if now is None else now)
        except Exception as exc:  # noqa: BLE001 - safety: an internal fault must not block calls
            self.faults += 1
            self.last_fault = exc
            get_logger("callguard.guard").error("decision_fault", error=repr(exc), caller=str(caller)[:64],
                                                callee=str(callee)[:64], faults=self.faults)
            return _fail_open(caller, callee, source)

    def check_batch(self, callers: Sequence[str], callees: Sequence[str], sources: Sequence[str | None],
                    times: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decide many calls in order; returns (codes, rule indexes into RULE_NAMES, scores)."""
        return self.core.check_batch(callers, callees, sources, np.ascontiguousarray(times, dtype=np.float64))

    def observe(self, caller: str, answered: bool, duration: float, source: str | None = None,
                now: float | None = None) -> None:
        """Feed a finished call's outcome (answered, duration in seconds) into the caller's score."""
        self.core.observe(caller, answered, duration, source, time.time() if now is None else now)

    def note_attempt(self, caller: str, callee: str, source: str | None, now: float) -> bool:
        """Count one past attempt in the rate-limit windows as :meth:`check` would, without deciding
        (``callguard serve`` rebuilds its windows from the call records after an unclean stop).
        False when ``check`` would not have counted it (untrusted source, hidden caller ID)."""
        return bool(self.core.note_attempt(caller, callee, source, now))

    def note_outcome(self, caller: str, answered: bool, duration: float, now: float) -> bool:
        """:meth:`observe` for a past call whose caller is given normalised, as its verdict and call
        record have it (rebuilding the answer/short-call counts); False when it is no number."""
        return bool(self.core.note_outcome(caller, answered, duration, now))

    def with_config(self, config: Config, lists: Lists | None = None) -> Guard:
        """A new guard for a reloaded config that keeps this one's rate-limit state."""
        new = Guard(config, lists, self.implementation)
        new.core.adopt_state(self.core)
        return new

    def snapshot(self) -> dict[str, Any]:
        return self.core.snapshot()

    def restore(self, data: dict[str, Any]) -> None:
        self.core.restore(data)


__all__ = ["Guard", "Verdict", "RULE_NAMES", "IMPLEMENTATION", "load_lists"]
