"""The call mix: generated lists, SIPp injection files and the bench's callguard config.

Everything is derived from a fixed seed, so two runs offer the same calls.  Number plan:

* banned callers: 5000 generated mobile numbers ``170........``/``171........`` in the blocklist;
* unfiled service callers: 95/96 numbers with no filing (``957xx``, ``0391 967xx``);
* inbound-only service callers: filed with ``outbound=false`` (``952xx``, ``0391 962xx``);
* burst callers: a small pool of ``1360...`` numbers, each calling in runs of ``BURST_RUN`` calls,
  so after the first 10 per minute (the shipped limit) each gets 603;
* clean callers: a fresh mobile number on every line (``13[7-9]``/``15x`` + counter), so no clean
  caller ever reaches a rate limit or the score threshold; their calls are forwarded to the UAS.

The callee is a fresh Shanghai fixed-line number per line (never an emergency number).
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

SEED = 4475
BANNED_COUNT = 5000
BURST_RUN = 50          # consecutive burst-class calls by one burst caller
FILED_OK = [f"951{i:02d}" for i in range(50)]             # filed, outbound allowed
INBOUND_ONLY_95 = [f"952{i:02d}" for i in range(50)]      # filed inbound-only (national)
INBOUND_ONLY_96 = [f"962{i:02d}" for i in range(50)]      # filed inbound-only, area 0391
UNFILED_95 = [f"957{i:02d}" for i in range(50)]
UNFILED_96 = [f"967{i:02d}" for i in range(50)]
AREA = "0391"

#: Call classes and the response each should get from a full callguard (the burst class gets 486
#: for the first calls of each caller's window and 603 after).
CLASSES = ("banned", "unfiled", "inbound_only", "burst", "clean")
EXPECTED = {"banned": "403", "unfiled": "403", "inbound_only": "403", "burst": "603", "clean": "486"}

#: Shares of each class per named mix.  ``reject`` is the BENCH-NOTES anchor path (every call a
#: banned caller), ``forward`` every call clean, ``mixed`` the realistic blend.
MIXES: dict[str, dict[str, float]] = {
    "mixed": {"banned": 0.40, "unfiled": 0.10, "inbound_only": 0.10, "burst": 0.10, "clean": 0.30},
    "reject": {"banned": 1.0},
    "forward": {"clean": 1.0},
}


def banned_numbers() -> list[str]:
    """The 5000 blocked callers (deterministic)."""
    rng = random.Random(SEED)
    out: set[str] = set()
    while len(out) < BANNED_COUNT:
        out.add(rng.choice(("170", "171")) + f"{rng.randrange(10**8):08d}")
    return sorted(out)


def write_lists(folder: Path) -> dict[str, Path]:
    """Write blocklist, filings and allowlist CSVs (callguard's list formats) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"blocklist": folder / "blocklist.csv", "service_numbers": folder / "service_numbers.csv",
             "allowlist": folder / "allowlist.csv"}
    with paths["blocklist"].open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["number", "match", "source", "reason", "added", "expires", "p"])
        for i, n in enumerate(banned_numbers()):
            w.writerow([n, "exact", ("regulator", "complaint", "eagle_eye", "provincial")[i % 4],
                        "bench: generated blocked caller", "2026-01-01", "", ""])
    with paths["service_numbers"].open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["number", "area", "carrier", "usage", "inbound", "outbound", "valid_from", "valid_until"])
        for n in FILED_OK:
            w.writerow([n, "", "China Telecom", "bench: filed call centre", "true", "true", "2024-01-01",
                        "2035-12-31"])
        for n in INBOUND_ONLY_95:
            w.writerow([n, "", "China Unicom", "bench: inbound-only", "true", "false", "2024-01-01", "2035-12-31"])
        for n in INBOUND_ONLY_96:
            w.writerow([n, AREA, "China Mobile", "bench: local inbound-only", "true", "false", "2024-01-01",
                        "2035-12-31"])
    with paths["allowlist"].open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["number", "match", "reason"])
        w.writerow(["10085", "exact", "China Mobile unified outbound platform"])
    return paths


def write_config(path: Path, lists: dict[str, Path], listen_port: int, trunk_port: int, workdir: Path) -> Path:
    """The callguard config used by ``callguard serve`` and the Kamailio plug-in.

    The shipped policy (rate limits, score, rules) is kept; only addresses, lists and file
    locations change.  Logging is at ``warning`` (per-call info lines would measure the log
    sink, not the proxy); the metrics endpoint is on, as shipped, on a free port.
    """
    cfg = {
        "sources": [{"name": "bench", "networks": ["127.0.0.0/8"], "customer": "bench", "direction": "outbound",
                     "trust_identity": True, "area": AREA}],
        "trunks": [{"name": "uas", "address": f"udp:127.0.0.1:{trunk_port}"}],
        "lists": {k: str(v) for k, v in lists.items()},
        "sip": {"listen": [f"udp:127.0.0.1:{listen_port}"]},
        "records": {"path": str(workdir / "records.sqlite3"), "state_path": str(workdir / "state.json")},
        "logging": {"level": "warning"},
        "metrics": {"enabled": True, "listen": "127.0.0.1:0"},
    }
    path.write_text("# written by bench/load.py for one run\n" + yaml.safe_dump(cfg, sort_keys=False),
                    encoding="utf-8")
    return path


@dataclass
class Line:
    caller: str
    callee: str
    klass: str


def lines(mix: str, count: int, instance: int) -> list[Line]:
    """``count`` calls of a mix for SIPp instance ``instance`` (instances never share a clean caller)."""
    shares = MIXES[mix]
    rng = random.Random(SEED * 1000 + instance * 7 + len(mix))
    banned = banned_numbers()
    classes = list(shares)
    weights = [shares[c] for c in classes]
    burst_pool = max(10, int(count * shares.get("burst", 0.0)) // BURST_RUN + 1)
    out: list[Line] = []
    burst_i = 0
    # Clean callers: 11-digit mobiles, a distinct 3-digit prefix per instance, a counter after it.
    clean_prefix = ("137", "138", "139", "150", "151", "152", "157", "158")[instance % 8]
    for i in range(count):
        klass = rng.choices(classes, weights)[0] if len(classes) > 1 else classes[0]
        callee = f"021{(instance * 10_000_000 + i) % 100_000_000:08d}"
        if klass == "banned":
            caller = banned[rng.randrange(len(banned))]
        elif klass == "unfiled":
            caller = rng.choice(UNFILED_95) if rng.random() < 0.5 else AREA + rng.choice(UNFILED_96)
        elif klass == "inbound_only":
            caller = rng.choice(INBOUND_ONLY_95) if rng.random() < 0.5 else AREA + rng.choice(INBOUND_ONLY_96)
        elif klass == "burst":
            caller = f"1360{instance:02d}{(burst_i // BURST_RUN) % burst_pool:05d}"
            burst_i += 1
        else:
            caller = f"{clean_prefix}{i:08d}"
        out.append(Line(caller, callee, klass))
    return out


def write_injection(path: Path, mix: str, count: int, instance: int) -> dict[str, int]:
    """Write a SIPp ``-inf`` file (``SEQUENTIAL``; ``caller;callee``) and return calls per class."""
    counts = dict.fromkeys(CLASSES, 0)
    with path.open("w", encoding="ascii") as fh:
        fh.write("SEQUENTIAL\n")
        for ln in lines(mix, count, instance):
            fh.write(f"{ln.caller};{ln.callee};\n")
            counts[ln.klass] += 1
    return counts
