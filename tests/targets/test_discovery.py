"""Targets discovered by DNS (``discovery = { dns = ... }``), against a DNS server of the test's
own on loopback (tests/helpers/dns_server.py) and real WebSocket targets."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.helpers.dns_server import DnsServer, dns_server
from tests.helpers.process import RunningProxy, parse_metrics, start_proxy
from wsproxy.address import Address
from wsproxy.config import parse_config
from wsproxy.errors import ConfigError
from wsproxy.proxy import Proxy
from wsproxy.targets.target import TargetState


@asynccontextmanager
async def echo_server(host: str, port: int = 0) -> AsyncIterator[Address]:
    """A WebSocket echo server on ``host`` (EchoTarget binds 127.0.0.1 only); it answers "who"
    with its host, so a test knows which target carries a session."""

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(host if message.data == "who" else message.data)
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    try:
        yield Address(host, int(bound[1]))
    finally:
        await runner.cleanup()


def config(server: DnsServer, discovery: str, extra: str = "") -> str:
    return f"""
[listeners.edge]
address = "127.0.0.1:0"
websocket = true
default_target_group = "chat"
[target_groups.chat]
algorithm = "round_robin"
deregistration_delay_seconds = 1.0
discovery = {{ {discovery}, refresh_seconds = 0.5, nameservers = ["{server.nameserver}"] }}
{extra}"""


async def who(ws: aiohttp.ClientWebSocketResponse) -> str:
    await ws.send_str("who")
    return await ws.receive_str(timeout=5)


def addresses(proxy: Proxy) -> dict[str, TargetState]:
    return {str(t.address): t.state for t in proxy.target_groups["chat"].targets}


async def next_lookups(proxy: Proxy, count: int = 2) -> None:
    """Wait until ``count`` more lookups have finished (bounded by wait_for's deadline)."""
    discovery = proxy.discoveries["chat"]
    target = discovery.lookups + count
    await wait_for(lambda: discovery.lookups >= target)


async def test_a_new_address_starts_initial_then_is_probed(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy.targets.target_group")
    async with (
        dns_server() as dns,
        echo_server("127.0.0.1") as first,
        echo_server("127.0.0.2", first.port) as second,
    ):
        dns.set_a("chat.test", "127.0.0.1")
        proxy = await make_proxy(
            config(dns, f'dns = "chat.test", port = {first.port}')
            + "[target_groups.chat.health_check]\ninterval_seconds = 0.5\n"
            "timeout_seconds = 0.4\nhealthy_threshold = 2\n"
        )
        group = proxy.target_groups["chat"]
        await wait_for(lambda: str(first) in addresses(proxy))
        await wait_for(lambda: addresses(proxy)[str(first)] is TargetState.HEALTHY)
        dns.set_a("chat.test", "127.0.0.1", "127.0.0.2")
        await wait_for(lambda: str(second) in addresses(proxy))
        # Registered like one the admin API adds: initial, then its first probe decides.
        await wait_for(lambda: addresses(proxy)[str(second)] is TargetState.HEALTHY)
        assert group.find(second) in proxy.health_checkers["chat"].watched
        logged = [r.getMessage() for r in caplog.records]
        assert f"target group 'chat': registered {second} (weight 1)" in logged
        assert any(f"target {second} initial -> healthy" in line for line in logged), logged
        assert group.stats.health_checks[(str(second), "ok")] >= 1
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                async with session.ws_connect(f"ws://{listener_address(proxy)}/") as ws:
                    await ws.send_str("x")
                    assert await ws.receive_str(timeout=5) == "x"
        assert group.stats.discovery_lookups["ok"] >= 2


async def test_a_vanished_address_drains_with_1001_spread(make_proxy: ProxyFactory) -> None:
    async with (
        dns_server() as dns,
        echo_server("127.0.0.1") as first,
        echo_server("127.0.0.2", first.port) as second,
    ):
        dns.set_a("chat.test", "127.0.0.1", "127.0.0.2")
        proxy = await make_proxy(config(dns, f'dns = "chat.test", port = {first.port}'))
        await wait_for(lambda: len(addresses(proxy)) == 2)
        address = listener_address(proxy)
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session:
            sockets = [await session.ws_connect(f"ws://{address}/s{i}") for i in range(8)]
            on_second = [ws for ws in sockets if await who(ws) == second.host]
            assert len(on_second) == 4  # round robin
            started = loop.time()
            dns.set_a("chat.test", "127.0.0.1")

            async def closed_at(ws: aiohttp.ClientWebSocketResponse) -> float:
                message = await ws.receive(timeout=5)
                assert message.type is aiohttp.WSMsgType.CLOSE, message
                assert ws.close_code == 1001
                return loop.time() - started

            times = sorted(await asyncio.gather(*map(closed_at, on_second)))
            assert times[-1] - times[0] >= 0.5, times  # spread over the 1 s delay, not a storm
            for ws in sockets:
                if ws not in on_second:
                    await ws.send_str("still here")
                    assert await ws.receive_str(timeout=5) == "still here"
            await wait_for(lambda: str(second) not in addresses(proxy))
            for ws in sockets:
                await ws.close()


async def test_lookup_failures_keep_the_last_set_counted_and_logged_once(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy.targets.discovery")
    async with dns_server() as dns:
        dns.set_a("chat.test", "127.0.0.1")
        proxy = await make_proxy(config(dns, 'dns = "chat.test", port = 9'))
        group = proxy.target_groups["chat"]
        await wait_for(lambda: list(addresses(proxy)) == ["127.0.0.1:9"])

        def events() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name.endswith("discovery")]

        dns.mode = "servfail"
        await next_lookups(proxy, 3)
        dns.mode = "silent"  # a server that stops answering: each lookup times out
        await next_lookups(proxy, 2)
        dns.close()  # nothing listens there any more
        await next_lookups(proxy, 2)
        assert list(addresses(proxy)) == ["127.0.0.1:9"]  # the last good set, still routable
        assert addresses(proxy)["127.0.0.1:9"] is TargetState.INITIAL
        assert group.stats.discovery_errors["servfail"] >= 3
        assert group.stats.discovery_errors["timeout"] >= 4
        assert group.stats.discovery_lookups["error"] == sum(group.stats.discovery_errors.values())
        # Logged once per change of state: ok -> servfail -> timeout, not once per lookup.
        logged = events()
        assert len(logged) == 2, logged
        assert "servfail" in logged[0] and "keeping the last 1 target(s)" in logged[0]
        assert "timeout" in logged[1]
        admin = proxy.admin
        assert admin is not None and admin.address is not None
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{admin.address}/metrics") as response,
        ):
            text = await response.text()
        assert 'wsproxy_target_discovery_errors_total{reason="timeout",target_group="chat"}' in text
        assert 'wsproxy_target_discovery_lookups_total{result="ok",target_group="chat"}' in text


async def test_recovery_and_nxdomain_are_logged_once(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy.targets.discovery")
    async with dns_server() as dns:
        dns.set_a("chat.test", "127.0.0.1")
        proxy = await make_proxy(config(dns, 'dns = "chat.test", port = 9'))
        await wait_for(lambda: bool(addresses(proxy)))
        dns.records.clear()  # the name is gone: NXDOMAIN
        await next_lookups(proxy, 3)
        dns.set_a("chat.test", "127.0.0.2")
        await wait_for(lambda: "127.0.0.2:9" in addresses(proxy))
        logged = [r.getMessage() for r in caplog.records if r.name.endswith("discovery")]
        assert len(logged) == 2, logged
        assert "nxdomain" in logged[0] and "answers again" in logged[1]
        assert proxy.target_groups["chat"].stats.discovery_errors["nxdomain"] >= 3


async def test_srv_without_port_gives_hosts_and_ports(make_proxy: ProxyFactory) -> None:
    async with (
        dns_server() as dns,
        echo_server("127.0.0.1") as one,
        echo_server("127.0.0.1") as two,
    ):
        dns.set_srv(
            "_ws._tcp.chat.test",
            (10, 50, one.port, "a.chat.test"),
            (10, 50, two.port, "b.chat.test"),
            (20, 50, 9, "backup.chat.test"),  # a higher priority value: not used
        )
        dns.set_a("a.chat.test", "127.0.0.1")
        dns.set_a("b.chat.test", "127.0.0.1")
        dns.set_a("backup.chat.test", "127.0.0.1")
        proxy = await make_proxy(config(dns, 'dns = "_ws._tcp.chat.test"'))
        await wait_for(lambda: len(addresses(proxy)) == 2)
        assert set(addresses(proxy)) == {str(one), str(two)}
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                async with session.ws_connect(f"ws://{listener_address(proxy)}/") as ws:
                    await ws.send_str("srv")
                    assert await ws.receive_str(timeout=5) == "srv"


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_aaaa_record_on_ipv6_loopback(make_proxy: ProxyFactory) -> None:
    async with dns_server() as dns, echo_server("::1") as target:
        dns.set_aaaa("chat.test", "::1")
        proxy = await make_proxy(config(dns, f'dns = "chat.test", port = {target.port}'))
        await wait_for(lambda: f"[::1]:{target.port}" in addresses(proxy))
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"ws://{listener_address(proxy)}/") as ws,
        ):
            await ws.send_str("six")
            assert await ws.receive_str(timeout=5) == "six"


BASE = '[listeners.edge]\naddress = "127.0.0.1:0"\ndefault_target_group = "c"\n[target_groups.c]\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'discovery = { dns = "a.test", port = 80 }\ntargets = [{ address = "127.0.0.1:1" }]',
            "target_groups.c: discovery and targets exclude each other",
        ),
        ('discovery = { dns = "a test" }', "target_groups.c.discovery.dns:"),
        ('discovery = { dns = "127.0.0.1:53" }', "must be a DNS name"),
        ('discovery = { dns = "a.test", port = 0 }', "discovery.port: must be >= 1"),
        ('discovery = { dns = "a.test", refresh_seconds = 0.1 }', "must be >= 0.5"),
        ('discovery = { dns = "a.test", nameservers = ["dns.test"] }', "not a host name"),
        ('discovery = { dns = "a.test", nameservers = [] }', "nameservers is empty"),
        ("discovery = { port = 80 }", "discovery.dns: required key is missing"),
        ('discovery = { dns = "a.test", prot = 80 }', "unknown key; did you mean port?"),
    ],
)
def test_config_errors(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(BASE + text, "<test>")
    issues = [str(issue) for issue in caught.value.issues]
    assert any(expected in issue for issue in issues), issues


def test_nameservers_take_an_optional_port() -> None:
    text = 'discovery = { dns = "a.test", nameservers = ["10.0.0.10", "[::1]:5353"] }'
    group = parse_config(BASE + text, "<test>").target_groups["c"]
    assert group.discovery is not None and group.discovery.nameservers == (
        Address("10.0.0.10", 53),
        Address("::1", 5353),
    )


async def test_reload_swaps_static_targets_for_discovery_and_back(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    async with dns_server() as dns:
        dns.set_a("chat.test", "127.0.0.2")
        static = config(dns, 'dns = "x.test"').split("discovery =")[0]
        static += 'targets = [{ address = "127.0.0.1:9" }]\n'
        path = tmp_path / "c.toml"
        path.write_text('[admin]\naddress = "127.0.0.1:0"\n' + static)
        proxy = await make_proxy(static)
        proxy.path = str(path)
        dynamic = config(dns, 'dns = "chat.test", port = 9')
        path.write_text('[admin]\naddress = "127.0.0.1:0"\n' + dynamic)
        assert await proxy.reload() == []
        await wait_for(lambda: addresses(proxy) == {"127.0.0.2:9": TargetState.INITIAL})
        path.write_text('[admin]\naddress = "127.0.0.1:0"\n' + static)
        assert await proxy.reload() == []
        assert "chat" not in proxy.discoveries
        await wait_for(lambda: addresses(proxy) == {"127.0.0.1:9": TargetState.INITIAL})


async def connect_when_routable(
    session: aiohttp.ClientSession, url: str
) -> aiohttp.ClientWebSocketResponse:
    """Connect, again while the proxy answers 503 (a worker that has not yet heard of any
    target: the supervisor's first lookup and snapshot are on their way); bounded."""
    async with asyncio.timeout(10):
        while True:
            try:
                return await session.ws_connect(url)
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 503, exc
            await asyncio.sleep(0.05)


async def test_workers_learn_discovered_targets_from_the_supervisor(
    tmp_path: Path, proxies: list[RunningProxy]
) -> None:
    async with (
        dns_server() as dns,
        echo_server("127.0.0.1") as first,
        echo_server("127.0.0.2", first.port) as second,
    ):
        dns.set_a("chat.test", "127.0.0.1", "127.0.0.2")
        text = '[proxy]\nworkers = 2\n[admin]\naddress = "127.0.0.1:0"\n' + config(
            dns, f'dns = "chat.test", port = {first.port}'
        )
        path = tmp_path / "workers.toml"
        path.write_text(text)
        proxy = await start_proxy(path)
        proxies.append(proxy)
        url = f"ws://127.0.0.1:{proxy.port}/"
        async with aiohttp.ClientSession() as session:
            sockets = [await connect_when_routable(session, url) for _ in range(8)]
            hosts = [await who(ws) for ws in sockets]
            on_second = [ws for ws, host in zip(sockets, hosts, strict=True) if host == second.host]
            assert on_second and len(on_second) < len(sockets), hosts
            dns.set_a("chat.test", "127.0.0.1")
            for ws in on_second:  # each worker drains its own sessions of the vanished target
                message = await ws.receive(timeout=10)
                assert message.type is aiohttp.WSMsgType.CLOSE, message
                assert ws.close_code == 1001
            for ws in sockets:
                if ws not in on_second:
                    await ws.send_str("still here")
                    assert await ws.receive_str(timeout=5) == "still here"
                    await ws.close()
            for _ in range(4):  # new sessions go to the remaining target only, in every worker
                async with session.ws_connect(url) as ws:
                    assert await who(ws) == first.host
            async with session.get(f"http://127.0.0.1:{proxy.admin}/metrics") as response:
                metrics = parse_metrics(await response.text())
        lookups = metrics["wsproxy_target_discovery_lookups_total"]
        assert sum(value for labels, value in lookups if labels["result"] == "ok") >= 2
