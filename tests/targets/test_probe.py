"""Health probes against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.helpers.pki import make_pki
from tests.helpers.servers import RawServer, closed_port, fixed_response, read_head
from wsproxy.config import HealthCheckConfig
from wsproxy.demo import EchoTarget
from wsproxy.targets.probe import run_probe
from wsproxy.wire.proxyproto import ProxyHeaderReader

RawServers = Callable[..., Awaitable[RawServer]]


def check(**settings: object) -> HealthCheckConfig:
    return HealthCheckConfig.model_validate(
        {"interval_seconds": 1, "timeout_seconds": 0.5, **settings}
    )


async def test_tcp(raw_servers: RawServers) -> None:
    server = await raw_servers(fixed_response(b""))
    assert (await run_probe(check(), server.address, tls=None, server_name=None, proxy_v2=False))[0]
    dead = await closed_port()
    ok, detail, timed_out = await run_probe(
        check(), dead, tls=None, server_name=None, proxy_v2=False
    )
    assert not ok and not timed_out and "ConnectionRefused" in detail


@pytest.mark.parametrize(
    ("answer", "matcher", "ok"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "200-399", True),
        (b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n", "200-399", False),
        (b"HTTP/1.1 204 No\r\n\r\n", "200,204", True),
        (b"not http at all\r\n\r\n", "200", False),
    ],
)
async def test_http(raw_servers: RawServers, answer: bytes, matcher: str, ok: bool) -> None:
    server = await raw_servers(fixed_response(answer))
    result = await run_probe(
        check(protocol="http", path="/health", matcher=matcher),
        server.address,
        tls=None,
        server_name=None,
        proxy_v2=False,
    )
    assert result[0] is ok, result


async def test_silent_target_times_out(raw_servers: RawServers) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await raw_servers(silent)
    ok, _, timed_out = await run_probe(
        check(protocol="http"), server.address, tls=None, server_name=None, proxy_v2=False
    )
    assert not ok and timed_out


async def test_websocket_with_a_message_round_trip() -> None:
    target = EchoTarget("probe", greeting=False)
    await target.start()
    try:
        ok, detail, _ = await run_probe(
            check(protocol="websocket", send="ping", expect="ping"),
            target.address,
            tls=None,
            server_name=None,
            proxy_v2=False,
        )
        assert ok, detail
        ok, detail, _ = await run_probe(
            check(protocol="websocket", send="ping", expect="pong"),
            target.address,
            tls=None,
            server_name=None,
            proxy_v2=False,
        )
        assert not ok and "expected 'pong'" in detail
    finally:
        await target.stop()


async def test_websocket_refused_upgrade(raw_servers: RawServers) -> None:
    server = await raw_servers(fixed_response(b"HTTP/1.1 426 No\r\nContent-Length: 0\r\n\r\n"))
    ok, detail, _ = await run_probe(
        check(protocol="websocket"), server.address, tls=None, server_name=None, proxy_v2=False
    )
    assert not ok and "426" in detail


async def test_tls_websocket_with_client_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    pki.ca.issue_client("wsproxy")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki.ca_file)
    server_tls.load_cert_chain(*pki.files("edge"))
    server_tls.verify_mode = ssl.CERT_REQUIRED
    target = EchoTarget("tls", greeting=False, ssl_context=server_tls)
    await target.start()
    client = ssl.create_default_context(cafile=pki.ca_file)
    client.load_cert_chain(*pki.files("wsproxy"))
    try:
        ok, detail, _ = await run_probe(
            check(protocol="websocket"),
            target.address,
            tls=client,
            server_name="edge.internal",
            proxy_v2=False,
        )
        assert ok, detail
    finally:
        await target.stop()


async def test_proxy_v2_groups_get_the_local_command(raw_servers: RawServers) -> None:
    seen: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = ProxyHeaderReader()
        result = None
        while result is None:
            result = parser.feed(await reader.readexactly(parser.needed()))
        seen.append(result[0].command)
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    server = await raw_servers(handler)
    ok, detail, _ = await run_probe(
        check(protocol="http"), server.address, tls=None, server_name=None, proxy_v2=True
    )
    assert ok, detail
    assert seen == ["LOCAL"]
