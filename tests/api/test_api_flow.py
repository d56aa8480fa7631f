"""An API listener end to end: real WebSocket clients, real HTTP integrations, real sockets."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
import websockets.asyncio.client
from aiohttp import web
from websockets.frames import Frame, Opcode

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.helpers.api_backend import Backend, admin_base, api_config, url
from tests.helpers.process import parse_metrics
from wsproxy.api.registry import Prepared
from wsproxy.config import load_config
from wsproxy.proxy import Proxy

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


async def test_metrics_count_connections_messages_calls_and_management(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    async def fail(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500)

    backend.handlers["/default"] = fail
    proxy = await make_proxy(api_config(backend.address, ECHO))
    admin = proxy.admin
    assert admin is not None and admin.address is not None
    base = f"http://{admin.address.host}:{admin.address.port}"
    async with aiohttp.ClientSession() as session, session.ws_connect(url(proxy)) as ws:
        await ws.send_str('{"action": "sendmessage"}')
        await ws.receive_str(timeout=5)
        await ws.send_str("to the default route, which fails")
        assert json.loads(await ws.receive_str(timeout=5))["error"] == "integration_error"
        async with session.post(f"{base}/@connections/AAAAAAAAAAAAAAAAAAAAAAAA") as response:
            assert response.status == 410
        async with session.get(f"{base}/metrics") as response:
            text = await response.text()
    samples = parse_metrics(text)
    assert samples["wsproxy_api_connections"] == [({"api": "chat"}, 1.0)]
    messages = {(s["route"], s["direction"]): v for s, v in samples["wsproxy_api_messages_total"]}
    assert messages == {("sendmessage", "in"): 1, ("sendmessage", "out"): 1, ("$default", "in"): 1}
    errors = samples["wsproxy_api_integration_errors_total"]
    assert errors == [({"api": "chat", "route": "$default", "reason": "integration_error"}, 1.0)]
    counts = {s["route"]: v for s, v in samples["wsproxy_api_integration_duration_seconds_count"]}
    assert counts == {"sendmessage": 1, "$default": 1}
    management = samples["wsproxy_api_management_requests_total"]
    assert management == [({"operation": "post_connection", "code": "410"}, 1.0)]


async def test_the_status_page_and_v1_apis_show_the_api(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    proxy = await make_proxy(api_config(backend.address, ECHO))
    admin = proxy.admin
    assert admin is not None and admin.address is not None
    base = f"http://{admin.address.host}:{admin.address.port}"
    async with aiohttp.ClientSession() as session, session.ws_connect(url(proxy)) as ws:
        await ws.send_str('{"action": "sendmessage"}')
        await ws.receive_str(timeout=5)
        async with session.get(f"{base}/v1/apis") as response:
            (api,) = (await response.json())["apis"]
        async with session.get(f"{base}/status") as response:
            page = await response.text()
    assert api["name"] == "chat" and api["listeners"] == ["edge"]
    assert api["connections"] == 1
    routes = {route["key"]: route for route in api["routes"]}
    assert routes["sendmessage"]["messages_in"] == 1
    assert routes["sendmessage"]["messages_out"] == 1
    assert '<table data-api="chat">' in page and '<tr data-route="sendmessage">' in page


async def test_a_reload_changes_routes_and_keeps_connections(
    make_proxy: ProxyFactory, backend: Backend, tmp_path: Path
) -> None:
    """New routes apply to the next message; the open connection and its id stay."""
    text = api_config(backend.address, ECHO)
    config = tmp_path / "api.toml"
    config.write_text('[admin]\naddress = "127.0.0.1:0"\n' + text)
    proxy = Proxy(load_config(config), path=str(config))
    await proxy.start()
    try:
        async with aiohttp.ClientSession() as session, session.ws_connect(url(proxy)) as ws:
            await ws.send_str("before")
            assert await ws.receive_str(timeout=5) == "before"
            config.write_text(
                '[admin]\naddress = "127.0.0.1:0"\n'
                + text.replace('path = "/default"', 'path = "/default-v2"')
            )
            assert await proxy.reload() == []
            await ws.send_str("after")
            assert await ws.receive_str(timeout=5) == "after"
        assert [path for path, _, _ in backend.calls] == ["/default", "/default-v2"]
    finally:
        await proxy.shutdown(grace=1.0)


DISCONNECT = """
[[apis.chat.routes]]
key = "$disconnect"
target_group = "backend"
path = "/disconnect"
"""


async def test_a_drain_closes_with_1001_and_calls_disconnect_for_each(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    proxy = await make_proxy(api_config(backend.address, ECHO + DISCONNECT))
    async with aiohttp.ClientSession() as session:
        sockets = [await session.ws_connect(url(proxy)) for _ in range(3)]
        for ws in sockets:  # every connection is open (its message answered)
            await ws.send_str("hi")
            assert await ws.receive_str(timeout=5) == "hi"
        await proxy.drain(grace=2.0)
        for ws in sockets:
            message = await ws.receive(timeout=5)
            assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1001
            await ws.close()
    await proxy.apis["chat"].close(grace=5.0)
    bodies = [json.loads(body) for path, _, body in backend.calls if path == "/disconnect"]
    assert len(bodies) == 3
    assert {body["closeCode"] for body in bodies} == {1001}
    assert {body["closedBy"] for body in bodies} == {"proxy"}
    assert {body["cause"] for body in bodies} == {"draining"}
    types = {h["ce-type"] for path, h, _ in backend.calls if path == "/disconnect"}
    assert types == {"wsproxy.disconnect"}


async def test_a_client_close_calls_disconnect_with_its_code(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    proxy = await make_proxy(api_config(backend.address, ECHO + DISCONNECT))
    async with aiohttp.ClientSession() as session, session.ws_connect(url(proxy)) as ws:
        await ws.send_str("hi")
        await ws.receive_str(timeout=5)
        await ws.close(code=4321, message=b"bye")
    # The proxy ends the connection when its socket closes, after the client's close returned.
    await wait_for(lambda: proxy.apis["chat"].stats.connections == 0)
    await proxy.apis["chat"].close(grace=5.0)
    (body,) = [json.loads(body) for path, _, body in backend.calls if path == "/disconnect"]
    assert (body["closeCode"], body["reason"], body["closedBy"]) == (4321, "bye", "client")
    assert body["cause"] == "closed"


async def test_with_two_apis_an_id_needs_no_api_name_and_a_group_does(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    text = (
        api_config(backend.address, ECHO)
        + """
[listeners.other]
address = "127.0.0.1:0"
api = "other"

[apis.other]
"""
    )
    proxy = await make_proxy(text)
    admin = proxy.admin
    assert admin is not None and admin.address is not None
    base = f"http://{admin.address.host}:{admin.address.port}"
    other = listener_address(proxy, "other")
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://{other.host}:{other.port}/") as ws,
    ):
        await wait_for(lambda: len(proxy.apis["other"].registry) == 1)
        (cid,) = proxy.apis["other"].registry.ids()
        headers = {"Content-Type": "application/ld+json"}
        async with session.post(f"{base}/@connections/{cid}", data="{}", headers=headers) as r:
            assert r.status == 200
        assert await ws.receive_str(timeout=5) == "{}"  # +json is text
        async with session.post(f"{base}/@groups/room", data="x") as response:
            assert response.status == 400
            assert "?api=NAME" in (await response.json())["error"]
        async with session.post(f"{base}/@groups/room?api=other", data="x") as response:
            assert await response.json() == {"delivered": 0, "dropped_slow": 0}


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_a_prepared_frame_is_what_websockets_writes(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    for text, opcode in ((True, Opcode.TEXT), (False, Opcode.BINARY)):
        expected = Frame(opcode, data).serialize(mask=False, extensions=[])
        assert Prepared(data, text).frame == expected


async def test_a_group_send_reaches_members_with_and_without_compression(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    proxy = await make_proxy(api_config(backend.address, ECHO))
    admin = proxy.admin
    assert admin is not None and admin.address is not None
    base = f"http://{admin.address.host}:{admin.address.port}"
    registry = proxy.apis["chat"].registry
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url(proxy)) as plain,
        websockets.asyncio.client.connect(url(proxy), compression="deflate") as deflated,
    ):
        await wait_for(lambda: len(registry) == 2)
        for cid in registry.ids():
            async with session.put(f"{base}/@groups/room/connections/{cid}") as response:
                assert response.status == 204
        text = "x" * 70_000  # a 64-bit length, compressed for one member
        async with session.post(
            f"{base}/@groups/room", data=text, headers={"Content-Type": "text/plain"}
        ) as response:
            assert await response.json() == {"delivered": 2, "dropped_slow": 0}
        assert await plain.receive_str(timeout=5) == text
        assert await asyncio.wait_for(deflated.recv(), 5) == text


async def test_messages_over_the_rate_are_throttled_and_the_connection_stays(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    text = api_config(backend.address, ECHO).replace(
        'api = "chat"', 'api = "chat"\nmax_messages_per_second = 1\nmessages_burst = 2'
    )
    proxy = await make_proxy(text)
    async with aiohttp.ClientSession() as session, session.ws_connect(url(proxy)) as ws:
        for index in range(3):  # at once: two fit the burst, the third is over
            await ws.send_str(f"m{index}")
        answers = [await ws.receive_str(timeout=5) for _ in range(3)]
        errors = [json.loads(a) for a in answers if a.startswith("{")]
        assert sorted(a for a in answers if not a.startswith("{")) == ["m0", "m1"]
        assert [e["error"] for e in errors] == ["throttled"]
    assert proxy.apis["chat"].stats.errors[("$default", "throttled")] == 1


async def test_a_frame_flood_ends_the_connection_with_1008(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    text = api_config(backend.address, ECHO).replace(
        'api = "chat"', 'api = "chat"\nmax_frames_per_second = 10\nframes_burst = 10'
    )
    proxy = await make_proxy(text)
    async with aiohttp.ClientSession() as session, session.ws_connect(url(proxy)) as ws:
        for _ in range(50):
            await ws.ping()
        message = await ws.receive(timeout=5)
        while message.type is aiohttp.WSMsgType.PONG:
            message = await ws.receive(timeout=5)
        assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1008
    await wait_for(lambda: not proxy.listeners["edge"].flows)


async def test_text_that_is_not_utf8_never_goes_out_as_text(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    """A client fails the connection on such a text frame (1007), and one group POST would do
    that to every member: management calls get 422, route responses an integration_error."""

    async def latin1(request: web.Request) -> web.StreamResponse:
        return web.Response(body="café".encode("latin-1"), content_type="text/plain")

    backend.handlers["/messages"] = latin1
    proxy = await make_proxy(api_config(backend.address, ECHO))
    base = admin_base(proxy)
    async with aiohttp.ClientSession() as session, session.ws_connect(url(proxy)) as ws:
        await ws.send_str('{"action": "sendmessage"}')
        assert json.loads(await ws.receive_str(timeout=5))["error"] == "integration_error"
        (cid,) = proxy.apis["chat"].registry.ids()
        headers = {"Content-Type": "text/plain"}
        for path in (f"/@connections/{cid}", "/@groups/room?api=chat"):
            async with session.post(base + path, data=b"\xff\xfe", headers=headers) as response:
                assert response.status == 422, path
        binary = {"Content-Type": "application/octet-stream"}
        async with session.post(f"{base}/@connections/{cid}", data=b"\xff", headers=binary) as r:
            assert r.status == 200
        assert await ws.receive_bytes(timeout=5) == b"\xff"  # the connection is fine
