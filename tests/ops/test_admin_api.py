"""The admin API changes targets at run time; bad calls get clear errors and change nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.conftest import ProxyFactory, listener_address, wait_for
from wsproxy.config import parse_config
from wsproxy.demo import EchoTarget
from wsproxy.proxy import Proxy


def config(targets: list[EchoTarget], extra: str = "") -> str:
    listed = ", ".join(f'{{ address = "{t.address}" }}' for t in targets)
    return f"""
{extra}
[listeners.edge]
address = "127.0.0.1:0"
websocket = true
default_target_group = "chat"
[target_groups.chat]
algorithm = "round_robin"
deregistration_delay_seconds = 1.0
targets = [{listed}]
"""


def admin_url(proxy: Proxy) -> str:
    assert proxy.admin is not None and proxy.admin.address is not None
    return f"http://{proxy.admin.address}"


async def test_register_routes_new_connections_and_rejects_bad_calls(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    first, second = echo_targets[0], echo_targets[1]
    proxy = await make_proxy(config([first]))
    api = f"{admin_url(proxy)}/v1/target-groups"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{api}/chat/targets", json={"address": str(second.address)}) as r:
            assert r.status == 201
            assert (await r.json())["state"] == "initial"
        for _ in range(4):
            async with session.ws_connect(f"ws://{listener_address(proxy)}/") as ws:
                await ws.send_str("x")
                await ws.receive_str(timeout=5)
        assert first.sessions == 2 and second.sessions == 2
        bad = [
            ("chat", {"address": str(second.address)}, 409),
            ("nope", {"address": "127.0.0.1:1"}, 404),
            ("chat", {"address": "nowhere"}, 422),
            ("chat", {"address": "127.0.0.1:2", "weight": 0}, 422),
            ("chat", {"address": "127.0.0.1:2", "extra": 1}, 422),
        ]
        for group, body, status in bad:
            async with session.post(f"{api}/{group}/targets", json=body) as r:
                assert r.status == status, (body, await r.text())
                assert "error" in await r.json()
        async with session.post(f"{api}/chat/targets", data=b"{not json") as r:
            assert r.status == 400
    assert len(proxy.target_groups["chat"].targets) == 2  # nothing else changed


async def test_deregistration_drains_sessions_spread_over_the_delay(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    first, second = echo_targets[0], echo_targets[1]
    proxy = await make_proxy(config([first, second]))
    address = listener_address(proxy)
    api = f"{admin_url(proxy)}/v1/target-groups/chat/targets"
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        sockets = [await session.ws_connect(f"ws://{address}/s{i}") for i in range(8)]
        for ws in sockets:
            await ws.send_str("hello")
            await ws.receive_str(timeout=5)
        assert second.active == 4
        started = loop.time()
        async with session.delete(f"{api}/{second.address}") as r:
            assert r.status == 202 and (await r.json())["state"] == "draining"
        async with session.delete(f"{api}/{second.address}") as r:
            assert r.status == 409
        async with session.delete(f"{api}/127.0.0.1:1") as r:
            assert r.status == 404

        async def closed_at(ws: aiohttp.ClientWebSocketResponse) -> float | None:
            message = await ws.receive(timeout=5)
            if message.type is aiohttp.WSMsgType.CLOSE:
                assert ws.close_code == 1001
                return loop.time() - started
            return None

        # Sessions on the drained target close, spread over the 1 s delay; others stay.
        on_second = sockets[1::2]  # round robin: every other session went to the second target
        times = sorted(t for t in await asyncio.gather(*(closed_at(ws) for ws in on_second)) if t)
        assert len(times) == 4
        assert times[-1] - times[0] >= 0.5, times  # not one storm
        for ws in sockets[0::2]:
            await ws.send_str("still here")
            assert await ws.receive_str(timeout=5) == "still here"
        for _ in range(3):
            async with session.ws_connect(f"ws://{address}/new") as ws:
                await ws.send_str("x")
                await ws.receive_str(timeout=5)
        assert second.sessions == 4  # no new session reached it
        await wait_for(lambda: len(proxy.target_groups["chat"].targets) == 1, timeout=5)
        for ws in sockets:
            await ws.close()


async def test_token_and_drain(echo_targets: list[EchoTarget], tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    admin = f'[admin]\naddress = "127.0.0.1:0"\ntoken_file = "{token}"'
    tokened = Proxy(parse_config(config([echo_targets[0]], extra=admin)))
    await tokened.start()
    try:
        base = admin_url(tokened)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/metrics") as r:
                assert r.status == 401
            async with session.get(f"{base}/healthz") as r:
                assert r.status == 200
            async with session.get(f"{base}/v1/listeners") as r:
                assert r.status == 401
            async with session.get(f"{base}/status") as r:  # the page holds no data
                assert r.status == 200 and r.content_type == "text/html"
                assert "connect-src 'self'" in r.headers["Content-Security-Policy"]
                page = await r.text()
            assert "<script>" in page and "src=" not in page  # no external assets
            headers = {"Authorization": "Bearer s3cret"}
            async with session.get(f"{base}/metrics", headers=headers) as r:
                assert r.status == 200
            async with session.get(f"{base}/v1/listeners", headers=headers) as r:
                listeners = (await r.json())["listeners"]
            assert [(entry["name"], entry["mode"]) for entry in listeners] == [
                ("edge", "plain websocket")
            ]
            ws = await session.ws_connect(f"ws://{listener_address(tokened)}/")
            async with session.post(f"{base}/v1/drain", headers=headers) as r:
                assert r.status == 202
            message = await ws.receive(timeout=10)
            assert message.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 1001
            async with session.get(f"{base}/readyz") as r:
                assert r.status == 503
            async with session.get(f"{base}/healthz") as r:
                assert r.status == 200  # drained, still alive
    finally:
        await tokened.shutdown(grace=1)
