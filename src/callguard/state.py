"""Rate-limit state across restarts: the snapshot, and what the call records add to it.

``callguard serve`` writes the snapshot on a clean stop and reads it at start; after a crash it
also reads back, from its call records, what happened since the snapshot.  The Kamailio decider
keeps the snapshot the same way.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

from .config import Config
from .settings import RULE_NAMES


def write_snapshot(path: str, guard: Any, now: float | None = None) -> None:
    """Write ``guard``'s rate-limit snapshot atomically (temporary file in the same folder, then
    rename), with the time it was taken: a start after a crash reads back what came after it."""
    data = {**guard.snapshot(), "written_at": time.time() if now is None else now}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".callguard-state.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


FUTURE_TOLERANCE = 60.0     # seconds a snapshot's written_at may be ahead of the clock (skew between hosts)


def restore_snapshot(guard: Any, path: str, log: Any, now: float | None = None) -> float | None:
    """Load the rate-limit snapshot if there is one; a corrupt file is logged and ignored.

    Returns the time the snapshot describes (when it was written), None when none was loaded.
    """
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        written = data.get("written_at")
        taken = float(written) if isinstance(written, (int, float)) else os.path.getmtime(path)
        now = time.time() if now is None else now
        if not taken <= now + FUTURE_TOLERANCE:
            # Written by a clock that ran ahead (then stepped back): taken as is, it hid every
            # record up to that time from rebuild_rate_state, so a caller over its limit before a
            # crash started afresh.  Without it the records of the whole window are counted again.
            log.warning("snapshot_ignored", path=path, written_at=taken, now=now,
                        error="written in the future: the clock was ahead when it was taken")
            return None
        guard.restore(data)
        log.info("snapshot_restored", path=path, written_at=taken)
        return taken
    except Exception as exc:  # noqa: BLE001 - a bad snapshot must not stop the proxy from starting
        log.warning("snapshot_ignored", path=path, error=repr(exc))
        return None


def rebuild_rate_state(guard: Any, records: Any, cfg: Config, snapshot_time: float | None, log: Any,
                       now: float | None = None) -> tuple[int, int]:
    """Count again what the call records hold that the rate-limit state has not seen.

    The snapshot is written on a clean stop only.  After a crash or SIGKILL the state starts from
    the last snapshot (or empty), while the records on disk hold every decision since: those from
    after the snapshot and inside the longest rate-limit window are fed back in time order
    through ``Guard.note_attempt`` (so a caller over its limit before the crash is still over it
    after), and the outcomes of those calls through ``Guard.note_outcome`` (answer and short-call
    counts).  Only decisions of the core count (not ``overload``/``shutdown`` rejections, which
    never reached it), and at most ``records.rebuild_max_records`` of them, the newest: the start
    must stay short, and the shortest windows matter most.  Returns (attempts, outcomes) counted;
    a failure is logged and the proxy starts with what it has: the windows only decide sooner or
    later, no call is lost.
    """
    replay = getattr(records, "replay_decisions", None)
    replay_outcomes = getattr(records, "replay_outcomes", None)
    horizon = getattr(records, "replay_horizon", None)
    window = max((lm.window for lm in cfg.rate_limits), default=0.0)
    budget = cfg.records.rebuild_max_records
    if replay is None or replay_outcomes is None or horizon is None or window <= 0 or budget <= 0:
        return 0, 0
    now = time.time() if now is None else now
    wanted = now - window
    if snapshot_time is not None and snapshot_time > wanted:
        wanted = snapshot_time
    attempts = outcomes = 0
    started = time.monotonic()

    def attempt(t: float, caller: str, callee: str, source: str) -> None:
        nonlocal attempts
        if guard.note_attempt(caller, callee, source, t):
            attempts += 1

    def outcome(t: float, caller: str, answered: bool, duration: float) -> None:
        nonlocal outcomes
        if guard.note_outcome(caller, answered, duration, t):
            outcomes += 1

    try:
        # At most the newest `budget` records: the short windows whole, the longest maybe in part.
        since = horizon(wanted, budget)
        rows = replay(since, attempt, RULE_NAMES)
        if rows:
            replay_outcomes(since, outcome)
    except Exception as exc:  # noqa: BLE001 - the proxy still starts; said loudly
        log.error("rate_state_rebuild_failed", error=repr(exc), attempts=attempts, outcomes=outcomes)
        return attempts, outcomes
    if rows:
        event = log.info if since <= wanted else log.warning
        event("rate_state_rebuilt", records=rows, attempts=attempts, outcomes=outcomes, since=since,
              partial=since > wanted, wanted_since=wanted, seconds=round(time.monotonic() - started, 3))
    return attempts, outcomes
