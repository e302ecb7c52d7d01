"""The typed, frozen configuration of callguard, built once from YAML.

One table drives everything: each option is a dataclass field whose metadata holds
its help line and its range check.  The same table parses the YAML, checks it,
renders the README's option reference (``python -m callguard.config``) and names
the key in every error.  Unknown keys are errors, so a typo is never silently
ignored.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import numbers
from .errors import ConfigError

Check = Callable[[Any], "str | None"]

RULE_IDS: tuple[str, ...] = (
    "emergency",
    "untrusted_source",
    "anonymous",
    "banned",
    "unfiled_service_number",
    "filing_expired",
    "outbound_prohibited",
    "caller_id_mismatch",
    "high_frequency",
    "score",
)


def opt(default: Any, help: str, check: Check | None = None) -> Any:
    """Declare one option: its default, its help line and its range check."""
    meta = {"help": help, "check": check}
    if isinstance(default, (list, dict, tuple)) or dataclasses.is_dataclass(default):
        frozen = default
        return field(default_factory=lambda: frozen, metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------- range checks
def between(lo: float, hi: float) -> Check:
    def check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"must be between {lo} and {hi} (got {v})"

    return check


def at_least(lo: float) -> Check:
    def check(v: Any) -> str | None:
        return None if v >= lo else f"must be >= {lo} (got {v})"

    return check


def one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)} (got {v!r})"

    return check


_ADDR_RE = re.compile(r"^(udp|tcp):(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+):(\d{1,5})$")


def parse_address(text: str) -> tuple[str, str, int]:
    """Split ``udp:HOST:PORT`` / ``tcp:[v6]:PORT`` into (transport, host, port)."""
    m = _ADDR_RE.match(text.strip())
    if not m:
        raise ValueError(f"expected udp:HOST:PORT or tcp:HOST:PORT (got {text!r})")
    host = m.group(2).strip("[]")
    port = int(m.group(3))
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return m.group(1), host, port


def _addresses(v: Any) -> str | None:
    for item in v:
        try:
            parse_address(item)
        except ValueError as exc:
            return str(exc)
    return None


def _networks(v: Any) -> str | None:
    for item in v:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"not a network in CIDR form: {item!r}"
    return None


def _digits_list(v: Any) -> str | None:
    for item in v:
        if not (str(item).isascii() and str(item).isdigit()):
            return f"expected digit strings, got {item!r}"
    return None


def _sip_code(v: Any) -> str | None:
    return None if v == 0 or 400 <= v <= 699 else f"must be a SIP final error code 400-699 (got {v})"


def _area(v: Any) -> str | None:
    return None if v == "" or re.fullmatch(r"0[0-9]{2,3}", v) else f"expected an area code like 0391 (got {v!r})"


def _caller_numbers(v: Any) -> str | None:
    problem = _digits_list(v)
    if problem:
        return problem
    for item in v:
        if numbers.normalize(item).hidden:
            return f"not a number a caller can have: {item!r}"
    return None


def _utc_offset(v: Any) -> str | None:
    m = re.fullmatch(r"[+-](\d\d):(\d\d)", v)
    if m is None:
        return f"expected +HH:MM (got {v!r})"
    if int(m.group(1)) > 14 or int(m.group(2)) > 59:
        return f"not a UTC offset: {v!r} (from -14:00 to +14:00)"
    return None


# ---------------------------------------------------------------- the options
@dataclass(frozen=True, slots=True)
class RuleSettings:
    """Mode, response and reason text of one rule."""

    mode: str = opt("enforce", "enforce: reject when the rule fires; shadow: log only and let the call pass",
                    one_of("enforce", "shadow"))
    code: int = opt(0, "SIP final response code sent when the rule rejects (0: the rule's own, as in the table "
                    "of rules)", _sip_code)
    reason: str = opt("", "reason phrase of the response and text of the Reason header")


def _rule(code: int, reason: str) -> RuleSettings:
    return RuleSettings(mode="enforce", code=code, reason=reason)


DEFAULT_RULES: dict[str, RuleSettings] = {
    "untrusted_source": _rule(403, "Forbidden - untrusted source"),
    "anonymous": _rule(433, "Anonymity Disallowed"),
    "banned": _rule(403, "Forbidden - caller number banned"),
    "unfiled_service_number": _rule(403, "Forbidden - service number not filed"),
    "filing_expired": _rule(403, "Forbidden - service number filing expired"),
    "outbound_prohibited": _rule(403, "Forbidden - service number filed inbound-only"),
    "caller_id_mismatch": _rule(403, "Forbidden - caller ID not allocated to sender"),
    "high_frequency": _rule(603, "Decline - call frequency exceeded"),
    "score": _rule(608, "Rejected - risk score"),
}


@dataclass(frozen=True, slots=True)
class RateLimit:
    """One sliding-window limit."""

    name: str = opt("", "name shown in logs and verdict reasons (defaults to the list position)")
    window: float = opt(60.0, "window length in seconds", between(1, 7 * 86400))
    max_calls: int = opt(0, "fire when the key already made this many attempts in the window (0: no count limit)",
                         between(0, 1_000_000))
    max_distinct_callees: int = opt(0, "fire when the key already called this many distinct callees in the "
                                    "window (0: no distinct limit)", between(0, 10_000))
    key: str = opt("caller", "what is counted: caller, source or customer", one_of("caller", "source", "customer"))


DEFAULT_RATE_LIMITS: tuple[RateLimit, ...] = (
    RateLimit(name="per_minute", window=60.0, max_calls=10),
    RateLimit(name="per_hour", window=3600.0, max_calls=60),
    RateLimit(name="distinct_callees_per_hour", window=3600.0, max_distinct_callees=30),
)


@dataclass(frozen=True, slots=True)
class Source:
    """A trusted network that may send calls through callguard."""

    name: str = opt("", "name shown in logs and call records")
    networks: tuple[str, ...] = opt((), "CIDR networks of this source (IPv4 or IPv6)", _networks)
    customer: str = opt("", "customer or channel this source belongs to (rate limits may be keyed by it)")
    direction: str = opt("outbound", "outbound: our customers' calls; inbound: calls from other networks",
                         one_of("outbound", "inbound"))
    trust_identity: bool = opt(True, "take the caller from P-Asserted-Identity when present")
    number_ranges: tuple[str, ...] = opt((), "number prefixes allocated to this source; when set, "
                                         "callers outside them hit caller_id_mismatch", _digits_list)
    area: str = opt("", "area code (with leading 0) for 96 numbers sent without one", _area)


@dataclass(frozen=True, slots=True)
class Trunk:
    """A next hop that allowed calls are forwarded to."""

    name: str = opt("", "name shown in logs and metrics")
    address: str = opt("udp:127.0.0.1:5080", "where to send: udp:HOST:PORT or tcp:HOST:PORT",
                       lambda v: _addresses([v]))
    prefixes: tuple[str, ...] = opt((), "callee prefixes routed to this trunk (empty: default route)",
                                    _digits_list)
    keepalive: float = opt(0.0, "seconds between OPTIONS pings (0: off); a trunk that fails to answer "
                           "is marked down until it answers again", between(0, 3600))


@dataclass(frozen=True, slots=True)
class ScoreWeights:
    """Weights of the risk-score features; the score is their weighted sum, capped at 1."""

    listed: float = opt(1.0, "added when the caller has an active blocklist entry (not big-data)", between(0, 10))
    big_data_p: float = opt(1.0, "times the big-data p of a listed number that did not reach the threshold",
                            between(0, 10))
    complaints: float = opt(0.3, "times min(1, complaints / complaint_saturation) from the blocklist",
                            between(0, 10))
    expired_ban: float = opt(0.2, "added when the caller has an expired blocklist entry", between(0, 10))
    attempt_rate: float = opt(0.3, "times the caller's attempts / max_calls in its busiest count window",
                              between(0, 10))
    distinct_ratio: float = opt(0.2, "times distinct callees / attempts in the distinct-callee window",
                                between(0, 10))
    unanswered: float = opt(0.2, "times the share of the caller's recent calls that were not answered",
                            between(0, 10))
    short_calls: float = opt(0.2, "times the share of answered calls shorter than short_call_seconds",
                             between(0, 10))
    no_filing_marketing: float = opt(0.0, "added for a 400/800 caller (marketing-style number)", between(0, 10))


@dataclass(frozen=True, slots=True)
class ScoreSettings:
    """Risk score."""

    threshold: float = opt(0.75, "reject when the score is >= this; also the big-data p cut-off", between(0, 1))
    weights: ScoreWeights = opt(ScoreWeights(), "feature weights")
    complaint_saturation: int = opt(3, "complaints at which the complaints feature reaches 1 (R10: 3)",
                                    between(1, 1000))
    min_attempts: int = opt(5, "attempts in the window before rate features count", between(1, 100000))
    min_outcomes: int = opt(5, "finished calls before answer/short-call features count", between(1, 100000))
    short_call_seconds: float = opt(6.0, "an answered call shorter than this is a short call", between(0, 3600))


@dataclass(frozen=True, slots=True)
class ListsSettings:
    """List files (relative paths resolve against the config file's folder)."""

    blocklist: str = opt("", "blocklist CSV (number,match,source,reason,added,expires,p[,complaints])")
    service_numbers: str = opt("", "95/96 filings CSV (number,area,carrier,usage,inbound,outbound,"
                               "valid_from,valid_until)")
    allowlist: str = opt("", "allowlist CSV (number,match,reason)")
    strict: bool = opt(False, "refuse a list with any broken row instead of skipping the row")
    timezone: str = opt("+08:00", "UTC offset for dates without a time in lists and logs", _utc_offset)


@dataclass(frozen=True, slots=True)
class SipSettings:
    """The SIP proxy (callguard serve)."""

    listen: tuple[str, ...] = opt(("udp:127.0.0.1:5060",), "listeners, udp:HOST:PORT or tcp:HOST:PORT "
                                  "(IPv6 as tcp:[::1]:5060)", _addresses)
    record_route: bool = opt(False, "insert Record-Route so in-dialog requests come back through the proxy")
    hide_reason: bool = opt(False, "leave the Reason header naming the rule out of rejections")
    max_message_size: int = opt(16384, "largest SIP message accepted, in bytes", between(1024, 65535))
    max_tcp_connections: int = opt(1024, "open TCP connections accepted at once", between(1, 100000))
    tcp_idle_timeout: float = opt(300.0, "seconds before an idle TCP connection is closed", between(1, 86400))
    tcp_partial_timeout: float = opt(10.0, "seconds a TCP connection may sit on a partial message",
                                     between(0.1, 600))
    tcp_write_queue_max: int = opt(1048576, "bytes sent to a TCP peer and not yet read by it before the connection "
                                   "is aborted (an accepted one is no longer read from 64 KiB on)",
                                   between(65536, 1_073_741_824))
    max_in_flight: int = opt(10000, "transactions in flight before new INVITEs get 503", between(1, 10_000_000))
    retry_after: int = opt(5, "Retry-After seconds sent with an overload 503", between(0, 3600))
    transaction_timeout: float = opt(180.0, "seconds a forwarded INVITE may go without a final response before "
                                     "the caller gets 408 (Timer C, > 3 min by RFC 3261)", between(1, 600))
    trunk_timeout: float = opt(4.0, "seconds without a provisional or final response before failing over "
                               "to the next trunk", between(0.1, 60))
    user_agent: str = opt("callguard", "Server header of responses the proxy generates")
    shutdown_grace: float = opt(8.0, "seconds SIGTERM waits for in-flight transactions", between(0, 600))


@dataclass(frozen=True, slots=True)
class RecordsSettings:
    """Call records (SQLite, WAL)."""

    enabled: bool = opt(True, "store a record of every decision")
    path: str = opt("callguard-records.sqlite3", "SQLite file of call records (relative to the config file)")
    retention_days: int = opt(30, "days records are kept before pruning (R9: at least 30)", between(30, 3650))
    partition_minutes: int = opt(60, "decision time per records partition: the partition being written is "
                                 "unindexed and scanned by queries, older ones are indexed in bulk and pruned "
                                 "whole; raised to keep at most 2000 partitions over retention_days",
                                 between(1, 1440))
    state_path: str = opt("callguard-state.json", "rate-limit snapshot written on stop and read on start")
    rebuild_max_records: int = opt(2_000_000, "at start, count again at most this many of the newest decisions "
                                   "the records hold that the snapshot has not seen (after a crash or SIGKILL), "
                                   "inside the longest rate-limit window; read at ~130k a second before the "
                                   "listeners open; 0: off", between(0, 1_000_000_000))


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    """Logs (structlog)."""

    level: str = opt("info", "debug, info, warning or error", one_of("debug", "info", "warning", "error"))
    format: str = opt("json", "json: one object per line; console: human-readable", one_of("json", "console"))


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """Prometheus metrics endpoint."""

    enabled: bool = opt(True, "serve /metrics over HTTP")
    listen: str = opt("127.0.0.1:9090", "HOST:PORT of the metrics endpoint")


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration."""

    sources: tuple[Source, ...] = opt((Source(name="loopback", networks=("127.0.0.0/8",), customer="local"),),
                                      "trusted source networks; requests from anywhere else hit "
                                      "untrusted_source")
    trunks: tuple[Trunk, ...] = opt((Trunk(name="trunk", address="udp:127.0.0.1:5080"),),
                                    "next hops, chosen by the longest matching callee prefix")
    emergency_numbers: tuple[str, ...] = opt(("110", "112", "119", "120", "122"),
                                             "callees that always pass", _digits_list)
    allowlist_numbers: tuple[str, ...] = opt(("10085", "10001", "10016"),
                                             "callers that skip high_frequency and score (besides the "
                                             "allowlist file)", _caller_numbers)
    rate_limits: tuple[RateLimit, ...] = opt(DEFAULT_RATE_LIMITS, "sliding-window limits; any one fires "
                                             "high_frequency")
    max_tracked_keys: int = opt(2_000_000, "rate-limit keys kept in memory; idle ones are evicted first",
                                between(1000, 100_000_000))
    score: ScoreSettings = opt(ScoreSettings(), "risk score")
    rules: dict[str, RuleSettings] = opt(DEFAULT_RULES, "per rule id: mode, code, reason")
    lists: ListsSettings = opt(ListsSettings(), "list files")
    sip: SipSettings = opt(SipSettings(), "SIP proxy")
    records: RecordsSettings = opt(RecordsSettings(), "call records")
    logging: LoggingSettings = opt(LoggingSettings(), "logs")
    metrics: MetricsSettings = opt(MetricsSettings(), "metrics")
    source_file: str = field(default="", metadata={"internal": True})

    def resolve(self, path: str) -> str:
        """Resolve a path from the config against the config file's folder."""
        if not path:
            return path
        p = Path(path)
        if p.is_absolute() or not self.source_file:
            return str(p)
        return str(Path(self.source_file).resolve().parent / p)


# ---------------------------------------------------------------- loading
def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, file: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(file, key, f"expected a mapping, got {type(value).__name__}")
        return _build(typing.cast(type, tp), value, file, key)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if value is None:
            value = []
        if isinstance(value, (str, int)) and not dataclasses.is_dataclass(item_tp):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(file, key, f"expected a list, got {type(value).__name__}")
        return tuple(_convert(v, item_tp, file, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(file, key, f"expected a mapping, got {type(value).__name__}")
        return {str(k): _convert(v, val_tp, file, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(file, key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(file, key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(file, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(file, key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(file, key, f"unsupported type {tp}")  # pragma: no cover - table bug


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, globalns=sys.modules[__name__].__dict__)


def _build(cls: type, data: dict[str, Any], file: str, prefix: str) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(file, key, f"unknown key (known here: {known})")
        value = _convert(v, hints[k], file, key)
        check = fields[k].metadata.get("check")
        if check is not None:
            problem = check(value)
            if problem:
                raise ConfigError(file, key, problem)
        kwargs[k] = value
    return cls(**kwargs)


def _finish(cfg: Config, file: str) -> Config:
    """Cross-field checks and merging of defaults that a per-field check cannot do."""
    rules = dict(DEFAULT_RULES)
    for rule_id, settings in cfg.rules.items():
        if rule_id not in DEFAULT_RULES:
            raise ConfigError(file, f"rules.{rule_id}",
                              f"unknown rule id (known: {', '.join(DEFAULT_RULES)})")
        base = DEFAULT_RULES[rule_id]
        # What the file leaves out keeps the rule's own: `{mode: shadow}` alone kept 433 a 403.
        rules[rule_id] = RuleSettings(mode=settings.mode, code=settings.code or base.code,
                                      reason=settings.reason or base.reason)
    for i, rl in enumerate(cfg.rate_limits):
        if rl.max_calls == 0 and rl.max_distinct_callees == 0:
            raise ConfigError(file, f"rate_limits[{i}]", "set max_calls or max_distinct_callees (or both)")
    limits = tuple(dataclasses.replace(rl, name=rl.name or f"limit{i}") for i, rl in enumerate(cfg.rate_limits))
    names = [rl.name for rl in limits]
    if len(set(names)) != len(names):
        raise ConfigError(file, "rate_limits", "names must be unique")
    if not cfg.trunks:
        raise ConfigError(file, "trunks", "at least one trunk is needed")
    src_names = [s.name for s in cfg.sources]
    if len(set(src_names)) != len(src_names):
        raise ConfigError(file, "sources", "source names must be unique")
    sources = tuple(dataclasses.replace(s, name=s.name or f"source{i}") for i, s in enumerate(cfg.sources))
    trunks = tuple(dataclasses.replace(t, name=t.name or f"trunk{i}") for i, t in enumerate(cfg.trunks))
    cfg = dataclasses.replace(cfg, rules=rules, rate_limits=limits, sources=sources, trunks=trunks,
                              source_file=file)
    # Lists and records paths resolve against the config file's folder.
    lists = dataclasses.replace(cfg.lists, blocklist=cfg.resolve(cfg.lists.blocklist),
                                service_numbers=cfg.resolve(cfg.lists.service_numbers),
                                allowlist=cfg.resolve(cfg.lists.allowlist))
    records = dataclasses.replace(cfg.records, path=cfg.resolve(cfg.records.path),
                                  state_path=cfg.resolve(cfg.records.state_path))
    return dataclasses.replace(cfg, lists=lists, records=records)


def from_mapping(data: dict[str, Any] | None, file: str = "<config>") -> Config:
    """Build a config from an already-parsed mapping (tests, the Kamailio plug-in)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(file, "", "the top level must be a mapping")
    cfg = _build(Config, data, file, "")
    return _finish(cfg, file)


class _ConfigLoader(yaml.SafeLoader):
    """YAML as PyYAML's safe loader reads it, with two surprises taken out.

    YAML 1.1 reads an unquoted ``0371`` as the octal number 249 (and ``0x10``, ``1_000`` or
    ``1:30`` as numbers too): an area code or number prefix written without quotes became other
    digits, silently.  Here only plain decimal integers are integers; anything else stays the
    string it was written as (a digit-string option takes it as is, a number option refuses it).
    And a key given twice in one mapping is refused instead of the last one winning, which
    silently dropped the first (``lists:`` twice lost the blocklist).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key_node.value!r} given twice",
                                                            key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"),
                                    list("-+0123456789"))


def load(path: str | os.PathLike[str]) -> Config:
    """Read, check and freeze a YAML config file.

    Raises:
        ConfigError: naming the file, the key and the problem.
    """
    file = str(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        line = Path(file).read_bytes()[:exc.start].count(b"\n") + 1
        raise ConfigError(file, "", f"not UTF-8: byte 0x{exc.object[exc.start]:02x} on line {line}") from None
    try:
        data = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(file, "", f"invalid YAML: {where}{getattr(exc, 'problem', exc)}") from None
    if data is None:
        # an empty file (or only comments): a config cut short on its way would run with no lists
        raise ConfigError(file, "", "no settings in the file (write {} for every default)")
    return from_mapping(data, str(Path(file).resolve()) if file != "<config>" else file)


def default_config_path() -> str:
    """The shipped config: $CALLGUARD_CONFIG, else ./config/callguard.yaml."""
    return os.environ.get("CALLGUARD_CONFIG", "config/callguard.yaml")


# ---------------------------------------------------------------- reference
def iter_options(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, str, str]]:
    """Yield (key, default, help) for every option, nested ones as ``a.b``."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        factory: Any = f.default_factory
        default = f.default if f.default is not dataclasses.MISSING else factory()
        if dataclasses.is_dataclass(tp):
            yield key, "", f.metadata.get("help", "")
            yield from iter_options(typing.cast(type, tp), key + ".")
        elif typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            yield key, "see shipped config", f.metadata.get("help", "")
            yield from iter_options(typing.get_args(tp)[0], key + "[].")
        elif typing.get_origin(tp) is dict:
            yield key, "see shipped config", f.metadata.get("help", "")
            yield from iter_options(RuleSettings, key + ".RULE.")
        else:
            if isinstance(default, tuple):
                default = "[" + ", ".join(str(x) for x in default) + "]"
            elif isinstance(default, bool):
                default = str(default).lower()
            yield key, f"`{default}`" if default != "" else '`""`', f.metadata.get("help", "")


def markdown_reference() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, help_text in iter_options():
        lines.append(f"| `{key}` | {default} | {help_text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(markdown_reference())
