"""Per-session limits in websocket mode: message size across fragments (1009), message rate
(1008, with a burst allowance) and session lifetime (1001 at a message boundary). Each beside a
canary session that must stay intact."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.flows.test_websocket import ws_config
from tests.helpers.canary import Canary
from tests.helpers.servers import RawServer, upgrading_target
from tests.helpers.wsraw import RawWebSocket
from wsproxy.address import Address
from wsproxy.config import parse_config
from wsproxy.demo import EchoTarget
from wsproxy.errors import ConfigError
from wsproxy.wire.wsframe import (
    OP_BINARY,
    OP_CONTINUATION,
    OP_TEXT,
    FrameTracker,
    encode_close,
)

CanaryFactory = Callable[..., Awaitable[Canary]]
RawServers = Callable[..., Awaitable[RawServer]]


async def test_a_message_over_max_message_bytes_across_fragments_is_refused(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], canary_factory: CanaryFactory
) -> None:
    proxy = await make_proxy(
        ws_config(
            ("chat", [echo_targets[0].address]),
            listener="max_frame_bytes = 2000\nmax_message_bytes = 2100",
        )
    )
    address = listener_address(proxy)
    canary = await canary_factory(address)
    ws = await RawWebSocket.connect(address)
    # Within the limit, fragmented: passes whole.
    ws.send(OP_BINARY, b"a" * 1000, fin=False)
    ws.send(OP_CONTINUATION, b"b" * 1000)
    assert await ws.recv() == (OP_BINARY, b"a" * 1000 + b"b" * 1000)
    # Each fragment is under max_frame_bytes, together they are over max_message_bytes.
    ws.send(OP_BINARY, b"c" * 1200, fin=False)
    ws.send(OP_CONTINUATION, b"d" * 1200)
    assert await ws.recv_close() == 1009
    await ws.closed()
    stats = proxy.listeners["edge"].stats
    await wait_for(lambda: stats.closes[("proxy", "1009")] == 1)
    await canary.check()


async def test_a_client_over_its_message_rate_gets_1008_and_a_steady_one_does_not(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], canary_factory: CanaryFactory
) -> None:
    proxy = await make_proxy(
        ws_config(
            ("chat", [echo_targets[0].address]),
            listener="max_messages_per_second = 10\nmessages_burst = 5",
        )
    )
    address = listener_address(proxy)
    canary = await canary_factory(address)  # one message: inside its own burst

    steady = await RawWebSocket.connect(address)
    for index in range(10):  # 5 per second for 2 s: under the rate, never limited
        steady.send(OP_TEXT, f"steady {index}".encode())
        assert await steady.recv() == (OP_TEXT, f"steady {index}".encode())
        await asyncio.sleep(0.2)

    flood = await RawWebSocket.connect(address)
    for index in range(5):  # the burst allowance
        flood.send(OP_TEXT, f"burst {index}".encode())
    for index in range(5):
        assert await flood.recv() == (OP_TEXT, f"burst {index}".encode())
    for index in range(30):  # far over 10 per second
        flood.send(OP_TEXT, f"flood {index}".encode())
    assert await flood.recv_close() == 1008
    flood.writer.write(encode_close(1008, mask=os.urandom(4)))  # a client's answer to a Close
    await flood.closed()
    await wait_for(lambda: proxy.listeners["edge"].stats.closes[("proxy", "1008")] == 1)

    steady.send(OP_TEXT, b"still fine")
    assert await steady.recv() == (OP_TEXT, b"still fine")
    await canary.check()


async def test_max_session_seconds_closes_with_1001_at_a_message_boundary(
    make_proxy: ProxyFactory, raw_servers: RawServers, canary_factory: CanaryFactory
) -> None:
    seen: list[bytes] = []
    target = upgrading_target(seen)

    server = await raw_servers(target)
    proxy = await make_proxy(
        ws_config(("chat", [server.address]), listener="max_session_seconds = 0.5")
    )
    ws = await RawWebSocket.connect(listener_address(proxy))
    opened = time.monotonic()
    ws.send(OP_TEXT, b"first", fin=False)  # a message still open when the time is up
    close = asyncio.create_task(ws.recv_close(timeout=5))
    await asyncio.sleep(0.9)
    ws.send(OP_CONTINUATION, b" and last")
    assert await close == 1001
    waited = time.monotonic() - opened
    assert 0.4 <= waited <= 2.0, waited

    def tracked() -> FrameTracker:
        tracker = FrameTracker(masked=True, max_frame_bytes=1024)
        received = b"".join(seen)
        assert tracker.feed(received) == len(received)
        return tracker

    await wait_for(lambda: tracked().closes == 1)
    # The target got the whole message (both fragments), then the proxy's masked Close 1001.
    tracker = tracked()
    assert (tracker.frames, tracker.messages, tracker.close_code) == (3, 1, 1001)
    ws.abort()
    await wait_for(lambda: proxy.listeners["edge"].stats.active == 0)


def test_limits_reject_bad_values() -> None:
    for line in (
        "max_messages_per_second = -1",
        "max_session_seconds = -5",
        "max_message_bytes = 10",
        "max_connections_per_ip = -1",
        "max_handshakes_in_flight = 0",
    ):
        text = ws_config(("chat", [Address("127.0.0.1", 20001)]), listener=line)
        with pytest.raises(ConfigError, match=line.split(" =")[0]):
            parse_config(text, "<test>")
