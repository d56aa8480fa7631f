"""Frame-level hostile input through a running proxy: each bad frame gets Close 1002 (1009 for
sizes) before a byte of it reaches the target, and a canary session beside it stays intact.
RSV bits are allowed only when the target negotiated an extension (permessage-deflate)."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.flows.test_websocket import ws_config
from tests.helpers.canary import Canary
from tests.helpers.wsraw import RawWebSocket
from wsproxy.demo import EchoTarget
from wsproxy.wire.wsframe import OP_BINARY, OP_CLOSE, OP_PING, OP_TEXT, encode_frame

CanaryFactory = Callable[..., Awaitable[Canary]]
MASK = b"\x11\x22\x33\x44"


def with_rsv1(frame: bytes) -> bytes:
    return bytes([frame[0] | 0x40]) + frame[1:]


HOSTILE = {
    "reserved opcode 0x3": encode_frame(0x3, b"x", mask=MASK),
    "reserved control opcode 0xb": encode_frame(0xB, b"", mask=MASK),
    "rsv1 without an extension": with_rsv1(encode_frame(OP_TEXT, b"x", mask=MASK)),
    "rsv3 without an extension": bytes([0x81 | 0x10]) + encode_frame(OP_TEXT, b"x", mask=MASK)[1:],
    "ping over 125 bytes": encode_frame(OP_PING, b"p" * 126, mask=MASK),
    "fragmented ping": encode_frame(OP_PING, b"p", fin=False, mask=MASK),
    "close with a 1-byte payload": encode_frame(OP_CLOSE, b"x", mask=MASK),
    "64-bit length with the high bit set": b"\x82\xff\x80" + b"\x00" * 7 + MASK,
    "continuation with no message": encode_frame(0x0, b"x", mask=MASK),
    "unmasked client frame": encode_frame(OP_BINARY, b"x"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hostile_frames_get_1002_and_end_the_session_on_both_sides(
    make_proxy: ProxyFactory,
    echo_targets: list[EchoTarget],
    canary_factory: CanaryFactory,
    name: str,
) -> None:
    proxy = await make_proxy(ws_config(("chat", [echo_targets[0].address])))
    address = listener_address(proxy)
    canary = await canary_factory(address)
    ws = await RawWebSocket.connect(address)
    ws.send(OP_TEXT, b"before")
    assert await ws.recv() == (OP_TEXT, b"before")
    ws.writer.write(HOSTILE[name])
    assert await ws.recv_close() == 1002
    await ws.closed()
    await wait_for(lambda: proxy.listeners["edge"].stats.closes[("proxy", "1002")] == 1)
    await canary.check()
    await wait_for(lambda: echo_targets[0].active == 1)  # only the canary's session is left


async def test_compressed_sessions_pass_when_the_target_negotiated_deflate(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    proxy = await make_proxy(ws_config(("chat", [echo_targets[0].address])))
    address = listener_address(proxy)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://{address}/deflate", compress=15) as ws,
    ):
        assert ws.compress == 15  # permessage-deflate agreed end to end: frames carry RSV1
        for size in (10, 1000, 100_000):
            payload = os.urandom(size // 2).hex()
            await ws.send_str(payload)
            assert await ws.receive_str(timeout=5) == payload
    assert proxy.listeners["edge"].stats.closes[("proxy", "1002")] == 0
