"""Every handshake the proxy parses, delivered one byte per TCP segment by the chaos relay: the
HTTP head of an upgrade, a PROXY v2 header before it, the ClientHello of a terminating listener
(with a client certificate) and of a passthrough listener. Each must parse exactly as if it had
come whole. (That the deadlines still hold against trickled input is in test_floods.py and in
tests/flows: slowloris heads, trickled ClientHellos, silent PROXY headers.)"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.conftest import ProxyFactory, listener_address
from tests.flows.test_passthrough import TlsEcho, passthrough_config, talk
from tests.flows.test_tls import client_context, tls_config
from tests.flows.test_websocket import ws_config
from tests.helpers.chaos import ChaosRelay
from tests.helpers.pki import Pki, make_pki
from tests.helpers.wsraw import upgrade_request
from wsproxy.address import Address
from wsproxy.demo import EchoTarget
from wsproxy.wire.proxyproto import encode_v2


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def byte_by_byte() -> AsyncIterator[list[ChaosRelay]]:
    relays: list[ChaosRelay] = []
    yield relays
    for relay in relays:
        await relay.stop()


async def slicer_in_front_of(address: Address, relays: list[ChaosRelay]) -> Address:
    relay = ChaosRelay(address)
    relay.to_target.slicer = 1  # client -> proxy: one byte per write
    relays.append(relay)
    return await relay.start()


async def test_an_upgrade_head_one_byte_at_a_time(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], byte_by_byte: list[ChaosRelay]
) -> None:
    proxy = await make_proxy(ws_config(("echo", [echo_targets[0].address])))
    address = await slicer_in_front_of(listener_address(proxy), byte_by_byte)
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(f"ws://{address}/sliced") as ws,
    ):
        payload = os.urandom(300)
        await ws.send_bytes(payload)
        assert await ws.receive_bytes(timeout=10) == payload


async def test_a_proxy_v2_header_and_head_one_byte_at_a_time(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], byte_by_byte: list[ChaosRelay]
) -> None:
    proxy = await make_proxy(
        ws_config(("echo", [echo_targets[0].address]), listener="accept_proxy_protocol = true")
    )
    address = await slicer_in_front_of(listener_address(proxy), byte_by_byte)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(encode_v2(("203.0.113.7", 50000), ("10.0.0.1", 443)) + upgrade_request())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 101"), head
    headers = echo_targets[0].last_headers or {}
    assert headers.get("x-forwarded-for") == ["203.0.113.7"]  # the header was read whole


async def test_a_client_hello_with_a_client_certificate_one_byte_at_a_time(
    make_proxy: ProxyFactory,
    echo_targets: list[EchoTarget],
    pki: Pki,
    byte_by_byte: list[ChaosRelay],
) -> None:
    client_cert = pki.ca.issue_client("sliced-client")
    proxy = await make_proxy(
        tls_config(pki, echo_targets[0].address, client_auth="required", crl=True)
    )
    address = await slicer_in_front_of(listener_address(proxy), byte_by_byte)
    context = client_context(pki, client_cert.cert_path, client_cert.key_path)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as client,
        client.ws_connect(
            f"wss://{address}/sliced",
            headers={"Host": "edge.internal"},
            server_hostname="edge.internal",
        ) as ws,
    ):
        await ws.send_str("through TLS, a byte at a time")
        assert await ws.receive_str(timeout=10) == "through TLS, a byte at a time"
    assert proxy.listeners["edge"].stats.client_certs["ok"] == 1


async def test_a_passthrough_client_hello_one_byte_at_a_time(
    make_proxy: ProxyFactory, pki: Pki, byte_by_byte: list[ChaosRelay]
) -> None:
    targets = [TlsEcho("edge", *pki.files("edge")), TlsEcho("other", *pki.files("other"))]
    for target in targets:
        await target.start()
    try:
        # The ClientHello (~500 bytes) at 1 byte per ms needs longer than the tests' 0.5 s.
        config = passthrough_config(targets).replace(
            "client_hello_timeout_seconds = 0.5", "client_hello_timeout_seconds = 5"
        )
        proxy = await make_proxy(config)
        address = await slicer_in_front_of(listener_address(proxy), byte_by_byte)
        der, answer = await talk(address, pki, "api.other.internal")
        assert answer == b"other: hello\n"  # routed on the SNI of a hello that came in pieces
        assert der == targets[1].cert_der
    finally:
        for target in targets:
            target.stop()
