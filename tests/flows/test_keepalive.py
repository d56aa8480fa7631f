"""Keepalive: silent clients get pings, the pongs that answer are dropped, dead sessions end."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable

import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.helpers.servers import RawServer, upgrading_target
from tests.helpers.wsraw import RawWebSocket, accept_upgrade
from wsproxy.address import Address
from wsproxy.demo import EchoTarget
from wsproxy.relay.websocket import WebSocketRelay
from wsproxy.wire.wsframe import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    encode_frame,
    parse_header,
    unmask,
)

RawServers = Callable[..., Awaitable[RawServer]]


def frames_of(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    while data:
        header = parse_header(data)
        assert header is not None
        end = header.header_len + header.payload_len
        out.append((header.opcode, unmask(data[header.header_len : end], header.mask_key)))
        data = data[end:]
    return out


def config(target: Address, ping: str) -> str:
    return f"""
[listeners.edge]
address = "127.0.0.1:0"
websocket = true
default_target_group = "t"
{ping}
[target_groups.t]
targets = [{{ address = "{target}" }}]
"""


async def test_silent_client_is_pinged_and_its_pong_is_not_forwarded(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    received: list[bytes] = []
    server = await raw_servers(upgrading_target(received))
    proxy = await make_proxy(
        config(server.address, "ping_interval_seconds = 0.3\nping_timeout_seconds = 2")
    )
    ws = await RawWebSocket.connect(listener_address(proxy))
    for _ in range(2):  # pings keep coming while the client stays silent
        opcode, payload = await ws.recv(timeout=3)
        assert opcode == OP_PING and payload.startswith(b"wsproxy:")
        ws.send(OP_PONG, payload)
    ws.send(OP_PONG, b"unsolicited")  # not an answer to us: the target gets it
    ws.send(OP_TEXT, b"data")
    await wait_for(lambda: any(op == OP_TEXT for op, _ in frames_of(b"".join(received))))
    frames = frames_of(b"".join(received))
    assert frames == [(OP_PONG, b"unsolicited"), (OP_TEXT, b"data")]
    relay = next(iter(proxy.listeners["edge"].flows)).relay
    assert isinstance(relay, WebSocketRelay) and relay.pings_sent >= 2
    ws.abort()


async def test_a_client_that_never_answers_is_cut_and_the_target_told(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    received: list[bytes] = []
    server = await raw_servers(upgrading_target(received))
    proxy = await make_proxy(
        config(server.address, "ping_interval_seconds = 0.2\nping_timeout_seconds = 0.3")
    )
    ws = await RawWebSocket.connect(listener_address(proxy))
    opcode, _ = await ws.recv(timeout=3)
    assert opcode == OP_PING  # and we do not answer
    with contextlib.suppress(ConnectionError):  # an abort is what a dead peer gets
        await asyncio.wait_for(ws.reader.read(), 3)
    await wait_for(lambda: OP_CLOSE in [op for op, _ in frames_of(b"".join(received))])
    close = next(payload for op, payload in frames_of(b"".join(received)) if op == OP_CLOSE)
    assert int.from_bytes(close[:2], "big") == 1001
    await wait_for(lambda: proxy.listeners["edge"].stats.active == 0)


async def test_active_clients_and_disabled_pings_get_none(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    received: list[bytes] = []
    server = await raw_servers(upgrading_target(received))
    proxy = await make_proxy(config(server.address, "ping_interval_seconds = 0"))
    ws = await RawWebSocket.connect(listener_address(proxy))
    await asyncio.sleep(0.5)
    ws.writer.write(encode_frame(OP_TEXT, b"still no ping", mask=os.urandom(4)))
    await wait_for(lambda: bool(received))
    try:
        frame = await ws.recv(timeout=0.3)
    except TimeoutError:
        frame = None
    assert frame is None
    ws.abort()


async def test_a_silent_target_is_pinged_and_its_pongs_stay_with_the_proxy(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    proxy = await make_proxy(
        config(
            echo_targets[0].address,
            "ping_interval_seconds = 0\ntarget_ping_interval_seconds = 0.2\n"
            "ping_timeout_seconds = 1",
        )
    )
    ws = await RawWebSocket.connect(listener_address(proxy))
    # A second of silence both ways: the proxy pings the target every 0.2 s (aiohttp answers),
    # and the client sees none of it.
    with pytest.raises(TimeoutError):
        await ws.recv(timeout=1.0)
    (flow,) = proxy.listeners["edge"].flows
    relay = flow.relay
    assert isinstance(relay, WebSocketRelay) and relay.pings_sent >= 2  # 0.25 s ticker slots
    ws.send(OP_TEXT, b"alive")
    assert await ws.recv() == (OP_TEXT, b"alive")


async def test_a_target_that_never_answers_pings_is_cut_and_the_client_told(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    received: list[bytes] = []
    server = await raw_servers(upgrading_target(received))  # upgrades, then never answers
    proxy = await make_proxy(
        config(
            server.address,
            "ping_interval_seconds = 0\ntarget_ping_interval_seconds = 0.2\n"
            "ping_timeout_seconds = 0.3",
        )
    )
    ws = await RawWebSocket.connect(listener_address(proxy))
    assert await ws.recv_close(timeout=3) == 1001
    frames = frames_of(b"".join(received))
    assert frames[0][0] == OP_PING and frames[0][1].startswith(b"wsproxy:")
    await wait_for(lambda: proxy.listeners["edge"].stats.active == 0)


def _split_pong(writer: asyncio.StreamWriter, pong: bytes, cut: int) -> None:
    """Make the next writes separate TCP segments: no Nagle coalescing on this socket."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.write(pong[:cut])


@pytest.mark.parametrize("cut", [1, 3])
async def test_a_client_pong_in_two_segments_keeps_the_session(
    make_proxy: ProxyFactory, raw_servers: RawServers, cut: int
) -> None:
    """Issue 13, item 6: the answer to our ping, its (masked, 6-byte) header cut in two TCP
    segments 0.2 s apart, is recognised: not forwarded, and the session outlives the pong's
    deadline (0.5 s). (Before issue 12's sans-I/O session it went out in part to the target,
    unrecognised, and the session ended with ping_timeout.)"""
    received: list[bytes] = []
    server = await raw_servers(upgrading_target(received))
    proxy = await make_proxy(
        config(server.address, "ping_interval_seconds = 0.3\nping_timeout_seconds = 0.5")
    )
    ws = await RawWebSocket.connect(listener_address(proxy))
    opcode, payload = await ws.recv(timeout=3)
    assert opcode == OP_PING
    pong = encode_frame(OP_PONG, payload, mask=os.urandom(4))
    _split_pong(ws.writer, pong, cut)
    await ws.writer.drain()
    await asyncio.sleep(0.2)
    ws.writer.write(pong[cut:])
    # Well past that pong's deadline, answering the next pings at once: the session lives.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.0
    pings = 0
    while (left := deadline - loop.time()) > 0:
        try:
            opcode, payload = await ws.recv(timeout=left)
        except TimeoutError:
            break
        assert opcode == OP_PING, "the session was closed"
        ws.send(OP_PONG, payload)
        pings += 1
    assert pings >= 1
    ws.send(OP_TEXT, b"still here")
    await wait_for(lambda: any(op == OP_TEXT for op, _ in frames_of(b"".join(received))))
    assert frames_of(b"".join(received)) == [(OP_TEXT, b"still here")]  # no pong of ours
    assert proxy.listeners["edge"].stats.active == 1
    ws.abort()


async def test_a_target_pong_in_two_segments_keeps_the_session(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    """Issue 13, item 6, the other way: a target answers each of the proxy's pings with its Pong
    header cut in two TCP segments 0.2 s apart; the session outlives several pong deadlines and
    the client sees none of it."""
    answered: list[bytes] = []

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept_upgrade(reader, writer)
        peer = RawWebSocket(reader, writer, client=False)
        while True:
            opcode, payload = await peer.recv(timeout=10)
            if opcode == OP_PING:
                pong = encode_frame(OP_PONG, payload)
                _split_pong(writer, pong, 1)
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.write(pong[1:])
                answered.append(payload)
            elif opcode == OP_TEXT:
                peer.send(OP_TEXT, payload)

    server = await raw_servers(target)
    proxy = await make_proxy(
        config(
            server.address,
            "ping_interval_seconds = 0\ntarget_ping_interval_seconds = 0.2\n"
            "ping_timeout_seconds = 0.4",
        )
    )
    ws = await RawWebSocket.connect(listener_address(proxy))
    await wait_for(lambda: len(answered) >= 3, timeout=10)
    with pytest.raises(TimeoutError):  # no pong, no close reached the client
        await ws.recv(timeout=0.3)
    ws.send(OP_TEXT, b"alive")
    assert await ws.recv() == (OP_TEXT, b"alive")
    ws.abort()


async def test_a_busy_client_whose_pong_is_late_is_not_cut(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    """Issue 13, item 6: after the proxy's ping, the client keeps sending messages for three
    pong deadlines before it answers; bytes received prove it alive, so the session lives on
    (it used to end with ping_timeout at the first deadline)."""
    received: list[bytes] = []
    server = await raw_servers(upgrading_target(received))
    proxy = await make_proxy(
        config(server.address, "ping_interval_seconds = 0.3\nping_timeout_seconds = 0.5")
    )
    ws = await RawWebSocket.connect(listener_address(proxy))
    opcode, payload = await ws.recv(timeout=3)
    assert opcode == OP_PING
    for index in range(15):  # 1.5 s of messages, no pong
        ws.send(OP_TEXT, b"busy %d" % index)
        await asyncio.sleep(0.1)
    ws.send(OP_PONG, payload)  # the late answer: still ours, taken out
    ws.send(OP_TEXT, b"done")
    await wait_for(lambda: (OP_TEXT, b"done") in frames_of(b"".join(received)))
    sent = frames_of(b"".join(received))
    assert sent == [(OP_TEXT, b"busy %d" % index) for index in range(15)] + [(OP_TEXT, b"done")]
    assert proxy.listeners["edge"].stats.active == 1
    ws.abort()
