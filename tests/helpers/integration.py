"""A real integration backend for API-mode tests: an aiohttp server that reads every call with
the official CloudEvents SDK, records it, and answers as the test says, well or badly.

The SDK's 2.x binding (``cloudevents.core.bindings.http``) reads the calls: it percent-decodes
header values as the HTTP binding says (§3.1.3.2) and checks the required attributes. The 1.x
compatible ``cloudevents.v1.http.from_http`` leaves them encoded.

    async with IntegrationBackend() as backend:
        backend.answer("/messages", Reply(200, b'{"ok": true}'))
        backend.answer("/slow", Fault.HANG)
        ... backend.address, backend.calls, backend.connections ...

The default answer echoes the call's data with its Content-Type (a ``respond = true`` route
then sends the client's message back).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType
from typing import Any

from aiohttp import web
from cloudevents.core.bindings.http import HTTPMessage, from_http_event

from wsproxy.address import Address


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: ``status`` and ``body`` after ``delay`` seconds; ``chunked`` sends the
    body with chunked framing (no Content-Length), as streaming backends do."""

    status: int = 200
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    chunked: bool = False


class Fault(Enum):
    """Ways to answer badly, each after the call was read and recorded."""

    HANG = "hang"  # never answer (until the backend stops)
    GARBAGE = "garbage"  # bytes that are not HTTP, then close
    RESET = "reset"  # a TCP RST instead of an answer
    CLOSE = "close"  # a FIN instead of an answer
    TRUNCATED = "truncated"  # a head promising a longer body than sent, then close


@dataclass
class RecordedCall:
    """One call as the backend read it. ``attributes`` are the CloudEvent's, as the SDK parsed
    them (extensions included, values percent-decoded, ``time`` a datetime); ``data`` the body
    as sent, ``event_data`` as the SDK read it (JSON parsed); ``headers`` by lower-case name;
    ``client_subject`` is the subject of the caller's TLS client certificate (a dict of RDNs),
    if one was presented."""

    path: str
    attributes: dict[str, Any]
    data: bytes
    headers: dict[str, str]
    event_data: Any = None
    client_subject: dict[str, str] | None = None


Behaviour = Reply | Fault | Callable[[RecordedCall], Reply]


def echo(call: RecordedCall) -> Reply:
    return Reply(200, call.data, call.headers.get("content-type"))


GARBAGE = b"\x16\x03\x01 this is not HTTP at all\r\n\r\n"


@dataclass
class IntegrationBackend:
    """An HTTP(S) integration on 127.0.0.1 and an ephemeral port (``ssl`` makes it HTTPS);
    ``answer(path, behaviour)`` says how calls to a path are answered (``default`` otherwise).

    ``connections`` counts accepted TCP connections (pooling shows as fewer connections than
    calls); ``errors`` holds calls the SDK refused to read (the backend answered them 400).
    """

    ssl: ssl.SSLContext | None = None
    default: Behaviour = echo
    address: Address = field(default_factory=lambda: Address("127.0.0.1", 0))
    calls: list[RecordedCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    connections: int = 0
    _behaviours: dict[str, Behaviour] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    _server: asyncio.Server | None = None
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    called: asyncio.Event = field(default_factory=asyncio.Event)

    def answer(self, path: str, behaviour: Behaviour) -> None:
        """How calls to ``path`` are answered from now on."""
        self._behaviours[path] = behaviour

    def calls_to(self, path: str) -> list[RecordedCall]:
        return [call for call in self.calls if call.path == path]

    async def wait_for_calls(self, count: int, timeout: float = 10.0) -> list[RecordedCall]:
        """The calls once there are at least ``count`` (``$disconnect`` arrives after the client
        has gone); ``TimeoutError`` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while len(self.calls) < count:
                self.called.clear()
                await self.called.wait()
        return self.calls

    async def start(self) -> Address:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Hanging handlers end when _stopping is set, so a short shutdown is enough.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        server = self._runner.server
        assert server is not None

        def accept() -> web.RequestHandler:
            self.connections += 1
            return server()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(accept, "127.0.0.1", 0, ssl=self.ssl)
        self.address = Address("127.0.0.1", self._server.sockets[0].getsockname()[1])
        return self.address

    async def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> IntegrationBackend:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        data = await request.read()
        headers = {name.lower(): value for name, value in request.headers.items()}
        try:
            event = from_http_event(HTTPMessage(dict(request.headers), data))
        except Exception as exc:  # noqa: BLE001  # any SDK refusal is the finding to record
            self.errors.append(f"{request.path}: {type(exc).__name__}: {exc}")
            return web.Response(status=400, text=str(exc))
        call = RecordedCall(
            request.path,
            dict(event.get_attributes()),
            data,
            headers,
            event.get_data(),
            _peer_subject(request),
        )
        self.calls.append(call)
        self.called.set()
        behaviour = self._behaviours.get(request.path, self.default)
        if isinstance(behaviour, Fault):
            return await self._fault(request, behaviour)
        reply = behaviour if isinstance(behaviour, Reply) else behaviour(call)
        if reply.delay:
            await self._wait(reply.delay)
        response = web.StreamResponse(status=reply.status, headers=dict(reply.headers))
        if reply.content_type is not None:
            response.headers["Content-Type"] = reply.content_type
        if reply.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = len(reply.body)
        # The caller may leave mid-answer (a body over its limit): aiohttp then lets it go
        # quietly, as a disconnected client.
        with contextlib.suppress(ConnectionError):
            await response.prepare(request)
            await response.write(reply.body)
            await response.write_eof()
        return response

    async def _fault(self, request: web.Request, fault: Fault) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        if fault is Fault.HANG:
            await self._stopping.wait()
        elif fault is Fault.GARBAGE:
            transport.write(GARBAGE)
            transport.close()
        elif fault is Fault.RESET:
            # SO_LINGER with a zero timeout: the close sends an RST, not a FIN.
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        elif fault is Fault.CLOSE:
            transport.close()
        elif fault is Fault.TRUNCATED:
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
            transport.close()
        # The connection is gone: aiohttp drops this response quietly.
        return web.Response(status=500)

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)


def _peer_subject(request: web.Request) -> dict[str, str] | None:
    transport = request.transport
    peer = transport.get_extra_info("peercert") if transport is not None else None
    if not peer:
        return None
    return {name: value for rdn in peer.get("subject", ()) for name, value in rdn}
