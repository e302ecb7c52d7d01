"""A bare uvloop SIP responder: the I/O floor of a Python proxy on this machine.

It does the least a screening proxy must do and nothing else: read the caller from the From
URI, look it up in a set built from the bench's blocklist (and treat every 95/96 caller, with
or without an area code, as unfiled), answer 403 statelessly, or forward the INVITE statelessly
to the trunk with its own Via on top and relay the responses back.  No transactions, no rate
limits, no records.  The figures it reaches are the BENCH-NOTES "bare uvloop responder" anchor;
a full proxy cannot beat them on the same loop.

Run: ``python bench/loadlib/responder.py --listen 127.0.0.1:PORT --trunk 127.0.0.1:PORT
--blocklist FILE``; it prints ``ready`` once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import signal
import sys

import uvloop


def _load_blocked(path: str) -> set[bytes]:
    """Exact blocklist numbers as bytes (the bench writes plain national-form digits)."""
    blocked: set[bytes] = set()
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            number = (row.get("number") or "").strip()
            if number and (row.get("match") or "exact").strip() == "exact":
                blocked.add(number.encode())
    return blocked


def _caller(msg: bytes) -> bytes:
    """The user part of the From URI, or b'' when there is none."""
    i = msg.find(b"\r\nFrom:")
    if i < 0:
        i = msg.find(b"\r\nf:")
        if i < 0:
            return b""
    j = msg.find(b"sip:", i, i + 200)
    if j < 0:
        return b""
    k = msg.find(b"@", j)
    return msg[j + 4:k] if k > 0 else b""


def _headers(msg: bytes, names: tuple[bytes, ...]) -> list[bytes]:
    """The header lines whose name is one of ``names`` (case as sent by SIPp/Kamailio)."""
    out = []
    head = msg.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n")[1:]:
        if line.startswith(names):
            out.append(line)
    return out


class Responder(asyncio.DatagramProtocol):
    """Stateless reject-or-forward on one UDP socket."""

    def __init__(self, blocked: set[bytes], trunk: tuple[str, int], via_host: bytes) -> None:
        self.blocked = blocked
        self.trunk = trunk
        self.via_host = via_host
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def _rejected(self, caller: bytes) -> bool:
        # 95/96 callers (a 96 number may carry its area code, 0391 96xxx) count as unfiled.
        return (caller in self.blocked or caller[:2] in (b"95", b"96")
                or (caller[:1] == b"0" and (caller[3:5] == b"96" or caller[4:6] == b"96")))

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # noqa: C901 - one flat dispatcher
        if data.startswith(b"SIP/2.0 "):
            # A response from the trunk: drop our Via value (a line of its own, or the first of a
            # comma-joined line as SIPp's [last_Via:] writes it), send to the next one's sent-by.
            first_via = data.find(b"\r\nVia:")
            if first_via < 0:
                return
            line_end = data.find(b"\r\n", first_via + 2)
            comma = data.find(b",", first_via, line_end)
            if comma > 0:
                rest = data[:first_via + 6] + b" " + data[comma + 1:].lstrip(b" ")
            else:
                rest = data[:first_via] + data[line_end:]
            nxt = rest.find(b"\r\nVia:")
            if nxt < 0:
                return
            value = rest[nxt + 6:rest.find(b"\r\n", nxt + 2)].split(b",", 1)[0]
            sent_by = value.split(b";", 1)[0].split()[-1]
            host, _, port = sent_by.partition(b":")
            self.transport.sendto(rest, (host.decode(), int(port or b"5060")))  # type: ignore[union-attr]
            return
        if data.startswith(b"INVITE "):
            if self._rejected(_caller(data)):
                self._reply(data, addr, b"SIP/2.0 403 Forbidden")
            else:
                self._forward(data)
            return
        if data.startswith(b"ACK "):
            # The ACK of a local 403 is absorbed; the ACK of a forwarded call follows the INVITE.
            if not self._rejected(_caller(data)):
                self._forward(data)
            return
        if data.startswith(b"OPTIONS "):
            self._reply(data, addr, b"SIP/2.0 200 OK")

    def _reply(self, data: bytes, addr: tuple[str, int], status: bytes) -> None:
        """A stateless final response built from the request's headers."""
        out = [status]
        for h in _headers(data, (b"Via:", b"From:", b"To:", b"Call-ID:", b"CSeq:")):
            out.append(h + b";tag=uvr" if h.startswith(b"To:") and b"tag=" not in h else h)
        out.append(b"Content-Length: 0\r\n\r\n")
        self.transport.sendto(b"\r\n".join(out), addr)  # type: ignore[union-attr]

    def _forward(self, data: bytes) -> None:
        i = data.find(b"\r\nVia:")
        if i < 0:
            return
        b = data.find(b"branch=", i)
        e = data.find(b"\r\n", i + 2)
        incoming = data[b + 7:e].split(b";", 1)[0] if 0 < b < e else data[i:e]
        branch = b"z9hG4bK-uvr" + hashlib.blake2s(incoming, digest_size=8).hexdigest().encode()
        via = b"\r\nVia: SIP/2.0/UDP " + self.via_host + b";branch=" + branch
        self.transport.sendto(data[:i] + via + data[i:], self.trunk)  # type: ignore[union-attr]


async def _main(args: argparse.Namespace) -> None:
    host, _, port = args.listen.rpartition(":")
    thost, _, tport = args.trunk.rpartition(":")
    loop = asyncio.get_running_loop()
    blocked = _load_blocked(args.blocklist)
    transport, _ = await loop.create_datagram_endpoint(
        lambda: Responder(blocked, (thost, int(tport)), f"{host}:{port}".encode()),
        local_addr=(host, int(port)))
    sock = transport.get_extra_info("socket")
    import socket

    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    transport.close()


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True, help="HOST:PORT to bind")
    p.add_argument("--trunk", required=True, help="HOST:PORT allowed calls are forwarded to")
    p.add_argument("--blocklist", required=True, help="blocklist CSV (number,match,...)")
    args = p.parse_args(argv)
    uvloop.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
