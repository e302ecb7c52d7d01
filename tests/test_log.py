"""The queued log stream of ``callguard serve``: a stalled reader of the log never stalls a writer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from callguard.log import QueuedStream


class StalledSink:
    """A target whose writes block until released, like a pipe nobody reads."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.chunks: list[str] = []

    def write(self, text: str) -> int:
        self.entered.set()
        assert self.release.wait(30)
        self.chunks.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_writes_never_wait_for_a_stalled_target_and_what_overflows_is_counted() -> None:
    sink = StalledSink()
    stream = QueuedStream(sink, max_pending=1000)
    try:
        stream.write("first\n")
        assert sink.entered.wait(10)         # the writer thread is now stuck in the target's write
        done = threading.Event()

        def writer() -> None:
            for i in range(200):
                stream.write(f"line {i:03d}\n")    # 9 characters each: 110 fit beside "first\n"
            done.set()

        threading.Thread(target=writer, daemon=True).start()
        assert done.wait(10), "a write waited for the stalled target"
        assert stream.dropped == 200 - 110      # what is being written still counts as pending
        sink.release.set()
        assert stream.drained(10)
    finally:
        sink.release.set()
        stream.close()
    text = "".join(sink.chunks)
    lines = text.splitlines()
    assert lines[0] == "first"
    # The lost lines are reported before the next lines written out, in order.
    notice = json.loads(lines[1])
    assert notice["event"] == "log_lines_dropped" and notice["count"] == 90
    assert lines[2:] == [f"line {i:03d}" for i in range(110)]


def test_close_writes_out_what_is_pending() -> None:
    class Sink:
        def __init__(self) -> None:
            self.text = ""

        def write(self, text: str) -> int:
            self.text += text
            return len(text)

        def flush(self) -> None:
            pass

    sink = Sink()
    stream = QueuedStream(sink)
    for i in range(1000):
        print(f"event {i}", file=stream, flush=True)     # how structlog's PrintLogger writes
    stream.close()
    assert sink.text.splitlines() == [f"event {i}" for i in range(1000)]
    assert stream.write("after close\n") and stream.dropped == 1


def test_a_decider_whose_log_nobody_reads_still_answers(tmp_path: Path) -> None:
    from callguard.kamailio import protocol as proto
    from callguard.kamailio.client import DeciderClient

    from .test_proxy_basic import BANNED, _serve_env, free_port, make_config, wait_until

    cfg = make_config(tmp_path, [f"udp:127.0.0.1:{free_port()}"], [{"name": "t", "address": "udp:127.0.0.1:5999"}],
                      logging={"level": "info"})
    sock = str(tmp_path / "decider.sock")
    # stderr: a pipe of 64 KiB that nothing reads until the end
    argv = [sys.executable, "-m", "callguard.kamailio.daemon", "--config", str(cfg), "--socket", sock]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=_serve_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        client = DeciderClient(sock, timeout=5.0)
        wait_until(lambda: os.path.exists(sock) or proc.poll() is not None, 30, "the decider to open its socket")
        assert proc.poll() is None
        # 2000 rejections at info, one log line each: ten times what the pipe holds.
        for i in range(2000):
            reply = client.check(proto.CheckRequest(BANNED, f"0215{i:07d}", "127.0.0.1", "", f"k{i}|1|z9hG4bKk{i}",
                                                    f"call-{i}"))
            assert reply.code == 403 and reply.rule == "banned", i
        proc.send_signal(signal.SIGTERM)
        _, log = proc.communicate(timeout=60)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert sum(1 for e in events if e.get("rule") == "banned") == 2000
    assert events[-1]["event"] == "decider_stopped"
