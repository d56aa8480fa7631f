"""Stream mode (protocol = "tcp", websocket = false): opaque bytes, both ways.

Half-close, backpressure, idle timeout, drain and abort of every flow kind: test_conformance.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.helpers.servers import RawServer, closed_port, tcp_echo
from wsproxy.address import Address

RawServers = Callable[..., Awaitable[RawServer]]


def tcp_config(targets: list[Address], extra: str = "", algorithm: str = "round_robin") -> str:
    listed = ", ".join(f'{{ address = "{a}" }}' for a in targets)
    return f"""
[listeners.edge]
address = "127.0.0.1:0"
default_target_group = "pool"
{extra}

[target_groups.pool]
algorithm = "{algorithm}"
targets = [{listed}]
"""


async def test_bytes_both_ways_in_order(make_proxy: ProxyFactory, raw_servers: RawServers) -> None:
    server = await raw_servers(tcp_echo)
    proxy = await make_proxy(tcp_config([server.address]))
    address = listener_address(proxy)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    payload = os.urandom(8 * 1024 * 1024)

    async def send() -> None:
        for offset in range(0, len(payload), 100_003):
            writer.write(payload[offset : offset + 100_003])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = await asyncio.wait_for(reader.read(), 30)
    await sender
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    writer.close()
    await wait_for(lambda: proxy.listeners["edge"].stats.active == 0)
    stats = proxy.listeners["edge"].stats
    assert stats.bytes_in == stats.bytes_out == len(payload)


async def test_server_speaks_first(make_proxy: ProxyFactory, raw_servers: RawServers) -> None:
    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 ready\r\n")
        await writer.drain()
        await reader.read()

    server = await raw_servers(banner)
    proxy = await make_proxy(tcp_config([server.address]))
    address = listener_address(proxy)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    assert await asyncio.wait_for(reader.readline(), 5) == b"220 ready\r\n"
    writer.close()


async def test_idle_timeout(make_proxy: ProxyFactory, raw_servers: RawServers) -> None:
    server = await raw_servers(tcp_echo)
    proxy = await make_proxy(tcp_config([server.address], "idle_timeout_seconds = 0.4"))
    address = listener_address(proxy)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    for _ in range(4):  # activity keeps it open past the timeout
        await asyncio.sleep(0.15)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    waited = asyncio.get_running_loop().time() - started
    assert waited >= 0.4
    writer.close()
    await wait_for(lambda: proxy.listeners["edge"].stats.active == 0)


async def test_refused_target_is_retried_on_another(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    server = await raw_servers(tcp_echo)
    proxy = await make_proxy(tcp_config([await closed_port(), server.address]))
    address = listener_address(proxy)
    for _ in range(4):
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(b"abc")
        assert await asyncio.wait_for(reader.readexactly(3), 5) == b"abc"
        writer.close()
    assert server.connections == 4


async def test_no_target_answers_closes_the_client(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(tcp_config([await closed_port()]))
    address = listener_address(proxy)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await wait_for(lambda: proxy.listeners["edge"].stats.rejected["target_refused"] == 1)


async def test_shutdown_closes_stream_connections_when_grace_ends(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    server = await raw_servers(tcp_echo)
    proxy = await make_proxy(tcp_config([server.address]))
    address = listener_address(proxy)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(b"abc")
    await reader.readexactly(3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    shutdown = asyncio.create_task(proxy.shutdown(grace=0.5))
    writer.write(b"during grace")  # still relayed while draining
    assert await asyncio.wait_for(reader.readexactly(12), 5) == b"during grace"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert loop.time() - started >= 0.45
    await shutdown
    writer.close()
    # New connections are refused once draining started.
    try:
        _, late_writer = await asyncio.open_connection(address.host, address.port)
    except ConnectionRefusedError:
        pass
    else:
        late_writer.close()
        raise AssertionError("listener still accepting after shutdown")
