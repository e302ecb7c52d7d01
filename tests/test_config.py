"""The YAML config: defaults, range checks, errors that name file, key and problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from callguard import config as config_mod
from callguard.errors import ConfigError

from .conftest import ROOT, write

SHIPPED = ROOT / "config" / "callguard.yaml"


def test_shipped_config_has_the_spec_defaults() -> None:
    cfg = config_mod.load(SHIPPED)
    assert cfg.sip.listen == ("udp:127.0.0.1:5060",)
    assert cfg.trunks[0].address == "udp:127.0.0.1:5080"
    assert cfg.sources[0].networks == ("127.0.0.0/8",)
    limits = {(rl.window, rl.max_calls, rl.max_distinct_callees) for rl in cfg.rate_limits}
    assert limits == {(60.0, 10, 0), (3600.0, 60, 0), (3600.0, 0, 30)}
    assert cfg.score.threshold == 0.75
    assert set(cfg.allowlist_numbers) == {"10085", "10001", "10016"}
    assert cfg.emergency_numbers == ("110", "112", "119", "120", "122")
    # relative list paths resolve against the config file's folder
    assert Path(cfg.lists.blocklist) == (SHIPPED.parent / "lists" / "blocklist.csv").resolve()
    assert cfg.rules["anonymous"].code == 433 and cfg.rules["high_frequency"].code == 603
    assert cfg.rules["score"].code == 608


def test_empty_config_gets_every_default() -> None:
    cfg = config_mod.from_mapping({})
    assert cfg == config_mod.from_mapping(None)
    assert cfg.score.threshold == 0.75 and cfg.records.retention_days == 30


def test_config_is_frozen() -> None:
    cfg = config_mod.from_mapping({})
    with pytest.raises(AttributeError):
        cfg.score = None  # type: ignore[misc]


@pytest.mark.parametrize(("text", "key", "problem"), [
    ("score: {threshold: 1.5}", "score.threshold", "between 0 and 1"),
    ("score: {threshold: high}", "score.threshold", "expected a number"),
    ("rate_limits: [{window: 0, max_calls: 3}]", "rate_limits[0].window", "between"),
    ("rate_limits: [{window: 60}]", "rate_limits[0]", "set max_calls or max_distinct_callees"),
    ("rate_limits: [{window: 60, max_calls: 3, key: imsi}]", "rate_limits[0].key", "one of caller, source"),
    ("sources: [{networks: [10.0.0.0/33]}]", "sources[0].networks", "CIDR"),
    ("sources: [{networks: [10.0.0.0/8], area: 391}]", "sources[0].area", "area code"),
    ("trunks: [{address: 'http://x'}]", "trunks[0].address", "udp:HOST:PORT"),
    ("trunks: []", "trunks", "at least one trunk"),
    ("rules: {banned: {mode: block}}", "rules.banned.mode", "enforce, shadow"),
    ("rules: {banned: {code: 200}}", "rules.banned.code", "400-699"),
    ("rules: {bannned: {code: 403}}", "rules.bannned", "unknown rule id"),
    ("records: {retention_days: 7}", "records.retention_days", "between 30"),
    ("records: {partition_minutes: 0}", "records.partition_minutes", "between 1 and 1440"),
    ("records: {partition_minutes: 1.5}", "records.partition_minutes", "an integer"),
    ("scoree: {}", "scoree", "unknown key"),
    ("sip: {listen: 'udp:127.0.0.1:99999'}", "sip.listen", "port out of range"),
    ("emergency_numbers: [11a]", "emergency_numbers", "digit strings"),
    ("lists: {strict: maybe}", "lists.strict", "true or false"),
    ("- just\n- a list", "", "top level must be a mapping"),
    ("score: {threshold: [unclosed", "", "invalid YAML: line "),
])
def test_errors_name_file_key_and_problem(tmp_path: Path, text: str, key: str, problem: str) -> None:
    path = write(tmp_path / "bad.yaml", text + "\n")
    with pytest.raises(ConfigError) as info:
        config_mod.load(path)
    err = info.value
    assert err.key == key
    assert problem in err.problem
    assert str(path.resolve()) in str(err) or str(path) in str(err)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config_mod.load(tmp_path / "nope.yaml")


def test_cli_exits_2_on_bad_config(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "score: {threshold: 2}\n")
    proc = subprocess.run([sys.executable, "-m", "callguard", "check", "13800138000", "110", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "bad.yaml: score.threshold: must be between 0 and 1" in proc.stderr


def test_readme_documents_every_key() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [key for key, _, _ in config_mod.iter_options() if f"`{key}`" not in readme]
    assert not missing, f"README lacks config keys: {missing}"
