"""The WebSocket flow end to end: real clients, real targets, real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.helpers.canary import Canary
from tests.helpers.servers import (
    RawServer,
    accept_then_close,
    closed_port,
    fixed_response,
    upgrading_target,
)
from tests.helpers.wsraw import RawWebSocket, upgrade_request
from wsproxy.address import Address
from wsproxy.demo import EchoTarget
from wsproxy.wire.wsframe import OP_BINARY, OP_TEXT, FrameTracker, encode_close

CanaryFactory = Callable[..., Awaitable[Canary]]
RawServers = Callable[..., Awaitable[RawServer]]


def ws_config(
    *groups: tuple[str, list[Address]],
    listener: str = "",
    algorithm: str = "round_robin",
    group_extra: str = "",
) -> str:
    text = f"""
[listeners.edge]
address = "127.0.0.1:0"
websocket = true
default_target_group = "{groups[0][0]}"
{listener}
"""
    for name, addresses in groups:
        targets = ", ".join(f'{{ address = "{a}" }}' for a in addresses)
        text += f"""
[target_groups.{name}]
algorithm = "{algorithm}"
targets = [{targets}]
{group_extra}
"""
    return text


async def exchange_raw(address: Address, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``, return everything the proxy says until it closes the connection."""
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(data)
    try:
        async with asyncio.timeout(timeout):
            return await reader.read(-1)
    finally:
        writer.close()


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:100]
    return int(response[9:12])


# --- the happy path ----------------------------------------------------------------------------


async def test_echo_through_the_proxy(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    proxy = await make_proxy(ws_config(("chat", [echo_targets[0].address])))
    address = listener_address(proxy)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://{address}/room?x=1") as ws,
    ):
        await ws.send_str("hello")
        assert await ws.receive_str(timeout=5) == "hello"
        await ws.send_bytes(b"\x00" * 100_000)
        assert await ws.receive_bytes(timeout=5) == b"\x00" * 100_000
    assert ws.close_code == 1000
    headers = echo_targets[0].last_headers
    assert headers is not None
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["http"]
    assert headers["x-forwarded-port"] == [str(address.port)]
    assert headers["x-forwarded-host"] == [f"{address}"]
    await wait_for(lambda: proxy.listeners["edge"].stats.active == 0)
    stats = proxy.listeners["edge"].stats
    assert stats.upgrades[("chat", "ok")] == 1
    assert stats.messages_in == 2 and stats.messages_out == 2


async def test_client_forwarded_headers_are_replaced(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    proxy = await make_proxy(ws_config(("chat", [echo_targets[0].address])))
    spoofed = {
        "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil",
    }
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://{listener_address(proxy)}/", headers=spoofed) as ws,
    ):
        await ws.send_str("x")
        await ws.receive_str(timeout=5)
    headers = echo_targets[0].last_headers
    assert headers is not None
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["http"]
    assert headers["x-forwarded-host"] != ["evil"]


async def test_subprotocol_and_permessage_deflate_pass_through(
    make_proxy: ProxyFactory,
) -> None:
    target = EchoTarget("proto", greeting=False, protocols=("chat.v2", "chat.v1"))
    await target.start()
    try:
        proxy = await make_proxy(ws_config(("chat", [target.address])))
        url = f"ws://{listener_address(proxy)}/"
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(url, protocols=("chat.v1",), compress=15) as ws,
        ):
            assert ws.protocol == "chat.v1"
            assert ws.compress == 15  # permessage-deflate negotiated end to end
            text = "compressible " * 1000
            await ws.send_str(text)
            assert await ws.receive_str(timeout=5) == text
        headers = target.last_headers
        assert headers is not None
        assert "permessage-deflate" in headers["sec-websocket-extensions"][0]
    finally:
        await target.stop()


async def test_rules_route_on_host_and_path(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    a, b, c = (t.address for t in echo_targets)
    listener = """
[[listeners.edge.rules]]
host = "chat.internal"
path_prefix = "/v2/"
target_group = "v2"
[[listeners.edge.rules]]
host = "CHAT.internal"
target_group = "chat"
"""
    proxy = await make_proxy(
        ws_config(("default", [a]), ("chat", [b]), ("v2", [c]), listener=listener)
    )
    address = listener_address(proxy)
    cases = [
        ("chat.internal", "/v2/room", 2),
        ("Chat.Internal:443", "/v1/room", 1),
        ("other.internal", "/v2/room", 0),
    ]
    async with aiohttp.ClientSession() as session:
        for host, path, index in cases:
            before = echo_targets[index].sessions
            async with session.ws_connect(f"ws://{address}{path}", headers={"Host": host}) as ws:
                await ws.send_str("x")
                await ws.receive_str(timeout=5)
            assert echo_targets[index].sessions == before + 1, (host, path)


async def test_plain_request_is_forwarded_alone(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    record: list[bytes] = []
    body = b"hello"
    server = await raw_servers(
        fixed_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n" + body, record
        )
    )
    proxy = await make_proxy(ws_config(("web", [server.address])))
    request = (
        b"POST /form HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n"
        b"abc"
        b"GET /second HTTP/1.1\r\nHost: web\r\n\r\n"
    )
    response = await exchange_raw(listener_address(proxy), request)
    assert status_of(response) == 200
    assert b"\r\nConnection: close\r\n" in response
    assert response.endswith(b"\r\n\r\n" + body)
    forwarded = b"".join(record)
    assert forwarded.startswith(b"POST /form HTTP/1.1\r\n")
    assert b"Connection: close\r\n" in forwarded and b"keep-alive" not in forwarded
    assert forwarded.endswith(b"\r\n\r\nabc")
    assert b"/second" not in forwarded


async def test_chunked_plain_request(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    proxy = await make_proxy(ws_config(("web", [echo_targets[0].address])))
    request = (
        b"POST /up HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n"
    )
    response = await exchange_raw(listener_address(proxy), request)
    assert status_of(response) == 200
    assert b"plain HTTP POST /up body=6 bytes" in response


async def test_websocket_only_answers_426(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    proxy = await make_proxy(
        ws_config(("web", [echo_targets[0].address]), listener="websocket_only = true")
    )
    response = await exchange_raw(listener_address(proxy), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(response) == 426
    assert b"\r\nUpgrade: websocket\r\n" in response
    assert echo_targets[0].last_headers is None


# --- bad input from clients, each beside a canary ------------------------------------------------

BAD_REQUESTS: list[tuple[str, bytes, int, str]] = [
    (
        "oversized head",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000,
        431,
        "head_too_large",
    ),
    ("not http", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 400, "bad_request"),
    ("garbage line", b"HELLO THERE\r\n\r\n", 400, "bad_request"),
    ("wrong method", upgrade_request().replace(b"GET", b"PUT", 1), 405, "method_not_allowed"),
    (
        "missing key",
        upgrade_request().replace(b"Sec-WebSocket-Key", b"X-Nothing"),
        400,
        "bad_request",
    ),
    (
        "invalid key",
        upgrade_request(key="c2hvcnQ="),
        400,
        "bad_request",
    ),
    (
        "wrong version",
        upgrade_request().replace(b"Version: 13", b"Version: 8"),
        426,
        "upgrade_required",
    ),
    ("two hosts", upgrade_request(extra=("Host: second",)), 400, "bad_request"),
    (
        "h2c upgrade",
        upgrade_request().replace(b"Upgrade: websocket", b"Upgrade: h2c"),
        400,
        "bad_request",
    ),
    (
        "upgrade with body",
        upgrade_request(extra=("Content-Length: 4",)) + b"abcd",
        400,
        "bad_request",
    ),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400, "bad_request"),
    (
        "smuggling framing",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
        "bad_request",
    ),
]


@pytest.mark.parametrize(
    ("name", "request_bytes", "status", "reason"), BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS]
)
async def test_bad_requests(
    make_proxy: ProxyFactory,
    echo_targets: list[EchoTarget],
    canary_factory: CanaryFactory,
    caplog: pytest.LogCaptureFixture,
    name: str,
    request_bytes: bytes,
    status: int,
    reason: str,
) -> None:
    proxy = await make_proxy(ws_config(("chat", [echo_targets[0].address])))
    address = listener_address(proxy)
    canary = await canary_factory(address)
    sessions = echo_targets[0].sessions
    with caplog.at_level(logging.INFO, logger="wsproxy.access"):
        response = await exchange_raw(address, request_bytes)
        assert status_of(response) == status
        if status == 426:
            assert b"Sec-WebSocket-Version: 13" in response
        if status == 405:
            assert b"Allow: GET" in response
        await canary.check()
        await wait_for(lambda: proxy.listeners["edge"].stats.rejected[reason] == 1)
    assert echo_targets[0].sessions == sessions, "nothing may reach the target"
    logged = [getattr(r, "connection", {}) for r in caplog.records if r.name == "wsproxy.access"]
    assert any(entry["reason"] == reason and entry["status"] == status for entry in logged)


async def test_head_not_complete_in_time(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], canary_factory: CanaryFactory
) -> None:
    proxy = await make_proxy(
        ws_config(
            ("chat", [echo_targets[0].address]), listener="request_head_timeout_seconds = 0.3"
        )
    )
    address = listener_address(proxy)
    canary = await canary_factory(address)
    response = await exchange_raw(address, b"GET / HTTP/1.1\r\nHost: slow")
    assert status_of(response) == 408
    await canary.check()
    assert proxy.listeners["edge"].stats.rejected["request_timeout"] == 1


async def test_slowloris_one_byte_at_a_time_still_parses(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    proxy = await make_proxy(ws_config(("chat", [echo_targets[0].address])))
    address = listener_address(proxy)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    for byte in upgrade_request():
        writer.write(bytes([byte]))
        await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    writer.close()


async def test_client_leaving_during_head_frees_the_slot(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    proxy = await make_proxy(ws_config(("chat", [echo_targets[0].address])))
    address = listener_address(proxy)
    _reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(b"GET / HTTP/1.1\r\n")
    await writer.drain()
    await wait_for(lambda: proxy.listeners["edge"].stats.active == 1)
    writer.close()
    await wait_for(lambda: proxy.listeners["edge"].stats.active == 0)


# --- targets that misbehave --------------------------------------------------------------------


@pytest.mark.parametrize("status", [426, 403, 500])
async def test_target_refusing_the_upgrade_is_forwarded_and_nothing_tunnelled(
    make_proxy: ProxyFactory,
    raw_servers: RawServers,
    echo_targets: list[EchoTarget],
    canary_factory: CanaryFactory,
    status: int,
) -> None:
    record: list[bytes] = []
    answer = (
        f"HTTP/1.1 {status} No\r\nContent-Length: 4\r\nConnection: keep-alive\r\n\r\nnope".encode()
    )
    server = await raw_servers(fixed_response(answer, record))
    listener = '[[listeners.edge.rules]]\npath_prefix = "/canary"\ntarget_group = "canary"'
    proxy = await make_proxy(
        ws_config(
            ("refuser", [server.address]),
            ("canary", [echo_targets[0].address]),
            listener=listener,
        )
    )
    address = listener_address(proxy)
    canary = await canary_factory(address)
    smuggled = b"GET /internal HTTP/1.1\r\nHost: x\r\n\r\n"
    frame = b"\x81\x85" + os.urandom(4) + b"hello"
    response = await exchange_raw(address, upgrade_request() + smuggled + frame)
    assert status_of(response) == status
    assert b"\r\nConnection: close\r\n" in response
    assert response.endswith(b"nope")
    await canary.check()
    received = b"".join(record)
    assert received.count(b"HTTP/1.1") == 1
    assert b"/internal" not in received and b"hello" not in received
    stats = proxy.listeners["edge"].stats
    assert stats.upgrades[("refuser", "rejected_by_target")] == 1


async def test_target_answering_101_with_a_wrong_accept_is_a_502(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    bogus = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n"
    )
    server = await raw_servers(fixed_response(bogus))
    proxy = await make_proxy(ws_config(("chat", [server.address])))
    response = await exchange_raw(listener_address(proxy), upgrade_request())
    assert status_of(response) == 502
    assert proxy.listeners["edge"].stats.rejected["bad_target_response"] == 1


async def test_target_that_accepts_then_closes_is_a_502(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    server = await raw_servers(accept_then_close)
    proxy = await make_proxy(ws_config(("chat", [server.address])))
    response = await exchange_raw(listener_address(proxy), upgrade_request())
    assert status_of(response) == 502
    assert proxy.listeners["edge"].stats.rejected["target_closed"] == 1


async def test_target_closing_before_answering_is_retried_elsewhere(
    make_proxy: ProxyFactory, raw_servers: RawServers, echo_targets: list[EchoTarget]
) -> None:
    server = await raw_servers(accept_then_close)
    proxy = await make_proxy(ws_config(("chat", [server.address, echo_targets[0].address])))
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            async with session.ws_connect(f"ws://{listener_address(proxy)}/") as ws:
                await ws.send_str("x")
                assert await ws.receive_str(timeout=5) == "x"
    assert echo_targets[0].sessions == 4


async def test_refused_target_is_skipped(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    dead = await closed_port()
    proxy = await make_proxy(ws_config(("chat", [dead, echo_targets[0].address])))
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            async with session.ws_connect(f"ws://{listener_address(proxy)}/") as ws:
                await ws.send_str("x")
                assert await ws.receive_str(timeout=5) == "x"
    assert proxy.target_groups["chat"].stats.connect_errors_by_reason()["refused"] >= 2


async def test_all_targets_refusing_is_a_502(make_proxy: ProxyFactory) -> None:
    dead = [await closed_port(), await closed_port()]
    proxy = await make_proxy(ws_config(("chat", dead)))
    response = await exchange_raw(listener_address(proxy), upgrade_request())
    assert status_of(response) == 502
    assert (
        proxy.target_groups["chat"].stats.connect_errors_by_reason()["refused"] == 3
    )  # a, b, a: never twice in a row


async def test_target_that_never_answers_is_a_504(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await raw_servers(silent)
    proxy = await make_proxy(
        ws_config(("chat", [server.address]), group_extra="handshake_timeout_seconds = 0.3")
    )
    response = await exchange_raw(listener_address(proxy), upgrade_request())
    assert status_of(response) == 504


async def test_group_without_targets_is_a_503(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(ws_config(("empty", [])))
    response = await exchange_raw(listener_address(proxy), upgrade_request())
    assert status_of(response) == 503
    assert proxy.listeners["edge"].stats.rejected["no_targets"] == 1


# --- frames after the 101 ----------------------------------------------------------------------


async def test_unmasked_client_frame_gets_1002(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], canary_factory: CanaryFactory
) -> None:
    proxy = await make_proxy(ws_config(("chat", [echo_targets[0].address])))
    address = listener_address(proxy)
    canary = await canary_factory(address)
    ws = await RawWebSocket.connect(address)
    ws.send(OP_TEXT, b"fine")
    assert await ws.recv() == (OP_TEXT, b"fine")
    ws.send(OP_TEXT, b"naked", masked=False)
    assert await ws.recv_close() == 1002
    await ws.closed()
    await canary.check()
    await wait_for(lambda: echo_targets[0].active == 1)  # only the canary is left


async def test_oversized_frame_gets_1009_and_target_1001(
    make_proxy: ProxyFactory, raw_servers: RawServers, canary_factory: CanaryFactory
) -> None:
    seen: list[bytes] = []
    target = upgrading_target(seen)

    server = await raw_servers(target)
    proxy = await make_proxy(
        ws_config(("chat", [server.address]), listener="max_frame_bytes = 1024")
    )
    ws = await RawWebSocket.connect(listener_address(proxy))
    ws.send(OP_BINARY, b"a" * 1024)
    ws.send(OP_BINARY, b"b" * 1025)
    assert await ws.recv_close() == 1009
    await ws.closed()
    received = b"".join(seen)
    # The target got the first frame whole, then a masked Close 1001, and nothing of the big one.
    from wsproxy.wire.wsframe import FrameTracker

    tracker = FrameTracker(masked=True, max_frame_bytes=2048)
    assert tracker.feed(received) == len(received)
    assert (tracker.frames, tracker.close_code) == (2, 1001)


async def test_client_vanishing_mid_frame_closes_the_target_connection(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], canary_factory: CanaryFactory
) -> None:
    proxy = await make_proxy(ws_config(("chat", [echo_targets[0].address])))
    address = listener_address(proxy)
    canary = await canary_factory(address)
    ws = await RawWebSocket.connect(address)
    frame = b"\x82\xfe\xff\xff" + os.urandom(4) + b"x" * 1000  # 65535-byte frame, 1000 bytes sent
    ws.writer.write(frame)
    await ws.writer.drain()
    await wait_for(lambda: echo_targets[0].active == 2)
    ws.abort()
    await wait_for(lambda: echo_targets[0].active == 1)
    await canary.check()
    await wait_for(lambda: proxy.listeners["edge"].stats.active == 1)


async def test_close_codes_pass_through(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    proxy = await make_proxy(ws_config(("chat", [echo_targets[0].address])))
    ws = await RawWebSocket.connect(listener_address(proxy))
    ws.writer.write(encode_close(4321, "done", mask=os.urandom(4)))
    assert await ws.recv_close() == 1000  # aiohttp's answer to any Close
    await ws.closed()
    await wait_for(lambda: proxy.listeners["edge"].stats.closes[("client", "4xxx")] == 1)


async def test_a_close_frame_split_across_reads_reaches_the_target_whole(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    """A Close whose status and reason come after its header, in another read, passes whole:
    the proxy used to drop the rest of the frame once its header had gone through."""
    seen: list[bytes] = []
    server = await raw_servers(upgrading_target(seen))
    proxy = await make_proxy(ws_config(("chat", [server.address])))
    ws = await RawWebSocket.connect(listener_address(proxy))
    close = encode_close(4000, "done here", mask=os.urandom(4))
    ws.writer.write(close[:6])  # the header and the mask key
    await ws.writer.drain()
    await asyncio.sleep(0.1)  # its own read at the proxy
    ws.writer.write(close[6:])

    def close_arrived() -> bool:
        tracker = FrameTracker(masked=True, max_frame_bytes=1024)
        received = b"".join(seen)
        return (
            tracker.feed(received) == len(received)
            and tracker.at_frame_boundary
            and (tracker.close_code == 4000)
        )

    await wait_for(close_arrived)
    assert b"".join(seen) == close
    ws.abort()
    stats = proxy.listeners["edge"].stats
    await wait_for(lambda: stats.active == 0)
    assert stats.closes[("client", "4xxx")] == 1


async def test_shutdown_sends_1001_at_a_message_boundary(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    proxy = await make_proxy(ws_config(("chat", [echo_targets[0].address])))
    clients = [await RawWebSocket.connect(listener_address(proxy)) for _ in range(3)]
    # One client is in the middle of a fragmented message when the drain starts.
    clients[0].send(OP_TEXT, b"part one ", fin=False)
    shutdown = asyncio.create_task(proxy.shutdown(grace=2.0))
    await asyncio.sleep(0.2)
    from wsproxy.wire.wsframe import OP_CONTINUATION

    clients[0].send(OP_CONTINUATION, b"part two")
    for ws in clients:
        code = await ws.recv_close(timeout=3)
        assert code == 1001
        ws.writer.write(encode_close(1001, mask=os.urandom(4)))
    for ws in clients:
        await ws.closed()
    await shutdown
    assert proxy.listeners["edge"].stats.active == 0


async def test_connection_log_line_is_json_with_every_field(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], caplog: pytest.LogCaptureFixture
) -> None:
    from wsproxy.ops.logs import CONNECTION_FIELDS, JsonFormatter

    proxy = await make_proxy(ws_config(("chat", [echo_targets[0].address])))
    with caplog.at_level(logging.INFO, logger="wsproxy.access"):
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"ws://{listener_address(proxy)}/x") as ws,
        ):
            await ws.send_str("x")
            await ws.receive_str(timeout=5)
        await wait_for(lambda: proxy.listeners["edge"].stats.active == 0)
    records = [r for r in caplog.records if r.name == "wsproxy.access"]
    assert len(records) == 1
    entry = json.loads(JsonFormatter().format(records[0]))
    assert set(CONNECTION_FIELDS) <= set(entry)
    fields = [key for key in entry if key in CONNECTION_FIELDS]
    assert fields == list(CONNECTION_FIELDS), "the documented field order"
    assert entry["target_group"] == "chat" and entry["close_code"] == 1000
    assert entry["target"] == str(echo_targets[0].address) and entry["host"]
    assert entry["path"] == "/x" and entry["status"] == 101
    assert entry["bytes_in"] > 0 and entry["bytes_out"] > 0


async def test_stalled_response_body_is_cut_at_the_idle_timeout(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    stall = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"
    server = await raw_servers(fixed_response(stall))
    proxy = await make_proxy(
        ws_config(("web", [server.address]), listener="idle_timeout_seconds = 0.4")
    )
    response = await exchange_raw(listener_address(proxy), b"GET / HTTP/1.1\r\nHost: w\r\n\r\n")
    assert status_of(response) == 200 and response.endswith(b"partial")
    await wait_for(lambda: proxy.listeners["edge"].stats.active == 0)


async def test_slow_upload_is_not_a_silent_target(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    proxy = await make_proxy(
        ws_config(("web", [echo_targets[0].address]), group_extra="handshake_timeout_seconds = 0.3")
    )
    address = listener_address(proxy)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: w\r\nContent-Length: 50\r\n\r\n")
    for _ in range(5):  # 0.75 s of upload: longer than the 0.3 s handshake timeout
        await asyncio.sleep(0.15)
        writer.write(b"x" * 10)
    response = await asyncio.wait_for(reader.read(), 5)
    assert status_of(response) == 200
    assert b"body=50 bytes" in response
    writer.close()


async def test_error_response_survives_a_client_still_sending(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    # Without a lingering close the unread input would turn our close into a TCP reset that can
    # destroy the 431 before the client reads it.
    proxy = await make_proxy(ws_config(("chat", [echo_targets[0].address])))
    address = listener_address(proxy)
    for _ in range(5):
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Flood: " + b"a" * 300_000)
        response = await asyncio.wait_for(reader.read(), 5)
        assert status_of(response) == 431
        writer.close()


async def test_both_legs_of_a_session_have_nagle_off(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    """Small frames must not wait for Nagle's algorithm; uvloop sets TCP_NODELAY itself, which
    the relay relies on (it no longer sets it per connection)."""
    proxy = await make_proxy(ws_config(("echo", [echo_targets[0].address])))
    address = listener_address(proxy)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://{address}/nagle") as ws,
    ):
        await ws.send_str("x")
        assert await ws.receive_str(timeout=5) == "x"
        (flow,) = proxy.listeners["edge"].flows
        assert flow.target_endpoint is not None
        for endpoint in (flow.client, flow.target_endpoint):
            assert endpoint.transport is not None
            sock = endpoint.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
