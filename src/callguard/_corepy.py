"""Pure-Python twin of the decision core: the specification of ``_core.pyx``.

Selected with ``CALLGUARD_NO_EXTENSIONS=1``.  Every method has the same name,
arguments and result as the Cython class, and the tests feed both the same
random lists, configs and call streams and require identical verdicts.  Where
this file and the Cython disagree, this file is right.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .lists import NEVER, P_ABSENT, P_SCALE, SOURCE_BIG_DATA, SOURCES, Lists
from .numbers import FREEPHONE, HIDDEN, KIND_NAMES, SERVICE95, SERVICE96, _is_digits, key_of, normalize
from .settings import (
    FEATURES,
    R_ALLOW,
    R_ANONYMOUS,
    R_BANNED,
    R_EMERGENCY,
    R_EXPIRED,
    R_FREQUENCY,
    R_MISMATCH,
    R_OUTBOUND,
    R_SCORE,
    R_UNFILED,
    R_UNTRUSTED,
    RULE_NAMES,
    SOURCE_OFFLINE,
    SOURCE_UNTRUSTED,
    EngineSettings,
    resolve_source,
)

SOURCE_CACHE_MAX = 65536
MAX_KEY_DIGITS = 38          # int("1" + digits) still fits the compiled core's 128-bit keys
P_ABSENT_F = -1.0


def _is_key_digits(number: str) -> bool:
    """A normalised number as a verdict gives it: ASCII digits, short enough for a 128-bit key."""
    return isinstance(number, str) and len(number) <= MAX_KEY_DIGITS and _is_digits(number)


class Verdict:
    """The decision on one call."""

    __slots__ = ("verdict", "code", "rule", "reason", "detail", "score", "caller", "callee", "caller_kind",
                 "source", "shadowed", "features")

    def __init__(self, verdict: str, code: int, rule: str, reason: str, detail: str, score: float, caller: str,
                 callee: str, caller_kind: str, source: str, shadowed: tuple[str, ...],
                 features: tuple[tuple[str, float], ...]) -> None:
        self.verdict = verdict
        self.code = code
        self.rule = rule
        self.reason = reason
        self.detail = detail
        self.score = score
        self.caller = caller
        self.callee = callee
        self.caller_kind = caller_kind
        self.source = source
        self.shadowed = shadowed
        self.features = features

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return (f"Verdict({self.verdict} {self.code} {self.rule} score={self.score:.3f} "
                f"caller={self.caller!r} callee={self.callee!r})")


class _Track:
    """Rate-limit state of one key (a caller, a source or a customer)."""

    __slots__ = ("times", "callees", "last", "total", "answered", "short")

    def __init__(self, t: int) -> None:
        self.times: list[int] = []           # the last ring_size attempt times (ms), oldest first
        self.callees: list[list[int]] = []   # [callee key, last time] of the most recent distinct callees
        self.last = t
        self.total = 0
        self.answered = 0
        self.short = 0


class CorePy:
    """Decision core, reference implementation."""

    def __init__(self, settings: EngineSettings, lists: Lists) -> None:
        self.settings = settings
        self._tracks: list[dict[int, _Track]] = [{}, {}, {}]
        self._source_cache: dict[str, int] = {}
        self.set_lists(lists)

    # ------------------------------------------------------------ lists
    def set_lists(self, lists: Lists) -> None:
        """Swap the lists (a reload); rate-limit state is kept."""
        bl = lists.blocklist
        block: dict[int, list[int]] = {}
        for i, k in enumerate(bl.keys.tolist()):
            block.setdefault(k, []).append(i)
        self._block = block
        self._bl_prefix = bl.prefix.tolist()
        self._bl_source = bl.source.tolist()
        self._bl_expires = bl.expires.tolist()
        self._bl_p = [P_ABSENT_F if q == P_ABSENT else q / P_SCALE for q in bl.p.tolist()]
        self._bl_complaints = bl.complaints.tolist()
        self._bl_reason = bl.reason.tolist()
        self._bl_reasons = list(bl.reasons)
        fl = lists.filings
        filing: dict[int, list[int]] = {}
        for i, k in enumerate(fl.keys.tolist()):
            filing.setdefault(k, []).append(i)
        self._filing = filing
        self._fl_outbound = fl.outbound.tolist()
        self._fl_from = fl.valid_from.tolist()
        self._fl_until = fl.valid_until.tolist()
        al = lists.allowlist
        self._allow_exact = {k for k, p in zip(al.keys.tolist(), al.prefix.tolist()) if not p}
        self._allow_prefix = {k for k, p in zip(al.keys.tolist(), al.prefix.tolist()) if p}
        self.lists = lists

    def adopt_state(self, other: CorePy) -> None:
        """Take over another core's rate-limit state (config reload)."""
        self._tracks = other._tracks

    # ------------------------------------------------------------ helpers
    def source_index(self, address: str | None) -> int:
        if address is None:
            return SOURCE_OFFLINE
        idx = self._source_cache.get(address)
        if idx is None:
            idx = resolve_source(self.settings, address)
            if len(self._source_cache) >= SOURCE_CACHE_MAX:
                self._source_cache.clear()
            self._source_cache[address] = idx
        return idx

    def _track(self, kind: int, key: int, t: int) -> _Track:
        table = self._tracks[kind]
        tr = table.get(key)
        if tr is None:
            if len(table) >= self.settings.max_tracked:
                self._evict(table, t)
            tr = table[key] = _Track(t)
        return tr

    def _evict(self, table: dict[int, _Track], t: int) -> None:
        """Make room: idle keys first, then the least recently seen (ties: smaller key)."""
        horizon = t - self.settings.max_window_ms
        for k in [k for k, tr in table.items() if tr.last <= horizon]:
            del table[k]
        if len(table) >= self.settings.max_tracked:
            keep = self.settings.max_tracked * 9 // 10
            order = sorted(table.items(), key=lambda kv: (kv[1].last, kv[0]))
            for k, _ in order[:len(table) - keep]:
                del table[k]

    def _keys(self, caller_key: int, src: int) -> tuple[int, int, int]:
        if src >= 0:
            return caller_key, src, self.settings.sources[src].customer
        return caller_key, -1, -1

    # ------------------------------------------------------------ the decision
    def check(self, caller: str, callee: str, source: str | None, now: float) -> Verdict:
        """Decide on one call and count it as an attempt (SPEC §3)."""
        s = self.settings
        t = int(now * 1000.0)
        src = self.source_index(source)
        area = s.sources[src].area if src >= 0 else ""
        src_name = s.sources[src].name if src >= 0 else ""
        ce = normalize(callee, area)
        cr = normalize(caller, area)
        shadowed: list[str] = []

        def verdict(rule: int, detail: str = "", score: float = 0.0,
                    features: tuple[tuple[str, float], ...] = ()) -> Verdict:
            allow = rule in (R_EMERGENCY, R_ALLOW)
            return Verdict("allow" if allow else "reject", 0 if allow else s.codes[rule], RULE_NAMES[rule],
                           s.reasons[rule], detail, score, cr.digits, ce.digits, KIND_NAMES[cr.kind], src_name,
                           tuple(shadowed), features)

        # 1. emergency: always through; the attempt still counts.
        if ce.kind != HIDDEN and ce.digits in s.emergency:
            if src != SOURCE_UNTRUSTED and cr.kind != HIDDEN:
                self._record(self._keys(key_of(cr.digits), src), key_of(ce.digits), t)
            return verdict(R_EMERGENCY)
        # 2. untrusted source: never an open relay.
        if src == SOURCE_UNTRUSTED:
            if s.enforce[R_UNTRUSTED]:
                return verdict(R_UNTRUSTED)
            shadowed.append("untrusted_source")
        # 3. hidden caller ID; without a number nothing below applies.
        if cr.kind == HIDDEN:
            if s.enforce[R_ANONYMOUS]:
                return verdict(R_ANONYMOUS)
            shadowed.append("anonymous")
            return verdict(R_ALLOW)

        caller_key = key_of(cr.digits)
        callee_key = key_of(ce.digits) if ce.kind != HIDDEN else 0
        keys = self._keys(caller_key, src)
        # Everything the score and rules 4-10 need is gathered before deciding, and the
        # attempt is counted whatever the outcome (SPEC §3: intercepted attempts count too).
        ban, listed, p_max, complaints, expired = self._blocklist(cr.digits, now)
        fired_limit, rate_ratio, distinct_ratio = self._rates(keys, t)
        outcome = self._tracks[0].get(caller_key)
        if src != SOURCE_UNTRUSTED:
            self._record(keys, callee_key, t)
        score, features = self._score(cr.kind, listed, p_max, complaints, expired, rate_ratio, distinct_ratio,
                                      outcome)

        # 4. banned
        if ban >= 0:
            detail = f"{SOURCES[self._bl_source[ban]]}: {self._bl_reasons[self._bl_reason[ban]]}"
            if s.enforce[R_BANNED]:
                return verdict(R_BANNED, detail, score, features)
            shadowed.append("banned")
        # 5-7. 95/96 call-centre numbers
        if cr.kind == SERVICE95 or cr.kind == SERVICE96:
            rule = self._filing_rule(cr.digits, cr.area, now)
            if rule >= 0:
                if s.enforce[rule]:
                    return verdict(rule, "", score, features)
                shadowed.append(RULE_NAMES[rule])
        # 8. caller ID outside the numbers allocated to the source
        if src >= 0 and s.sources[src].ranges:
            if not any(cr.digits.startswith(r) for r in s.sources[src].ranges):
                if s.enforce[R_MISMATCH]:
                    return verdict(R_MISMATCH, f"source {src_name}", score, features)
                shadowed.append("caller_id_mismatch")
        if not self._allowlisted(cr.digits):
            # 9. high frequency
            if fired_limit >= 0:
                limit = s.limits[fired_limit]
                detail = f"limit {limit.name}"
                if s.enforce[R_FREQUENCY]:
                    return verdict(R_FREQUENCY, detail, score, features)
                shadowed.append("high_frequency")
            # 10. risk score
            if score >= s.threshold:
                if s.enforce[R_SCORE]:
                    return verdict(R_SCORE, "", score, features)
                shadowed.append("score")
        return verdict(R_ALLOW, "", score, features)

    def _blocklist(self, digits: str, now: float) -> tuple[int, bool, float, int, bool]:
        """First firing entry (or -1) and the score signals of every matching entry."""
        ban = -1
        listed = False
        p_max = -1.0
        complaints = 0
        expired = False
        threshold = self.settings.threshold
        n = len(digits)
        for length in range(n, 0, -1):
            idxs = self._block.get(key_of(digits[:length]))
            if idxs is None:
                continue
            for i in idxs:
                if length < n and not self._bl_prefix[i]:
                    continue
                complaints = max(complaints, self._bl_complaints[i])
                exp = self._bl_expires[i]
                if exp != NEVER and now >= exp:
                    expired = True
                    continue
                if self._bl_source[i] == SOURCE_BIG_DATA:
                    p = self._bl_p[i]
                    if p > p_max:
                        p_max = p
                    if p < threshold:
                        continue
                else:
                    listed = True
                if ban < 0:
                    ban = i
        return ban, listed, p_max, complaints, expired

    def _filing_rule(self, digits: str, area: str, now: float) -> int:
        n = len(digits)
        stop = len(area) + 2
        for length in range(n, stop - 1, -1):
            rows = self._filing.get(key_of(digits[:length]))
            if rows is not None:
                # the filing in force decides (the last in the file when several are)
                in_force = [i for i in rows if self._fl_from[i] <= now < self._fl_until[i]]
                if not in_force:
                    return R_EXPIRED
                if not self._fl_outbound[in_force[-1]]:
                    return R_OUTBOUND
                return -1
        return R_UNFILED

    def _allowlisted(self, digits: str) -> bool:
        if key_of(digits) in self._allow_exact:
            return True
        if self._allow_prefix:
            for length in range(len(digits), 0, -1):
                if key_of(digits[:length]) in self._allow_prefix:
                    return True
        return False

    def _rates(self, keys: tuple[int, int, int], t: int) -> tuple[int, float, float]:
        """First limit that fires (or -1), busiest count ratio, highest distinct-callee ratio."""
        s = self.settings
        fired = -1
        rate_ratio = 0.0
        distinct_ratio = 0.0
        for i, limit in enumerate(s.limits):
            key = keys[limit.kind]
            if key < 0:
                continue
            tr = self._tracks[limit.kind].get(key)
            if tr is None:
                continue
            lo = t - limit.window_ms
            attempts = 0
            for x in tr.times:
                if lo < x <= t:
                    attempts += 1
            if limit.max_calls:
                if attempts >= limit.max_calls and fired < 0:
                    fired = i
                if attempts >= s.min_attempts:
                    r = attempts / limit.max_calls
                    if r > rate_ratio:
                        rate_ratio = r
            if limit.max_distinct:
                distinct = 0
                for entry in tr.callees:
                    if lo < entry[1] <= t:
                        distinct += 1
                if distinct >= limit.max_distinct and fired < 0:
                    fired = i
                if attempts >= s.min_attempts:
                    r = distinct / (attempts if attempts > distinct else distinct)
                    if r > distinct_ratio:
                        distinct_ratio = r
        return fired, rate_ratio, distinct_ratio

    def _record(self, keys: tuple[int, int, int], callee_key: int, t: int) -> None:
        s = self.settings
        for kind in range(3):
            key = keys[kind]
            if key < 0 or not s.kind_used[kind]:
                continue
            tr = self._track(kind, key, t)
            tr.last = t
            times = tr.times
            if len(times) >= s.ring_size[kind]:
                del times[0]
            times.append(t)
            cap = s.callee_cap[kind]
            if cap:
                for entry in tr.callees:
                    if entry[0] == callee_key:
                        if t > entry[1]:
                            entry[1] = t
                        break
                else:
                    if len(tr.callees) >= cap:
                        oldest = 0
                        for j in range(1, len(tr.callees)):
                            if tr.callees[j][1] < tr.callees[oldest][1]:
                                oldest = j
                        del tr.callees[oldest]
                    tr.callees.append([callee_key, t])

    def _score(self, kind: int, listed: bool, p_max: float, complaints: int, expired: bool, rate_ratio: float,
               distinct_ratio: float, outcome: _Track | None) -> tuple[float, tuple[tuple[str, float], ...]]:
        s = self.settings
        w = s.weights
        parts = [0.0] * len(FEATURES)
        if listed:
            parts[0] = w[0]
        if p_max >= 0.0:
            parts[1] = w[1] * p_max
        if complaints:
            parts[2] = w[2] * min(1.0, complaints / s.complaint_saturation)
        if expired:
            parts[3] = w[3]
        parts[4] = w[4] * min(1.0, rate_ratio)
        parts[5] = w[5] * distinct_ratio
        if outcome is not None:
            if outcome.total >= s.min_outcomes:
                parts[6] = w[6] * ((outcome.total - outcome.answered) / outcome.total)
            if outcome.answered >= s.min_outcomes:
                parts[7] = w[7] * (outcome.short / outcome.answered)
        if kind == FREEPHONE:
            parts[8] = w[8]
        total = 0.0
        for c in parts:
            total += c
        features = tuple((FEATURES[i], c) for i, c in enumerate(parts) if c > 0.0)
        return (total if total < 1.0 else 1.0), features

    # ------------------------------------------------------------ outcomes and batches
    def observe(self, caller: str, answered: bool, duration: float, source: str | None, now: float) -> None:
        """Feed the outcome of a finished call (answered? how long?) into the caller's score."""
        src = self.source_index(source)
        area = self.settings.sources[src].area if src >= 0 else ""
        cr = normalize(caller, area)
        if cr.kind == HIDDEN:
            return
        self._outcome(key_of(cr.digits), answered, duration, int(now * 1000.0))

    def _outcome(self, caller_key: int, answered: bool, duration: float, t: int) -> None:
        """One finished call in the caller's answer and short-call counts."""
        tr = self._track(0, caller_key, t)
        tr.total += 1
        if answered:
            tr.answered += 1
            if duration * 1000.0 < self.settings.short_call_ms:
                tr.short += 1

    def note_attempt(self, caller: str, callee: str, source: str | None, now: float) -> bool:
        """Count one attempt in the rate-limit windows exactly as :meth:`check` counted it, without
        deciding: ``caller`` and ``callee`` are the normalised numbers its verdict (and the call
        record) gave, ``source`` the request's source address.  False when check did not count
        it: an untrusted source or a hidden caller ID (no digits)."""
        t = int(now * 1000.0)
        src = self.source_index(source)
        if src == SOURCE_UNTRUSTED or not _is_key_digits(caller):
            return False
        callee_key = key_of(callee) if _is_key_digits(callee) else 0
        self._record(self._keys(key_of(caller), src), callee_key, t)
        return True

    def note_outcome(self, caller: str, answered: bool, duration: float, now: float) -> bool:
        """:meth:`observe` for a caller as a verdict (and the call record) gave it, normalised:
        rebuilding the answer/short-call counts from call records.  False when it is no number."""
        t = int(now * 1000.0)
        if not _is_key_digits(caller):
            return False
        self._outcome(key_of(caller), answered, duration, t)
        return True

    def check_batch(self, callers: Sequence[str], callees: Sequence[str], sources: Sequence[str | None],
                    times: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decide a batch in order; returns (codes int16, rule indexes uint8, scores float64)."""
        n = len(callers)
        codes = np.zeros(n, dtype=np.int16)
        rules = np.zeros(n, dtype=np.uint8)
        scores = np.zeros(n, dtype=np.float64)
        index = {name: i for i, name in enumerate(RULE_NAMES)}
        for i in range(n):
            v = self.check(callers[i], callees[i], sources[i], float(times[i]))
            codes[i] = v.code
            rules[i] = index[v.rule]
            scores[i] = v.score
        return codes, rules, scores

    def tracked(self) -> tuple[int, int, int]:
        return len(self._tracks[0]), len(self._tracks[1]), len(self._tracks[2])

    # ------------------------------------------------------------ snapshot
    def snapshot(self) -> dict[str, Any]:
        """Rate-limit state as plain data (written on stop, read on start)."""
        return {"version": 1, "tracks": [
            [[k, tr.last, list(tr.times), [list(e) for e in tr.callees], tr.total, tr.answered, tr.short]
             for k, tr in table.items()] for table in self._tracks]}

    def restore(self, data: dict[str, Any]) -> None:
        if data.get("version") != 1:
            raise ValueError("unknown snapshot version")
        s = self.settings
        tracks: list[dict[int, _Track]] = [{}, {}, {}]
        for kind, rows in enumerate(data["tracks"][:3]):
            for k, last, times, callees, total, answered, short in rows:
                tr = _Track(int(last))
                tr.times = [int(x) for x in times][-s.ring_size[kind]:]
                cap = s.callee_cap[kind]
                tr.callees = [[int(a), int(b)] for a, b in callees][-cap:] if cap else []
                tr.total, tr.answered, tr.short = int(total), int(answered), int(short)
                tracks[kind][int(k)] = tr
        self._tracks = tracks

