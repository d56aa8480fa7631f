"""What an API connection holds and how it keeps time while its messages wait for an
integration: found by review, each row reproduced first against the code before its fix."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import zlib

import aiohttp
import websockets.asyncio.client
from aiohttp import web

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.helpers.api_backend import Backend, admin_base, api_config, url
from wsproxy.flows.api import ApiFlow

SLOW = """
[[apis.chat.routes]]
key = "$default"
target_group = "backend"
path = "/slow"
respond = true

[[apis.chat.routes]]
key = "$disconnect"
target_group = "backend"
path = "/disconnect"
"""


def masked_frame(payload: bytes, *, rsv1: bool) -> bytes:
    mask = os.urandom(4)
    first = 0x81 | (0x40 if rsv1 else 0)
    size = len(payload)
    if size < 126:
        head = bytes((first, 0x80 | size))
    elif size < 1 << 16:
        head = bytes((first, 0x80 | 126)) + struct.pack("!H", size)
    else:
        head = bytes((first, 0x80 | 127)) + struct.pack("!Q", size)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def the_flow(proxy: object) -> ApiFlow:
    (flow,) = proxy.listeners["edge"].flows  # type: ignore[attr-defined]
    assert isinstance(flow, ApiFlow)
    return flow


async def test_a_compressed_burst_is_not_inflated_while_messages_wait(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    """3,000 messages of 32,000 spaces cost ~160 KB compressed; while the first waits for its
    integration, the rest stay unparsed instead of ~100 MB inflated in the queue."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=204)

    backend.handlers["/slow"] = slow
    proxy = await make_proxy(api_config(backend.address, SLOW))
    address = listener_address(proxy)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert b" 101 " in head and b"permessage-deflate" in head
    compressor = zlib.compressobj(wbits=-15)  # the client keeps its context: each is tiny
    burst = bytearray()
    for _ in range(3000):
        data = compressor.compress(b" " * 32000) + compressor.flush(zlib.Z_SYNC_FLUSH)
        burst += masked_frame(data[:-4], rsv1=True)
    writer.write(bytes(burst))
    await writer.drain()
    await wait_for(lambda: bool(backend.calls))
    flow = the_flow(proxy)
    await wait_for(lambda: bool(flow._held))  # the rest waits as bytes
    queued = sum(len(payload) for _, payload, _ in flow._pending)
    assert queued <= 2 * 1024 * 1024, queued  # one wire slice's worth, not the burst's
    release.set()
    writer.close()


async def test_a_long_call_does_not_cut_a_live_client_for_its_pong(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    """Reading pauses while the call runs, so the client's Pong cannot be read: no ping
    deadline runs then."""

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(2)
        return web.Response(text="result")

    backend.handlers["/slow"] = slow
    text = api_config(backend.address, SLOW, api_extra="integration_timeout_seconds = 10")
    text = text.replace(
        'api = "chat"', 'api = "chat"\nping_interval_seconds = 0.2\nping_timeout_seconds = 0.4'
    )
    proxy = await make_proxy(text)
    async with websockets.asyncio.client.connect(url(proxy), ping_interval=None) as ws:
        await ws.send("a long job")
        assert await asyncio.wait_for(ws.recv(), 10) == "result"


async def test_a_client_that_only_answers_pings_is_idle(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    text = api_config(backend.address, SLOW, api_extra="idle_timeout_seconds = 1")
    text = text.replace(
        'api = "chat"', 'api = "chat"\nping_interval_seconds = 0.2\nping_timeout_seconds = 5'
    )
    proxy = await make_proxy(text)
    async with aiohttp.ClientSession() as session, session.ws_connect(url(proxy)) as ws:
        message = await ws.receive(timeout=10)  # aiohttp answers the pings by itself
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert (message.data, message.extra) == (1001, "idle timeout")


async def test_a_close_by_the_api_is_answered_while_a_call_runs(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    """The proxy reads the client's Close answer although the connection is at its in-flight
    limit, so the connection ends at once, not when the close timer cuts it."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="late")

    backend.handlers["/slow"] = slow
    proxy = await make_proxy(api_config(backend.address, SLOW))
    async with (
        aiohttp.ClientSession() as session,
        websockets.asyncio.client.connect(url(proxy), compression=None) as ws,
    ):
        await ws.send("work")
        await wait_for(lambda: bool(backend.calls))
        flow = the_flow(proxy)
        async with session.delete(f"{admin_base(proxy)}/@connections/{flow.connection_id}") as r:
            assert r.status == 204
        await ws.wait_closed()
        assert ws.close_code == 1000
        await wait_for(lambda: flow.finished)
        # The client's Close was read (not cut by the close timer), while the call still ran.
        assert flow.protocol is not None and flow.protocol.close_rcvd is not None
        assert not release.is_set()
        release.set()
    await wait_for(lambda: len([c for c in backend.calls if c[0] == "/disconnect"]) == 1)
    (call,) = [c for c in backend.calls if c[0] == "/disconnect"]
    assert json.loads(call[2])["cause"] == "closed_by_api"
