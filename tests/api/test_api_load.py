"""Load on an API listener (issue 14, "Load"), bounded and without timing asserts: 1,000
connections each getting a callback, a group of 1,000 members, and 1,000 messages on one
connection through an integration with random latency, kept in order."""

from __future__ import annotations

import asyncio
import json
import random
import resource
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import ProxyFactory
from tests.helpers.api_backend import Backend, admin_base, api_config, url

N = 1000
BATCH = 100  # connections opened at once

ROUTES = """
[[apis.chat.routes]]
key = "$connect"
target_group = "backend"
path = "/connect"

[[apis.chat.routes]]
key = "$default"
target_group = "backend"
path = "/default"
respond = true
"""


@pytest.fixture(autouse=True)
def enough_descriptors() -> Iterator[None]:
    """Each connection takes two descriptors here (client and proxy side), plus integrations."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * N + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def open_many(
    proxy_url: str, session: aiohttp.ClientSession, backend: Backend
) -> list[tuple[aiohttp.ClientWebSocketResponse, str]]:
    """N connections in the group "room", with their ids (the $connect call of ``?n=i`` names
    the id it was given)."""
    ids: dict[str, str] = {}

    async def connect(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        ids[body["query"]] = body["connectionId"]
        return web.json_response({"groups": ["room"]})

    backend.handlers["/connect"] = connect
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    for start in range(0, N, BATCH):
        sockets += await asyncio.gather(
            *(session.ws_connect(f"{proxy_url}?n={i}") for i in range(start, start + BATCH))
        )
    return [(ws, ids[f"n={i}"]) for i, ws in enumerate(sockets)]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # No pool limit: a WebSocket holds its connection for its life.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        yield client


async def close_all(sockets: list[tuple[aiohttp.ClientWebSocketResponse, str]]) -> None:
    for start in range(0, len(sockets), BATCH):
        await asyncio.gather(*(ws.close() for ws, _ in sockets[start : start + BATCH]))


async def test_a_thousand_connections_each_get_their_callback(
    make_proxy: ProxyFactory, backend: Backend, session: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(api_config(backend.address, ROUTES))
    sockets = await open_many(url(proxy), session, backend)
    assert len(set(cid for _, cid in sockets)) == N
    base = admin_base(proxy)
    semaphore = asyncio.Semaphore(BATCH)

    async def post(i: int, cid: str) -> int:
        async with (
            semaphore,
            session.post(f"{base}/@connections/{cid}", data=f"callback {i}".encode()) as response,
        ):
            return response.status

    statuses = await asyncio.gather(*(post(i, cid) for i, (_, cid) in enumerate(sockets)))
    assert Counter(statuses) == {200: N}
    answers = await asyncio.gather(*(ws.receive_bytes(timeout=30) for ws, _ in sockets))
    assert answers == [f"callback {i}".encode() for i in range(N)]  # each its own
    assert proxy.apis["chat"].stats.messages[("@connections", "out")] == N
    await close_all(sockets)


async def test_a_group_of_a_thousand_gets_one_post(
    make_proxy: ProxyFactory, backend: Backend, session: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(api_config(backend.address, ROUTES))
    sockets = await open_many(url(proxy), session, backend)
    base = admin_base(proxy)
    async with session.post(f"{base}/@groups/room", data=b"to everyone") as response:
        assert response.status == 200
        assert await response.json() == {"delivered": N, "dropped_slow": 0}
    answers = await asyncio.gather(*(ws.receive_bytes(timeout=30) for ws, _ in sockets))
    assert answers == [b"to everyone"] * N
    assert proxy.apis["chat"].registry.group_size("room") == N
    await close_all(sockets)


@pytest.mark.parametrize("in_flight", [1, 4])
async def test_a_thousand_messages_through_an_integration_with_random_latency(
    in_flight: int, make_proxy: ProxyFactory, backend: Backend, session: aiohttp.ClientSession
) -> None:
    """With max_in_flight_per_connection = 1 the integration sees the messages in order and
    the client gets the answers in order; with 4 it never sees more than 4 calls of the
    connection at once (and the answers are all there, in any order)."""
    rng = random.Random(14)
    seen: list[int] = []
    running = 0
    most = 0

    async def slow_echo(request: web.Request) -> web.StreamResponse:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            body = await request.read()
            seen.append(int(body))
            await asyncio.sleep(rng.uniform(0, 0.005))
            return web.Response(body=body, content_type="text/plain")
        finally:
            running -= 1

    backend.handlers["/default"] = slow_echo
    routes = ROUTES.split("[[apis.chat.routes]]")[2]
    proxy = await make_proxy(
        api_config(
            backend.address,
            "[[apis.chat.routes]]" + routes,
            f"max_in_flight_per_connection = {in_flight}",
        )
    )
    async with session.ws_connect(url(proxy)) as ws:
        for i in range(N):  # all at once: the proxy holds back what is over its limit
            await ws.send_str(str(i))
        answers = [int(await ws.receive_str(timeout=30)) for _ in range(N)]
    if in_flight == 1:
        assert seen == list(range(N))
        assert answers == list(range(N))
        assert most == 1
    else:
        assert sorted(seen) == list(range(N))
        assert sorted(answers) == list(range(N))
        assert 1 < most <= in_flight  # calls did overlap, and never beyond the limit
