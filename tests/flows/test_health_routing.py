"""Health checks steer traffic: dead targets leave the rotation, recovered ones come back."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.flows.test_websocket import exchange_raw, status_of
from tests.helpers.servers import closed_port
from tests.helpers.wsraw import upgrade_request
from wsproxy.address import Address
from wsproxy.demo import EchoTarget
from wsproxy.targets.target import TargetState

CHECK = """
[target_groups.chat.health_check]
protocol = "websocket"
interval_seconds = 0.5
timeout_seconds = 0.2
healthy_threshold = 2
unhealthy_threshold = 2
"""


def config(targets: list[Address], extra: str = "", check: str = CHECK) -> str:
    listed = ", ".join(f'{{ address = "{a}" }}' for a in targets)
    return f"""
[listeners.edge]
address = "127.0.0.1:0"
websocket = true
default_target_group = "chat"
[target_groups.chat]
algorithm = "round_robin"
targets = [{listed}]
{extra}
{check}
"""


async def echo_once(address: Address) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://{address}/") as ws,
    ):
        await ws.send_str("x")
        assert await ws.receive_str(timeout=5) == "x"


async def test_a_killed_target_leaves_and_comes_back(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    a, b = echo_targets[0], echo_targets[1]
    proxy = await make_proxy(config([a.address, b.address]))
    group = proxy.target_groups["chat"]
    await wait_for(lambda: all(t.state is TargetState.HEALTHY for t in group.targets))
    address = listener_address(proxy)
    port = b.address.port
    loop = asyncio.get_running_loop()
    killed = loop.time()
    await b.stop()
    await wait_for(lambda: group.targets[1].state is TargetState.UNHEALTHY, timeout=10)
    detected = loop.time() - killed
    # At most unhealthy_threshold probes apart (+10 % jitter) plus one timeout, plus slack.
    assert detected <= 0.5 * 1.1 * 2 + 0.2 + 0.5, detected
    sessions = b.sessions
    for _ in range(6):
        await echo_once(address)
    assert b.sessions == sessions  # nothing routed to the dead target
    await b.start(port)
    await wait_for(lambda: group.targets[1].state is TargetState.HEALTHY, timeout=10)
    for _ in range(4):
        await echo_once(address)
    assert b.sessions >= sessions + 2


async def test_first_probe_runs_at_once(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    dead = await closed_port()
    slow_check = CHECK.replace("interval_seconds = 0.5", "interval_seconds = 30")
    proxy = await make_proxy(config([echo_targets[0].address, dead], check=slow_check))
    group = proxy.target_groups["chat"]
    await wait_for(lambda: group.targets[1].state is TargetState.UNHEALTHY, timeout=3)
    assert group.targets[0].state is TargetState.HEALTHY


async def test_passive_checks_mark_a_refusing_target_at_once(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    dead = await closed_port()
    proxy = await make_proxy(config([dead, echo_targets[0].address], check=""))
    address = listener_address(proxy)
    group = proxy.target_groups["chat"]
    for _ in range(8):
        await echo_once(address)
    assert group.targets[0].state is TargetState.UNHEALTHY
    # then it was no longer tried
    assert group.stats.connect_errors_by_reason() == {"refused": 3}


async def test_all_unhealthy_rejects_or_fails_open(make_proxy: ProxyFactory) -> None:
    dead = [await closed_port(), await closed_port()]
    reject = await make_proxy(config(dead, extra='when_all_unhealthy = "reject"'))
    group = reject.target_groups["chat"]
    await wait_for(lambda: all(t.state is TargetState.UNHEALTHY for t in group.targets))
    response = await exchange_raw(listener_address(reject), upgrade_request())
    assert status_of(response) == 503
    fail_open = await make_proxy(config(dead))
    group = fail_open.target_groups["chat"]
    await wait_for(lambda: all(t.state is TargetState.UNHEALTHY for t in group.targets))
    response = await exchange_raw(listener_address(fail_open), upgrade_request())
    assert status_of(response) == 502  # tried the unhealthy targets anyway, as NLB does
    assert fail_open.target_groups["chat"].failing_open
