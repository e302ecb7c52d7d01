"""The queued log stream of ``callguard serve``: a stalled reader of the log never stalls a writer."""

from __future__ import annotations

import json
import threading

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
