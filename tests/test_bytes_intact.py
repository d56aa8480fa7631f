"""100 concurrent WebSocket sessions through the proxy, every byte checked both ways.

Each session sends 1,000 messages of random size (0 B to 256 KiB, log-uniform so small and large
both occur often), text and binary, some fragmented; the targets echo them. SHA-256 digests of
each direction, taken at both ends, must match, and the balancer must have spread the sessions
exactly as smooth weighted round robin says. WSPROXY_INTACT_SESSIONS / _MESSAGES scale it.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import random
from collections import Counter

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from tests.conftest import ProxyFactory, listener_address, wait_for

SESSIONS = int(os.environ.get("WSPROXY_INTACT_SESSIONS", "100"))
MESSAGES = int(os.environ.get("WSPROXY_INTACT_MESSAGES", "1000"))
MAX_SIZE = 256 * 1024


def digest_update(digest: hashlib._Hash, message: str | bytes) -> None:
    data = message.encode() if isinstance(message, str) else message
    # Type and length go into the digest too, so merged or split messages would be caught.
    digest.update(b"T" if isinstance(message, str) else b"B")
    digest.update(len(data).to_bytes(4, "big"))
    digest.update(data)


class HashingEcho:
    def __init__(self, name: str) -> None:
        self.name = name
        self.received: dict[str, str] = {}
        self.sent: dict[str, str] = {}
        self.sessions = 0

    async def handler(self, ws: ServerConnection) -> None:
        self.sessions += 1
        path = ws.request.path if ws.request else "?"
        got, sent = hashlib.sha256(), hashlib.sha256()
        async for message in ws:
            digest_update(got, message)
            digest_update(sent, message)
            await ws.send(message)
        self.received[path] = got.hexdigest()
        self.sent[path] = sent.hexdigest()


def make_message(rng: random.Random) -> str | bytes:
    size = int(2 ** rng.uniform(0, 18)) - 1
    if rng.random() < 0.3:
        return os.urandom((size + 1) // 2).hex()[:size]
    return os.urandom(size)


def fragments(message: str | bytes, rng: random.Random) -> list[str] | list[bytes]:
    cuts = sorted(rng.sample(range(1, len(message)), min(3, len(message) - 1)))
    bounds = [0, *cuts, len(message)]
    return [message[a:b] for a, b in itertools.pairwise(bounds)]  # type: ignore[return-value]


async def run_session(url: str, seed: int) -> tuple[str, str]:
    rng = random.Random(seed)
    sent, got = hashlib.sha256(), hashlib.sha256()
    async with connect(
        url, max_size=None, compression=None, ping_interval=None, open_timeout=120
    ) as ws:

        async def sender() -> None:
            for _ in range(MESSAGES):
                message = make_message(rng)
                digest_update(sent, message)
                if len(message) > 4 and rng.random() < 0.1:
                    await ws.send(fragments(message, rng))
                else:
                    await ws.send(message)

        task = asyncio.create_task(sender())
        for _ in range(MESSAGES):
            digest_update(got, await ws.recv())
        await task
    return sent.hexdigest(), got.hexdigest()


async def test_every_byte_arrives_intact_and_in_order(make_proxy: ProxyFactory) -> None:
    echoes = [HashingEcho(f"echo-{i}") for i in range(3)]
    servers = [
        # No keepalive of the library's own (as on the clients): one loop runs clients, proxy
        # and targets, and on a loaded machine a 20 s ping deadline cut sessions mid-transfer.
        await serve(
            echo.handler, "127.0.0.1", 0, max_size=None, compression=None, ping_interval=None
        )
        for echo in echoes
    ]
    try:
        addresses = [f"127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers]
        weights = [1, 2, 2]
        targets = ", ".join(
            f'{{ address = "{a}", weight = {w} }}' for a, w in zip(addresses, weights, strict=True)
        )
        proxy = await make_proxy(
            f"""
[listeners.edge]
address = "127.0.0.1:0"
websocket = true
default_target_group = "echo"
[target_groups.echo]
algorithm = "round_robin"
targets = [{targets}]
"""
        )
        base = f"ws://{listener_address(proxy)}"
        results = await asyncio.wait_for(
            asyncio.gather(*(run_session(f"{base}/s{i}", i) for i in range(SESSIONS))), 600
        )
        await wait_for(lambda: sum(len(e.sent) for e in echoes) == SESSIONS, timeout=30)
        for index, (client_sent, client_got) in enumerate(results):
            path = f"/s{index}"
            (echo,) = [e for e in echoes if path in e.received]
            assert echo.received[path] == client_sent, f"client→target bytes differ in {path}"
            assert echo.sent[path] == client_got, f"target→client bytes differ in {path}"
        spread = Counter({e.name: e.sessions for e in echoes})
        cycles, extra = divmod(SESSIONS, sum(weights))
        if extra == 0:
            assert spread == Counter({"echo-0": cycles, "echo-1": 2 * cycles, "echo-2": 2 * cycles})
        stats = proxy.listeners["edge"].stats
        await wait_for(lambda: stats.active == 0)
        assert stats.upgrades[("echo", "ok")] == SESSIONS
        assert stats.messages_in == stats.messages_out == SESSIONS * MESSAGES
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
