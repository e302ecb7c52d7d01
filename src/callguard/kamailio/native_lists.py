"""Export callguard's lists as db_text tables for ``config/kamailio/kamailio-native.cfg``.

The native configuration is the benchmark anchor: Kamailio doing the screening with its own
``htable`` module and no Python.  It looks callers up by exact key, so this export writes the
normalised national form of every *active exact* blocklist entry (prefix entries, expired
entries and big-data entries below the score threshold are left out) and one row per 95/96
filing (value 1: outbound allowed, 0: inbound only; 96 filings keyed with their area code,
``039196123``).

    python -m callguard.kamailio.native_lists --config config/callguard.yaml --out /etc/kamailio/callguard-db

The folder then holds the db_text tables ``version``, ``callguard_blocklist`` and
``callguard_filings``; point ``CG_DBURL`` at it (``text:///etc/kamailio/callguard-db``).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from .. import config as config_mod
from ..errors import CallguardError
from ..lists import parse_time, parse_tz
from ..numbers import HIDDEN, normalize

HTABLE_COLUMNS = "key_name(str) key_type(int) value_type(int) key_value(str) expires(int)\n"
HTABLE_VERSION = 2


def _esc(text: str) -> str:
    """db_text escaping: the separator and backslash."""
    return text.replace("\\", "\\\\").replace(":", "\\:")


def _rows(path: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        return [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader
                if row and not str(next(iter(row.values()), "")).startswith("#")]


def export(config_path: str, out: str, now: float | None = None) -> tuple[int, int]:
    """Write the db_text tables; return (blocklist rows, filing rows)."""
    cfg = config_mod.load(config_path)
    tz = parse_tz(cfg.lists.timezone)
    now = time.time() if now is None else now
    blocked: set[str] = set()
    if cfg.lists.blocklist:
        for row in _rows(cfg.lists.blocklist):
            try:
                if row.get("match", "exact").lower() != "exact":
                    continue
                if row.get("expires") and parse_time(row["expires"], tz, end_of_day=True) < now:
                    continue
                if row.get("source") == "big_data" and row.get("p") and float(row["p"]) < cfg.score.threshold:
                    continue
            except (ValueError, CallguardError):
                continue   # the same rows the core skips as broken
            number = normalize(row.get("number", ""))
            if number.kind != HIDDEN:
                blocked.add(number.digits)
    filings: dict[str, int] = {}
    if cfg.lists.service_numbers:
        for row in _rows(cfg.lists.service_numbers):
            digits = "".join(ch for ch in row.get("number", "") if ch.isdigit())
            if not digits:
                continue
            try:
                if row.get("valid_from") and parse_time(row["valid_from"], tz) > now:
                    continue
                if row.get("valid_until") and parse_time(row["valid_until"], tz, end_of_day=True) < now:
                    continue   # an expired filing is no filing for the native script
            except (ValueError, CallguardError):
                continue
            key = (row.get("area", "") + digits) if digits.startswith("96") else digits
            filings[key] = 1 if row.get("outbound", "").lower() == "true" else 0
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "callguard_blocklist", "w", encoding="utf-8") as f:
        f.write(HTABLE_COLUMNS)
        f.writelines(f"{_esc(n)}:0:0:1:0\n" for n in sorted(blocked))
    with open(folder / "callguard_filings", "w", encoding="utf-8") as f:
        f.write(HTABLE_COLUMNS)
        f.writelines(f"{_esc(n)}:0:1:{v}:0\n" for n, v in sorted(filings.items()))
    (folder / "version").write_text("table_name(str) table_version(int)\n"
                                    f"callguard_blocklist:{HTABLE_VERSION}\ncallguard_filings:{HTABLE_VERSION}\n",
                                    encoding="utf-8")
    return len(blocked), len(filings)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m callguard.kamailio.native_lists",
                                description="Export the lists as db_text tables for kamailio-native.cfg.")
    p.add_argument("--config", default=config_mod.default_config_path(), help="YAML config naming the lists")
    p.add_argument("--out", required=True, help="folder for the db_text tables")
    args = p.parse_args(argv)
    try:
        blocked, filings = export(args.config, args.out)
    except (CallguardError, OSError) as exc:
        sys.stderr.write(f"native_lists: {exc}\n")
        return 2
    print(f"wrote {blocked} blocklist keys and {filings} filings to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
