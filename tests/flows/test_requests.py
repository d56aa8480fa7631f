"""Plain requests and routing through the WebSocket flow (issue 13, items 9, 10, 12 and 16):
interim 1xx answers, which requests may be retried elsewhere, request lines, absolute-form
targets and path normalisation. Real clients (raw sockets, curl), real targets, 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.flows.test_websocket import exchange_raw, status_of, ws_config
from tests.helpers.servers import Handler, RawServer, closed_port, read_head
from tests.helpers.tools import require_tool
from wsproxy.wire.http1 import parse_request_head
from wsproxy.wire.upgrade import accept_key

RawServers = Callable[..., Awaitable[RawServer]]


def answering_target(record: list[bytes], *, interim: tuple[bytes, ...] = ()) -> Handler:
    """Reads one request head, records it, sends the ``interim`` 1xx heads when the request
    says ``Expect: 100-continue``, reads the Content-Length body, records it, answers 200 with
    ``got N bytes`` and closes. An Upgrade with a key gets a real 101 and then echoes bytes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        record.append(head)
        request = parse_request_head(head)
        key = request.get("sec-websocket-key")
        if key:
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n"
                + f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n".encode()
            )
            await writer.drain()
            await reader.read()
            return
        if (request.get("expect") or "").lower() == "100-continue":
            for response in interim:
                writer.write(response)
            await writer.drain()
        body = await reader.readexactly(int(request.get("content-length") or 0))
        record.append(body)
        text = f"got {len(body)} bytes".encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))
        await writer.drain()

    return handler


async def read_response_head(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(5):
        return await reader.readuntil(b"\r\n\r\n")


# --- item 9: Expect: 100-continue -------------------------------------------------------------

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"


async def test_expect_100_continue_reaches_a_client_that_waits_for_it(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    """Item 9: the target's 100 (and a 103) went nowhere and the client got a 502. A client
    that waits for the 100 before sending its body must get it, then the final answer."""
    record: list[bytes] = []
    server = await raw_servers(answering_target(record, interim=(EARLY_HINTS, CONTINUE)))
    proxy = await make_proxy(ws_config(("web", [server.address])))
    address = listener_address(proxy)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    try:
        writer.write(
            b"PUT /upload HTTP/1.1\r\nHost: web\r\nContent-Length: 11\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        first = await read_response_head(reader)
        assert first.startswith(b"HTTP/1.1 103 Early Hints\r\n"), first
        assert b"\r\nLink: </style.css>; rel=preload\r\n" in first
        assert await read_response_head(reader) == CONTINUE
        assert record[1:] == [], "the body was not sent yet"
        writer.write(b"hello world")
        async with asyncio.timeout(5):
            final = await reader.read()
    finally:
        writer.close()
    assert status_of(final) == 200 and final.endswith(b"got 11 bytes")
    assert record[1] == b"hello world"
    await wait_for(lambda: proxy.listeners["edge"].stats.active == 0)
    assert proxy.listeners["edge"].stats.rejected.get("bad_target_response", 0) == 0


async def test_curl_expect_100_continue(
    make_proxy: ProxyFactory, raw_servers: RawServers, tmp_path: object
) -> None:
    """The same with curl, which sends Expect: 100-continue for a large upload by itself. With
    --expect100-timeout at 60 s, curl only sends the body early if the 100 reaches it."""
    curl = require_tool("curl", "curl")
    record: list[bytes] = []
    server = await raw_servers(answering_target(record, interim=(CONTINUE,)))
    proxy = await make_proxy(ws_config(("web", [server.address])))
    body = b"x" * 2_000_000
    process = await asyncio.create_subprocess_exec(
        curl,
        "-sS",
        "-v",
        "--expect100-timeout",
        "60",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        "@-",
        "-w",
        "\n%{http_code}",
        f"http://{listener_address(proxy)}/upload",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate(body)
    assert process.returncode == 0, err
    assert out.splitlines()[-2:] == [b"got 2000000 bytes", b"200"], out
    assert b"< HTTP/1.1 100 Continue" in err, err
    assert len(record[1]) == len(body)


async def test_interim_answers_are_not_sent_to_an_http_1_0_client(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    """RFC 9110 §15.2: HTTP/1.0 defines no 1xx, so a 1.0 client gets the final answer only."""
    record: list[bytes] = []
    server = await raw_servers(answering_target(record, interim=(CONTINUE,)))
    proxy = await make_proxy(ws_config(("web", [server.address])))
    response = await exchange_raw(
        listener_address(proxy),
        b"POST /form HTTP/1.0\r\nHost: web\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc",
    )
    assert status_of(response) == 200 and response.endswith(b"got 3 bytes")
    assert b" 100 " not in response


async def test_endless_interim_answers_are_a_502(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    record: list[bytes] = []
    server = await raw_servers(answering_target(record, interim=(EARLY_HINTS,) * 40))
    proxy = await make_proxy(ws_config(("web", [server.address])))
    response = await exchange_raw(
        listener_address(proxy),
        b"POST /form HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
    )
    assert response.count(b"HTTP/1.1 103 Early Hints\r\n") == 16
    assert response.split(b"\r\n\r\n")[-2].startswith(b"HTTP/1.1 502 ")


async def test_a_101_to_a_request_that_did_not_ask_for_an_upgrade_is_a_502(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    record: list[bytes] = []
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
    server = await raw_servers(answering_target(record, interim=(switch,)))
    proxy = await make_proxy(ws_config(("web", [server.address])))
    response = await exchange_raw(
        listener_address(proxy),
        b"POST /x HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
    )
    assert status_of(response) == 502


# --- item 10: retries --------------------------------------------------------------------------


def read_then_close(record: list[bytes]) -> Handler:
    """A target that reads the request head, records it and closes without a word."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record.append(await read_head(reader))

    return handler


@pytest.mark.parametrize("method", ["POST", "DELETE", "PUT", "PATCH"])
async def test_a_request_that_reached_a_target_is_not_retried_unless_it_is_safe(
    make_proxy: ProxyFactory, raw_servers: RawServers, method: str
) -> None:
    """Item 10: a body-less POST (or DELETE) that the first target read before closing was sent
    again to a second target. Now it reaches exactly one target; the client gets a 502."""
    first: list[bytes] = []
    second: list[bytes] = []
    closing = await raw_servers(read_then_close(first))
    answering = await raw_servers(answering_target(second))
    proxy = await make_proxy(ws_config(("web", [closing.address, answering.address])))
    statuses = []
    for _ in range(4):
        response = await exchange_raw(
            listener_address(proxy), f"{method} /charge HTTP/1.1\r\nHost: web\r\n\r\n".encode()
        )
        statuses.append(status_of(response))
    requests_at_second = [head for head in second if head.startswith(method.encode())]
    assert len(first) + len(requests_at_second) == 4, "each request reached one target"
    assert statuses.count(502) == len(first) > 0
    assert statuses.count(200) == len(requests_at_second)


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
async def test_a_safe_request_is_retried_after_a_target_closed_without_answering(
    make_proxy: ProxyFactory, raw_servers: RawServers, method: str
) -> None:
    first: list[bytes] = []
    second: list[bytes] = []
    closing = await raw_servers(read_then_close(first))
    answering = await raw_servers(answering_target(second))
    proxy = await make_proxy(ws_config(("web", [closing.address, answering.address])))
    for _ in range(4):
        response = await exchange_raw(
            listener_address(proxy), f"{method} /page HTTP/1.1\r\nHost: web\r\n\r\n".encode()
        )
        assert status_of(response) == 200
    assert len(first) > 0 and len([h for h in second if h.startswith(method.encode())]) == 4


async def test_a_post_is_retried_when_nothing_was_sent_to_the_first_target(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    second: list[bytes] = []
    dead = await closed_port()
    answering = await raw_servers(answering_target(second))
    proxy = await make_proxy(ws_config(("web", [dead, answering.address])))
    for _ in range(4):
        response = await exchange_raw(
            listener_address(proxy), b"POST /charge HTTP/1.1\r\nHost: web\r\n\r\n"
        )
        assert status_of(response) == 200
    assert len([h for h in second if h.startswith(b"POST")]) == 4
