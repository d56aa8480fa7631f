"""What an idle session keeps: nothing of its handshake, no callback objects per event.

Memory per idle session is measured by ``loadtest hold`` (bytes, against HAProxy); these tests pin
down the structure that keeps it low, so a change that re-grows it fails here and not only in a
benchmark: after the handshake no head buffer, ClientHello reader, handshake callbacks or
``_Exchange`` survives, and the endpoints reach their relay without bound methods.
"""

from __future__ import annotations

import asyncio
import gc
import types
from collections import Counter

import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.flows.test_tcp import tcp_config
from tests.flows.test_websocket import ws_config
from tests.helpers.wsraw import RawWebSocket
from wsproxy.demo import EchoTarget
from wsproxy.relay.relay import Endpoint, HandshakeCallbacks, Relay
from wsproxy.relay.websocket import WebSocketRelay
from wsproxy.wire.wsframe import OP_TEXT

SESSIONS = 20
HANDSHAKE_ONLY = ("HeadBuffer", "ClientHelloReader", "HandshakeCallbacks", "_Exchange")


def live_types() -> Counter[str]:
    gc.collect()
    return Counter(type(o).__name__ for o in gc.get_objects())


def bound_methods_of(owners: tuple[type, ...]) -> int:
    gc.collect()
    return sum(
        1
        for o in gc.get_objects()
        if isinstance(o, types.MethodType) and isinstance(o.__self__, owners)
    )


def check_relay_wiring(relay: Relay) -> None:
    client, target = relay.client, relay.target
    if isinstance(relay, WebSocketRelay):  # every byte through a frame tracker
        assert (client.on_data, target.on_data) == (relay.to_target, relay.to_client)
        assert client.peer is None and target.peer is None
    else:  # each endpoint writes what it reads straight to the other
        assert client.peer is target and target.peer is client
    for endpoint in (client, target):
        assert endpoint.owner is relay
        assert not isinstance(endpoint.on_data, types.MethodType)
        with pytest.raises(RuntimeError, match="relay owns this endpoint"):
            _ = endpoint.callbacks


@pytest.mark.parametrize("websocket", [False, True], ids=["stream", "websocket"])
async def test_idle_sessions_keep_nothing_of_their_handshake(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], websocket: bool
) -> None:
    target = echo_targets[0].address
    proxy = await make_proxy(ws_config(("chat", [target])) if websocket else tcp_config([target]))
    listener = proxy.listeners["edge"]
    before = live_types()
    sessions = [await RawWebSocket.connect(listener_address(proxy)) for _ in range(SESSIONS)]
    for ws in sessions:  # every session proven open end to end
        ws.send(OP_TEXT, b"hello")
        assert await ws.recv() == (OP_TEXT, b"hello")
    await wait_for(lambda: all(flow.relay is not None for flow in listener.flows))
    await asyncio.sleep(0.1)  # handshake tasks finish their last step

    after = live_types()
    for name in HANDSHAKE_ONLY:
        assert after[name] - before[name] <= 0, f"{name} outlived the handshake"
    relays = [flow.relay for flow in listener.flows]
    assert len(relays) == SESSIONS
    for relay in relays:
        assert relay is not None
        assert isinstance(relay, WebSocketRelay) == websocket
        check_relay_wiring(relay)
    # Per session, uvloop caches one bound data_received per transport; nothing else of ours.
    assert bound_methods_of((Endpoint, Relay, HandshakeCallbacks)) <= 2 * SESSIONS
    # One shared string for one client address, however many connections it has.
    assert len({id(flow.client_ip) for flow in listener.flows}) == 1

    for ws in sessions:
        ws.abort()
    await wait_for(lambda: listener.stats.active == 0)
