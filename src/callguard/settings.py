"""The config, compiled into the flat, primitive form both cores read.

Everything that can be decided once per config (rule modes, window lengths in
milliseconds, ring sizes, source networks) is decided here, in one place, so the
two cores cannot disagree about what the config means.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .config import RULE_IDS, Config

KEY_KINDS = ("caller", "source", "customer")

# Rule indexes, in decision order (SPEC §3).
R_EMERGENCY, R_UNTRUSTED, R_ANONYMOUS, R_BANNED, R_UNFILED, R_EXPIRED, R_OUTBOUND, R_MISMATCH, R_FREQUENCY, \
    R_SCORE = range(10)
R_ALLOW = 10
RULE_NAMES = RULE_IDS + ("allow",)

# Score feature names, in the order both cores add them up.
FEATURES = ("listed", "big_data_p", "complaints", "expired_ban", "attempt_rate", "distinct_ratio",
            "unanswered", "short_calls", "no_filing_marketing")

SOURCE_OFFLINE = -2     # no source given (offline check): untrusted_source does not apply
SOURCE_UNTRUSTED = -1


@dataclass(frozen=True, slots=True)
class Limit:
    name: str
    kind: int               # index into KEY_KINDS
    window_ms: int
    max_calls: int
    max_distinct: int


@dataclass(frozen=True, slots=True)
class SourceInfo:
    name: str
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    customer: int           # index into EngineSettings.customers
    area: str
    ranges: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EngineSettings:
    enforce: tuple[bool, ...]
    codes: tuple[int, ...]
    reasons: tuple[str, ...]
    emergency: frozenset[str]
    limits: tuple[Limit, ...]
    ring_size: tuple[int, int, int]
    callee_cap: tuple[int, int, int]
    kind_used: tuple[bool, bool, bool]
    max_window_ms: int
    max_tracked: int
    threshold: float
    weights: tuple[float, ...]      # in FEATURES order
    complaint_saturation: int
    min_attempts: int
    min_outcomes: int
    short_call_ms: int
    sources: tuple[SourceInfo, ...]
    customers: tuple[str, ...]


def compile_settings(cfg: Config) -> EngineSettings:
    rules = [cfg.rules[r] if r in cfg.rules else None for r in RULE_IDS]
    enforce = tuple(True if r is None else r.mode == "enforce" for r in rules) + (True,)
    codes = tuple(0 if r is None else r.code for r in rules) + (0,)
    reasons = tuple("Emergency call" if r is None else r.reason for r in rules) + ("",)
    limits = tuple(Limit(rl.name, KEY_KINDS.index(rl.key), int(rl.window * 1000), rl.max_calls,
                         rl.max_distinct_callees) for rl in cfg.rate_limits)
    min_attempts = cfg.score.min_attempts
    ring = tuple(max([lm.max_calls for lm in limits if lm.kind == k] + [min_attempts, 1]) for k in range(3))
    cap = tuple(max([lm.max_distinct for lm in limits if lm.kind == k] + [0]) for k in range(3))
    used = tuple(any(lm.kind == k for lm in limits) for k in range(3))
    customers: list[str] = []
    sources = []
    for src in cfg.sources:
        if src.customer not in customers:
            customers.append(src.customer)
        sources.append(SourceInfo(src.name, tuple(ipaddress.ip_network(n, strict=False) for n in src.networks),
                                  customers.index(src.customer), src.area, src.number_ranges))
    w = cfg.score.weights
    return EngineSettings(
        enforce=enforce, codes=codes, reasons=reasons,
        emergency=frozenset(cfg.emergency_numbers),
        limits=limits, ring_size=ring, callee_cap=cap, kind_used=used,  # type: ignore[arg-type]
        max_window_ms=max([lm.window_ms for lm in limits] + [0]),
        max_tracked=cfg.max_tracked_keys,
        threshold=cfg.score.threshold,
        weights=(w.listed, w.big_data_p, w.complaints, w.expired_ban, w.attempt_rate, w.distinct_ratio,
                 w.unanswered, w.short_calls, w.no_filing_marketing),
        complaint_saturation=cfg.score.complaint_saturation,
        min_attempts=min_attempts, min_outcomes=cfg.score.min_outcomes,
        short_call_ms=int(cfg.score.short_call_seconds * 1000),
        sources=tuple(sources), customers=tuple(customers),
    )


def resolve_source(settings: EngineSettings, address: str | None) -> int:
    """Index of the first source whose networks hold ``address``; -1 untrusted, -2 none given."""
    if address is None or address == "":
        return SOURCE_OFFLINE
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%")[0])
    except ValueError:
        return SOURCE_UNTRUSTED
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for i, src in enumerate(settings.sources):
        for net in src.networks:
            if ip.version == net.version and ip in net:
                return i
    return SOURCE_UNTRUSTED
