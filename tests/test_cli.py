"""`callguard check`, `replay` and `validate` as SPEC §5 says, run as real processes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, write

SHIPPED = str(ROOT / "config" / "callguard.yaml")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "callguard", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.fixture(params=["cython", "python"])
def core_env(request: pytest.FixtureRequest) -> dict[str, str]:
    from .conftest import CYTHON

    if request.param == "cython" and not CYTHON:
        pytest.skip("compiled core not built")
    return {"CALLGUARD_NO_EXTENSIONS": "1"} if request.param == "python" else {"CALLGUARD_NO_EXTENSIONS": ""}


def test_check_json_reject(core_env: dict[str, str]) -> None:
    proc = run("check", "sip:+8613800138000@gw", "02150001234", "--source", "127.0.0.1", "--config", SHIPPED,
               "--json", env=core_env)
    assert proc.returncode == 3, proc.stderr
    out = json.loads(proc.stdout)
    assert out["verdict"] == "reject" and out["code"] == 403 and out["rule"] == "banned"
    assert out["caller"] == "13800138000" and out["callee"] == "02150001234"
    assert out["reason"] and 0.0 <= out["score"] <= 1.0


def test_check_allow_and_text_output(core_env: dict[str, str]) -> None:
    proc = run("check", "13312345678", "tel:+86-391-3569391", "--config", SHIPPED, env=core_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("allow - allow") and "callee=03913569391" in proc.stdout


def test_check_emergency_from_banned_caller(core_env: dict[str, str]) -> None:
    proc = run("check", "13800138000", "110", "--source", "127.0.0.1", "--config", SHIPPED, "--json", env=core_env)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["rule"] == "emergency"


@pytest.mark.parametrize("args", [
    ["13800138000", "110", "--source", "300.1.1.1"],
    ["13800138000", "110", "--time", "last tuesday"],
    ["13800138000"],
])
def test_check_bad_input_exits_2(args: list[str]) -> None:
    proc = run("check", *args, "--config", SHIPPED)
    assert proc.returncode == 2
    assert "error" in proc.stderr


def test_check_missing_config_exits_2(tmp_path: Path) -> None:
    proc = run("check", "13800138000", "110", "--config", str(tmp_path / "none.yaml"))
    assert proc.returncode == 2 and "cannot read" in proc.stderr


def _log(path: Path, rows: list[tuple[str, ...]], header: str = "time,caller,callee,source") -> Path:
    with open(path, "w", newline="") as f:
        f.write(header + "\n")
        csv.writer(f).writerows(rows)
    return path


def test_replay_writes_rows_and_summary(tmp_path: Path, core_env: dict[str, str]) -> None:
    t0 = 1_780_000_000
    rows = [(str(t0), "13800138000", "02150001234", "127.0.0.1"),
            ("2026-05-28T12:00:00+08:00", "95555", "02150001234", "127.0.0.1"),
            (str(t0 + 2), "anonymous", "02150001234", "127.0.0.1"),
            (str(t0 + 3), "13312345678", "110", "192.0.2.1"),
            ("not-a-time", "13312345678", "02150001234", "127.0.0.1")]
    rows += [(str(t0 + 10 + i), "13312345678", f"0215000{i:04d}", "127.0.0.1") for i in range(12)]
    log = _log(tmp_path / "log.csv", rows)
    out = tmp_path / "out.csv"
    proc = run("replay", str(log), "--config", SHIPPED, "--out", str(out), env=core_env)
    assert proc.returncode == 0, proc.stderr
    got = list(csv.DictReader(open(out, newline="")))
    assert len(got) == len(rows)                        # nothing lost, broken rows included
    assert [r["rule"] for r in got[:5]] == ["banned", "outbound_prohibited", "anonymous", "emergency", "bad_row"]
    assert got[0]["verdict"] == "reject" and got[0]["code"] == "403"
    assert got[4]["verdict"] == "error"
    assert [r["rule"] for r in got[5:]] == ["allow"] * 10 + ["high_frequency"] * 2
    assert got[5]["caller"] == "13312345678" and got[5]["source"] == "127.0.0.1"   # input columns kept
    summary = proc.stdout
    assert "high_frequency" in summary and "banned" in summary and "total" in summary
    assert f"{log}:6: time" in proc.stderr                # the broken row named with file and line


def test_replay_chunks_give_the_same_verdicts(tmp_path: Path) -> None:
    """Chunked replay (constant memory) decides exactly as one check per row."""
    from callguard.guard import Guard
    from callguard.replay import replay

    t0 = 1_780_000_000
    rows = [(str(t0 + i // 3), f"1331234{i % 7:04d}", f"0215000{i % 40:04d}", "127.0.0.1") for i in range(300)]
    log = _log(tmp_path / "log.csv", rows)
    out = tmp_path / "out.csv"
    with open(out, "w", newline="") as f:
        summary = replay(Guard.from_config(SHIPPED), str(log), f, chunk_rows=7)
    single = Guard.from_config(SHIPPED)
    expected = [single.check(c, e, source=s, now=float(t)).rule for t, c, e, s in rows]
    got = [r["rule"] for r in csv.DictReader(open(out, newline=""))]
    assert got == expected
    assert summary.rows == 300 and sum(summary.per_rule.values()) == 300


def test_replay_warns_about_time_order(tmp_path: Path) -> None:
    log = _log(tmp_path / "log.csv", [("100", "13312345678", "110"), ("50", "13312345678", "110")],
               header="time,caller,callee")
    proc = run("replay", str(log), "--config", SHIPPED)
    assert proc.returncode == 0
    assert "out of time order" in proc.stdout or "earlier than the row before" in proc.stdout


def test_replay_bad_header_exits_2(tmp_path: Path) -> None:
    log = write(tmp_path / "log.csv", "when,who\n1,2\n")
    proc = run("replay", str(log), "--config", SHIPPED)
    assert proc.returncode == 2 and "header lacks column" in proc.stderr


def test_validate_reports_broken_rows(tmp_path: Path) -> None:
    lists_dir = tmp_path / "lists"
    write(lists_dir / "bl.csv",
          "number,match,source,reason,added,expires,p\n13800138000,exact,manual,x,,,\nzz,exact,manual,x,,,\n")
    cfg = write(tmp_path / "c.yaml", "lists: {blocklist: lists/bl.csv}\n")
    proc = run("validate", "--config", str(cfg))
    assert proc.returncode == 2
    assert "bl.csv:3: number" in proc.stderr
    proc = run("validate", "--config", SHIPPED)
    assert proc.returncode == 0 and "ok" in proc.stdout
