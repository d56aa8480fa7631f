"""An API listener with ``[proxy] workers = 2``: management calls that arrive at the supervisor
reach the worker holding the connection, and group sends reach every worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.helpers.api_backend import Backend
from tests.helpers.process import RunningProxy, start_proxy
from wsproxy.api.connection_id import owner_of

CLIENTS = 12


async def test_management_calls_reach_the_worker_that_holds_the_connection(
    tmp_path: Path, proxies: list[RunningProxy], backend: Backend
) -> None:
    config = tmp_path / "api.toml"
    config.write_text(f"""
[proxy]
workers = 2
shutdown_grace_seconds = 2
[admin]
address = "127.0.0.1:0"
[listeners.edge]
address = "127.0.0.1:0"
api = "chat"
[apis.chat]
[[apis.chat.routes]]
key = "whoami"
target_group = "backend"
path = "/whoami"
respond = true
[target_groups.backend]
protocol = "http"
targets = [{{ address = "{backend.address}" }}]
""")

    async def whoami(request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        return aiohttp.web.Response(text=request.headers["ce-connectionid"])

    backend.handlers["/whoami"] = whoami
    proxy = await start_proxy(config)
    proxies.append(proxy)
    admin = f"http://127.0.0.1:{proxy.admin}"
    async with aiohttp.ClientSession() as session:
        sockets = []
        ids = []
        # New connections are spread by the kernel (SO_REUSEPORT): open until both workers
        # hold some, within a bound.
        for _ in range(200):
            ws = await session.ws_connect(f"ws://127.0.0.1:{proxy.port}/")
            await ws.send_str('{"action": "whoami"}')
            cid = await ws.receive_str(timeout=5)
            sockets.append(ws)
            ids.append(cid)
            if len(ids) >= CLIENTS and len({owner_of(i).worker for i in ids}) == 2:
                break
        assert {owner_of(i).worker for i in ids} == {0, 1}
        for ws, cid in zip(sockets, ids, strict=True):
            async with session.post(f"{admin}/@connections/{cid}", data=cid.encode()) as answer:
                assert answer.status == 200, await answer.text()
            assert await ws.receive_bytes(timeout=5) == cid.encode()
            async with session.get(f"{admin}/@connections/{cid}") as answer:
                assert (await answer.json())["connectionId"] == cid
            async with session.put(f"{admin}/@groups/room/connections/{cid}") as answer:
                assert answer.status == 204
        async with session.post(
            f"{admin}/@groups/room", data="hello", headers={"Content-Type": "text/plain"}
        ) as answer:
            assert await answer.json() == {"delivered": len(ids), "dropped_slow": 0}
        for ws in sockets:
            assert await ws.receive_str(timeout=5) == "hello"
        members: list[str] = []
        cursor = None
        for _ in range(len(ids)):
            query = {"limit": "5"} | ({"after": cursor} if cursor else {})
            async with session.get(f"{admin}/@groups/room", params=query) as answer:
                page = await answer.json()
            assert page["size"] == len(ids)
            members += page["connections"]
            cursor = page["next"]
            if cursor is None:
                break
        assert sorted(members) == sorted(ids)
        async with session.get(f"{admin}/v1/apis") as answer:
            (api,) = (await answer.json())["apis"]
        assert api["connections"] == len(ids) and api["group_members"] == len(ids)
        (route,) = api["routes"]
        assert route["messages_in"] == route["messages_out"] == len(ids)
        async with session.delete(f"{admin}/@connections/{ids[0]}?code=4001") as answer:
            assert answer.status == 204
        closed = await sockets[0].receive(timeout=5)
        assert closed.type is aiohttp.WSMsgType.CLOSE and closed.data == 4001
        await asyncio.gather(*(ws.close() for ws in sockets))
