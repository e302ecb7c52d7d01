"""CPU per rejected call inside ``callguard serve``'s UDP listener, without the kernel's wake-ups.

The load bench (``bench/load.py``) measures the whole process under SIPp, where every wake-up
from epoll costs a context switch and the machine's noise moves a point by a microsecond or
two.  This script takes those out: it builds the proxy of ``callguard serve`` in this process
(the load bench's lists and config: records on, metrics on), puts ``--group`` calls' INVITEs
(a banned caller, SIPp's INVITE with SDP) and the previous group's ACKs in the socket with one
``sendmmsg``, then runs one wake-up of the listener, and so on for ``--calls`` calls.  It reports
the listener's CPU per call (receiving, parsing, deciding, answering, the bookkeeping: the loop's
thread) and the records writer thread's CPU per call.  With ``--groups 1,20`` the difference
between the two sizes is the fixed cost of one wake-up (the system calls and the loop's share).

It runs the compiled path (``FastPath.pump``) and the Python path (``CALLGUARD_NO_FAST_PATH=1``:
the same batched socket, the pure parser and ``Guard.check``), each in its own process, and prints
the ratio.  Nothing is asserted; only 127.0.0.1 is used.

Usage: PYTHONPATH=src python bench/fastpath.py [--calls 60000] [--groups 1,20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

SDP = (b"v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       b"m=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


def _messages(n: int, caller: str, port: int, lport: int, pid: int) -> tuple[bytes, bytes]:
    """The INVITE of call ``n`` (as SIPp's bench scenario sends it) and its ACK."""
    callee = f"13800{n % 100000:06d}"
    head = (f"sip:{callee}@127.0.0.1:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch=z9hG4bK-{pid}-{n}-1\r\n"
            f"From: sipp <sip:{caller}@127.0.0.1:{lport}>;tag={n}SIPpTag00{n}\r\n")
    rest = (f"Call-ID: {n}-{pid}@127.0.0.1\r\nCSeq: 1 {{m}}\r\n"
            f"Contact: sip:sipp@127.0.0.1:{lport}\r\nMax-Forwards: 70\r\nSubject: Performance Test\r\n")
    invite = (f"INVITE {head}To: <sip:{callee}@127.0.0.1:{port}>\r\n" + rest.format(m="INVITE")
              + f"Content-Type: application/sdp\r\nContent-Length: {len(SDP)}\r\n\r\n").encode() + SDP
    ack = (f"ACK {head}To: <sip:{callee}@127.0.0.1:{port}>;tag=cg\r\n" + rest.format(m="ACK")
           + "Content-Length: 0\r\n\r\n").encode()
    return invite, ack


def _thread_cpu(tid: int) -> float:
    """CPU seconds of one thread of this process (schedstat: nanoseconds, not clock ticks)."""
    try:
        return int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def measure(calls: int, group: int) -> dict[str, Any]:
    """Run the calls through one proxy in this process; CPU per call of its listener and records writer."""
    import gc

    import yaml

    from callguard import config as config_mod
    from callguard.guard import Guard
    from callguard.sip._sipcore import UdpBatch
    from callguard.sip.proxy import NullMetrics, Proxy
    from callguard.sip.server import _open_records
    from callguard.sip.transport import open_udp
    from loadlib import mix

    work = Path(tempfile.mkdtemp(prefix="cg-fastpath-"))
    lists = mix.write_lists(work / "lists")
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    cfg_path = mix.write_config(work / "callguard.yaml", lists, port, 9, work)
    data = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    data["metrics"]["enabled"] = False      # no HTTP server in the measuring process
    cfg_path.write_text(yaml.safe_dump(data), encoding="utf-8")
    cfg = config_mod.load(cfg_path)

    class _Log:
        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: None

    loop = asyncio.new_event_loop()
    tasks_before = set(os.listdir("/proc/self/task"))
    records = _open_records(cfg, _Log(), NullMetrics())
    proxy = Proxy(loop, cfg, Guard(cfg), records=records)
    ep = loop.run_until_complete(open_udp(loop, proxy.handle, "127.0.0.1", port))
    proxy.udp.append(ep)
    proxy.start()
    fast = getattr(ep, "fast", None)
    wake = (lambda: fast.pump(ep, proxy, loop)) if fast is not None else ep._on_readable

    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sender.bind(("127.0.0.1", 0))
    lport = sender.getsockname()[1]
    out = UdpBatch(sender.fileno(), 64)
    banned = mix.banned_numbers()
    dest = ("127.0.0.1", port)
    pairs = [_messages(n, banned[n % len(banned)], port, lport, os.getpid()) for n in range(calls)]
    batches = []
    for first in range(0, calls, group):
        batch = [(pairs[n][0], dest) for n in range(first, min(first + group, calls))]
        batch += [(pairs[n][1], dest) for n in range(max(0, first - group), first)]
        batches.append(batch)
    batches.append([(pairs[n][1], dest) for n in range(max(0, calls - group), calls)])
    gc.collect()
    gc.freeze()     # the messages above are this script's, not the proxy's

    # the records writer (an OS thread of its own) and anything else the proxy started
    writer = [int(t) for t in set(os.listdir("/proc/self/task")) - tasks_before]
    if hasattr(records, "flush"):
        records.flush(timeout=60.0)      # the writer has opened its database and waits
    writer_cpu0 = sum(_thread_cpu(t) for t in writer)
    cpu = 0.0
    answers = 0
    tick_every = max(1, 200 // group)     # the proxy's timer tick, as often per call as at 10k calls/s
    for i, batch in enumerate(batches):
        sent = 0
        while sent < len(batch):
            sent += out.send_many(batch[sent:])
        select.select([ep.sock], [], [], 1.0)
        c0 = time.thread_time()
        wake()
        if i % tick_every == 0:
            proxy._tick_handle.cancel()
            proxy._tick()
        cpu += time.thread_time() - c0
        while True:
            try:
                sender.recv(65535, socket.MSG_DONTWAIT)
                answers += 1
            except BlockingIOError:
                break
    proxy._tick_handle.cancel()
    proxy._tick()
    if fast is not None:
        proxy.on_batch(fast)     # the rows of the last batches, which the tick leaves until enough gather
    if hasattr(records, "flush"):
        records.flush(timeout=60.0)      # every row written (the writer thread's CPU is read before it ends)
    writer_cpu = sum(_thread_cpu(t) for t in writer) - writer_cpu0
    written = len(records.query(rule="banned", limit=calls + 1)) if hasattr(records, "query") else 0
    records.close()
    slow = int(fast.slow) if fast is not None else None
    sender.close()
    return {"path": "compiled" if fast is not None else "python", "calls": calls, "group": group,
            "answers": answers, "slow_path_datagrams": slow, "records_written": written,
            "listener_us": round(cpu * 1e6 / calls, 2),
            "records_thread_us": round(writer_cpu * 1e6 / calls, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=60000, help="rejected calls per path (default 60000)")
    ap.add_argument("--groups", default="1,20",
                    help="calls whose INVITEs (and the previous calls' ACKs) one wake-up reads, comma-separated "
                         "(default 1,20)")
    ap.add_argument("--group", type=int, default=20, help=argparse.SUPPRESS)
    ap.add_argument("--one", choices=("compiled", "python"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.calls, args.group)))
        return 0
    for group in [int(g) for g in args.groups.split(",") if g.strip()]:
        results = {}
        for path in ("compiled", "python"):
            env = dict(os.environ)
            if path == "python":
                env["CALLGUARD_NO_FAST_PATH"] = "1"
            calls = args.calls if path == "compiled" else max(group, args.calls // 10)
            run = subprocess.run([sys.executable, __file__, "--one", path, "--calls", str(calls), "--group",
                                  str(group)], env=env, capture_output=True, text=True, timeout=900)
            if run.returncode != 0:
                print(f"{path}: failed\n{run.stderr[-2000:]}", file=sys.stderr)
                return 1
            results[path] = json.loads(run.stdout)
        print(f"rejected calls (INVITE with SDP -> 403, ACK), {group} per wake-up, records on; "
              "CPU per call, epoll's wake-ups excluded:")
        for path, r in results.items():
            total = r["listener_us"] + r["records_thread_us"]
            if r["answers"] != r["calls"] or r["records_written"] != r["calls"]:
                print(f"  warning: {path} answered {r['answers']} and recorded {r['records_written']} "
                      f"of {r['calls']} calls")
            print(f"  {path:8s} listener {r['listener_us']:6.2f} us + records thread {r['records_thread_us']:5.2f} us "
                  f"= {total:6.2f} us  ({r['calls']} calls)")
        c, p = results["compiled"], results["python"]
        print(f"  compiled / python: listener {c['listener_us'] / p['listener_us']:.3f}, total "
              f"{(c['listener_us'] + c['records_thread_us']) / (p['listener_us'] + p['records_thread_us']):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
