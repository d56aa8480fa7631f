"""Listener limits: connections beyond max_connections are closed at accept and counted."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.flows.test_tls import client_context, tls_config, wss_echo
from tests.flows.test_websocket import ws_config
from tests.helpers.pki import Pki, make_pki
from tests.helpers.process import parse_metrics, start_proxy
from wsproxy.address import Address
from wsproxy.config import parse_config
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


async def test_max_connections_per_ip_limits_one_address_not_the_others(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    proxy = await make_proxy(
        ws_config(("chat", [echo_targets[0].address]), listener="max_connections_per_ip = 2")
    )
    url = f"ws://{listener_address(proxy)}/"
    stats = proxy.listeners["edge"].stats
    async with (
        aiohttp.ClientSession() as one,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as two,
    ):
        first, second = await one.ws_connect(url), await one.ws_connect(url)
        with pytest.raises(aiohttp.ClientError):
            await one.ws_connect(url)
        await wait_for(lambda: stats.rejected["per_ip_limit"] == 1)
        other = await two.ws_connect(url)  # another client address has its own allowance
        for ws in (first, second, other):
            await ws.send_str("ok")
            assert await ws.receive_str(timeout=5) == "ok"
        await first.close()
        await wait_for(lambda: stats.active == 2)
        again = await one.ws_connect(url)  # the slot came back
        await again.send_str("again")
        assert await again.receive_str(timeout=5) == "again"
        await asyncio.gather(second.close(), other.close(), again.close())
    await wait_for(lambda: proxy.listeners["edge"].context._per_ip == {})


async def silent_clients(
    address: Address, count: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` TCP connections from 127.0.0.2 that never send a ClientHello."""
    return [
        await asyncio.open_connection(address.host, address.port, local_addr=("127.0.0.2", 0))
        for _ in range(count)
    ]


async def test_handshakes_in_flight_are_bounded_and_later_clients_wait_their_turn(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], pki: Pki
) -> None:
    extra = "max_handshakes_in_flight = 2\ntls_handshake_timeout_seconds = 1"
    proxy = await make_proxy(tls_config(pki, echo_targets[0].address, extra=extra))
    listener = proxy.listeners["edge"]
    address = listener_address(proxy)
    # Two clients (at 127.0.0.2) that connect and never say hello take both slots; a third
    # one of theirs waits, and gets a slot at the same time as the canary.
    silent = await silent_clients(address, 3)
    await wait_for(lambda: listener.handshake_slots.in_flight == 2)
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, listener.handshake_slots.in_flight)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    started = asyncio.get_running_loop().time()
    try:
        await wss_echo(address, client_context(pki))  # served once a slot frees up
        waited = asyncio.get_running_loop().time() - started
        await wait_for(lambda: listener.stats.tls_handshakes["tls_handshake_timeout"] == 3)
    finally:
        watcher.cancel()
        for _, writer in silent:
            writer.close()
    assert most == 2
    assert waited >= 0.5, waited  # it waited for the silent ones' 1 s handshake timeout
    assert listener.stats.accept_pauses["handshakes"] >= 2  # the third silent one, the canary


async def test_a_tls_listener_applies_max_connections_per_ip_at_accept(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], pki: Pki
) -> None:
    """Before the handshake: an address at its limit gets no handshake slot or descriptor."""
    extra = "max_connections_per_ip = 2\ntls_handshake_timeout_seconds = 60"
    proxy = await make_proxy(tls_config(pki, echo_targets[0].address, extra=extra))
    listener = proxy.listeners["edge"]
    address = listener_address(proxy)
    silent = await silent_clients(address, 3)
    try:
        await wait_for(lambda: listener.stats.rejected["per_ip_limit"] == 1)
        assert await asyncio.wait_for(silent[2][0].read(), 5) == b""  # closed at accept
        assert listener.handshake_slots.held("127.0.0.2") == 2
        await wss_echo(address, client_context(pki))  # another address has its own allowance
    finally:
        for _, writer in silent:
            writer.close()
    await wait_for(lambda: listener.context._per_ip == {} and listener.context.handshakes == 0)
    assert listener.context._reserved == {}
    assert "per_ip_limit" not in listener.stats.tls_handshakes  # a refusal, not a handshake


async def test_one_address_holding_idle_sockets_does_not_stall_other_handshakes(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], pki: Pki
) -> None:
    """More idle sockets from one address than max_handshakes_in_flight (256): another
    address's handshake still completes, long before any of them times out. (Measured with
    1,000 sockets in ``python -m loadtest handshake-fairness``.)"""
    extra = "tls_handshake_timeout_seconds = 60"
    proxy = await make_proxy(tls_config(pki, echo_targets[0].address, extra=extra))
    listener = proxy.listeners["edge"]
    address = listener_address(proxy)
    silent = await silent_clients(address, 300)
    try:
        await wait_for(lambda: listener.context.handshakes >= 256)  # all slots taken
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(30):  # functional bound: the attacker's would end at 60 s
            await wss_echo(address, client_context(pki))
        waited = asyncio.get_running_loop().time() - started
        assert listener.stats.tls_handshakes["tls_handshake_timeout"] == 0
        assert listener.handshake_slots.held("127.0.0.2") == 32  # its share, the rest wait
        print(f"\ncanary handshake + echo beside 300 idle sockets: {waited * 1000:.0f} ms")
    finally:
        for _, writer in silent:
            writer.close()
    await wait_for(lambda: listener.context.handshakes == 0)


async def test_connections_waiting_for_a_handshake_slot_are_closed_at_shutdown(
    echo_targets: list[EchoTarget], pki: Pki
) -> None:
    config = "[admin]\nenabled = false\n" + tls_config(
        pki,
        echo_targets[0].address,
        extra="max_handshakes_in_flight = 1\ntls_handshake_timeout_seconds = 60",
    )
    proxy = Proxy(parse_config(config, "<test>"))
    await proxy.start()
    listener = proxy.listeners["edge"]
    address = listener_address(proxy)
    silent = [await asyncio.open_connection(address.host, address.port) for _ in range(3)]
    try:
        await wait_for(lambda: listener.context.handshakes == 3)  # one in its slot, two wait
        assert listener.handshake_slots.in_flight == 1
        await proxy.shutdown(grace=0.5)
        for reader, _ in silent:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert listener.context.handshakes == 0 and listener.budget.open == 0
    finally:
        for _, writer in silent:
            writer.close()


async def test_the_descriptor_budget_refuses_connections_and_keeps_the_admin_answering(
    tmp_path: Path, echo: EchoTarget
) -> None:
    # 128 descriptors: 64 reserved, 64 for the data path: 32 sessions of two each.
    config = tmp_path / "fds.toml"
    config.write_text(
        '[admin]\naddress = "127.0.0.1:0"\n'
        + ws_config(("chat", [echo.address]), listener="max_connections = 1000")
    )
    proxy = await start_proxy(config, descriptor_limit=128)
    url = f"ws://127.0.0.1:{proxy.port}/"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
            sessions = []
            refused = 0
            for _ in range(40):
                try:
                    sessions.append(await client.ws_connect(url))
                except aiohttp.ClientError:
                    refused += 1
            assert (len(sessions), refused) == (32, 8)
            async with client.get(f"http://127.0.0.1:{proxy.admin}/metrics") as response:
                assert response.status == 200  # the reserve keeps the admin listener usable
                samples = parse_metrics(await response.text())
            rejected = {
                labels["reason"]: value
                for labels, value in samples["wsproxy_listener_connections_rejected_total"]
            }
            # aiohttp retries a refused handshake once, so each refusal may count twice.
            assert set(rejected) == {"fd_exhausted"} and rejected["fd_exhausted"] >= 8
            for ws in sessions:  # the admitted sessions are untouched
                await ws.send_str("fine")
                assert await ws.receive_str(timeout=5) == "fine"
            for ws in sessions[:5]:
                await ws.close()
            await asyncio.sleep(0.2)
            fresh = await client.ws_connect(url)  # room again
            await fresh.send_str("back")
            assert await fresh.receive_str(timeout=5) == "back"
            for ws in [*sessions[5:], fresh]:
                await ws.close()
    finally:
        await proxy.stop()
