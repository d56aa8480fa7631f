"""A slow client and a slow target (neither reads): the proxy buffers at most its write
high-water mark plus one read per connection, pauses the other side, and the event loop stays
responsive for everyone else (a canary's round trips are measured and their p99 reported)."""

from __future__ import annotations

import asyncio
import statistics
import time

import aiohttp
import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.helpers.servers import RawServer
from wsproxy.address import Address
from wsproxy.demo import EchoTarget
from wsproxy.proxy import Proxy
from wsproxy.relay.relay import WRITE_HIGH_WATER

READ_CHUNK = 256 * 1024  # uvloop reads up to this much at once


def stream_config(flood: Address, echo: Address) -> str:
    return f"""
[listeners.edge]
address = "127.0.0.1:0"
default_target_group = "flood"
[listeners.canary]
address = "127.0.0.1:0"
websocket = true
default_target_group = "echo"
[target_groups.flood]
targets = [{{ address = "{flood}" }}]
[target_groups.echo]
targets = [{{ address = "{echo}" }}]
"""


async def canary_rtts(proxy: Proxy, seconds: float) -> list[float]:
    address = listener_address(proxy, "canary")
    rtts = []
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(f"ws://{address}/canary") as ws,
    ):
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            started = time.monotonic()
            await ws.send_str("tick")
            assert await ws.receive_str(timeout=5) == "tick"
            rtts.append(time.monotonic() - started)
            await asyncio.sleep(0.01)
    return rtts


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


@pytest.mark.parametrize("slow", ["client", "target"])
async def test_a_peer_that_stops_reading_pauses_the_other_and_bounds_buffers(
    make_proxy: ProxyFactory, echo: EchoTarget, slow: str
) -> None:
    stop = asyncio.Event()
    blob = b"x" * READ_CHUNK

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if slow == "client":  # the target floods; the client never reads
            while not stop.is_set():
                writer.write(blob)
                await writer.drain()
        else:  # the target never reads; the client floods
            await stop.wait()

    server = RawServer(target)
    await server.start()
    proxy = await make_proxy(stream_config(server.address, echo.address))
    address = listener_address(proxy)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    flooding = None
    if slow == "target":

        async def flood() -> None:
            while not stop.is_set():
                writer.write(blob)
                await writer.drain()

        flooding = asyncio.create_task(flood())
    try:
        listener = proxy.listeners["edge"]
        await wait_for(
            lambda: bool(listener.flows) and next(iter(listener.flows)).relay is not None
        )
        (flow,) = listener.flows
        assert flow.target_endpoint is not None
        # The proxy's side toward the slow peer fills up to its high-water mark, then it pauses
        # reading from the fast peer.
        sink, source = (
            (flow.client, flow.target_endpoint)
            if slow == "client"
            else (flow.target_endpoint, flow.client)
        )
        await wait_for(lambda: sink.write_paused, timeout=10)
        rtts = await canary_rtts(proxy, 2.0)
        assert sink.transport is not None and source.transport is not None
        buffered = sink.transport.get_write_buffer_size()
        assert sink.write_paused and not source.transport.is_reading()
        assert buffered <= WRITE_HIGH_WATER + READ_CHUNK, buffered
    finally:
        stop.set()
        if flooding is not None:
            flooding.cancel()
        writer.transport.abort()
        await server.stop()
    print(
        f"\nslow {slow}: proxy buffered {buffered} bytes toward it; canary RTT over "
        f"{len(rtts)} round trips: p50 {1000 * statistics.median(rtts):.2f} ms, "
        f"p99 {1000 * p99(rtts):.2f} ms"
    )
    assert p99(rtts) < 0.1  # far above a healthy loop's ~1 ms; a blocked loop shows seconds
    del reader
