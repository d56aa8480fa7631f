"""An API listener end to end: real WebSocket clients, real HTTP integrations, real sockets."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web

from tests.conftest import ProxyFactory
from tests.helpers.api_backend import Backend, api_config, url

ECHO = """
[[apis.chat.routes]]
key = "$default"
target_group = "backend"
path = "/default"
respond = true

[[apis.chat.routes]]
key = "sendmessage"
target_group = "backend"
path = "/messages"
respond = true
"""


async def test_messages_go_to_their_routes_and_answers_come_back(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    proxy = await make_proxy(api_config(backend.address, ECHO))
    async with aiohttp.ClientSession() as session, session.ws_connect(url(proxy)) as ws:
        await ws.send_str('{"action": "sendmessage", "text": "hi"}')
        assert json.loads(await ws.receive_str(timeout=5)) == {
            "action": "sendmessage",
            "text": "hi",
        }
        await ws.send_str("not json")
        assert await ws.receive_str(timeout=5) == "not json"
        await ws.send_bytes(b"\x00\x01")
        assert await ws.receive_bytes(timeout=5) == b"\x00\x01"
    paths = [path for path, _, _ in backend.calls]
    assert paths == ["/messages", "/default", "/default"]
    _, headers, _ = backend.calls[0]
    assert headers["ce-type"] == "wsproxy.message"
    assert headers["ce-routekey"] == "sendmessage"
    assert headers["Content-Type"] == "application/json"
    assert backend.calls[1][1]["Content-Type"] == "text/plain; charset=utf-8"
    assert backend.calls[2][1]["Content-Type"] == "application/octet-stream"


async def test_without_a_default_route_the_client_gets_an_error_and_stays(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    routes = ECHO.split("[[apis.chat.routes]]")[2]
    proxy = await make_proxy(api_config(backend.address, "[[apis.chat.routes]]" + routes))
    async with aiohttp.ClientSession() as session, session.ws_connect(url(proxy)) as ws:
        await ws.send_str("hello")
        error = json.loads(await ws.receive_str(timeout=5))
        assert error["error"] == "no_route"
        assert set(error) == {"message", "error", "connectionId", "requestId"}
        await ws.send_str('{"action": "sendmessage"}')
        assert json.loads(await ws.receive_str(timeout=5)) == {"action": "sendmessage"}


async def test_a_backend_posts_to_a_connection_by_id(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    async def whoami(request: web.Request) -> web.StreamResponse:
        return web.Response(text=request.headers["ce-connectionid"])

    backend.handlers["/messages"] = whoami
    proxy = await make_proxy(api_config(backend.address, ECHO))
    admin = proxy.admin
    assert admin is not None and admin.address is not None
    base = f"http://{admin.address.host}:{admin.address.port}"
    async with aiohttp.ClientSession() as session, session.ws_connect(url(proxy)) as ws:
        await ws.send_str('{"action": "sendmessage"}')
        cid = await ws.receive_str(timeout=5)
        async with session.post(f"{base}/@connections/{cid}", data=b"pushed") as response:
            assert response.status == 200
        assert await ws.receive_bytes(timeout=5) == b"pushed"
        async with session.get(f"{base}/@connections/{cid}") as response:
            info = await response.json()
            assert info["connectionId"] == cid and info["api"] == "chat"
        async with session.delete(f"{base}/@connections/{cid}?code=4000&reason=bye") as response:
            assert response.status == 204
        message = await ws.receive(timeout=5)
        assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 4000
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/@connections/{cid}", data=b"late") as response:
            assert response.status == 410
        async with session.post(f"{base}/@connections/nonsense", data=b"x") as response:
            assert response.status == 410
    await asyncio.sleep(0)
