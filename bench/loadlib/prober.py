"""Latency prober: one INVITE every few milliseconds beside the load, replies timestamped by the kernel.

SIPp reports response times in whole milliseconds (p50 reads 0 for a fast system), so the bench
measures latency itself: the send time is taken just before ``sendto`` and the receive time is
the kernel's ``SO_TIMESTAMPNS`` stamp of the reply, both on CLOCK_REALTIME, so the queueing in
this Python process is not counted.  Each probe is acknowledged like a real call.

Probe kinds: ``reject`` (a banned caller: the screening decision alone) and ``forward`` (a fresh
clean caller: decision, forwarding, the UAS's 486 and its relay back).

Run: ``python bench/loadlib/prober.py --port PORT --duration S --interval-ms 5 --kinds reject,forward
--banned NUMBER``; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import time
from typing import Any

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def _invite(port: int, lport: int, n: int, caller: str, callee: str) -> tuple[bytes, str]:
    branch = f"z9hG4bK-probe-{os.getpid()}-{n}"
    msg = (f"INVITE sip:{callee}@127.0.0.1:{port} SIP/2.0\r\n"
           f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch={branch};rport\r\n"
           f"From: <sip:{caller}@127.0.0.1>;tag=p{n}\r\nTo: <sip:{callee}@127.0.0.1:{port}>\r\n"
           f"Call-ID: probe-{os.getpid()}-{n}@127.0.0.1\r\nCSeq: 1 INVITE\r\n"
           f"Contact: <sip:{caller}@127.0.0.1:{lport}>\r\nMax-Forwards: 70\r\n"
           "Content-Length: 0\r\n\r\n")
    return msg.encode(), branch


def _ack(port: int, lport: int, n: int, caller: str, callee: str, branch: str, to_line: str) -> bytes:
    return (f"ACK sip:{callee}@127.0.0.1:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch={branch};rport\r\n"
            f"From: <sip:{caller}@127.0.0.1>;tag=p{n}\r\n{to_line}\r\n"
            f"Call-ID: probe-{os.getpid()}-{n}@127.0.0.1\r\nCSeq: 1 ACK\r\nMax-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n").encode()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def run(port: int, duration: float, interval: float, kinds: list[str], banned: str, delay: float) -> dict[str, Any]:
    """Probe 127.0.0.1:port for ``duration`` seconds; return latency figures per kind (µs)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.setblocking(False)
    lport = s.getsockname()[1]
    dest = ("127.0.0.1", port)
    pending: dict[str, tuple[int, int, str, str, str]] = {}   # Call-ID -> (n, sent_ns, kind, caller, callee)
    done: dict[str, bytes] = {}                                # Call-ID -> our ACK, for retransmitted finals
    lat: dict[str, list[float]] = {k: [] for k in kinds}
    codes: dict[str, dict[str, int]] = {k: {} for k in kinds}
    sent = dict.fromkeys(kinds, 0)
    time.sleep(delay)
    start = time.monotonic()
    next_send = start
    end = start + duration
    drain_end = end + 1.0
    n = 0
    anc_size = socket.CMSG_SPACE(16)
    while True:
        now = time.monotonic()
        if now >= drain_end or (now >= end and not pending):
            break
        if now >= next_send and now < end:
            kind = kinds[n % len(kinds)]
            caller = banned if kind == "reject" else f"134{os.getpid() % 1000:03d}{n:05d}"
            callee = f"0218{n % 10_000_000:07d}"
            msg, branch = _invite(port, lport, n, caller, callee)
            cid = f"probe-{os.getpid()}-{n}@127.0.0.1"
            t0 = time.time_ns()
            s.sendto(msg, dest)
            pending[cid] = (n, t0, kind, caller, callee)
            sent[kind] += 1
            n += 1
            next_send += interval
            if next_send < now:           # never burst to catch up after a stall
                next_send = now + interval
            continue
        timeout = max(0.0, min(next_send if now < end else drain_end, drain_end) - now)
        r, _, _ = select.select([s], [], [], timeout)
        if not r:
            continue
        while True:
            try:
                data, anc, _, _ = s.recvmsg(65535, anc_size)
            except BlockingIOError:
                break
            t1 = None
            for level, typ, payload in anc:
                if level == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", payload[:16])
                    t1 = sec * 1_000_000_000 + nsec
            if t1 is None:
                t1 = time.time_ns()
            if not data.startswith(b"SIP/2.0 "):
                continue
            code = data[8:11].decode()
            if code < "200":
                continue
            text = data.decode(errors="replace")
            cid = ""
            to_line = ""
            for line in text.split("\r\n"):
                low = line[:9].lower()
                if low.startswith("call-id:") or low.startswith("i:"):
                    cid = line.split(":", 1)[1].strip()
                elif low.startswith("to:") or low.startswith("t:"):
                    to_line = line
            entry = pending.pop(cid, None)
            if entry is None:
                if cid in done:  # a retransmitted final: our ACK was lost, send it again
                    s.sendto(done[cid], dest)
                continue
            pn, t0, kind, caller, callee = entry
            lat[kind].append((t1 - t0) / 1000.0)
            codes[kind][code] = codes[kind].get(code, 0) + 1
            ack = _ack(port, lport, pn, caller, callee, f"z9hG4bK-probe-{os.getpid()}-{pn}", to_line)
            done[cid] = ack
            s.sendto(ack, dest)
    s.close()
    out: dict[str, Any] = {"interval_ms": interval * 1000, "kinds": {}}
    for k in kinds:
        v = lat[k]
        out["kinds"][k] = {"sent": sent[k], "answered": len(v), "lost": sent[k] - len(v), "codes": codes[k],
                           "p50_us": _pct(v, 50), "p90_us": _pct(v, 90), "p99_us": _pct(v, 99),
                           "max_us": max(v) if v else None}
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True, help="UDP port of the system on 127.0.0.1")
    p.add_argument("--duration", type=float, required=True, help="seconds of probing")
    p.add_argument("--delay", type=float, default=0.0, help="seconds to wait before the first probe")
    p.add_argument("--interval-ms", type=float, default=5.0, help="milliseconds between probes")
    p.add_argument("--kinds", default="reject", help="comma-separated: reject, forward")
    p.add_argument("--banned", required=True, help="a caller on the blocklist (for reject probes)")
    a = p.parse_args(argv)
    res = run(a.port, a.duration, a.interval_ms / 1000.0, a.kinds.split(","), a.banned, a.delay)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
