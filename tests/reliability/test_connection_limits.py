"""Listener limits: connections beyond max_connections are closed at accept and counted."""

from __future__ import annotations

import asyncio
import ssl

import aiohttp
import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.flows.test_tls import client_context, tls_config
from tests.flows.test_websocket import ws_config
from tests.helpers.pki import Pki, make_pki
from wsproxy.demo import EchoTarget
from wsproxy.proxy import Proxy


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def check_limit(proxy: Proxy, scheme: str, context: ssl.SSLContext | bool) -> None:
    url = f"{scheme}://{listener_address(proxy)}/"
    stats = proxy.listeners["edge"].stats
    connector = aiohttp.TCPConnector(ssl=context)
    async with aiohttp.ClientSession(connector=connector) as session:
        server_name = "edge.internal" if scheme == "wss" else None
        first = await session.ws_connect(url, server_hostname=server_name)
        second = await session.ws_connect(url, server_hostname=server_name)
        with pytest.raises(aiohttp.ClientError):
            await session.ws_connect(url, server_hostname=server_name)
        await wait_for(lambda: stats.rejected["limit"] >= 1)
        for ws in (first, second):  # the sessions inside the limit are untouched
            await ws.send_str("still here")
            assert await ws.receive_str(timeout=5) == "still here"
        await first.close()
        await wait_for(lambda: stats.active == 1)
        third = await session.ws_connect(url, server_hostname=server_name)
        await third.send_str("room again")
        assert await third.receive_str(timeout=5) == "room again"
        await asyncio.gather(second.close(), third.close())


async def test_plain_listener_closes_connections_over_the_limit(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    proxy = await make_proxy(
        ws_config(("chat", [echo_targets[0].address]), listener="max_connections = 2")
    )
    await check_limit(proxy, "ws", False)


async def test_tls_listener_counts_handshakes_toward_the_limit(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], pki: Pki
) -> None:
    proxy = await make_proxy(tls_config(pki, echo_targets[0].address, extra="max_connections = 2"))
    await check_limit(proxy, "wss", client_context(pki))
    # A refusal at accept is not a failed TLS handshake.
    assert "limit" not in proxy.listeners["edge"].stats.tls_handshakes
