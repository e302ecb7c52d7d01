"""Messages per second of the SIP parsers (pure Python and Cython) on a typical INVITE with SDP.

Usage: PYTHONPATH=src python bench/sip_parse.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from callguard.sip import message as sipmsg

SDP = (b"v=0\r\no=- 20518 0 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
       b"m=audio 4000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
       b"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=sendrecv\r\n")
INVITE = (b"INVITE sip:02150001234@gw.example.com;user=phone SIP/2.0\r\n"
          b"Via: SIP/2.0/UDP 192.0.2.1:5062;branch=z9hG4bK776asdhds;rport\r\n"
          b"Via: SIP/2.0/UDP 192.0.2.200:5060;branch=z9hG4bKnashds8;received=192.0.2.200\r\n"
          b"Max-Forwards: 69\r\n"
          b"To: <sip:02150001234@gw.example.com;user=phone>\r\n"
          b"From: \"Alice\" <sip:+8613800138000@192.0.2.1;user=phone>;tag=1928301774\r\n"
          b"Call-ID: a84b4c76e66710@192.0.2.1\r\n"
          b"CSeq: 314159 INVITE\r\n"
          b"Contact: <sip:+8613800138000@192.0.2.1:5062>\r\n"
          b"Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, PRACK, UPDATE\r\n"
          b"Supported: 100rel, timer\r\n"
          b"User-Agent: bench/1.0\r\n"
          b"Content-Type: application/sdp\r\n"
          b"Content-Length: " + str(len(SDP)).encode() + b"\r\n\r\n" + SDP)


def rate(parse: Callable[[bytes], Any], seconds: float) -> float:
    """Messages per second of ``parse`` over about ``seconds`` (best of three rounds)."""
    best = 0.0
    batch = 2000
    for _ in range(3):
        done = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds / 3
        while True:
            for _ in range(batch):
                parse(INVITE)
            done += batch
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, done / (now - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="time per parser (default 2)")
    args = ap.parse_args()
    print(f"message: INVITE with SDP, {len(INVITE)} octets, 2 Via, 13 headers")
    py = rate(sipmsg.parse_message_py, args.seconds)
    print(f"python  {py:12,.0f} msg/s  {1e6 / py:8.2f} us/msg")
    try:
        from callguard.sip import _sipcore
    except ImportError:
        print("cython  not built (python setup.py build_ext --inplace)")
        return
    c = rate(_sipcore.parse_message, args.seconds)
    print(f"cython  {c:12,.0f} msg/s  {1e6 / c:8.2f} us/msg")
    print(f"ratio   {c / py:12.1f} x")


if __name__ == "__main__":
    main()
