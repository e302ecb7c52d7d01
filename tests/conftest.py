"""Shared fixtures: both core implementations, and guards built from small configs."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from callguard import config as config_mod
from callguard.guard import Guard, load_lists
from callguard.lists import Lists

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_780_000_000.0          # 2026-05-28, inside the sample lists' validity periods


def _cython_available() -> bool:
    if os.environ.get("CALLGUARD_NO_EXTENSIONS"):
        return False
    try:
        import callguard._core  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise  # in CI the compiled core must be there: never skip it silently
        return False
    return True


CYTHON = _cython_available()
IMPLEMENTATIONS = [
    pytest.param("python", id="py-core"),
    pytest.param("cython", id="c-core", marks=pytest.mark.skipif(not CYTHON, reason="compiled core not built")),
]


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


BLOCKLIST = """\
number,match,source,reason,added,expires,p,complaints
13800138000,exact,regulator,police notice,2026-01-10,,,
17100000001,exact,complaint,harassment,2026-03-02,,,4
1650000,prefix,manual,leased dialer block,2026-02-14,,,
13900139000,exact,big_data,model,2026-09-01,,0.91,
13900139001,exact,big_data,model below cut-off,2026-09-01,,0.42,1
13900139002,exact,big_data,model at cut-off,2026-09-01,,0.75,
13700137000,exact,complaint,expired ban,2025-01-01,2025-06-30,,2
"""

FILINGS = """\
number,area,carrier,usage,inbound,outbound,valid_from,valid_until
95588,,China Telecom,bank,true,true,2024-01-01,2029-12-31
95555,,China Unicom,bank inbound only,true,false,2024-01-01,2029-12-31
95511,,China Mobile,insurance,true,true,2020-01-01,2025-12-31
9512345,,China Mobile,sub-code filed separately,true,false,2024-01-01,2029-12-31
96123,0391,China Telecom,utility inbound only,true,false,2024-01-01,2029-12-31
96555,0391,China Mobile,taxi,true,true,2024-01-01,2029-12-31
"""

ALLOWLIST = """\
number,match,reason
10085,exact,unified outbound platform
1880000,prefix,call-centre range under contract
"""


@pytest.fixture
def lists_dir(tmp_path: Path) -> Path:
    d = tmp_path / "lists"
    write(d / "blocklist.csv", BLOCKLIST)
    write(d / "service_numbers.csv", FILINGS)
    write(d / "allowlist.csv", ALLOWLIST)
    return d


@pytest.fixture
def make_guard(lists_dir: Path, impl: str) -> Callable[..., Guard]:
    """Build a guard of the parametrised implementation from config overrides."""

    def make(**overrides: Any) -> Guard:
        data: dict[str, Any] = {
            "lists": {"blocklist": str(lists_dir / "blocklist.csv"),
                      "service_numbers": str(lists_dir / "service_numbers.csv"),
                      "allowlist": str(lists_dir / "allowlist.csv")},
            "records": {"enabled": False},
            "metrics": {"enabled": False},
        }
        data.update(overrides)
        cfg = config_mod.from_mapping(data, "test.yaml")
        lists: Lists = load_lists(cfg)
        return Guard(cfg, lists, implementation=impl)

    return make
