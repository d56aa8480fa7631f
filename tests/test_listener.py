"""The listener: binding, the FlowContext its flows see, stopping and draining."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.flows.test_websocket import ws_config
from wsproxy.config import ListenerConfig
from wsproxy.demo import EchoTarget
from wsproxy.descriptors import DescriptorBudget
from wsproxy.errors import NoRoute, Reason
from wsproxy.flows.context import FlowContext
from wsproxy.listener import Listener
from wsproxy.ops.metrics import ListenerStats


def _context(**listener: object) -> FlowContext:
    config = ListenerConfig.model_validate({"address": "127.0.0.1:0", **listener})
    return FlowContext("edge", config, {}, ListenerStats(), DescriptorBudget(limit=100), None)


def test_the_context_admits_per_address_up_to_the_limit_and_releases() -> None:
    context = _context(max_connections_per_ip=2, default_target_group="g")
    assert context.admit_ip("10.0.0.1") and context.admit_ip("10.0.0.1")
    assert not context.admit_ip("10.0.0.1")
    assert context.admit_ip("10.0.0.2")  # another address is not held back
    context.release_ip("10.0.0.1")
    assert context.admit_ip("10.0.0.1")
    for _ in range(2):
        context.release_ip("10.0.0.1")
    context.release_ip("10.0.0.2")
    assert context._per_ip == {}  # nothing kept for addresses that left


def test_the_context_refuses_at_max_connections_handshakes_included() -> None:
    context = _context(max_connections=2, default_target_group="g")
    assert context.refusal() is None
    context.stats.active, context.handshakes = 1, 1
    assert context.refusal() is Reason.LIMIT
    assert "max_connections (2)" in context.refusal_detail(Reason.LIMIT)


def test_no_default_group_and_no_rule_is_no_route() -> None:
    rules = [{"sni": "a.example", "target_group": "g"}]
    context = _context(protocol="tls_passthrough", rules=rules)
    with pytest.raises(NoRoute) as caught:
        context.target_group(context.sni_router.route("b.example"))
    assert caught.value.status == 404


async def test_a_taken_address_names_the_listener() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        config = ListenerConfig.model_validate(
            {"address": f"127.0.0.1:{port}", "default_target_group": "g"}
        )
        listener = Listener("edge", config, {}, budget=DescriptorBudget(limit=100))
        with pytest.raises(OSError) as caught:
            await listener.start()
        assert f"listener 'edge': cannot bind 127.0.0.1:{port}" in str(caught.value)
    finally:
        taken.close()


async def test_stop_accepting_keeps_sessions_and_drain_closes_them(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    proxy = await make_proxy(ws_config(("chat", [echo_targets[0].address])))
    listener = proxy.listeners["edge"]
    address = listener_address(proxy)
    async with aiohttp.ClientSession() as client:
        ws = await client.ws_connect(f"ws://{address}/")
        listener.stop_accepting()
        with pytest.raises((aiohttp.ClientError, OSError)):
            await client.ws_connect(f"ws://{address}/")
        await ws.send_str("still here")  # an accepted session is not the listening socket's
        assert await ws.receive_str(timeout=5) == "still here"
        drain = asyncio.create_task(listener.drain(grace=2.0, spread=0.0))
        message = await ws.receive(timeout=5)
        assert message.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 1001
        await drain
    await wait_for(lambda: not listener.flows)
    assert listener.context.connections == set() and listener.stats.active == 0
