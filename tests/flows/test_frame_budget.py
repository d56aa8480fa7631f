"""The client's frame budget (issue 13, item 8): every frame counts, control frames and
continuations included, and the limit is on by default. A flood of empty frames is closed with
1008 (reason ``frame_rate_exceeded``) while a canary session beside it keeps flowing, and a real
client's fragmented upload passes."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import cast

import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.flows.test_websocket import ws_config
from tests.helpers.canary import Canary
from tests.helpers.wsraw import RawWebSocket, frame, upgrade_request
from wsproxy.config import parse_config
from wsproxy.demo import EchoTarget
from wsproxy.wire.wsframe import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    parse_header,
)

CanaryFactory = Callable[..., Awaitable[Canary]]

# 60,000 empty frames, ~360 KB: the flood sent 200,000 pings in 2 s.
FLOOD_FRAMES = 60_000


def flood(kind: str) -> bytes:
    mask = os.urandom(4)
    if kind == "pings":
        return frame(OP_PING, b"", mask=mask) * FLOOD_FRAMES
    opening = frame(OP_TEXT, b"open", fin=False, mask=mask)
    return opening + frame(OP_CONTINUATION, b"", fin=False, mask=mask) * FLOOD_FRAMES


class Flooder(asyncio.Protocol):
    """A raw client that upgrades, then floods; it keeps every byte the proxy sends until the
    connection ends (a stream reader would hide what came before a reset)."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.received += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)

    def frames(self) -> list[tuple[int, bytes]]:
        """What came after the 101, as (opcode, payload)."""
        data = self.received.split(b"\r\n\r\n", 1)[1]
        out = []
        while (header := parse_header(data)) is not None:
            end = header.header_len + header.payload_len
            if len(data) < end:
                break
            out.append((header.opcode, data[header.header_len : end]))
            data = data[end:]
        return out


@pytest.mark.parametrize("kind", ["pings", "continuations"])
async def test_an_empty_frame_flood_is_closed_by_default_beside_a_canary(
    make_proxy: ProxyFactory,
    echo_targets: list[EchoTarget],
    canary_factory: CanaryFactory,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    # No limit in the config: the default (10,000 frames/s, one second's burst) applies.
    text = ws_config(("chat", [echo_targets[0].address]))
    assert parse_config(text, "<test>").listeners["edge"].max_frames_per_second == 10_000
    proxy = await make_proxy(text)
    address = listener_address(proxy)
    canary = await canary_factory(address)
    loop = asyncio.get_running_loop()
    with caplog.at_level(logging.INFO, logger="wsproxy.access"):
        _, flooder = await loop.create_connection(Flooder, address.host, address.port)
        assert flooder.transport is not None
        flooder.transport.write(upgrade_request())
        await wait_for(lambda: b"\r\n\r\n" in flooder.received)
        assert flooder.received.startswith(b"HTTP/1.1 101")
        flooder.transport.write(flood(kind))
        await canary.check()  # while the flood is being read
        # The proxy fails the connection: its Close 1008, then the socket closes (a reset, as
        # the flood's tail is still unread), without waiting for an answer.
        await asyncio.wait_for(flooder.lost, 10)
        stats = proxy.listeners["edge"].stats
        await wait_for(lambda: stats.active == 1)  # the canary's
    received = flooder.frames()
    assert received[-1] == (OP_CLOSE, (1008).to_bytes(2, "big") + b"frame rate exceeded")
    assert stats.closes[("proxy", "1008")] == 1
    logged = [getattr(r, "connection", {}) for r in caplog.records if r.name == "wsproxy.access"]
    assert [entry["reason"] for entry in logged] == ["frame_rate_exceeded"]
    # Far fewer pings than were sent reached the target: the burst and the read that overdrew.
    pongs = sum(opcode == OP_PONG for opcode, _ in received)
    assert pongs < FLOOD_FRAMES / 2
    await canary.check()


async def test_a_fragmented_upload_and_a_chatty_client_pass_under_the_default(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], canary_factory: CanaryFactory
) -> None:
    proxy = await make_proxy(ws_config(("chat", [echo_targets[0].address])))
    address = listener_address(proxy)
    canary = await canary_factory(address)
    ws = await RawWebSocket.connect(address)
    # 2 MiB in 4 KiB fragments (gorilla/websocket's default write buffer): 512 frames at once.
    chunk = os.urandom(4096)
    pieces = 512
    for index in range(pieces):
        opcode = OP_BINARY if index == 0 else OP_CONTINUATION
        ws.send(opcode, chunk, fin=index == pieces - 1)
    opcode, payload = await ws.recv(timeout=10)
    assert opcode == OP_BINARY and payload == chunk * pieces
    # Pings and small messages, 2,000 frames in one go: within the burst.
    for index in range(1000):
        ws.send(OP_PING, b"")
        ws.send(OP_TEXT, b"%d" % index)
    seen = 0
    while seen < 1000:
        opcode, payload = await ws.recv(timeout=10)
        if opcode == OP_TEXT:
            assert payload == b"%d" % seen
            seen += 1
    assert proxy.listeners["edge"].stats.closes[("proxy", "1008")] == 0
    ws.abort()
    await canary.check()


async def test_max_frames_per_second_0_turns_the_budget_off(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    proxy = await make_proxy(
        ws_config(("chat", [echo_targets[0].address]), listener="max_frames_per_second = 0")
    )
    ws = await RawWebSocket.connect(listener_address(proxy))
    ws.writer.write(frame(OP_PING, b"", mask=os.urandom(4)) * 20_000)
    ws.send(OP_TEXT, b"after the pings")
    while (await ws.recv(timeout=20))[0] != OP_TEXT:
        pass
    await asyncio.sleep(0)
    assert proxy.listeners["edge"].stats.closes[("proxy", "1008")] == 0
    ws.abort()
