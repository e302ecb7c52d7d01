"""Thread names the operating system shows."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from callguard.osthread import set_os_thread_name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux names threads through prctl")
def test_a_thread_named_shows_under_that_name() -> None:
    seen: dict[str, object] = {}

    def body() -> None:
        seen["ok"] = set_os_thread_name("cg-records-writer-long-name")
        seen["comm"] = Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == {"ok": True, "comm": "cg-records-writ"}     # the kernel keeps 15 bytes
    assert Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip() != "cg-records-writ"
