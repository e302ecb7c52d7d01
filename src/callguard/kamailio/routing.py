"""Routing helpers shared by the decider and the KEMI plug-in: trunk choice, SIP URIs, identity."""

from __future__ import annotations

from functools import lru_cache

from ..config import Config, parse_address
from ..settings import compile_settings, resolve_source


def pick_trunk(cfg: Config, callee_digits: str) -> str:
    """The address (``udp:HOST:PORT``) of the trunk for a normalised callee.

    The trunk whose prefixes match the callee longest wins; otherwise the first trunk
    without prefixes (the default route); otherwise the first trunk.
    """
    best = ""
    best_len = -1
    default = ""
    for trunk in cfg.trunks:
        if not trunk.prefixes:
            if not default:
                default = trunk.address
            continue
        for prefix in trunk.prefixes:
            if len(prefix) > best_len and callee_digits.startswith(prefix):
                best, best_len = trunk.address, len(prefix)
    return best or default or cfg.trunks[0].address


@lru_cache(maxsize=256)
def trunk_uri(address: str) -> str:
    """``udp:127.0.0.1:5080`` -> ``sip:127.0.0.1:5080;transport=udp`` (the destination URI, $du)."""
    transport, host, port = parse_address(address)
    if ":" in host:
        host = f"[{host}]"
    return f"sip:{host}:{port};transport={transport}"


class IdentityPolicy:
    """Which number is the caller: From, or P-Asserted-Identity from a source that is trusted for it."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self._settings = compile_settings(cfg)
        self._cache: dict[str, bool] = {}

    def trusts(self, source: str) -> bool:
        """True when the source trusts P-Asserted-Identity: the source the core finds (the same
        resolve_source, so an IPv4-mapped, bracketed or zoned address is the same source)."""
        hit = self._cache.get(source)
        if hit is None:
            idx = resolve_source(self._settings, source)
            hit = idx >= 0 and self._cfg.sources[idx].trust_identity
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[source] = hit
        return hit

    def caller(self, source: str, from_uri: str, identity: str) -> str:
        """The caller to screen: the asserted identity when present and trusted, else From."""
        if identity and self.trusts(source):
            return identity
        return from_uri
