"""Shared fixtures: uvloop, echo targets, and a proxy built from a TOML snippet."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import uvloop
from hypothesis import HealthCheck, settings

from tests.helpers.canary import Canary
from tests.helpers.process import RunningProxy
from tests.helpers.servers import RawServer
from wsproxy.address import Address
from wsproxy.config import parse_config
from wsproxy.demo import EchoTarget
from wsproxy.proxy import Proxy

# Hypothesis's own timing checks (a 200 ms deadline per example, the too_slow health check)
# measure the machine, not the code: on a loaded CI runner they fail at random. Tests never
# assert timings, so neither does Hypothesis here.
settings.register_profile("wsproxy", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("wsproxy")


def pytest_asyncio_loop_factories() -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    # The proxy runs under uvloop in production; the tests run it there too.
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def echo_targets() -> AsyncIterator[list[EchoTarget]]:
    targets = [EchoTarget(f"echo-{i}", greeting=False) for i in range(3)]
    for target in targets:
        await target.start()
    yield targets
    for target in targets:
        await target.stop()


@pytest.fixture
async def echo() -> AsyncIterator[EchoTarget]:
    """One WebSocket echo target (aiohttp), for tests that need a single target."""
    target = EchoTarget("echo", greeting=False)
    await target.start()
    yield target
    await target.stop()


@pytest.fixture
async def raw_servers() -> AsyncIterator[Callable[..., Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def make(handler: object) -> RawServer:
        server = RawServer(handler)  # type: ignore[arg-type]
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


ProxyFactory = Callable[[str], Awaitable[Proxy]]


@pytest.fixture
async def make_proxy() -> AsyncIterator[ProxyFactory]:
    """Start a proxy from TOML text; every listener and the admin bind port 0."""
    proxies: list[Proxy] = []

    async def make(toml: str) -> Proxy:
        text = '[admin]\naddress = "127.0.0.1:0"\n' + toml
        proxy = Proxy(parse_config(text, "<test>"), rng=random.Random(7))
        await proxy.start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        with contextlib.suppress(Exception):
            await proxy.shutdown(grace=1.0)


def listener_address(proxy: Proxy, name: str = "edge") -> Address:
    address = proxy.listeners[name].address
    assert address is not None
    return address


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition the test cannot await directly (e.g. a server-side counter)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.fixture
async def canary_factory() -> AsyncIterator[object]:
    """Open canary sessions (``await make(address)``); closed after the test."""
    opened: list[Canary] = []

    async def make(address: Address, path: str = "/canary") -> Canary:
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(f"ws://{address}{path}")
        canary = Canary(session, ws)
        opened.append(canary)
        await canary.check()
        return canary

    yield make
    for canary in opened:
        await canary.ws.close()
        await canary.session.close()


@pytest.fixture
async def proxies() -> AsyncIterator[list[RunningProxy]]:
    """wsproxy processes a test started (append them); stopped after it: SIGTERM (a supervisor
    then stops its workers), SIGKILL after 15 s."""
    started: list[RunningProxy] = []
    yield started
    for proxy in started:
        if proxy.process.returncode is not None:
            continue
        proxy.process.terminate()
        try:
            async with asyncio.timeout(15):
                await proxy.process.wait()
        except TimeoutError:
            proxy.process.kill()
            await proxy.process.wait()
