"""PROXY v2 toward targets: the header comes first, carries the real client, TLS follows it."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable

import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.helpers.pki import Pki, make_pki
from tests.helpers.servers import RawServer
from tests.helpers.wsraw import upgrade_request
from wsproxy.demo import EchoTarget
from wsproxy.wire.proxyproto import PP2_TYPE_AUTHORITY, ProxyHeader, ProxyHeaderReader, encode_v2

RawServers = Callable[..., Awaitable[RawServer]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def header_then_echo(
    seen: list[ProxyHeader], tls: ssl.SSLContext | None = None
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = ProxyHeaderReader()
        result = None
        while result is None:
            result = parser.feed(await reader.readexactly(parser.needed()))
        seen.append(result[0])
        if tls is not None:
            await writer.start_tls(tls)
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    return handler


def config(target: object, listener: str = "", group: str = "") -> str:
    return f"""
[listeners.edge]
address = "127.0.0.1:0"
default_target_group = "pp"
{listener}
[target_groups.pp]
proxy_protocol_v2 = true
targets = [{{ address = "{target}" }}]
{group}
"""


async def test_stream_mode_sends_the_client_address_first(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    seen: list[ProxyHeader] = []
    server = await raw_servers(header_then_echo(seen))
    proxy = await make_proxy(config(server.address))
    address = listener_address(proxy)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(b"payload")
    assert await asyncio.wait_for(reader.readexactly(7), 5) == b"payload"
    local = writer.get_extra_info("sockname")
    writer.close()
    (header,) = seen
    assert header.command == "PROXY"
    assert header.source == (local[0], local[1])
    assert header.destination == (address.host, address.port)


async def test_websocket_mode_header_precedes_the_request(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    seen: list[ProxyHeader] = []
    server = await raw_servers(header_then_echo(seen))
    proxy = await make_proxy(config(server.address, listener="websocket = true"))
    address = listener_address(proxy)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    request = upgrade_request()
    writer.write(request)
    # The echo target sends our own request back, which is not a valid response: 502.
    response = await asyncio.wait_for(reader.read(), 5)
    assert response.startswith(b"HTTP/1.1 502")
    writer.close()
    await wait_for(lambda: len(seen) == 1)
    assert seen[0].source is not None and seen[0].source[0] == "127.0.0.1"


async def test_header_goes_before_tls_to_the_target(
    make_proxy: ProxyFactory, raw_servers: RawServers, pki: Pki
) -> None:
    seen: list[ProxyHeader] = []
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(*pki.files("edge"))
    server = await raw_servers(header_then_echo(seen, tls))
    group = f'protocol = "tls"\ntls = {{ ca = "{pki.ca_file}", server_name = "edge.internal" }}'
    proxy = await make_proxy(config(server.address, group=group))
    address = listener_address(proxy)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(b"inside TLS")
    assert await asyncio.wait_for(reader.readexactly(10), 5) == b"inside TLS"
    writer.close()
    assert seen[0].command == "PROXY"


async def test_passthrough_sends_the_sni_as_authority(make_proxy: ProxyFactory, pki: Pki) -> None:
    # The header and the ClientHello may share one segment, so this target reads the header with
    # exact socket reads before TLS starts, as a real PROXY-aware TLS server does.
    seen: list[ProxyHeader] = []
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(*pki.files("edge"))
    loop = asyncio.get_running_loop()
    listening = socket.create_server(("127.0.0.1", 0))
    listening.setblocking(False)

    async def serve_one() -> None:
        connection, _ = await loop.sock_accept(listening)
        parser = ProxyHeaderReader()
        result = None
        while result is None:
            result = parser.feed(await loop.sock_recv(connection, parser.needed()))
        seen.append(result[0])
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_accepted_socket(
            lambda: asyncio.StreamReaderProtocol(reader), connection, ssl=tls
        )
        transport.write(await reader.readexactly(2))

    server = asyncio.create_task(serve_one())
    target = f"127.0.0.1:{listening.getsockname()[1]}"
    proxy = await make_proxy(config(target, listener='protocol = "tls_passthrough"'))
    address = listener_address(proxy)
    client = ssl.create_default_context(cafile=pki.ca_file)
    reader, writer = await asyncio.open_connection(
        address.host, address.port, ssl=client, server_hostname="edge.internal"
    )
    writer.write(b"hi")
    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"hi"
    writer.close()
    await server
    listening.close()
    assert seen[0].tlvs[PP2_TYPE_AUTHORITY] == b"edge.internal"


async def test_accepting_proxy_v1_on_a_websocket_listener(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    proxy = await make_proxy(
        f"""
[listeners.edge]
address = "127.0.0.1:0"
websocket = true
accept_proxy_protocol = true
default_target_group = "echo"
[target_groups.echo]
targets = [{{ address = "{echo_targets[0].address}" }}]
"""
    )
    address = listener_address(proxy)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 443\r\n" + upgrade_request())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    writer.close()
    headers = echo_targets[0].last_headers
    assert headers is not None and headers["x-forwarded-for"] == ["203.0.113.7"]
    # Without a header the connection is refused, counted, and nothing reaches the target.
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(upgrade_request())
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    stats = proxy.listeners["edge"].stats
    await wait_for(lambda: stats.rejected["proxy_protocol_error"] == 1)
    assert echo_targets[0].sessions == 1


async def test_proxy_v2_before_tls_is_read_with_exact_reads_and_passed_on(
    make_proxy: ProxyFactory, raw_servers: RawServers, pki: Pki
) -> None:
    seen: list[ProxyHeader] = []
    server = await raw_servers(header_then_echo(seen))
    cert, key = pki.files("edge")
    proxy = await make_proxy(
        config(
            server.address,
            listener=(
                'protocol = "tls"\naccept_proxy_protocol = true\n'
                "proxy_protocol_timeout_seconds = 0.5\n"
                f'[listeners.edge.tls]\ncertificates = [{{ cert = "{cert}", key = "{key}" }}]'
            ),
        )
    )
    address = listener_address(proxy)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    # The header and the ClientHello leave in one burst: the proxy must not over-read.
    writer.write(encode_v2(("203.0.113.9", 41000), ("198.51.100.1", 443)))
    await writer.start_tls(
        ssl.create_default_context(cafile=pki.ca_file), server_hostname="edge.internal"
    )
    writer.write(b"after TLS")
    assert await asyncio.wait_for(reader.readexactly(9), 5) == b"after TLS"
    writer.close()
    assert seen[0].source == ("203.0.113.9", 41000)  # the original client, passed on
    silent_reader, silent = await asyncio.open_connection(address.host, address.port)
    assert await asyncio.wait_for(silent_reader.read(), 5) == b""
    silent.close()
    stats = proxy.listeners["edge"].stats
    await wait_for(lambda: stats.rejected["proxy_protocol_timeout"] == 1)
