"""Request smuggling around the Upgrade, as regressions named after the advisories they cover.

The rule each test checks: nothing reaches a target that the proxy did not parse as one valid
request; no connection is tunnelled unless the target answered a real 101; and the headers the
proxy adds (X-Forwarded-*) are always there, with the proxy's values, whatever the client sent.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import pytest

from tests.conftest import ProxyFactory, listener_address
from tests.flows.test_websocket import exchange_raw, status_of, ws_config
from tests.helpers.servers import Handler, RawServer, read_head
from tests.helpers.wsraw import upgrade_request
from wsproxy.wire.http1 import parse_request_head
from wsproxy.wire.upgrade import accept_key

RawServers = Callable[..., Awaitable[RawServer]]


def recording_target(record: list[bytes], *, upgrade: bool) -> Handler:
    """Answers one request (101 when ``upgrade`` and asked, else 200 keep-alive) and records
    every byte that arrives, so a test can count the requests a client got through."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        record.append(head)
        request = parse_request_head(head)
        key = request.get("sec-websocket-key")
        if upgrade and key and request.get("upgrade"):
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n"
                + f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n".encode()
            )
        else:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
            )
        await writer.drain()
        while more := await reader.read(65536):
            record.append(more)

    return handler


SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: internal\r\n\r\n"


async def test_cve_2019_17567_no_tunnel_when_the_target_did_not_upgrade(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    """Apache mod_proxy_wstunnel tunnelled connections the backend never upgraded: a client could
    then send any request straight to the backend. A 200 to an Upgrade ends the connection."""
    record: list[bytes] = []
    server = await raw_servers(recording_target(record, upgrade=False))
    proxy = await make_proxy(ws_config(("app", [server.address])))
    frame = b"\x81\x85" + os.urandom(4) + b"hello"
    response = await exchange_raw(listener_address(proxy), upgrade_request() + SMUGGLED + frame)
    assert status_of(response) == 200
    assert b"\r\nConnection: close\r\n" in response
    await asyncio.sleep(0.1)
    received = b"".join(record)
    assert received.count(b" HTTP/1.1\r\n") == 1
    assert b"/admin" not in received and b"hello" not in received


@pytest.mark.parametrize(
    "connection",
    [
        "close, X-Forwarded-For",
        "X-Forwarded-Host, X-Forwarded-Port, X-Forwarded-Proto",
        "keep-alive, x-forwarded-for, X-Real-IP",
    ],
)
@pytest.mark.parametrize("upgrade", [True, False], ids=["upgrade", "plain"])
async def test_cve_2024_45410_hop_by_hop_cannot_strip_forwarded_headers(
    make_proxy: ProxyFactory, raw_servers: RawServers, connection: str, upgrade: bool
) -> None:
    """Traefik let a client name X-Forwarded-* in Connection and so remove them (CVE-2024-45410,
    earlier CVE-2021-32813). The proxy's own headers must survive, and the client's copies must
    not."""
    record: list[bytes] = []
    server = await raw_servers(recording_target(record, upgrade=True))
    proxy = await make_proxy(ws_config(("app", [server.address])))
    forged = ("X-Forwarded-For: 6.6.6.6", "X-Forwarded-Host: evil.example")
    if upgrade:
        request = upgrade_request(extra=forged).replace(
            b"Connection: Upgrade", f"Connection: Upgrade, {connection}".encode()
        )
    else:
        request = (
            "GET /plain HTTP/1.1\r\nHost: test.internal\r\n"
            f"Connection: {connection}\r\n" + "\r\n".join(forged) + "\r\n\r\n"
        ).encode()
    address = listener_address(proxy)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(request)
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert status_of(response) == (101 if upgrade else 200), response
    head = parse_request_head(record[0])
    assert head.get_all("x-forwarded-for") == ["127.0.0.1"]
    assert head.get_all("x-forwarded-host") == ["test.internal"]
    assert head.get_all("x-forwarded-proto") == ["http"]
    assert head.get_all("x-forwarded-port") == [str(listener_address(proxy).port)]
    assert b"6.6.6.6" not in record[0] and b"evil.example" not in record[0]


LENIENT = {
    # CVE-2023-47627 (aiohttp's lenient parser) and the RFC 9112 rules it broke: each of these
    # lets two parsers disagree on where a request ends.
    "CVE-2023-47627 content-length with a sign": b"Content-Length: +3",
    "CVE-2023-47627 two content-lengths": b"Content-Length: 3\r\nContent-Length: 4",
    "CVE-2023-47627 transfer-encoding not chunked last": b"Transfer-Encoding: chunked, gzip",
    "CVE-2023-47627 nul in a header value": b"X-Test: a\x00b",
    "CVE-2023-47627 bare CR in a header value": b"X-Test: a\rb",
    "RFC 9112 obsolete line folding": b"X-Test: a\r\n folded",
    "RFC 9112 content-length and transfer-encoding": (
        b"Content-Length: 3\r\nTransfer-Encoding: chunked"
    ),
    "h2c smuggling (Bishop Fox, 2020)": b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__",
}


@pytest.mark.parametrize("name", list(LENIENT))
async def test_lenient_framing_is_refused_and_nothing_reaches_the_target(
    make_proxy: ProxyFactory, raw_servers: RawServers, name: str
) -> None:
    record: list[bytes] = []
    server = await raw_servers(recording_target(record, upgrade=True))
    proxy = await make_proxy(ws_config(("app", [server.address])))
    connection = b"Upgrade, HTTP2-Settings" if b"h2c" in LENIENT[name] else b"keep-alive"
    request = (
        b"POST /form HTTP/1.1\r\nHost: test.internal\r\nConnection: "
        + connection
        + b"\r\n"
        + LENIENT[name]
        + b"\r\n\r\nabc"
        + SMUGGLED
    )
    response = await exchange_raw(listener_address(proxy), request)
    assert 400 <= status_of(response) < 500, response
    await asyncio.sleep(0.1)
    assert record == [], record
    assert server.connections == 0
