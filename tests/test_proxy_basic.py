"""``callguard serve`` as a SIP proxy, driven by plain UDP/TCP sockets acting as caller and trunks.

Most tests run the proxy in-process on its own event loop thread (fast); reload and shutdown
run ``python -m callguard serve`` as a subprocess so real signals are delivered.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from callguard import config as config_mod

from .conftest import ALLOWLIST, BLOCKLIST, FILINGS, ROOT, write

CALLER = "13912345678"
CALLEE = "02150001234"
BANNED = "13800138000"


# ---------------------------------------------------------------- waiting and sockets
def wait_until(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Peer:
    """A UDP socket on 127.0.0.1 playing caller or trunk; keeps what it received."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.port = int(self.sock.getsockname()[1])
        self.got: list[tuple[str, Any]] = []
        self.last_addr: Any = None

    def send(self, text: str | bytes, port: int) -> None:
        data = text.encode() if isinstance(text, str) else text
        self.sock.sendto(data, ("127.0.0.1", port))

    def recv(self, timeout: float = 3.0, match: Callable[[str], bool] | None = None) -> str:
        """The next message (matching ``match``) received within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                firsts = [g[0].splitlines()[0] for g in self.got]
                raise AssertionError(f"port {self.port}: nothing (matching) received within {timeout}s; "
                                     f"got {len(firsts)}, the last: {firsts[-20:]}")
            self.sock.settimeout(left)
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            text = data.decode("utf-8", "replace")
            self.got.append((text, addr))
            self.last_addr = addr
            if match is None or match(text):
                return text

    def silent(self, seconds: float, match: Callable[[str], bool] | None = None) -> bool:
        """True when nothing (matching) arrives within ``seconds`` -- used only for "must not be sent"."""
        try:
            self.recv(seconds, match)
        except AssertionError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


def first_line(msg: str) -> str:
    return msg.split("\r\n", 1)[0]


def status(msg: str) -> int:
    m = re.match(r"SIP/2\.0 (\d{3}) ", msg)
    return int(m.group(1)) if m else 0


def headers(msg: str, name: str) -> list[str]:
    head = msg.split("\r\n\r\n", 1)[0]
    out = []
    for line in head.split("\r\n")[1:]:
        n, _, v = line.partition(":")
        if n.strip().lower() == name.lower():
            out.append(v.strip())
    return out


def is_status(code: int) -> Callable[[str], bool]:
    return lambda m: status(m) == code


def is_method(method: str) -> Callable[[str], bool]:
    return lambda m: m.startswith(method + " ")


def request(method: str, port_from: int, proxy_port: int, *, caller: str = CALLER, callee: str = CALLEE,
            branch: str | None = None, call_id: str | None = None, cseq: int = 1, to_tag: str = "",
            max_forwards: int | None = 70, body: str = "", extra: str = "", uri: str | None = None,
            transport: str = "UDP") -> str:
    branch = branch or "z9hG4bK" + uuid.uuid4().hex[:12]
    call_id = call_id or uuid.uuid4().hex
    uri = uri or f"sip:{callee}@127.0.0.1:{proxy_port}"
    lines = [f"{method} {uri} SIP/2.0",
             f"Via: SIP/2.0/{transport} 127.0.0.1:{port_from};branch={branch};rport",
             f"From: <sip:{caller}@127.0.0.1>;tag=ft{call_id[:6]}",
             f"To: <sip:{callee}@127.0.0.1>" + (f";tag={to_tag}" if to_tag else ""),
             f"Call-ID: {call_id}", f"CSeq: {cseq} {method}",
             f"Contact: <sip:{caller}@127.0.0.1:{port_from}>"]
    if max_forwards is not None:
        lines.append(f"Max-Forwards: {max_forwards}")
    if extra:
        lines.append(extra)
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body.encode())}")
    return "\r\n".join(lines) + "\r\n\r\n" + body


def answer(req: str, code: int, reason: str, to_tag: str | None = "trunk1") -> str:
    """A response built by a trunk from the request it received (all Vias copied)."""
    lines = [f"SIP/2.0 {code} {reason}"]
    lines += [f"Via: {v}" for v in headers(req, "Via")]
    to = headers(req, "To")[0]
    if to_tag and ";tag=" not in to:
        to += f";tag={to_tag}"
    lines += [f"From: {headers(req, 'From')[0]}", f"To: {to}", f"Call-ID: {headers(req, 'Call-ID')[0]}",
              f"CSeq: {headers(req, 'CSeq')[0]}", "Content-Length: 0"]
    return "\r\n".join(lines) + "\r\n\r\n"


def ack_for(invite: str, resp: str, port_from: int, proxy_port: int) -> str:
    """The caller's ACK to a non-2xx final: same branch as the INVITE, To from the response."""
    branch = re.search(r"branch=([^;\s]+)", headers(invite, "Via")[0]).group(1)  # type: ignore[union-attr]
    lines = [f"ACK {invite.split(' ')[1]} SIP/2.0",
             f"Via: SIP/2.0/UDP 127.0.0.1:{port_from};branch={branch};rport",
             f"From: {headers(invite, 'From')[0]}", f"To: {headers(resp, 'To')[0]}",
             f"Call-ID: {headers(invite, 'Call-ID')[0]}", f"CSeq: {headers(invite, 'CSeq')[0].split()[0]} ACK",
             "Max-Forwards: 70", "Content-Length: 0"]
    return "\r\n".join(lines) + "\r\n\r\n"


def cancel_for(invite: str, port_from: int) -> str:
    branch = re.search(r"branch=([^;\s]+)", headers(invite, "Via")[0]).group(1)  # type: ignore[union-attr]
    lines = [f"CANCEL {invite.split(' ')[1]} SIP/2.0",
             f"Via: SIP/2.0/UDP 127.0.0.1:{port_from};branch={branch};rport",
             f"From: {headers(invite, 'From')[0]}", f"To: {headers(invite, 'To')[0]}",
             f"Call-ID: {headers(invite, 'Call-ID')[0]}", f"CSeq: {headers(invite, 'CSeq')[0].split()[0]} CANCEL",
             "Max-Forwards: 70", "Content-Length: 0"]
    return "\r\n".join(lines) + "\r\n\r\n"


# ---------------------------------------------------------------- configs
def make_config(folder: Path, listen: list[str], trunks: list[dict[str, Any]], **over: Any) -> Path:
    lists = folder / "lists"
    write(lists / "blocklist.csv", BLOCKLIST)
    write(lists / "service_numbers.csv", FILINGS)
    write(lists / "allowlist.csv", ALLOWLIST)
    data: dict[str, Any] = {
        "sources": [{"name": "local", "networks": ["127.0.0.1/32", "::1/128"], "trust_identity": True}],
        "trunks": trunks,
        "lists": {"blocklist": "lists/blocklist.csv", "service_numbers": "lists/service_numbers.csv",
                  "allowlist": "lists/allowlist.csv"},
        "sip": {"listen": listen, "trunk_timeout": 5.0, "shutdown_grace": 0.5},
        "records": {"enabled": False, "path": str(folder / "records.sqlite3"),
                    "state_path": str(folder / "state.json")},
        "metrics": {"enabled": False},
        "logging": {"level": "warning"},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = folder / "callguard.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


class InProcess:
    """The proxy on its own event loop in a thread of the test process."""

    def __init__(self, config_path: Path, loop_kind: str = "asyncio") -> None:
        from callguard.guard import Guard
        from callguard.sip.server import Server

        cfg = config_mod.load(config_path)
        self.cfg = cfg
        self.server = Server(cfg, Guard(cfg), str(config_path), [], None)
        if loop_kind == "uvloop":
            import uvloop

            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.result: list[int] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_until(lambda: getattr(self.server, "proxy", None) is not None and self.server.proxy.our_ports,
                   10, "the proxy to listen")
        # Its ports are known in the middle of Proxy.start(), which configures the fast paths after
        # them; a call through the loop returns once that step of Server.run is over.
        self.call(lambda: None)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.result.append(self.loop.run_until_complete(self.server.run()))

    @property
    def proxy(self) -> Any:
        return self.server.proxy

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the proxy's loop and return its result."""
        fut: Any = asyncio.run_coroutine_threadsafe(self._wrap(fn), self.loop)
        return fut.result(10)

    @staticmethod
    async def _wrap(fn: Callable[[], Any]) -> Any:
        return fn()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.server._on_term)
            self.thread.join(15)
        if not self.loop.is_closed() and not self.thread.is_alive():
            self.loop.close()


@pytest.fixture
def peers() -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(host: str = "127.0.0.1") -> Peer:
        p = Peer(host)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def _uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


NEED_UVLOOP = pytest.mark.skipif(not _uvloop_available(), reason="uvloop not installed")


@pytest.fixture(params=["asyncio", "asyncio-plain-udp", "asyncio-batch-udp", pytest.param("uvloop", marks=NEED_UVLOOP),
                        pytest.param("uvloop-plain-udp", marks=NEED_UVLOOP)])
def start(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[Callable[..., tuple[InProcess, int]]]:
    """start(trunks=[port,...], **config overrides) -> (running proxy, its UDP port).

    Runs on the stdlib loop and on uvloop with the default UDP listener (the compiled fast path
    when it is built), with the plain datagram listener, and (stdlib loop) batched without the
    fast path.
    """
    loop_kind = str(request.param)
    if loop_kind.endswith("-plain-udp"):
        monkeypatch.setenv("CALLGUARD_NO_UDP_BATCH", "1")
        loop_kind = loop_kind.removesuffix("-plain-udp")
    if loop_kind.endswith("-batch-udp"):
        monkeypatch.setenv("CALLGUARD_NO_FAST_PATH", "1")
        loop_kind = loop_kind.removesuffix("-batch-udp")
    running: list[InProcess] = []

    def run(trunk_ports: list[int], listen: list[str] | None = None, trunks: list[dict[str, Any]] | None = None,
            **over: Any) -> tuple[InProcess, int]:
        port = free_port()
        listen = listen or [f"udp:127.0.0.1:{port}"]
        trunks = trunks or [{"name": f"t{i}", "address": f"udp:127.0.0.1:{p}"} for i, p in enumerate(trunk_ports)]
        folder = tmp_path / f"p{len(running)}"
        folder.mkdir()
        ip = InProcess(make_config(folder, listen, trunks, **over), loop_kind)
        running.append(ip)
        return ip, port

    yield run
    for ip in running:
        ip.stop()


# ---------------------------------------------------------------- INVITE forwarding
def test_allowed_invite_is_forwarded_and_responses_routed_back(start: Any, peers: Any) -> None:
    caller, trunk = peers(), peers()
    _, port = start([trunk.port])
    inv = request("INVITE", caller.port, port, body="v=0\r\n")
    caller.send(inv, port)
    assert status(caller.recv(match=is_status(100))) == 100
    fwd = trunk.recv(match=is_method("INVITE"))
    vias = headers(fwd, "Via")
    assert len(vias) == 2
    assert vias[0].startswith(f"SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK")
    assert vias[1].endswith(f";rport={caller.port};received=127.0.0.1")  # RFC 3581
    assert headers(fwd, "Max-Forwards") == ["69"]
    assert fwd.endswith("\r\n\r\nv=0\r\n")
    trunk.send(answer(fwd, 180, "Ringing"), port)
    ringing = caller.recv(match=is_status(180))
    assert len(headers(ringing, "Via")) == 1 and headers(ringing, "Via")[0] == vias[1]
    trunk.send(answer(fwd, 200, "OK"), port)
    ok = caller.recv(match=is_status(200))
    assert headers(ok, "Call-ID") == headers(inv, "Call-ID")
    assert "tag=trunk1" in headers(ok, "To")[0]


def test_missing_max_forwards_inserted(start: Any, peers: Any) -> None:
    caller, trunk = peers(), peers()
    _, port = start([trunk.port])
    caller.send(request("INVITE", caller.port, port, max_forwards=None), port)
    fwd = trunk.recv(match=is_method("INVITE"))
    assert headers(fwd, "Max-Forwards") == ["70"]


def test_p_asserted_identity_is_the_caller_for_trusted_sources(start: Any, peers: Any) -> None:
    caller, trunk = peers(), peers()
    _, port = start([trunk.port])
    caller.send(request("INVITE", caller.port, port, extra=f"P-Asserted-Identity: <sip:{BANNED}@127.0.0.1>"), port)
    assert status(caller.recv(match=lambda m: status(m) >= 200)) == 403


# ---------------------------------------------------------------- rejections
def test_banned_caller_gets_403_with_to_tag_and_reason(start: Any, peers: Any) -> None:
    caller, trunk = peers(), peers()
    _, port = start([trunk.port])
    caller.send(request("INVITE", caller.port, port, caller=BANNED), port)
    resp = caller.recv(match=lambda m: status(m) >= 200)
    assert status(resp) == 403
    assert ";tag=" in headers(resp, "To")[0]
    reason = headers(resp, "Reason")[0]
    assert reason.startswith("SIP;cause=403;text=\"banned: ")
    assert headers(resp, "Server") == ["callguard"]
    assert trunk.silent(0.3, is_method("INVITE"))


@pytest.mark.parametrize("header", ["From", "P-Asserted-Identity"])
def test_a_uri_quoted_in_the_display_name_is_not_the_caller(start: Any, peers: Any, header: str) -> None:
    """RFC 3261 §25.1: the identity is the URI in angle brackets after the quoted display name, which
    may hold anything; taking the first '<' let a banned caller pass as the number it quoted."""
    caller, trunk = peers(), peers()
    _, port = start([trunk.port])
    for display, user, banned in ((f'"<sip:{CALLER}@x>"', BANNED, True), (f'"x \\" <tel:{CALLER}>"', BANNED, True),
                                  (f'"<sip:{BANNED}@x>"', CALLER, False)):
        inv = request("INVITE", caller.port, port)
        value = f"{display} <sip:{user}@127.0.0.1>"
        if header == "From":
            inv = inv.replace(f"From: <sip:{CALLER}@127.0.0.1>", f"From: {value}")
        else:
            inv = inv.replace("Max-Forwards: 70", f"Max-Forwards: 70\r\nP-Asserted-Identity: {value}")
        caller.send(inv, port)
        if banned:
            resp = caller.recv(match=lambda m: status(m) >= 200)
            assert status(resp) == 403 and "banned" in headers(resp, "Reason")[0], value
        else:
            call_id = headers(inv, "Call-ID")[0]
            fwd = trunk.recv(match=lambda m, cid=call_id: is_method("INVITE")(m) and headers(m, "Call-ID") == [cid])
            trunk.send(answer(fwd, 486, "Busy Here"), port)
            assert status(caller.recv(match=lambda m: status(m) >= 200)) == 486, value
    assert trunk.silent(0.3, is_method("INVITE"))     # none of the banned caller's INVITEs got through


@pytest.mark.parametrize("bad", ["Subject: Perf\x00ormance", "Subject: ring\x07", "X-Note: a\x7fb",
                                 "User-Agent: \x1b[31mred"])
def test_control_octets_in_a_header_value_get_400_and_are_not_forwarded(start: Any, peers: Any, bad: str) -> None:
    caller, trunk = peers(), peers()
    _, port = start([trunk.port])
    caller.send(request("INVITE", caller.port, port, extra=bad), port)
    resp = caller.recv(match=lambda m: status(m) >= 200)
    assert status(resp) == 400 and "\x00" not in resp
    # as a quoted-pair inside a quoted string (RFC 4475 intmeth) the same octets are fine
    caller.send(request("INVITE", caller.port, port, extra='Subject: "a\\\x00b\\\x07"'), port)
    fwd = trunk.recv(match=is_method("INVITE"))
    assert 'Subject: "a\\\x00b\\\x07"' in fwd
    trunk.send(answer(fwd, 486, "Busy Here"), port)
    assert status(caller.recv(match=is_status(486))) == 486
    assert trunk.silent(0.3, lambda m: is_method("INVITE")(m) and bad.split(":")[0] in m)


@pytest.mark.parametrize("uri", ["sip:110;phone-context=+86@127.0.0.1;user=phone", "sip:%3110@127.0.0.1",
                                 "tel:+86-110", "sip:0391110;isub=1@127.0.0.1;user=phone"])
def test_an_emergency_callee_with_user_parameters_passes_a_banned_caller(start: Any, peers: Any, uri: str) -> None:
    caller, trunk = peers(), peers()
    _, port = start([trunk.port])
    caller.send(request("INVITE", caller.port, port, caller=BANNED, uri=uri), port)
    fwd = trunk.recv(match=is_method("INVITE"))
    trunk.send(answer(fwd, 486, "Busy Here"), port)
    assert status(caller.recv(match=lambda m: status(m) >= 200)) == 486


def test_hide_reason_omits_the_reason_header(start: Any, peers: Any) -> None:
    caller, trunk = peers(), peers()
    _, port = start([trunk.port], sip={"hide_reason": True, "user_agent": "edge-1"})
    caller.send(request("INVITE", caller.port, port, caller=BANNED), port)
    resp = caller.recv(match=lambda m: status(m) >= 200)
    assert status(resp) == 403 and headers(resp, "Reason") == [] and headers(resp, "Server") == ["edge-1"]


def test_retransmitted_invite_gets_same_response_and_is_not_a_new_attempt(start: Any, peers: Any) -> None:
    caller, trunk = peers(), peers()
    ip, port = start([trunk.port], rate_limits=[{"name": "one", "window": 60, "max_calls": 1}])
    # First attempt: allowed and forwarded; the trunk rejects it.
    inv1 = request("INVITE", caller.port, port, callee="02150001111")
    caller.send(inv1, port)
    fwd = trunk.recv(match=is_method("INVITE"))
    trunk.send(answer(fwd, 486, "Busy Here"), port)
    busy = caller.recv(match=is_status(486))
    assert trunk.recv(match=is_method("ACK"))  # the proxy ACKs the trunk's 486 itself
    caller.send(ack_for(inv1, busy, caller.port, port), port)
    # Second attempt (a new transaction) exceeds max_calls: 1.
    inv2 = request("INVITE", caller.port, port, callee="02150002222")
    caller.send(inv2, port)
    first = caller.recv(match=lambda m: status(m) >= 200)
    assert status(first) == 603
    # Its retransmission: the same bytes, and no third attempt counted.
    caller.send(inv2, port)
    again = caller.recv(match=lambda m: status(m) >= 200)
    assert again == first
    # ACK to our rejection: absorbed, never forwarded.
    caller.send(ack_for(inv2, first, caller.port, port), port)
    caller.send(ack_for(inv1, busy, caller.port, port), port)
    # Both transactions are now kept only for Timer I, not 64*T1.
    wait_until(lambda: ip.proxy.lingering_acked() >= 3, 3, "the ACKed transactions to be scheduled early")
    assert trunk.silent(0.3, lambda m: m.startswith("ACK ") or m.startswith("INVITE "))


def test_retransmission_does_not_count(start: Any, peers: Any) -> None:
    caller, trunk = peers(), peers()
    ip, port = start([trunk.port], rate_limits=[{"name": "one", "window": 60, "max_calls": 1}])
    inv = request("INVITE", caller.port, port, caller=BANNED)
    for _ in range(3):
        caller.send(inv, port)
    replies = [caller.recv(match=lambda m: status(m) >= 200) for _ in range(3)]
    assert replies[0] == replies[1] == replies[2] and status(replies[0]) == 403
    # One attempt counted: the next new call is the second attempt and hits max_calls: 1.
    tracked = ip.call(lambda: ip.proxy.guard.snapshot())
    rows = tracked["tracks"][0]
    assert len(rows) == 1 and len(rows[0][2]) == 1


def test_untrusted_source_gets_403_and_nothing_forwarded(start: Any, peers: Any) -> None:
    caller, trunk = peers(), peers()
    _, port = start([trunk.port], sources=[{"name": "elsewhere", "networks": ["10.9.0.0/16"]}])
    caller.send(request("INVITE", caller.port, port), port)
    resp = caller.recv(match=lambda m: status(m) >= 200)
    assert status(resp) == 403 and "untrusted_source" in headers(resp, "Reason")[0]
    caller.send(request("MESSAGE", caller.port, port), port)
    assert status(caller.recv(match=lambda m: status(m) >= 200)) == 403
    assert trunk.silent(0.3)
    # A response for a transaction we did not create is dropped, not relayed.
    trunk.send(answer(request("INVITE", caller.port, port), 200, "OK"), port)
    assert caller.silent(0.3, is_status(200))


def test_emergency_call_passes_even_from_untrusted_source(start: Any, peers: Any) -> None:
    caller, trunk = peers(), peers()
    _, port = start([trunk.port], sources=[{"name": "elsewhere", "networks": ["10.9.0.0/16"]}])
    caller.send(request("INVITE", caller.port, port, callee="110"), port)
    assert "sip:110@" in first_line(trunk.recv(match=is_method("INVITE")))


def test_options_to_the_proxy_answered_even_from_untrusted(start: Any, peers: Any) -> None:
    caller, trunk = peers(), peers()
    _, port = start([trunk.port], sources=[{"name": "elsewhere", "networks": ["10.9.0.0/16"]}])
    caller.send(request("OPTIONS", caller.port, port, uri=f"sip:127.0.0.1:{port}"), port)
    assert status(caller.recv()) == 200
    caller.send(request("OPTIONS", caller.port, port, uri=f"sip:ping@127.0.0.1:{port}"), port)
    assert status(caller.recv()) == 200
    assert trunk.silent(0.2)


def test_register_is_refused_405(start: Any, peers: Any) -> None:
    caller, trunk = peers(), peers()
    _, port = start([trunk.port])
    caller.send(request("REGISTER", caller.port, port, uri="sip:127.0.0.1"), port)
    resp = caller.recv()
    assert status(resp) == 405 and headers(resp, "Allow")


def test_max_forwards_zero_gets_483(start: Any, peers: Any) -> None:
    caller, trunk = peers(), peers()
    _, port = start([trunk.port])
    caller.send(request("INVITE", caller.port, port, max_forwards=0), port)
    assert status(caller.recv(match=lambda m: status(m) >= 200)) == 483
    assert trunk.silent(0.2)


def test_loop_is_detected_482(start: Any, peers: Any) -> None:
    caller = peers()
    port = free_port()
    # The trunk is the proxy itself: the forwarded INVITE comes back with our Via on top.
    start([], listen=[f"udp:127.0.0.1:{port}"], trunks=[{"name": "self", "address": f"udp:127.0.0.1:{port}"}])
    caller.send(request("INVITE", caller.port, port), port)
    final = caller.recv(match=lambda m: status(m) >= 200, timeout=5)
    assert status(final) == 482


def test_malformed_datagram_gets_400_and_is_not_forwarded(start: Any, peers: Any) -> None:
    caller, trunk = peers(), peers()
    _, port = start([trunk.port])
    bad = request("INVITE", caller.port, port).replace("CSeq: 1 INVITE", "CSeq: x INVITE")
    caller.send(bad, port)
    assert status(caller.recv()) == 400
    caller.send(b"\x00\x01garbage\r\n\r\n", port)
    assert trunk.silent(0.3)


def test_oversized_datagram_gets_513_and_is_not_forwarded(start: Any, peers: Any) -> None:
    caller, trunk = peers(), peers()
    _, port = start([trunk.port], sip={"max_message_size": 1024})
    caller.send(request("INVITE", caller.port, port, body="a=x\r\n" * 300), port)
    assert status(caller.recv()) == 513
    assert trunk.silent(0.2)


def test_cancel_is_answered_and_forwarded(start: Any, peers: Any) -> None:
    caller, trunk = peers(), peers()
    _, port = start([trunk.port])
    inv = request("INVITE", caller.port, port)
    caller.send(inv, port)
    fwd = trunk.recv(match=is_method("INVITE"))
    trunk.send(answer(fwd, 180, "Ringing"), port)
    caller.recv(match=is_status(180))
    caller.send(cancel_for(inv, caller.port), port)
    ok = caller.recv(match=lambda m: status(m) == 200 and "CANCEL" in headers(m, "CSeq")[0])
    assert ok
    cancel = trunk.recv(match=is_method("CANCEL"))
    assert headers(cancel, "Via")[0] == headers(fwd, "Via")[0]  # same branch as the INVITE it cancels
    trunk.send(answer(cancel, 200, "OK"), port)
    trunk.send(answer(fwd, 487, "Request Terminated"), port)
    assert status(caller.recv(match=is_status(487))) == 487
    assert trunk.recv(match=is_method("ACK"))


def test_in_dialog_requests_are_forwarded_without_screening(start: Any, peers: Any) -> None:
    caller, trunk = peers(), peers()
    _, port = start([trunk.port], sip={"record_route": True})
    inv = request("INVITE", caller.port, port, caller=CALLER)
    caller.send(inv, port)
    fwd = trunk.recv(match=is_method("INVITE"))
    rr = headers(fwd, "Record-Route")
    assert rr == [f"<sip:127.0.0.1:{port};lr>"]
    trunk.send(answer(fwd, 200, "OK"), port)
    caller.recv(match=is_status(200))
    call_id = headers(inv, "Call-ID")[0]
    bye = request("BYE", caller.port, port, call_id=call_id, cseq=2, to_tag="trunk1",
                  uri=f"sip:{CALLEE}@127.0.0.1:{trunk.port}", extra=f"Route: {rr[0]}")
    caller.send(bye, port)
    got = trunk.recv(match=is_method("BYE"))
    assert headers(got, "Route") == [] and first_line(got) == f"BYE sip:{CALLEE}@127.0.0.1:{trunk.port} SIP/2.0"
    trunk.send(answer(got, 200, "OK", to_tag=None), port)
    assert "BYE" in headers(caller.recv(match=is_status(200)), "CSeq")[0]


def test_in_dialog_requests_from_an_untrusted_caller_go_only_to_its_trunk(start: Any, peers: Any) -> None:
    trunk = peers()
    caller, stranger, elsewhere = peers("127.0.0.2"), peers("127.0.0.3"), peers("127.0.0.4")
    # Only 127.0.0.1 (the trunk) is vouched for; an emergency call from 127.0.0.2 passes all the same.
    _, port = start([trunk.port], sources=[{"name": "elsewhere", "networks": ["10.9.0.0/16"]}],
                    sip={"record_route": True})
    inv = request("INVITE", caller.port, port, callee="110")
    caller.send(inv, port)
    fwd = trunk.recv(match=is_method("INVITE"))
    rr = headers(fwd, "Record-Route")[0]
    trunk.send(answer(fwd, 200, "OK"), port)
    caller.recv(match=is_status(200))
    call_id = headers(inv, "Call-ID")[0]

    # The caller's re-INVITE names another host: it is not screened, so it goes to the dialog's trunk.
    reinvite = request("INVITE", caller.port, port, callee="110", call_id=call_id, cseq=2, to_tag="trunk1",
                       uri=f"sip:02150001234@127.0.0.4:{elsewhere.port}", extra=f"Route: {rr}")
    caller.send(reinvite, port)
    got = trunk.recv(match=lambda m: is_method("INVITE")(m) and "CSeq: 2 INVITE" in m)
    assert headers(got, "Call-ID") == [call_id]

    # Someone else with the dialog's Call-ID and tags is refused, not relayed.
    bye = request("BYE", stranger.port, port, callee="110", call_id=call_id, cseq=3, to_tag="trunk1",
                  uri=f"sip:110@127.0.0.1:{trunk.port}", extra=f"Route: {rr}")
    stranger.send(bye, port)
    refused = stranger.recv(match=lambda m: status(m) >= 200)
    assert status(refused) == 403 and "untrusted" in first_line(refused)

    # The caller's own BYE to the trunk goes through, and ends the dialog.
    bye = request("BYE", caller.port, port, callee="110", call_id=call_id, cseq=4, to_tag="trunk1",
                  uri=f"sip:110@127.0.0.1:{trunk.port}", extra=f"Route: {rr}")
    caller.send(bye, port)
    got = trunk.recv(match=is_method("BYE"))
    assert headers(got, "CSeq") == ["4 BYE"]
    trunk.send(answer(got, 200, "OK", to_tag=None), port)
    assert "BYE" in headers(caller.recv(match=is_status(200)), "CSeq")[0]


# ---------------------------------------------------------------- trunks
def test_failover_on_503(start: Any, peers: Any) -> None:
    caller, t1, t2 = peers(), peers(), peers()
    _, port = start([t1.port, t2.port])
    caller.send(request("INVITE", caller.port, port), port)
    f1 = t1.recv(match=is_method("INVITE"))
    t1.send(answer(f1, 503, "Service Unavailable"), port)
    assert t1.recv(match=is_method("ACK"))
    f2 = t2.recv(match=is_method("INVITE"))
    assert headers(f2, "Via")[0] != headers(f1, "Via")[0]
    t2.send(answer(f2, 200, "OK", to_tag="t2"), port)
    assert "tag=t2" in headers(caller.recv(match=is_status(200)), "To")[0]
    assert caller.silent(0.2, is_status(503))


def test_failover_on_timeout_then_503_when_all_fail(start: Any, peers: Any) -> None:
    caller, t1, t2 = peers(), peers(), peers()
    _, port = start([t1.port, t2.port], sip={"trunk_timeout": 0.3})
    caller.send(request("INVITE", caller.port, port), port)
    t1.recv(match=is_method("INVITE"))
    t2.recv(match=is_method("INVITE"), timeout=3)
    final = caller.recv(match=lambda m: status(m) >= 200, timeout=3)
    assert status(final) == 503


def test_failover_on_icmp_port_unreachable(start: Any, peers: Any) -> None:
    caller, alive = peers(), peers()
    dead = free_port()   # nothing listens: the kernel answers ICMP port unreachable
    ip, port = start([], trunks=[{"name": "dead", "address": f"udp:127.0.0.1:{dead}"},
                                 {"name": "alive", "address": f"udp:127.0.0.1:{alive.port}"}],
                     sip={"trunk_timeout": 30})
    if not ip.proxy.udp[0].recverr:
        pytest.skip("ICMP errors are not read on this listener (batched UDP on uvloop)")
    caller.send(request("INVITE", caller.port, port), port)
    # Long before the 30 s trunk timeout: the ICMP error moved the call on.
    fwd = alive.recv(match=is_method("INVITE"), timeout=5)
    alive.send(answer(fwd, 486, "Busy Here"), port)
    assert status(caller.recv(match=lambda m: status(m) >= 200)) == 486
    # The listener still serves after the error.
    caller.send(request("OPTIONS", caller.port, port, uri=f"sip:127.0.0.1:{port}"), port)
    assert status(caller.recv(match=lambda m: "OPTIONS" in headers(m, "CSeq")[0])) == 200


def test_longest_prefix_picks_the_trunk(start: Any, peers: Any) -> None:
    caller, default, mobile = peers(), peers(), peers()
    _, port = start([], trunks=[{"name": "default", "address": f"udp:127.0.0.1:{default.port}"},
                                {"name": "mobile", "address": f"udp:127.0.0.1:{mobile.port}", "prefixes": ["139"]}])
    caller.send(request("INVITE", caller.port, port, callee="13912340000"), port)
    assert mobile.recv(match=is_method("INVITE"))
    caller.send(request("INVITE", caller.port, port, callee=CALLEE), port)
    assert default.recv(match=is_method("INVITE"))


def test_keepalive_marks_trunk_down_and_calls_skip_it(start: Any, peers: Any) -> None:
    caller, dead, alive = peers(), peers(), peers()
    ip, port = start([], trunks=[{"name": "dead", "address": f"udp:127.0.0.1:{dead.port}", "keepalive": 0.2},
                                 {"name": "alive", "address": f"udp:127.0.0.1:{alive.port}"}],
                     sip={"trunk_timeout": 0.2})
    assert dead.recv(match=is_method("OPTIONS"))
    wait_until(lambda: not ip.proxy.trunks[0].up, 3, "the silent trunk to be marked down")
    caller.send(request("INVITE", caller.port, port), port)
    assert alive.recv(match=is_method("INVITE"))
    assert dead.silent(0.2, is_method("INVITE"))
    # It answers its next ping: up again, and it takes calls.
    ping = dead.recv(match=is_method("OPTIONS"))
    dead.send(answer(ping, 200, "OK"), port)
    wait_until(lambda: ip.proxy.trunks[0].up, 3, "the trunk to be marked up")
    caller.send(request("INVITE", caller.port, port), port)
    assert dead.recv(match=is_method("INVITE"))


def test_emergency_calls_in_every_form_the_core_knows_pass_overload(start: Any, peers: Any) -> None:
    from callguard.guard import Guard

    caller, trunk = peers(), peers()
    ip, port = start([trunk.port], sip={"max_in_flight": 1, "trunk_timeout": 30})
    forms = ["110", "+86-110", "+86110", "0086110", "0391110", "0391-119", "sip:120@127.0.0.1", "86110", "0110",
             "1100", "anonymous"]
    guard = Guard(ip.cfg)
    core_says = {f: guard.check(CALLER, f, source="127.0.0.1").rule == "emergency" for f in forms}
    assert [f for f in forms if core_says[f]] == forms[:7]
    caller.send(request("INVITE", caller.port, port), port)
    trunk.recv(match=is_method("INVITE"))              # max_in_flight reached: new INVITEs get 503 ...
    for form in forms:
        inv = request("INVITE", caller.port, port, callee=form.replace("sip:", "").split("@")[0])
        caller.send(inv, port)
        if core_says[form]:                            # ... unless the core would let them through as emergency
            got = trunk.recv(match=lambda m, inv=inv: is_method("INVITE")(m) and
                             headers(m, "Call-ID") == headers(inv, "Call-ID"))
            assert got
        else:
            resp = caller.recv(match=lambda m, inv=inv: status(m) >= 200 and
                               headers(m, "Call-ID") == headers(inv, "Call-ID"))
            assert status(resp) == 503, form


def test_emergency_call_goes_to_trunks_marked_down_when_none_is_up(start: Any, peers: Any) -> None:
    caller, t1, t2 = peers(), peers(), peers()
    ip, port = start([], trunks=[{"name": "a", "address": f"udp:127.0.0.1:{t1.port}", "keepalive": 0.2},
                                 {"name": "b", "address": f"udp:127.0.0.1:{t2.port}", "keepalive": 0.2}],
                     sip={"trunk_timeout": 0.3})
    wait_until(lambda: not any(t.up for t in ip.proxy.trunks), 5, "both silent trunks to be marked down")
    caller.send(request("INVITE", caller.port, port), port)
    assert status(caller.recv(match=lambda m: status(m) >= 200)) == 503      # an ordinary call: no trunk up
    emergency = request("INVITE", caller.port, port, callee="110")
    caller.send(emergency, port)
    assert "sip:110@" in first_line(t1.recv(match=is_method("INVITE")))
    second = t2.recv(match=is_method("INVITE"))                              # t1 did not answer either
    assert headers(second, "Call-ID") == headers(emergency, "Call-ID")
    t2.send(answer(second, 200, "OK"), port)
    assert headers(caller.recv(match=is_status(200)), "Call-ID") == headers(emergency, "Call-ID")


def test_emergency_call_goes_to_a_trunk_marked_down_once_the_trunks_up_failed(start: Any, peers: Any) -> None:
    caller, down, up = peers(), peers(), peers()
    ip, port = start([], trunks=[{"name": "down", "address": f"udp:127.0.0.1:{down.port}", "keepalive": 0.2},
                                 {"name": "up", "address": f"udp:127.0.0.1:{up.port}"}],
                     sip={"trunk_timeout": 0.3})
    wait_until(lambda: not ip.proxy.trunks[0].up, 5, "the silent trunk to be marked down")
    emergency = request("INVITE", caller.port, port, callee="120")
    caller.send(emergency, port)
    up.recv(match=is_method("INVITE"))                       # the trunk up first; it does not answer
    got = down.recv(match=is_method("INVITE"))
    assert headers(got, "Call-ID") == headers(emergency, "Call-ID")
    down.send(answer(got, 486, "Busy Here"), port)
    assert status(caller.recv(match=lambda m: status(m) >= 200)) == 486


def test_overload_gets_503_with_retry_after(start: Any, peers: Any) -> None:
    caller, trunk = peers(), peers()
    _, port = start([trunk.port], sip={"max_in_flight": 1, "retry_after": 7, "trunk_timeout": 30})
    caller.send(request("INVITE", caller.port, port), port)
    trunk.recv(match=is_method("INVITE"))
    caller.send(request("INVITE", caller.port, port, callee="02150009999"), port)
    resp = caller.recv(match=lambda m: status(m) >= 200)
    assert status(resp) == 503 and headers(resp, "Retry-After") == ["7"]


def test_emergency_passes_under_overload(start: Any, peers: Any) -> None:
    caller, trunk = peers(), peers()
    _, port = start([trunk.port], sip={"max_in_flight": 1, "trunk_timeout": 30})
    caller.send(request("INVITE", caller.port, port), port)
    trunk.recv(match=is_method("INVITE"))
    caller.send(request("INVITE", caller.port, port, callee="110", caller="anonymous"), port)
    assert "sip:110@" in first_line(trunk.recv(match=is_method("INVITE")))


# ---------------------------------------------------------------- TCP
def _tcp(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=3)
    return s


def _tcp_read(s: socket.socket, n: int, timeout: float = 3.0) -> list[str]:
    """Read until n complete messages arrived (Content-Length 0 responses)."""
    buf = b""
    deadline = time.monotonic() + timeout
    while buf.count(b"\r\n\r\n") < n:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = s.recv(65535)
        if not chunk:
            break
        buf += chunk
    return [m + "\r\n\r\n" for m in buf.decode().split("\r\n\r\n") if m]


def test_tcp_framing(start: Any, peers: Any) -> None:
    trunk = peers()
    tport = free_port(socket.SOCK_STREAM)
    _, _ = start([trunk.port], listen=[f"tcp:127.0.0.1:{tport}"])
    s = _tcp(tport)
    try:
        o1 = request("OPTIONS", 5999, tport, uri=f"sip:127.0.0.1:{tport}", transport="TCP")
        o2 = request("OPTIONS", 5999, tport, uri=f"sip:127.0.0.1:{tport}", transport="TCP")
        s.sendall((o1 + o2).encode())                     # two messages in one segment
        got = _tcp_read(s, 2)
        assert [status(m) for m in got] == [200, 200]
        o3 = request("OPTIONS", 5999, tport, uri=f"sip:127.0.0.1:{tport}", transport="TCP").encode()
        s.sendall(o3[:40])                                # one message split across segments
        time.sleep(0.05)  # force a separate segment; the assertion below waits for the reply itself
        s.sendall(o3[40:])
        assert [status(m) for m in _tcp_read(s, 1)] == [200]
    finally:
        s.close()


def test_tcp_partial_message_times_out(start: Any, peers: Any) -> None:
    trunk = peers()
    tport = free_port(socket.SOCK_STREAM)
    start([trunk.port], listen=[f"tcp:127.0.0.1:{tport}"], sip={"tcp_partial_timeout": 0.3})
    s = _tcp(tport)
    try:
        s.sendall(b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKx\r\n")
        s.settimeout(5)
        assert s.recv(100) == b""   # closed by the proxy
    finally:
        s.close()


def test_tcp_stream_whose_reads_never_end_on_a_message_boundary_stays_open(start: Any, peers: Any) -> None:
    trunk = peers()
    tport = free_port(socket.SOCK_STREAM)
    start([trunk.port], listen=[f"tcp:127.0.0.1:{tport}"], sip={"tcp_partial_timeout": 0.2})
    s = _tcp(tport)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def options() -> bytes:
        return request("OPTIONS", 5999, tport, uri=f"sip:127.0.0.1:{tport}", transport="TCP").encode()

    try:
        # Each write ends one message and begins the next: the proxy always holds a partial message,
        # a different one each time, for five times the partial-message timeout in all.
        current = options()
        s.sendall(current[:30])
        began, answered = time.monotonic(), 0
        while time.monotonic() - began < 1.0:
            following = options()
            s.sendall(current[30:] + following[:30])
            assert [status(m) for m in _tcp_read(s, 1)] == [200], f"closed after {answered} answers"
            answered += 1
            current = following
        s.sendall(current[30:])
        assert [status(m) for m in _tcp_read(s, 1)] == [200]
    finally:
        s.close()


def test_tcp_invite_forwarded_to_udp_trunk_and_back(start: Any, peers: Any) -> None:
    trunk = peers()
    tport = free_port(socket.SOCK_STREAM)
    uport = free_port()
    start([trunk.port], listen=[f"tcp:127.0.0.1:{tport}", f"udp:127.0.0.1:{uport}"])
    s = _tcp(tport)
    try:
        inv = request("INVITE", 5999, tport, transport="TCP")
        s.sendall(inv.encode())
        fwd = trunk.recv(match=is_method("INVITE"))
        assert headers(fwd, "Via")[0].startswith(f"SIP/2.0/UDP 127.0.0.1:{uport};")
        trunk.send(answer(fwd, 486, "Busy Here"), uport)
        got = _tcp_read(s, 2)
        assert [status(m) for m in got] == [100, 486]
    finally:
        s.close()


def test_tcp_response_opens_a_connection_when_the_callers_has_closed(start: Any, peers: Any) -> None:
    trunk = peers()
    tport, uport = free_port(socket.SOCK_STREAM), free_port()
    ip, _ = start([trunk.port], listen=[f"tcp:127.0.0.1:{tport}", f"udp:127.0.0.1:{uport}"])
    back = socket.socket(socket.AF_INET, socket.SOCK_STREAM)    # the caller's own SIP port (its Via's sent-by)
    back.bind(("127.0.0.1", 0))
    back.listen(1)
    back.settimeout(5)
    s = _tcp(tport)
    try:
        inv = request("INVITE", back.getsockname()[1], tport, transport="TCP")
        s.sendall(inv.encode())
        fwd = trunk.recv(match=is_method("INVITE"))
        assert [status(m) for m in _tcp_read(s, 1)] == [100]
        s.close()
        wait_until(lambda: not _tcp_connections(ip), 5, "the proxy to see the connection closed")
        trunk.send(answer(fwd, 486, "Busy Here"), uport)
        conn, _ = back.accept()                                  # RFC 3261 18.2.2: to received, sent-by port
        try:
            got = _tcp_read(conn, 1)
            assert [status(m) for m in got] == [486]
            assert headers(got[0], "Call-ID") == headers(inv, "Call-ID")
        finally:
            conn.close()
    finally:
        s.close()
        back.close()


def test_tcp_connection_limit(start: Any, peers: Any) -> None:
    trunk = peers()
    tport = free_port(socket.SOCK_STREAM)
    start([trunk.port], listen=[f"tcp:127.0.0.1:{tport}"], sip={"max_tcp_connections": 1})
    first = _tcp(tport)
    try:
        first.sendall(request("OPTIONS", 5999, tport, uri=f"sip:127.0.0.1:{tport}", transport="TCP").encode())
        assert [status(m) for m in _tcp_read(first, 1)] == [200]
        second = _tcp(tport)
        try:
            second.settimeout(5)
            assert second.recv(100) == b""   # refused: closed at once
        finally:
            second.close()
    finally:
        first.close()


def _fat(method: str, tport: int, i: int, transport: str = "TCP", uri: str | None = None,
         caller: str = CALLER) -> bytes:
    """A request carrying 40 long Vias, which every answer to it copies: what a peer does not read piles up fast."""
    vias = [f"Via: SIP/2.0/{transport} 127.0.0.1:5999;branch=z9hG4bK{i:06d}n0;rport"]
    vias += [f"Via: SIP/2.0/TCP 192.0.2.{n}:5060;branch=z9hG4bK{i:06d}n{n}{'x' * 120}" for n in range(1, 41)]
    lines = [f"{method} {uri or f'sip:127.0.0.1:{tport}'} SIP/2.0", *vias,
             f"From: <sip:{caller}@127.0.0.1>;tag=f{i}", f"To: <sip:{CALLEE}@127.0.0.1>", f"Call-ID: fat-{i:06d}",
             f"CSeq: 1 {method}", "Max-Forwards: 70", "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _tcp_connections(ip: InProcess) -> list[Any]:
    return ip.call(lambda: [c for c in ip.proxy.tcp.by_peer.values() if not c.outgoing])


def test_tcp_peer_that_does_not_read_is_not_read_until_it_does(start: Any, peers: Any) -> None:
    trunk = peers()
    tport = free_port(socket.SOCK_STREAM)
    ip, _ = start([trunk.port], listen=[f"tcp:127.0.0.1:{tport}"])
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)   # fixed: the kernel holds few answers for us
    s.connect(("127.0.0.1", tport))
    n = 2000            # 15 MB of requests and as much in answers: about three times what the kernels hold
    data = b"".join(_fat("OPTIONS", tport, i) for i in range(n))
    try:
        s.setblocking(False)
        sent = 0
        paused = False
        while sent < len(data) and not paused:
            try:
                sent += s.send(data[sent:sent + 65536])
            except BlockingIOError:
                select.select([], [s], [], 0.05)
            conns = _tcp_connections(ip)
            assert len(conns) == 1
            paused = not ip.call(conns[0].transport.is_reading)
        assert paused, f"all {n} requests were read while their answers were left unread"
        queued = ip.call(conns[0].transport.get_write_buffer_size)
        assert 0 < queued <= ip.cfg.sip.tcp_write_queue_max
        assert ip.proxy.tcp.overflows == 0
        # Read now: every request gets its answer, in order, and the proxy reads the rest.
        s.setblocking(True)
        s.settimeout(30)
        failed: list[BaseException] = []

        def send_rest() -> None:
            try:
                s.sendall(data[sent:])
            except OSError as exc:
                failed.append(exc)

        rest = threading.Thread(target=send_rest, daemon=True)
        rest.start()
        got, ends = bytearray(), 0
        while ends < n:                            # answers have no body: one blank line each
            chunk = s.recv(1 << 20)
            assert chunk, f"closed after {ends} answers"
            scan_from = max(0, len(got) - 3)
            got += chunk
            ends += got.count(b"\r\n\r\n", scan_from)
        rest.join(30)
        assert not failed
        assert got.count(b"SIP/2.0 200 ") == n
        ids = re.findall(rb"\r\nCall-ID: fat-(\d+)\r\n", got)
        assert [int(x) for x in ids] == list(range(n))
        assert ip.call(conns[0].transport.is_reading)
    finally:
        s.close()


def test_tcp_peer_that_never_reads_is_aborted_past_the_write_queue_limit(start: Any, peers: Any) -> None:
    trunk = peers()
    tport = free_port(socket.SOCK_STREAM)
    ip, _ = start([trunk.port], listen=[f"tcp:127.0.0.1:{tport}"], sip={"tcp_write_queue_max": 65536})
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", tport))
    data = b"".join(_fat("OPTIONS", tport, i) for i in range(4000))
    try:
        s.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 60
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            while True:
                assert time.monotonic() < deadline, "never aborted"
                assert sent < len(data), "all 4000 requests were read while their answers were left unread"
                try:
                    sent += s.send(data[sent:sent + 65536])
                except BlockingIOError:
                    select.select([], [s], [], 1.0)
        assert ip.proxy.tcp.overflows == 1
        assert _tcp_connections(ip) == []
        # The proxy goes on: a new connection is answered.
        fresh = _tcp(tport)
        try:
            fresh.sendall(request("OPTIONS", 5999, tport, uri=f"sip:127.0.0.1:{tport}", transport="TCP").encode())
            assert [status(m) for m in _tcp_read(fresh, 1)] == [200]
        finally:
            fresh.close()
    finally:
        s.close()


def test_tcp_trunk_that_does_not_read_is_aborted_and_its_calls_fail_over(start: Any, peers: Any) -> None:
    caller, backup = peers(), peers()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)    # inherited by the accepted connection
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        ip, port = start([], trunks=[{"name": "stuck", "address": f"tcp:127.0.0.1:{server.getsockname()[1]}"},
                                    {"name": "backup", "address": f"udp:127.0.0.1:{backup.port}"}],
                        sip={"trunk_timeout": 60, "tcp_write_queue_max": 65536})
        # The stuck trunk never reads: its INVITEs fill the connection until the proxy gives up on it
        # and fails what waited on it over to the backup, the first INVITE included.
        first = None
        for i in range(2000):
            # A caller per call: one caller's burst would trip high_frequency.
            caller.send(_fat("INVITE", port, i, "UDP", f"sip:{CALLEE}@127.0.0.1:{port}", f"1391{i:07d}"), port)
            caller.recv(match=lambda m, i=i: status(m) == 100 and f"fat-{i:06d}" in m)   # forwarded (or failed over)
            backup.sock.setblocking(False)
            try:
                first = backup.sock.recv(65535).decode()
                break
            except BlockingIOError:
                continue
            finally:
                backup.sock.setblocking(True)
        assert first is not None, "2000 INVITEs and none failed over"
        assert first_line(first).startswith("INVITE ") and headers(first, "Call-ID") == ["fat-000000"]
        assert ip.proxy.tcp.overflows >= 1
    finally:
        server.close()


def test_tcp_trunk_and_failover_on_connection_error(start: Any, peers: Any) -> None:
    caller = peers()
    closed = free_port(socket.SOCK_STREAM)        # nothing listens here: connection refused
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(5)
    try:
        _, port = start([], trunks=[{"name": "gone", "address": f"tcp:127.0.0.1:{closed}"},
                                    {"name": "tcp", "address": f"tcp:127.0.0.1:{server.getsockname()[1]}"}],
                        sip={"trunk_timeout": 30})
        caller.send(request("INVITE", caller.port, port), port)
        conn, _ = server.accept()
        try:
            fwd = _tcp_read(conn, 1)[0]
            assert first_line(fwd).startswith("INVITE ")
            assert headers(fwd, "Via")[0].startswith("SIP/2.0/TCP ")
            conn.sendall(answer(fwd, 200, "OK").encode())
            assert caller.recv(match=is_status(200))
        finally:
            conn.close()
    finally:
        server.close()


def test_ipv6_listener_and_trunk(start: Any) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    socks = []
    try:
        for _ in range(2):
            s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            try:
                s6.bind(("::1", 0))
            except OSError:
                pytest.skip("no ::1 on this machine")
            s6.settimeout(3)
            socks.append(s6)
        caller6, trunk6 = socks
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
            port = int(probe.getsockname()[1])
        trunk_addr = f"udp:[::1]:{trunk6.getsockname()[1]}"
        start([], listen=[f"udp:[::1]:{port}"], trunks=[{"name": "v6", "address": trunk_addr}])
        cport = caller6.getsockname()[1]
        inv = request("INVITE", cport, port).replace("127.0.0.1", "[::1]")
        caller6.sendto(inv.encode(), ("::1", port))
        fwd = ""
        while not fwd.startswith("INVITE"):
            fwd = trunk6.recv(65535).decode()
        assert headers(fwd, "Via")[0].startswith(f"SIP/2.0/UDP [::1]:{port};")
        trunk6.sendto(answer(fwd, 486, "Busy Here").encode(), ("::1", port))
        codes = []
        while 486 not in codes:
            codes.append(status(caller6.recv(65535).decode()))
        assert codes[-1] == 486
    finally:
        for s6 in socks:
            s6.close()


def test_sighup_during_a_reload_reads_the_files_again_after_it(start: Any, peers: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    caller, trunk = peers(), peers()
    ip, port = start([trunk.port])
    path = Path(ip.server.config_path)

    def set_reason(text: str) -> None:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        data["rules"] = {"banned": {"reason": text}}
        path.write_text(yaml.safe_dump(data), encoding="utf-8")

    # The first reload reads the config, then waits until the file changed again and a second
    # SIGHUP came; that one must not be lost.
    real_load = config_mod.load
    read_first, release = threading.Event(), threading.Event()

    def load(*args: Any, **kwargs: Any) -> Any:
        cfg = real_load(*args, **kwargs)
        if not read_first.is_set():
            read_first.set()
            assert release.wait(10)
        return cfg

    monkeypatch.setattr(config_mod, "load", load)
    set_reason("first")
    ip.call(ip.server._on_hup)
    assert read_first.wait(10)
    set_reason("second")
    ip.call(ip.server._on_hup)
    release.set()
    wait_until(lambda: not ip.call(lambda: ip.server.reloading), 10, "the reloads to finish")
    caller.send(request("INVITE", caller.port, port, caller=BANNED), port)
    resp = caller.recv(match=lambda m: status(m) >= 200)
    assert status(resp) == 403 and first_line(resp) == "SIP/2.0 403 second"


def test_a_reload_waits_for_a_list_still_being_written(start: Any, peers: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A blocklist written in place, SIGHUP in the middle: the reload sees a last line without its
    end, waits, and loads the finished file; it swapped the half file in, bans lost, before."""
    from callguard import lists as lists_mod

    caller, trunk = peers(), peers()
    ip, port = start([trunk.port])
    blocklist = Path(ip.server.cfg.lists.blocklist)
    unfinished_seen = threading.Event()
    real_unfinished = lists_mod.unfinished_file

    def unfinished(path: str) -> bool:
        r = real_unfinished(path)
        if r:
            unfinished_seen.set()
        return r

    monkeypatch.setattr(lists_mod, "unfinished_file", unfinished)
    text = BLOCKLIST + "13700137001,exact,regulator,new ban,,,,\n13700137002,exact,regul"
    blocklist.write_text(text)
    ip.call(ip.server._on_hup)
    assert unfinished_seen.wait(10)
    with open(blocklist, "a") as f:
        f.write("ator,new ban,,,,\n")
    wait_until(lambda: not ip.call(lambda: ip.server.reloading), 15, "the reload to finish")
    for number in (BANNED, "13700137001", "13700137002"):
        caller.send(request("INVITE", caller.port, port, caller=number), port)
        assert status(caller.recv(match=lambda m: status(m) >= 200)) == 403, number


def test_a_reload_that_fails_changes_nothing(start: Any, peers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new config's trunk name does not resolve: reload_failed, and the old lists, rules and
    trunks all stay (the guard and rules were swapped before the lookup failed)."""
    caller, trunk = peers(), peers()
    ip, port = start([trunk.port])
    path = Path(ip.server.config_path)
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "trunk.unresolvable.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["trunks"] = [{"name": "t", "address": "udp:trunk.unresolvable.test:5060"}]
    data["rules"] = {"banned": {"mode": "shadow"}}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    before = ip.call(lambda: (ip.server.proxy.guard, ip.server.proxy.cfg, list(ip.server.proxy.trunks)))
    ip.call(ip.server._on_hup)
    wait_until(lambda: not ip.call(lambda: ip.server.reloading), 10, "the reload to finish")
    after = ip.call(lambda: (ip.server.proxy.guard, ip.server.proxy.cfg, list(ip.server.proxy.trunks)))
    assert after[0] is before[0] and after[1] is before[1] and after[2] == before[2]
    caller.send(request("INVITE", caller.port, port, caller=BANNED), port)
    assert status(caller.recv(match=lambda m: status(m) >= 200)) == 403


def test_sigterm_during_a_reload_abandons_it_and_stops_cleanly(start: Any, peers: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The reload task is cancelled and awaited on stop: left pending it was reported on stderr
    ("Task was destroyed but it is pending"), outside the JSON log."""
    trunk = peers()
    ip, _ = start([trunk.port])
    real_load = config_mod.load
    reading, release = threading.Event(), threading.Event()

    def load(*args: Any, **kwargs: Any) -> Any:
        reading.set()
        assert release.wait(10)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(config_mod, "load", load)
    ip.call(ip.server._on_hup)
    assert reading.wait(10)
    ip.loop.call_soon_threadsafe(ip.server._on_term)
    wait_until(lambda: ip.server._reload_task.done(), 10, "the reload task to end")
    assert ip.server._reload_task.cancelled()
    release.set()
    ip.thread.join(15)
    assert ip.result == [0]


def test_records_and_outcomes(start: Any, peers: Any, tmp_path: Path) -> None:
    from callguard.records import RecordStore

    caller, trunk = peers(), peers()
    db = tmp_path / "rec.sqlite3"
    ip, port = start([trunk.port], records={"enabled": True, "path": str(db)}, sip={"record_route": True})
    caller.send(request("INVITE", caller.port, port, caller=BANNED), port)
    caller.recv(match=lambda m: status(m) >= 200)
    inv = request("INVITE", caller.port, port)
    caller.send(inv, port)
    fwd = trunk.recv(match=is_method("INVITE"))
    trunk.send(answer(fwd, 200, "OK"), port)
    caller.recv(match=is_status(200))
    bye = request("BYE", caller.port, port, call_id=headers(inv, "Call-ID")[0], cseq=2, to_tag="trunk1",
                  uri=f"sip:{CALLEE}@127.0.0.1:{trunk.port}", extra=f"Route: {headers(fwd, 'Record-Route')[0]}")
    caller.send(bye, port)
    trunk.recv(match=is_method("BYE"))
    ip.stop()   # flushes the records
    with RecordStore(str(db)) as store:
        rows = {r["rule"]: r for r in store.query()}
    assert rows["banned"]["code"] == 403 and rows["banned"]["verdict"] == "reject"
    allowed = rows["allow"]
    assert allowed["final_code"] == 200 and allowed["answered_at"] and allowed["ended_at"]


def test_drain_answers_new_invites_503(start: Any, peers: Any) -> None:
    caller, trunk = peers(), peers()
    ip, port = start([trunk.port], sip={"shutdown_grace": 5, "trunk_timeout": 30})
    inv = request("INVITE", caller.port, port)
    caller.send(inv, port)
    fwd = trunk.recv(match=is_method("INVITE"))
    ip.loop.call_soon_threadsafe(ip.server._on_term)
    wait_until(lambda: ip.proxy.draining, 5, "draining")
    caller.send(request("INVITE", caller.port, port, callee="02150007777"), port)
    assert status(caller.recv(match=lambda m: status(m) >= 200)) == 503
    # The call in flight still completes; then the proxy stops.
    trunk.send(answer(fwd, 200, "OK"), port)
    assert caller.recv(match=is_status(200))
    ip.thread.join(10)
    assert ip.result == [0]


def test_internal_fault_fails_open(start: Any, peers: Any) -> None:
    caller, trunk = peers(), peers()
    ip, port = start([trunk.port])

    def broken(*_: Any) -> str:
        raise RuntimeError("injected fault")

    ip.proxy._caller_of = broken   # fault injection: the screening step raises
    for ep in ip.proxy.udp:        # ... on the Python path, which the compiled fast path bypasses
        if getattr(ep, "fast", None) is not None:
            ep.fast.enabled = False
    caller.send(request("INVITE", caller.port, port, caller=BANNED), port)
    assert trunk.recv(match=is_method("INVITE"))   # failed open: forwarded
    assert ip.proxy.faults == 1
    # Stopping (SIGTERM's drain): an ordinary call gets 503, an emergency call still fails open.
    ip.call(lambda: setattr(ip.proxy, "draining", True))
    caller.send(request("INVITE", caller.port, port), port)
    assert status(caller.recv(match=lambda m: status(m) >= 200)) == 503
    emergency = request("INVITE", caller.port, port, callee="112")
    caller.send(emergency, port)
    assert trunk.recv(match=lambda m: is_method("INVITE")(m) and headers(m, "Call-ID") == headers(emergency, "Call-ID"))
    assert ip.proxy.faults == 2


# ---------------------------------------------------------------- reload and stop (subprocess)
def _serve_env() -> dict[str, str]:
    """The subprocess imports callguard from where this test did (installed package or source tree)."""
    import callguard

    pkg_parent = str(Path(callguard.__file__).resolve().parent.parent)
    return dict(os.environ, PYTHONPATH=pkg_parent + os.pathsep + os.environ.get("PYTHONPATH", ""))


class Served:
    """``python -m callguard serve`` as a subprocess; its stderr log lines are collected by a thread."""

    def __init__(self, config: Path, read_log: bool = True) -> None:
        env = _serve_env()
        self.proc = subprocess.Popen([sys.executable, "-m", "callguard", "serve", "--config", str(config)],
                                     cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        if read_log:
            self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == name:
                out.append(ev)
        return out

    def wait_options(self, peer: Peer, port: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "".join(self.lines)
            peer.send(request("OPTIONS", peer.port, port, uri=f"sip:127.0.0.1:{port}"), port)
            try:
                if status(peer.recv(0.2)) == 200:
                    return
            except AssertionError:
                continue
        raise AssertionError("proxy did not answer OPTIONS:\n" + "".join(self.lines))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_sighup_reload_and_sigterm_snapshot_survive_restart(tmp_path: Path, peers: Any) -> None:
    caller, trunk = peers(), peers()
    port = free_port()
    cfg = make_config(tmp_path, [f"udp:127.0.0.1:{port}"], [{"name": "t", "address": f"udp:127.0.0.1:{trunk.port}"}],
                      logging={"level": "info"}, rate_limits=[{"name": "one", "window": 600, "max_calls": 1}])
    good = cfg.read_text()
    final = lambda m: status(m) >= 200  # noqa: E731
    served = Served(cfg)
    try:
        served.wait_options(caller, port)
        inv = request("INVITE", caller.port, port)
        caller.send(inv, port)
        fwd = trunk.recv(match=is_method("INVITE"))
        trunk.send(answer(fwd, 486, "Busy Here"), port)
        caller.recv(match=is_status(486))
        # A broken file: the old config stays in force.
        cfg.write_text(good.replace("trunk_timeout", "no_such_key"))
        served.proc.send_signal(signal.SIGHUP)
        failed = wait_until(lambda: served.events("reload_failed"), 15, "reload_failed")
        assert "no_such_key" in failed[0]["error"]
        caller.send(request("INVITE", caller.port, port, caller=BANNED), port)
        resp = caller.recv(match=final)
        assert status(resp) == 403 and headers(resp, "Reason")
        # A good file: applied, and the rate-limit state is kept across the reload.
        data = yaml.safe_load(good)
        data["sip"]["hide_reason"] = True
        cfg.write_text(yaml.safe_dump(data))
        served.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: served.events("reloaded"), 15, "reloaded")
        caller.send(request("INVITE", caller.port, port, caller=BANNED), port)
        resp = caller.recv(match=final)
        assert status(resp) == 403 and not headers(resp, "Reason")
        caller.send(request("INVITE", caller.port, port, callee="02150003333"), port)
        assert status(caller.recv(match=final)) == 603
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(20) == 0
        assert json.loads((tmp_path / "state.json").read_text())["tracks"][0]
    finally:
        served.kill()
    # Restarted: the snapshot is restored, so the caller is still over its limit.
    served = Served(cfg)
    try:
        served.wait_options(caller, port)
        assert served.events("snapshot_restored")
        caller.send(request("INVITE", caller.port, port, callee="02150004444"), port)
        assert status(caller.recv(match=final)) == 603
        assert trunk.silent(0.2, is_method("INVITE"))
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(20) == 0
    finally:
        served.kill()


def test_a_log_nobody_reads_does_not_stall_calls(tmp_path: Path, peers: Any) -> None:
    caller, trunk = peers(), peers()
    port = free_port()
    cfg = make_config(tmp_path, [f"udp:127.0.0.1:{port}"], [{"name": "t", "address": f"udp:127.0.0.1:{trunk.port}"}],
                      logging={"level": "info"})
    served = Served(cfg, read_log=False)     # its stderr is a pipe of 64 KiB that nothing reads for now
    try:
        served.wait_options(caller, port)
        # 2000 decisions at info: some 600 kB of log lines, ten times what the pipe holds.
        call_ids = []
        for i in range(2000):
            inv = request("INVITE", caller.port, port, caller=BANNED, callee=f"0215{i:07d}")
            call_ids.append(headers(inv, "Call-ID")[0])
            caller.send(inv, port)
            resp = caller.recv(match=lambda m, cid=call_ids[-1]: status(m) >= 200 and headers(m, "Call-ID") == [cid])
            assert status(resp) == 403, i
        served.proc.send_signal(signal.SIGTERM)
        _, log = served.proc.communicate(timeout=60)     # reads the log at last, while the proxy stops
        assert served.proc.returncode == 0
    finally:
        served.kill()
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    decided = [e["call_id"] for e in events if e.get("event") == "decision"]
    assert decided == call_ids                             # every line kept, in order
    assert [e["event"] for e in events][-1] == "stopped"


def test_sigkill_restart_rebuilds_rate_limits_from_the_records(tmp_path: Path, peers: Any) -> None:
    """No snapshot is written on SIGKILL: the restarted proxy counts again the attempts the call
    records hold, so a caller over its limit before stays over it; after a clean stop it reads
    nothing again (the snapshot already has it all)."""
    caller, trunk = peers(), peers()
    port = free_port()
    cfg = make_config(tmp_path, [f"udp:127.0.0.1:{port}"], [{"name": "t", "address": f"udp:127.0.0.1:{trunk.port}"}],
                      logging={"level": "info"}, records={"enabled": True},
                      rate_limits=[{"name": "two", "window": 600, "max_calls": 2}])
    final = lambda m: status(m) >= 200  # noqa: E731
    def stored() -> tuple[int, int]:
        """The caller's decisions and the outcomes committed to the records file (read-only: the
        proxy is its writer)."""
        path = tmp_path / "records.sqlite3"
        if not path.exists():
            return 0, 0
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            parts = conn.execute("SELECT name, outcomes FROM partitions").fetchall()
            return (sum(conn.execute(f'SELECT count(*) FROM "{r}" WHERE caller = ?', (CALLER,)).fetchone()[0]
                        for r, _ in parts),
                    sum(conn.execute(f'SELECT count(*) FROM "{o}"').fetchone()[0] for _, o in parts))
        except sqlite3.OperationalError:    # the catalog is not there yet
            return 0, 0
        finally:
            conn.close()

    served = Served(cfg)
    try:
        served.wait_options(caller, port)
        for n in range(2):
            caller.send(request("INVITE", caller.port, port, callee=f"0215000{n:04d}"), port)
            fwd = trunk.recv(match=is_method("INVITE"))
            trunk.send(answer(fwd, 486, "Busy Here"), port)
            caller.recv(match=is_status(486))
        # the two decisions are on disk (the writer commits about once a second), then a hard kill
        wait_until(lambda: stored() == (2, 2), 15, "records and outcomes on disk")
        served.kill()
    finally:
        served.kill()
    assert not (tmp_path / "state.json").exists()
    served = Served(cfg)
    try:
        served.wait_options(caller, port)
        rebuilt = served.events("rate_state_rebuilt")
        assert rebuilt and rebuilt[0]["records"] == 2 and rebuilt[0]["attempts"] == 2
        assert rebuilt[0]["outcomes"] == 2          # both were answered 486: scored as not answered
        caller.send(request("INVITE", caller.port, port, callee="02150009999"), port)
        assert status(caller.recv(match=final)) == 603      # high_frequency: the third attempt in 600 s
        assert trunk.silent(0.2, is_method("INVITE"))
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(20) == 0
    finally:
        served.kill()
    assert json.loads((tmp_path / "state.json").read_text())["written_at"] > 0
    served = Served(cfg)
    try:
        served.wait_options(caller, port)
        assert served.events("snapshot_restored")
        assert not served.events("rate_state_rebuilt")     # nothing after the snapshot: no double count
        caller.send(request("INVITE", caller.port, port, callee="02150008888"), port)
        assert status(caller.recv(match=final)) == 603
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(20) == 0
    finally:
        served.kill()


def test_corrupt_snapshot_is_ignored(tmp_path: Path, peers: Any) -> None:
    caller, trunk = peers(), peers()
    port = free_port()
    cfg = make_config(tmp_path, [f"udp:127.0.0.1:{port}"], [{"name": "t", "address": f"udp:127.0.0.1:{trunk.port}"}],
                      logging={"level": "info"})
    (tmp_path / "state.json").write_text("{not json")
    served = Served(cfg)
    try:
        served.wait_options(caller, port)
        assert served.events("snapshot_ignored")
    finally:
        served.kill()


def _catches_sighup(pid: int) -> bool:
    """Whether the process has a handler for SIGHUP (SigCgt in /proc, bit 0)."""
    try:
        status_text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status_text.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & 1)


def test_a_sighup_while_starting_is_a_reload_once_up_not_the_end(tmp_path: Path, peers: Any) -> None:
    """SIGHUP's default action ends a process: one that came while the lists loaded took serve
    down with exit 129.  Sent as soon as the process catches it (before it listens): serve comes
    up, reads the files again, and stops cleanly on SIGTERM."""
    caller, trunk = peers(), peers()
    port = free_port()
    cfg = make_config(tmp_path, [f"udp:127.0.0.1:{port}"], [{"name": "t", "address": f"udp:127.0.0.1:{trunk.port}"}],
                      logging={"level": "info"})
    blocklist = Path(config_mod.load(cfg).lists.blocklist)
    with open(blocklist, "a") as f:      # enough rows that the start takes a while after the handler is set
        f.writelines(f"1370{i:07d},exact,regulator,bulk,,,,\n" for i in range(300_000))
    served = Served(cfg)
    try:
        wait_until(lambda: _catches_sighup(served.proc.pid) or served.proc.poll() is not None, 30,
                   "serve to catch SIGHUP")
        served.proc.send_signal(signal.SIGHUP)
        served.wait_options(caller, port)
        wait_until(lambda: served.events("reloaded"), 30, "the reload after the start")
        assert served.proc.poll() is None and served.events("reload_after_start")
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(30) == 0
    finally:
        served.kill()


def _serve(config: Path) -> subprocess.Popen[str]:
    env = _serve_env()
    return subprocess.Popen([sys.executable, "-m", "callguard", "serve", "--config", str(config)],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def test_config_error_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sip: {listen: [nonsense]}\n")
    proc = _serve(bad)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and err.startswith("error: ") and "sip.listen" in err


@pytest.mark.parametrize(("via", "stamped"), [
    ("SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKa;rport", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKa;rport=5070"
     ";received=127.0.0.1"),
    ("SIP/2.0/UDP 10.0.0.9:5070;branch=z9hG4bKa", "SIP/2.0/UDP 10.0.0.9:5070;branch=z9hG4bKa;received=127.0.0.1"),
    ("SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKa", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKa"),
    ("SIP/2.0/UDP [::1]:5070;branch=z9hG4bKa", "SIP/2.0/UDP [::1]:5070;branch=z9hG4bKa;received=127.0.0.1"),
    # a received the sender wrote is replaced by where the request came from (RFC 3261 §18.2.1)
    ("SIP/2.0/UDP gw.example;branch=z9hG4bKa;received=10.1.1.1", "SIP/2.0/UDP gw.example;branch=z9hG4bKa"
     ";received=127.0.0.1"),
    ("SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKa;rport;received=10.1.1.1", "SIP/2.0/UDP 127.0.0.1:5070"
     ";branch=z9hG4bKa;rport=5070;received=127.0.0.1"),
    ("SIP/2.0/UDP 127.0.0.1:5070;RECEIVED=10.1.1.1;branch=z9hG4bKa", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKa"),
])
def test_received_and_rport_stamping(via: str, stamped: str) -> None:
    from callguard.sip.proxy import Proxy

    assert Proxy._stamp_via(via, ("127.0.0.1", 5070)) == stamped


def test_rebuild_counts_only_what_the_state_has_not_seen(tmp_path: Path) -> None:
    """The records since the snapshot and inside the longest window, core decisions only, and the
    outcomes of those calls that are over."""
    from structlog.testing import capture_logs

    from callguard.guard import Guard
    from callguard.log import get_logger
    from callguard.records import RecordStore
    from callguard.state import rebuild_rate_state

    trunks = [{"name": "t", "address": "udp:127.0.0.1:5080"}]
    cfg = config_mod.load(make_config(tmp_path, ["udp:127.0.0.1:5060"], trunks, records={"enabled": True},
                                      rate_limits=[{"name": "w", "window": 600, "max_calls": 100}],
                                      score={"short_call_seconds": 6}))
    now = 1_790_000_000.0
    rows = [(now - 700, "allow"), (now - 300, "allow"), (now - 250, "allow"), (now - 220, "allow"),
            (now - 210, "allow"), (now - 200, "banned"), (now - 150, "overload"), (now - 50, "high_frequency"),
            (now - 10, "untrusted_source")]
    with RecordStore(str(tmp_path / "r.sqlite3")) as store:
        for i, (t, rule) in enumerate(rows):
            source = "192.0.2.1" if rule == "untrusted_source" else "127.0.0.1"
            store.add({"time": t, "call_id": f"c{i}", "source": source, "caller": CALLER, "callee": "02150001234",
                       "rule": rule, "verdict": "reject", "code": 403, "score": 0.0, "latency_us": 1})
        store.outcome("c0", final_code=486)                                 # outside the window
        store.outcome("c1", final_code=486)                                 # not answered
        store.outcome("c2", final_code=200, answered_at=now - 249)
        store.outcome("c2", ended_at=now - 240)                             # 9 s: not short
        store.outcome("c3", final_code=200, answered_at=now - 219)
        store.outcome("c3", ended_at=now - 217)                             # 2 s: short
        store.outcome("c4", final_code=200, answered_at=now - 209)         # still talking: not scored
        store.flush()
        with capture_logs() as logs:
            no_snapshot = Guard(cfg)
            # attempts 300, 250, 220, 210, 200 and 50 s ago; not the overload rejection (no decision
            # of the core) nor the untrusted source (check does not count it either)
            assert rebuild_rate_state(no_snapshot, store, cfg, None, get_logger(), now=now) == (6, 3)
            after_snapshot = Guard(cfg)
            assert rebuild_rate_state(after_snapshot, store, cfg, now - 100, get_logger(), now=now) == (1, 0)
            assert rebuild_rate_state(Guard(cfg), store, cfg, now, get_logger(), now=now) == (0, 0)
    assert [e["records"] for e in logs if e["event"] == "rate_state_rebuilt"] == [7, 2]
    track = no_snapshot.snapshot()["tracks"][0][0]
    assert track[2] == [int((now - s) * 1000) for s in (300, 250, 220, 210, 200, 50)]
    assert track[4:] == [3, 2, 1]      # finished, answered, short
    assert after_snapshot.snapshot()["tracks"][0][0][2] == [int((now - 50) * 1000)]


def test_rebuild_reads_at_most_the_newest_records_it_may(tmp_path: Path) -> None:
    """records.rebuild_max_records bounds the start: the newest records are read (the short windows
    whole), the event says the rebuild is partial; 0 turns it off."""
    from structlog.testing import capture_logs

    from callguard.guard import Guard
    from callguard.log import get_logger
    from callguard.records import RecordStore
    from callguard.state import rebuild_rate_state

    trunks = [{"name": "t", "address": "udp:127.0.0.1:5080"}]
    limits = [{"name": "w", "window": 3600, "max_calls": 1000}]
    now = 1_790_000_000.0
    with RecordStore(str(tmp_path / "r.sqlite3")) as store:
        for i in range(50):
            store.add({"time": now - 500 + 10 * i, "call_id": f"c{i}", "source": "127.0.0.1", "caller": CALLER,
                       "callee": "02150001234", "rule": "allow", "verdict": "allow", "code": 0, "score": 0.0,
                       "latency_us": 1})
        store.flush()
        for budget, attempts in ((1000, 50), (20, 20), (0, 0)):
            cfg = config_mod.load(make_config(tmp_path, ["udp:127.0.0.1:5060"], trunks, rate_limits=limits,
                                              records={"enabled": True, "rebuild_max_records": budget}))
            guard = Guard(cfg)
            with capture_logs() as logs:
                assert rebuild_rate_state(guard, store, cfg, None, get_logger(), now=now) == (attempts, 0)
            rebuilt = [e for e in logs if e["event"] == "rate_state_rebuilt"]
            if attempts:
                assert rebuilt[0]["partial"] is (budget < 50)
                assert rebuilt[0]["log_level"] == ("warning" if budget < 50 else "info")
                times = guard.snapshot()["tracks"][0][0][2]
                assert times[-1] == int((now - 10) * 1000) and len(times) == attempts   # the newest ones
            else:
                assert not rebuilt and guard.core.tracked() == (0, 0, 0)


def test_a_snapshot_written_in_the_future_is_ignored_so_the_records_count(tmp_path: Path) -> None:
    """A snapshot whose written_at is ahead of the clock (taken while the clock ran ahead) hid every
    record up to that time from the rebuild after a crash; it is ignored, said so, and a snapshot
    of the past is restored as before."""
    from structlog.testing import capture_logs

    from callguard.guard import Guard
    from callguard.log import get_logger
    from callguard.state import restore_snapshot, write_snapshot

    trunks = [{"name": "t", "address": "udp:127.0.0.1:5080"}]
    cfg = config_mod.load(make_config(tmp_path, ["udp:127.0.0.1:5060"], trunks,
                                      rate_limits=[{"name": "w", "window": 600, "max_calls": 2}]))
    now = time.time()
    over = Guard(cfg)
    for i in range(3):
        over.check(CALLER, f"0215000123{i}", source="127.0.0.1", now=now - 30 + i)
    assert over.check(CALLER, "02150001299", source="127.0.0.1", now=now - 20).rule == "high_frequency"
    path = str(tmp_path / "state.json")
    for written_at, restored in ((now + 86400, False), (now - 5, True)):
        write_snapshot(path, over, now=written_at)
        fresh = Guard(cfg)
        with capture_logs() as logs:
            taken = restore_snapshot(fresh, path, get_logger(), now=now)
        assert (taken is not None) == restored
        assert [e["event"] for e in logs] == (["snapshot_restored"] if restored else ["snapshot_ignored"])
        rule = fresh.check(CALLER, "02150001298", source="127.0.0.1", now=now).rule
        assert rule == ("high_frequency" if restored else "allow")
