"""Bad input to an API listener, one row per input (issue 14, "Bad input"), each beside a canary:
a second API connection that keeps exchanging messages in order before, during and after it and
must see every answer intact.

Three tables: what a client sends (message contents and frames), what integrations answer, and
what management calls ask. Each row names the outcome a client or backend sees (a route, a close
code, an HTTP status, the ``error`` of the error message) and what the proxy counts or logs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import random
import socket
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosedError

from tests.conftest import ProxyFactory, listener_address
from tests.helpers.api_backend import ApiCanary, Backend, Handler, admin_base, api_config, url
from tests.helpers.servers import Handler as RawHandler
from tests.helpers.wsraw import RawWebSocket, upgrade_request
from wsproxy.address import Address
from wsproxy.config import parse_config
from wsproxy.errors import ApiError, Reason
from wsproxy.proxy import Proxy
from wsproxy.wire.wsframe import OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_TEXT

OP_CONT = OP_CONTINUATION

ACCESS = "wsproxy.access"

ECHO_ROUTES = """
[[apis.chat.routes]]
key = "$default"
target_group = "backend"
path = "/default"
respond = true

[[apis.chat.routes]]
key = "sendmessage"
target_group = "backend"
path = "/messages"
respond = true
"""


def connection_lines(caplog: pytest.LogCaptureFixture, path: str = "/bad") -> list[dict[str, Any]]:
    """The connection log lines so far of connections to ``path`` (the canary uses another)."""
    lines = [r.__dict__["connection"] for r in caplog.records if r.name == ACCESS]
    return [line for line in lines if line["path"] == path]


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# --- message contents -----------------------------------------------------------------------

FRAME_LIMIT = 200_000
MESSAGE_LIMIT = 600_000
CONTENT_LIMITS = f"max_frame_bytes = {FRAME_LIMIT}\nmax_message_bytes = {MESSAGE_LIMIT}\n"
NESTED = '"$request.body.a.b"'

Frames = tuple[tuple[int, bytes, bool], ...]  # (opcode, payload, fin)


def message(opcode: int, payload: bytes, size: int = 65536) -> Frames:
    """``payload`` as one message in frames of at most ``size`` bytes."""
    parts = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
    return tuple(
        (opcode if i == 0 else OP_CONT, part, i == len(parts) - 1) for i, part in enumerate(parts)
    )


def text(value: str | bytes, size: int = 65536) -> Frames:
    return message(OP_TEXT, value.encode() if isinstance(value, str) else value, size)


DEEP = b"[" * 100_000
DEEP_OBJECT = b'{"action":"sendmessage","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
HUGE_STRING = json.dumps({"action": "sendmessage", "text": "x" * (MESSAGE_LIMIT - 100)}).encode()
HUGE_LIST = b'{"action":"sendmessage","list":[' + b",".join([b"0"] * 290_000) + b"]}"


@dataclass(frozen=True)
class Content:
    """A message a client sends and what becomes of it: routed (``route``, the backend path
    that saw it, whose echo the client gets back as ``echo``) or refused (``close``, with the
    connection log's ``reason``)."""

    id: str
    frames: Frames
    route: str | None = None  # the route key it went to
    close: int | None = None
    reason: Reason | None = None
    # The proxy refuses it while the client is still sending it: see
    # test_a_client_still_sending_reads_the_close for why the client may see a reset instead.
    sending: bool = False
    expression: str = '"$request.body.action"'

    @property
    def payload(self) -> bytes:
        return b"".join(part for _, part, _ in self.frames)


def routed(id: str, frames: Frames, route: str = "$default", expression: str = "") -> Content:
    return Content(id, frames, route=route, expression=expression or Content.expression)


def closed(id: str, frames: Frames, code: int, reason: Reason, sending: bool = False) -> Content:
    return Content(id, frames, close=code, reason=reason, sending=sending)


RESET = -1


async def close_code(client: RawWebSocket) -> int:
    """The code of the Close the proxy sent (answered with the same code), or ``RESET`` when
    the connection was reset before the client could read it."""
    try:
        code = await client.recv_close()
    except ConnectionResetError:
        return RESET
    client.send(OP_CLOSE, code.to_bytes(2, "big"))
    return code


CONTENTS: list[Any] = [
    routed("not-json", text("hello, not json")),
    routed("not-json-binary", message(OP_BINARY, b"\x00\xff{")),
    routed("truncated-json", text('{"action": "sendmessage"')),
    routed("json-array", text('["sendmessage"]')),
    routed("json-string", text('"sendmessage"')),
    routed("json-number", text("42")),
    routed("json-null", text("null")),
    routed("action-missing", text('{"text": "hi"}')),
    routed("action-number", text('{"action": 1}')),
    routed("action-null", text('{"action": null}')),
    routed("action-list", text('{"action": ["sendmessage"]}')),
    routed("action-object", text('{"action": {"sendmessage": 1}}')),
    routed("action-unknown", text('{"action": "nosuchroute"}')),
    routed("action-reserved", text('{"action": "$connect"}')),
    routed("action-case", text('{"action": "SendMessage"}')),
    routed("action-ok", text('{"action": "sendmessage"}'), "sendmessage"),
    routed("action-ok-binary", message(OP_BINARY, b'{"action": "sendmessage"}'), "sendmessage"),
    routed("nested-missing", text('{"a": {}}'), expression=NESTED),
    routed("nested-not-object", text('{"a": "sendmessage"}'), expression=NESTED),
    routed("nested-not-string", text('{"a": {"b": 1}}'), expression=NESTED),
    routed("nested-top-level-only", text('{"b": "sendmessage"}'), expression=NESTED),
    routed("nested-ok", text('{"a": {"b": "sendmessage"}}'), "sendmessage", NESTED),
    routed("deep-array-100k", text(DEEP)),
    routed("deep-object-100k", text(DEEP_OBJECT)),
    routed("huge-string", text(HUGE_STRING), "sendmessage"),
    routed("huge-list", text(HUGE_LIST), "sendmessage"),
    routed(
        "utf8-split-across-fragments", ((OP_TEXT, b"\xe2\x82", False), (OP_CONT, b"\xac", True))
    ),
    routed("invalid-utf8-in-binary", message(OP_BINARY, b"\xff\xfe")),
    routed("frame-at-limit", message(OP_BINARY, b"b" * FRAME_LIMIT, FRAME_LIMIT)),
    routed("message-at-limit", message(OP_BINARY, b"m" * MESSAGE_LIMIT)),
    closed("utf8-invalid-byte", text(b"\xff"), 1007, Reason.WS_INVALID_UTF8),
    closed("utf8-truncated", text(b"caf\xc3"), 1007, Reason.WS_INVALID_UTF8),
    closed("utf8-overlong", text(b"\xc0\xaf"), 1007, Reason.WS_INVALID_UTF8),
    closed("utf8-surrogate", text(b"\xed\xa0\x80"), 1007, Reason.WS_INVALID_UTF8),
    closed(
        "utf8-invalid-last-fragment",
        ((OP_TEXT, b"hello ", False), (OP_CONT, b"\xff", True)),
        1007,
        Reason.WS_INVALID_UTF8,
    ),
    closed(
        "utf8-truncated-at-the-end",
        ((OP_TEXT, b"hello ", False), (OP_CONT, b"\xe2\x82", True)),
        1007,
        Reason.WS_INVALID_UTF8,
    ),
    # Fail fast (Autobahn 6.4): the first fragment is already invalid; no final one follows.
    closed(
        "utf8-invalid-first-fragment", ((OP_TEXT, b"\xff", False),), 1007, Reason.WS_INVALID_UTF8
    ),
    pytest.param(
        closed(
            "frame-over-limit",
            message(OP_BINARY, b"f" * (FRAME_LIMIT + 1), FRAME_LIMIT + 1),
            1009,
            Reason.WS_FRAME_TOO_LARGE,
            sending=True,
        ),
        id="frame-over-limit",
    ),
    closed(
        "message-over-limit-in-fragments",
        message(OP_BINARY, b"m" * (MESSAGE_LIMIT + 1)),
        1009,
        Reason.WS_MESSAGE_TOO_LARGE,
        sending=True,
    ),
    closed(
        "text-message-over-limit-in-fragments",
        text(b"t" * (MESSAGE_LIMIT + 1)),
        1009,
        Reason.WS_MESSAGE_TOO_LARGE,
        sending=True,
    ),
]


def short(payload: bytes) -> bytes:
    """What ``short_echo`` answers to ``payload``."""
    return payload if len(payload) <= 4096 else hashlib.sha256(payload).hexdigest().encode()


async def short_echo(request: web.Request) -> web.StreamResponse:
    """An echo, but of a digest for a large message: these rows are about how a message is
    routed; how a large answer comes back is a row of the integration table."""
    return web.Response(body=short(await request.read()), content_type=request.content_type)


def content_config(backend: Backend, expression: str) -> str:
    extra = f"route_selection_expression = {expression}\n{CONTENT_LIMITS}"
    return api_config(backend.address, ECHO_ROUTES, extra)


@pytest.mark.parametrize("row", CONTENTS, ids=lambda row: getattr(row, "id", None))
async def test_message_contents(
    row: Content,
    make_proxy: ProxyFactory,
    backend: Backend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await make_proxy(content_config(backend, row.expression))
    api = proxy.apis["chat"]
    backend.handlers["/default"] = backend.handlers["/messages"] = short_echo
    with caplog.at_level(logging.INFO, logger=ACCESS):
        async with ApiCanary.running(proxy) as canary:
            canary_id = backend.calls[0][1]["ce-connectionid"]
            client = await RawWebSocket.connect(listener_address(proxy), "/bad")
            for opcode, part, fin in row.frames:
                client.send(opcode, part, fin=fin)
            await client.writer.drain()
            if row.close is None:
                opcode, answer = await client.recv(timeout=10)
                assert opcode == row.frames[0][0]
                assert answer == short(row.payload)  # the route's echo
                client.send(OP_CLOSE, (1000).to_bytes(2, "big"))
                assert await client.recv_close() == 1000
            else:
                assert await close_code(client) in (row.close, RESET if row.sending else None)
            with contextlib.suppress(ConnectionError):
                await client.closed()
            client.writer.close()  # the proxy closed: so does the client (RFC 6455 §7.1.1)
            await wait_until(lambda: bool(connection_lines(caplog)))
            await canary.finish()
    (line,) = connection_lines(caplog)  # the canary's connection is still open
    calls = [
        (p, body) for p, headers, body in backend.calls if headers["ce-connectionid"] != canary_id
    ]
    if row.close is None:
        path = "/messages" if row.route == "sendmessage" else "/default"
        assert calls == [(path, row.payload)]
        expected_in = 1 + (canary.exchanged if row.route == "$default" else 0)
        assert api.stats.messages[(row.route or "", "in")] == expected_in
        assert line["reason"] == Reason.CLOSED.value
        assert line["close_code"] == 1000
    else:
        assert calls == []  # nothing of the refused message reached an integration
        assert line["close_code"] == row.close
        assert row.reason is not None and line["reason"] == row.reason.value
    assert not api.stats.errors


def bomb_payload() -> bytes:
    return b"\x00" * (MESSAGE_LIMIT * 16)  # deflates to a few KiB: under max_frame_bytes


@pytest.mark.parametrize("fragmented", [False, True], ids=["one-frame", "fragments"])
async def test_a_deflate_bomb_gets_1009(
    fragmented: bool,
    make_proxy: ProxyFactory,
    backend: Backend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """permessage-deflate is negotiated, and inflation is bounded by max_message_bytes."""
    proxy = await make_proxy(content_config(backend, '"$request.body.action"'))
    payload = bomb_payload()
    assert len(zlib.compress(payload)) < FRAME_LIMIT
    with caplog.at_level(logging.INFO, logger=ACCESS):
        async with (
            ApiCanary.running(proxy) as canary,
            ws_connect(url(proxy, "/bad"), compression="deflate", max_size=None) as ws,
        ):
            assert ws.response is not None
            assert "permessage-deflate" in ws.response.headers["Sec-WebSocket-Extensions"]
            await ws.send(b'{"action": "sendmessage", "small": "compressed"}')
            assert await ws.recv() == b'{"action": "sendmessage", "small": "compressed"}'
            if fragmented:
                chunk = MESSAGE_LIMIT // 4
                await ws.send([payload[i : i + chunk] for i in range(0, len(payload), chunk)])
            else:
                await ws.send(payload)
            with pytest.raises(ConnectionClosedError) as closed_info:
                await ws.recv()
            assert closed_info.value.rcvd is not None and closed_info.value.rcvd.code == 1009
            await wait_until(lambda: bool(connection_lines(caplog)))
            await canary.finish()
    (line,) = connection_lines(caplog)
    assert line["close_code"] == 1009
    assert line["reason"] == Reason.WS_MESSAGE_TOO_LARGE.value
    assert all(len(body) < MESSAGE_LIMIT for _, _, body in backend.calls)


async def test_a_client_still_sending_reads_the_close(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    """A frame far over max_frame_bytes: the proxy refuses it at its header, while the client
    is still writing it; the client must still read the Close 1009 (RFC 6455 §7.1.1)."""
    proxy = await make_proxy(content_config(backend, '"$request.body.action"'))
    async with ApiCanary.running(proxy) as canary:
        client = await RawWebSocket.connect(listener_address(proxy), "/bad")
        client.send(OP_BINARY, b"f" * (20 * FRAME_LIMIT))
        await client.writer.drain()
        assert await client.recv_close() == 1009
        await canary.finish()


# --- integrations ---------------------------------------------------------------------------

TIMEOUT = 0.5  # integration_timeout_seconds: a call that never answers fails within it


@pytest.fixture
def closed_port() -> Iterator[Address]:
    """An address where nothing listens: bound (so no other test can take it) but not
    listening, so a connect is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        host, port = sock.getsockname()
        yield Address(host, port)


def status(code: int, body: bytes = b"") -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=code, body=body, content_type="text/plain")

    return handler


async def never(request: web.Request) -> web.StreamResponse:
    await asyncio.Event().wait()  # cancelled when the backend stops
    raise AssertionError("unreachable")


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"garbage, not HTTP at all\r\n\r\n")
    await writer.drain()


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")  # then close without a word


async def short_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """10 bytes of the 100 its Content-Length promises, then nothing (until the proxy leaves)."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nten bytes!")
    await writer.drain()
    await reader.read()


def trickle(body: bytes, chunk: int = 16384) -> Handler:
    """A 200 whose body arrives in pieces, as from a real backend that streams it (a pause
    between pieces so they reach the proxy in separate reads)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(body)
        await response.prepare(request)
        for i in range(0, len(body), chunk):
            await response.write(body[i : i + chunk])
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    return handler


@dataclass(frozen=True)
class Failing:
    """An integration that fails a message's call, and the ``error`` the client gets."""

    id: str
    error: ApiError
    handler: Handler | None = None  # how the backend answers /bad
    raw: RawHandler | None = None  # or a raw TCP server answering instead
    down: bool = False  # or nothing listening
    backend_calls: int = 1  # calls the backend saw: 1, as only connect failures are retried


FAILING: list[Any] = [
    Failing("400", ApiError.INTEGRATION_ERROR, status(400, b"bad request")),
    Failing("403", ApiError.INTEGRATION_ERROR, status(403)),
    Failing("404", ApiError.INTEGRATION_ERROR, status(404)),
    Failing("429", ApiError.INTEGRATION_ERROR, status(429)),
    Failing("500", ApiError.INTEGRATION_ERROR, status(500, b"internal error")),
    Failing("502", ApiError.INTEGRATION_ERROR, status(502)),
    Failing("503", ApiError.INTEGRATION_ERROR, status(503)),
    pytest.param(
        Failing("body-over-max-message-bytes", ApiError.INTEGRATION_ERROR, trickle(b"x" * 131073)),
        id="body-over-max-message-bytes",
    ),
    Failing("never-answers", ApiError.INTEGRATION_TIMEOUT, never),
    Failing("garbage", ApiError.INTEGRATION_ERROR, raw=garbage, backend_calls=0),
    Failing("hangs-up", ApiError.INTEGRATION_ERROR, raw=hang_up, backend_calls=0),
    pytest.param(
        Failing("body-shorter", ApiError.INTEGRATION_TIMEOUT, raw=short_body, backend_calls=0),
        id="body-shorter-than-its-length",
    ),
    Failing("target-down", ApiError.UNAVAILABLE, down=True, backend_calls=0),
]

BAD_ROUTE = """
[[apis.chat.routes]]
key = "bad"
target_group = "{group}"
path = "/bad"
respond = true
"""


def group(name: str, address: Address) -> str:
    return f"""
[target_groups.{name}]
protocol = "http"
targets = [{{ address = "{address}" }}]
"""


async def error_message(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    value = json.loads(await ws.receive_str(timeout=10))
    assert isinstance(value, dict)
    assert set(value) == {"message", "error", "connectionId", "requestId"}
    return value


@pytest.mark.parametrize("row", FAILING, ids=lambda row: getattr(row, "id", None))
async def test_failing_integrations(
    row: Failing,
    make_proxy: ProxyFactory,
    backend: Backend,
    raw_servers: Any,
    closed_port: Address,
) -> None:
    """The client gets one error message; the session stays open; counted by route and reason."""
    extra = ""
    target_group = "backend"
    if row.raw is not None:
        server = await raw_servers(row.raw)
        extra, target_group = group("other", server.address), "other"
    elif row.down:
        extra, target_group = group("other", closed_port), "other"
    elif row.handler is not None:
        backend.handlers["/bad"] = row.handler
    routes = ECHO_ROUTES + BAD_ROUTE.format(group=target_group)
    proxy = await make_proxy(
        api_config(backend.address, routes, f"integration_timeout_seconds = {TIMEOUT}", extra)
    )
    api = proxy.apis["chat"]
    async with (
        ApiCanary.running(proxy) as canary,
        aiohttp.ClientSession() as session,
        session.ws_connect(url(proxy, "/bad")) as ws,
    ):
        await ws.send_str('{"action": "bad"}')
        error = await error_message(ws)
        assert error["error"] == row.error.value
        await ws.send_str("still open")  # the session stays open
        assert await ws.receive_str(timeout=10) == "still open"
        await canary.finish()
    assert backend.paths().count("/bad") == row.backend_calls
    assert api.stats.errors == {("bad", row.error): 1}
    assert api.stats.messages[("bad", "in")] == 1
    assert api.stats.messages[("bad", "out")] == 0


async def test_a_large_answer_reaches_the_client_whole(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    body = bytes(range(256)) * (131072 // 256)  # max_message_bytes exactly

    backend.handlers["/bad"] = trickle(body)
    proxy = await make_proxy(
        api_config(backend.address, ECHO_ROUTES + BAD_ROUTE.format(group="backend"))
    )
    async with (
        ApiCanary.running(proxy) as canary,
        aiohttp.ClientSession() as session,
        session.ws_connect(url(proxy, "/bad")) as ws,
    ):
        await ws.send_str('{"action": "bad"}')
        assert await ws.receive_bytes(timeout=10) == body
        await canary.finish()


async def test_a_connect_failure_is_retried_on_another_target(
    make_proxy: ProxyFactory, backend: Backend, closed_port: Address
) -> None:
    mixed = f"""
[target_groups.mixed]
protocol = "http"
algorithm = "round_robin"
targets = [{{ address = "{closed_port}" }}, {{ address = "{backend.address}" }}]
"""
    proxy = await make_proxy(
        api_config(backend.address, ECHO_ROUTES + BAD_ROUTE.format(group="mixed"), "", mixed)
    )
    async with (
        ApiCanary.running(proxy) as canary,
        aiohttp.ClientSession() as session,
        session.ws_connect(url(proxy, "/bad")) as ws,
    ):
        for i in range(4):
            await ws.send_str(json.dumps({"action": "bad", "i": i}))
            assert json.loads(await ws.receive_str(timeout=10)) == {"action": "bad", "i": i}
        await canary.finish()
    assert backend.paths().count("/bad") == 4


# --- $connect and $disconnect ---------------------------------------------------------------

CONNECT_ROUTE = """
[[apis.chat.routes]]
key = "$connect"
target_group = "{group}"
path = "/connect"
"""


def chooses(protocol: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=200, headers={"Sec-WebSocket-Protocol": protocol})

    return handler


@dataclass(frozen=True)
class Refusal:
    """A ``$connect`` that refuses or fails, and the HTTP answer the client gets instead of 101."""

    id: str
    status: int
    reason: Reason
    error: ApiError | None  # counted under route $connect
    handler: Handler | None = None
    raw: RawHandler | None = None
    down: bool = False
    body: bytes | None = None  # the body the client gets, when it must be exactly that


REFUSALS = [
    Refusal(
        "403-with-body",
        403,
        Reason.CONNECT_REJECTED,
        ApiError.INTEGRATION_ERROR,
        status(403, b"go away: no token"),
        body=b"go away: no token",
    ),
    Refusal(
        "401-body-capped",
        401,
        Reason.CONNECT_REJECTED,
        ApiError.INTEGRATION_ERROR,
        status(401, b"y" * 100_000),
        body=b"y" * 4096,
    ),
    Refusal("500", 500, Reason.CONNECT_REJECTED, ApiError.INTEGRATION_ERROR, status(500)),
    Refusal(
        "never-answers", 504, Reason.TARGET_HANDSHAKE_TIMEOUT, ApiError.INTEGRATION_TIMEOUT, never
    ),
    Refusal("target-down", 503, Reason.NO_TARGETS, ApiError.UNAVAILABLE, down=True),
    Refusal("garbage", 502, Reason.BAD_TARGET_RESPONSE, ApiError.INTEGRATION_ERROR, raw=garbage),
    Refusal(
        "protocol-not-offered",
        502,
        Reason.BAD_TARGET_RESPONSE,
        ApiError.INTEGRATION_ERROR,
        chooses("c"),
    ),
    Refusal(
        "protocol-list-chosen",
        502,
        Reason.BAD_TARGET_RESPONSE,
        ApiError.INTEGRATION_ERROR,
        chooses("a, b"),
    ),
]


async def upgrade(proxy: Proxy, extra: tuple[str, ...] = ()) -> tuple[int, bytes, bytes]:
    """Ask for an upgrade on path /bad; the answer's status, head and body (read to EOF: a
    refusal closes the connection)."""
    address = listener_address(proxy)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    try:
        writer.write(upgrade_request("/bad", extra=extra))
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.read() if not head.startswith(b"HTTP/1.1 101") else b""
    finally:
        writer.close()
    return int(head.split(b" ", 2)[1]), head, body


async def replace_target(proxy: Proxy, name: str, old: Address, new: Address) -> None:
    """Through the admin API: register ``new`` in group ``name``, deregister ``old``."""
    base = admin_base(proxy)
    async with aiohttp.ClientSession() as session:
        targets = f"{base}/v1/target-groups/{name}/targets"
        async with session.post(targets, json={"address": str(new)}) as response:
            assert response.status == 201, await response.text()
        async with session.delete(f"{targets}/{old}") as response:
            assert response.status == 202, await response.text()


def only_the_bad(handler: Handler) -> Handler:
    """``handler`` for the upgrade on /bad; the canary (on /canary) is let in."""

    async def choose(request: web.Request) -> web.StreamResponse:
        if json.loads(await request.read())["path"] == "/bad":
            return await handler(request)
        return web.Response(status=200)

    return choose


@pytest.mark.parametrize("row", REFUSALS, ids=lambda row: row.id)
async def test_connect_refusals(
    row: Refusal,
    make_proxy: ProxyFactory,
    backend: Backend,
    raw_servers: Any,
    closed_port: Address,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # $connect goes to group "other": first the backend, which lets the canary in; then the
    # row's target replaces it (registered, the backend deregistered: draining, so new
    # connections go to the row's target only).
    bad_target: Address | None = None
    if row.raw is not None:
        bad_target = (await raw_servers(row.raw)).address
    elif row.down:
        bad_target = closed_port
    elif row.handler is not None:
        backend.handlers["/connect"] = only_the_bad(row.handler)
    routes = ECHO_ROUTES + CONNECT_ROUTE.format(group="other")
    settings = f"integration_timeout_seconds = {TIMEOUT}"
    extra = group("other", backend.address)
    proxy = await make_proxy(api_config(backend.address, routes, settings, extra))
    api = proxy.apis["chat"]
    with caplog.at_level(logging.INFO, logger=ACCESS):
        async with ApiCanary.running(proxy) as canary:
            if bad_target is not None:
                await replace_target(proxy, "other", backend.address, bad_target)
            code, head, body = await upgrade(proxy, ("Sec-WebSocket-Protocol: a, b",))
            assert code == row.status, head
            assert b"Connection: close" in head
            if row.body is not None:
                assert body == row.body
            await wait_until(lambda: bool(connection_lines(caplog)))
            await canary.finish()
    (line,) = connection_lines(caplog)
    assert line["reason"] == row.reason.value
    assert line["status"] == row.status
    assert api.stats.errors == ({("$connect", row.error): 1} if row.error else {})
    assert len(api.registry) == 0  # the canary has left too


async def test_connect_choosing_an_offered_protocol_gets_it(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    """The control row of the two above: a protocol the client offered is accepted."""
    backend.handlers["/connect"] = only_the_bad(chooses("b"))
    routes = ECHO_ROUTES + CONNECT_ROUTE.format(group="backend")
    proxy = await make_proxy(api_config(backend.address, routes))
    code, head, _ = await upgrade(proxy, ("Sec-WebSocket-Protocol: a, b",))
    assert code == 101, head
    assert b"Sec-WebSocket-Protocol: b\r\n" in head


DISCONNECT_ROUTE = """
[[apis.chat.routes]]
key = "$disconnect"
target_group = "{group}"
path = "/disconnect"
"""


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("target-down", ApiError.UNAVAILABLE),
        ("500", ApiError.INTEGRATION_ERROR),
        ("never-answers", ApiError.INTEGRATION_TIMEOUT),
    ],
)
async def test_a_failing_disconnect_never_delays_the_close(
    case: str,
    error: ApiError,
    make_proxy: ProxyFactory,
    backend: Backend,
    closed_port: Address,
) -> None:
    """$disconnect runs after the close; its failure is counted. The integration timeout is
    long here (20 s) so that a close that waited for it would not end within the bound."""
    extra, target_group = "", "backend"
    if case == "target-down":
        extra, target_group = group("other", closed_port), "other"
    elif case == "500":
        backend.handlers["/disconnect"] = status(500)
    else:
        backend.handlers["/disconnect"] = never
    routes = ECHO_ROUTES + DISCONNECT_ROUTE.format(group=target_group)
    proxy = await make_proxy(
        api_config(backend.address, routes, "integration_timeout_seconds = 20", extra)
    )
    api = proxy.apis["chat"]
    async with ApiCanary.running(proxy) as canary, aiohttp.ClientSession() as session:
        ws = await session.ws_connect(url(proxy, "/bad"))
        await ws.send_str("hello")
        assert await ws.receive_str(timeout=10) == "hello"
        async with asyncio.timeout(5):  # well within the integration's 20 s
            assert await ws.close()
            assert ws.close_code == 1000
            await wait_until(lambda: len(api.registry) == 1)  # the canary's only
        if case != "never-answers":
            await wait_until(lambda: api.stats.errors[("$disconnect", error)] == 1)
        await canary.finish()
    if case == "never-answers":
        assert backend.paths().count("/disconnect") == 1  # called, and still waiting


# --- management API -------------------------------------------------------------------------

WHOAMI_ROUTE = """
[[apis.chat.routes]]
key = "whoami"
target_group = "backend"
path = "/whoami"
respond = true
"""


async def whoami(request: web.Request) -> web.StreamResponse:
    return web.Response(text=request.headers["ce-connectionid"])


async def management_proxy(make_proxy: ProxyFactory, backend: Backend, extra: str = "") -> Proxy:
    backend.handlers["/whoami"] = whoami
    return await make_proxy(api_config(backend.address, ECHO_ROUTES + WHOAMI_ROUTE, extra))


async def connection_id(ws: aiohttp.ClientWebSocketResponse) -> str:
    await ws.send_str('{"action": "whoami"}')
    return await ws.receive_str(timeout=10)


def respell(cid: str, change: Callable[[bytearray], None]) -> str:
    raw = bytearray(base64.urlsafe_b64decode(cid))
    change(raw)
    return base64.urlsafe_b64encode(bytes(raw)).decode()


def bad_ids(live: str, ended: str) -> dict[str, str]:
    """Ids that name no live connection of this proxy, by kind."""
    return {
        "unknown": respell(live, lambda raw: raw.__setitem__(slice(6, 18), bytes(12))),
        "ended": ended,
        "other-instance": respell(live, lambda raw: raw.__setitem__(slice(1, 5), b"\xff" * 4)),
        "other-version": respell(live, lambda raw: raw.__setitem__(0, 2)),
        "too-short": live[:-1],
        "too-long": live + "A",
        "tiny": "x",
        "huge": "A" * 4000,
        "bad-base64": "!" * 24,
        "padded": live[:22] + "==",
        "standard-alphabet": "+" * 24,
        "non-ascii": "é" * 24,
        "nul": "%00" * 24,
    }


OPERATIONS = [
    ("post_connection", "POST", "/@connections/{}"),
    ("get_connection", "GET", "/@connections/{}"),
    ("delete_connection", "DELETE", "/@connections/{}"),
    ("join_group", "PUT", "/@groups/room/connections/{}"),
    ("leave_group", "DELETE", "/@groups/room/connections/{}"),
]


async def test_ids_that_name_no_live_connection_get_410(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    proxy = await management_proxy(make_proxy, backend)
    base = admin_base(proxy)
    async with ApiCanary.running(proxy) as canary, aiohttp.ClientSession() as session:
        async with session.ws_connect(url(proxy, "/gone")) as gone:
            ended = await connection_id(gone)
        async with session.ws_connect(url(proxy, "/bad")) as ws:
            live = await connection_id(ws)
            await wait_until(lambda: len(proxy.apis["chat"].registry) == 2)
            for kind, cid in bad_ids(live, ended).items():
                for _, method, path in OPERATIONS:
                    target = base + path.format(cid.replace("%", "%25") if kind != "nul" else cid)
                    if kind == "non-ascii":
                        target = base + path.format(urllib.parse.quote(cid))
                    async with session.request(method, target, data=b"x") as response:
                        assert response.status == 410, (kind, method, path)
                        assert "error" in await response.json()
            # The live connection saw none of it and still works.
            await ws.send_str("still here")
            assert await ws.receive_str(timeout=10) == "still here"
        await canary.finish()
    requests = proxy.management.requests
    for operation, _, _ in OPERATIONS:
        assert requests[(operation, 410)] == len(bad_ids(live, ended))


async def test_an_oversized_post_gets_413(make_proxy: ProxyFactory, backend: Backend) -> None:
    """Over max_message_bytes (default 128 KiB), with a Content-Length and chunked without."""
    limit = 131072
    proxy = await management_proxy(make_proxy, backend)
    base = admin_base(proxy)

    async def chunked(size: int) -> AsyncIterator[bytes]:
        for _ in range(size // 8192):
            yield b"c" * 8192
        yield b"c" * (size % 8192)

    async with ApiCanary.running(proxy) as canary, aiohttp.ClientSession() as session:
        async with session.ws_connect(url(proxy, "/bad")) as ws:
            cid = await connection_id(ws)
            join = f"{base}/@groups/room/connections/{cid}"
            async with session.put(join) as response:
                assert response.status == 204
            for target in (f"{base}/@connections/{cid}", f"{base}/@groups/room"):
                async with session.post(target, data=b"L" * (limit + 1)) as response:
                    assert response.status == 413
                async with session.post(target, data=chunked(limit + 1)) as response:
                    assert response.status == 413
                async with session.post(target, data=chunked(10 * limit)) as response:
                    assert response.status == 413
                # The control: exactly the limit is delivered, whole, and nothing else came.
                async with session.post(target, data=b"E" * limit) as response:
                    assert response.status == 200
                assert await ws.receive_bytes(timeout=10) == b"E" * limit
            await ws.send_str("still here")
            assert await ws.receive_str(timeout=10) == "still here"
        await canary.finish()
    assert proxy.management.requests[("post_connection", 413)] == 3
    assert proxy.management.requests[("post_group", 413)] == 3


async def test_a_slow_client_gets_429_and_the_proxy_buffers_a_bounded_amount(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    """A client that stops reading: POSTs are taken until its send buffer passes
    max_send_buffer_bytes, then 429 with Retry-After; what the proxy holds for it stays near
    that bound; a group send drops it (dropped_slow); once it reads again it gets every
    accepted message, whole and in order."""
    buffer_limit = 256 * 1024
    message = 64 * 1024
    proxy = await management_proxy(make_proxy, backend, f"max_send_buffer_bytes = {buffer_limit}\n")
    api = proxy.apis["chat"]
    base = admin_base(proxy)
    address = listener_address(proxy)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (address.host, address.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=message)
    slow = RawWebSocket(reader, writer)
    writer.write(upgrade_request("/slow"))
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    slow.send(OP_TEXT, b'{"action": "whoami"}')
    _, raw_id = await slow.recv()
    cid = raw_id.decode()
    accepted = 0
    async with ApiCanary.running(proxy) as canary, aiohttp.ClientSession() as session:
        async with session.put(f"{base}/@groups/room/connections/{cid}") as response:
            assert response.status == 204
        for i in range(2000):  # bounded: kernel buffers plus the limit are far less
            payload = i.to_bytes(4, "big") + b"s" * (message - 4)
            async with session.post(f"{base}/@connections/{cid}", data=payload) as response:
                if response.status == 429:
                    assert response.headers["Retry-After"].isdigit()
                    break
                assert response.status == 200
                accepted += 1
        else:
            raise AssertionError("no 429 after 2000 messages to a client that does not read")
        assert accepted > buffer_limit // message  # the kernel's buffers took some too
        flow = api.registry.get(cid)
        assert flow is not None
        transport = flow.client.transport  # type: ignore[attr-defined]
        held = transport.get_write_buffer_size()
        assert buffer_limit < held <= buffer_limit + message + 64
        async with session.post(f"{base}/@groups/room", data=b"to all") as response:
            assert await response.json() == {"delivered": 0, "dropped_slow": 1}
        assert transport.get_write_buffer_size() == held  # nothing more was taken
        await canary.finish()
    for i in range(accepted):  # reading again: every accepted message, whole and in order
        opcode, payload = await slow.recv(timeout=10)
        assert opcode == OP_BINARY
        assert payload == i.to_bytes(4, "big") + b"s" * (message - 4)
    slow.abort()


async def test_a_wrong_or_missing_token_gets_401(backend: Backend, tmp_path: Any) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    backend.handlers["/whoami"] = whoami
    text = f'[admin]\naddress = "127.0.0.1:0"\ntoken_file = "{token}"\n' + api_config(
        backend.address, ECHO_ROUTES + WHOAMI_ROUTE
    )
    proxy = Proxy(parse_config(text, "<test>"), rng=random.Random(7))
    await proxy.start()
    try:
        base = admin_base(proxy)
        async with ApiCanary.running(proxy) as canary, aiohttp.ClientSession() as session:
            async with session.ws_connect(url(proxy, "/bad")) as ws:
                cid = await connection_id(ws)
                calls = [
                    *((method, path.format(cid)) for _, method, path in OPERATIONS),
                    ("POST", "/@groups/room"),
                    ("GET", "/@groups/room"),
                    ("POST", "/@users/someone"),
                ]
                for authorization in (None, "Bearer wrong", "Bearer s3cret-token2", "s3cret-token"):
                    headers = {"Authorization": authorization} if authorization else {}
                    for method, path in calls:
                        async with session.request(
                            method, base + path, data=b"x", headers=headers
                        ) as response:
                            assert response.status == 401, (authorization, method, path)
                good = {"Authorization": "Bearer s3cret-token"}
                async with session.post(
                    f"{base}/@connections/{cid}", data=b"ok", headers=good
                ) as response:
                    assert response.status == 200
                assert await ws.receive_bytes(timeout=10) == b"ok"
            await canary.finish()
    finally:
        await proxy.shutdown(grace=1.0)


BAD_CLOSES = [
    "code=999",
    "code=1001",
    "code=1004",
    "code=1005",
    "code=1006",
    "code=1015",
    "code=2999",
    "code=5000",
    "code=-1",
    "code=abc",
    "code=",
    "code=1000.0",
    "code=99999999999999999999",
    "code=4000&reason=" + "r" * 124,
    "code=4000&reason=" + "é" * 62,
]


async def test_bad_close_codes_get_422(make_proxy: ProxyFactory, backend: Backend) -> None:
    proxy = await management_proxy(make_proxy, backend)
    base = admin_base(proxy)
    async with ApiCanary.running(proxy) as canary, aiohttp.ClientSession() as session:
        async with session.ws_connect(url(proxy, "/bad")) as ws:
            cid = await connection_id(ws)
            for query in BAD_CLOSES:
                async with session.delete(f"{base}/@connections/{cid}?{query}") as response:
                    assert response.status == 422, query
            await ws.send_str("still open")
            assert await ws.receive_str(timeout=10) == "still open"
            async with session.delete(
                f"{base}/@connections/{cid}?code=4999&reason=" + "r" * 123
            ) as response:
                assert response.status == 204
            closing = await ws.receive(timeout=10)
            assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 4999
        await canary.finish()
    assert proxy.management.requests[("delete_connection", 422)] == len(BAD_CLOSES)


BAD_NAMES = ["a b", "a%2Fb", "é", "<script>", "x" * 129, "%00", "a%22b", "tab%09"]


async def test_bad_group_and_user_names_get_400(make_proxy: ProxyFactory, backend: Backend) -> None:
    proxy = await management_proxy(make_proxy, backend)
    base = admin_base(proxy)
    async with ApiCanary.running(proxy) as canary, aiohttp.ClientSession() as session:
        async with session.ws_connect(url(proxy, "/bad")) as ws:
            cid = await connection_id(ws)
            for name in BAD_NAMES:
                quoted = name if "%" in name else urllib.parse.quote(name, safe="")
                for method, path in (
                    ("POST", f"/@groups/{quoted}"),
                    ("GET", f"/@groups/{quoted}"),
                    ("PUT", f"/@groups/{quoted}/connections/{cid}"),
                    ("DELETE", f"/@groups/{quoted}/connections/{cid}"),
                    ("POST", f"/@users/{quoted}"),
                ):
                    target = yarl.URL(base + path, encoded=True)
                    async with session.request(method, target, data=b"x") as response:
                        assert response.status == 400, (name, method, path)
            await ws.send_str("still open")
            assert await ws.receive_str(timeout=10) == "still open"
        await canary.finish()
    assert len(proxy.apis["chat"].registry.members("room", None, 10)[0]) == 0
