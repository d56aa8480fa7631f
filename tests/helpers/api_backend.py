"""The pieces of an API-listener test: a recording integration backend (aiohttp), the TOML of
an API listener in front of it, and a canary connection that keeps exchanging messages."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from tests.conftest import listener_address
from wsproxy.address import Address
from wsproxy.proxy import Proxy

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Backend:
    """An integration backend: records every call, answers as each path's handler says (an
    echo of the body and its Content-Type by default)."""

    calls: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    handlers: dict[str, Handler] = field(default_factory=dict)
    address: Address = field(default_factory=lambda: Address("127.0.0.1", 0))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.calls.append((request.path, dict(request.headers), body))
        handler = self.handlers.get(request.path)
        if handler is not None:
            return await handler(request)
        return web.Response(body=body, content_type=request.content_type)  # echo

    def paths(self) -> list[str]:
        return [path for path, _, _ in self.calls]


@contextlib.asynccontextmanager
async def running_backend() -> AsyncIterator[Backend]:
    """A ``Backend`` on 127.0.0.1 and a free port, stopped on exit (handlers still waiting are
    cancelled)."""
    server = Backend()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("POST", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.address = Address(host, port)
    try:
        yield server
    finally:
        await runner.cleanup()


def api_config(backend: Address, routes: str = "", api_extra: str = "", extra: str = "") -> str:
    """An API listener "edge" serving API "chat", whose routes use target group "backend"
    (``backend``); ``api_extra`` goes into ``[apis.chat]``, ``extra`` at the end (more target
    groups)."""
    return f"""
[listeners.edge]
address = "127.0.0.1:0"
api = "chat"

[apis.chat]
{api_extra}
{routes}

[target_groups.backend]
protocol = "http"
targets = [{{ address = "{backend}" }}]
{extra}
"""


def url(proxy: Proxy, path: str = "/chat") -> str:
    address = listener_address(proxy)
    return f"ws://{address.host}:{address.port}{path}"


def admin_base(proxy: Proxy) -> str:
    admin = proxy.admin
    assert admin is not None and admin.address is not None
    return f"http://{admin.address.host}:{admin.address.port}"


class ApiCanary:
    """A second API connection that keeps exchanging binary messages with an echo route
    (``$default``, ``respond = true``) in the background: before, during and after a test's bad
    input. Every answer must be the message it sent, in order; ``finish`` proves a few more
    exchanges after the bad input and re-raises the first failure."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session = session
        self.ws = ws
        self.exchanged = 0
        self._task: asyncio.Task[None] | None = None
        self._progress = asyncio.Event()
        self._stopping = False

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, proxy: Proxy, path: str = "/canary") -> AsyncIterator[ApiCanary]:
        """Connect, exchange once (before), keep exchanging while the block runs (during)."""
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(url(proxy, path))
            canary = cls(session, ws)
            await canary._exchange()
            canary._task = asyncio.create_task(canary._loop())
            try:
                yield canary
            finally:
                if not canary._task.done():
                    canary._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await canary._task
                await ws.close()

    async def _exchange(self) -> None:
        # A sequence number up front, then random bytes: a reordered, lost or corrupted answer
        # fails the comparison.
        payload = self.exchanged.to_bytes(8, "big") + os.urandom(200 + self.exchanged % 500)
        await self.ws.send_bytes(payload)
        message = await self.ws.receive(timeout=10)
        assert message.type is aiohttp.WSMsgType.BINARY, message
        assert message.data == payload, f"canary answer {self.exchanged} differs"
        self.exchanged += 1
        self._progress.set()

    async def _loop(self) -> None:
        while not self._stopping:
            await self._exchange()
            await asyncio.sleep(0)

    async def finish(self, more: int = 3) -> None:
        """After the bad input: ``more`` further exchanges, then stop; raises what failed."""
        task = self._task
        assert task is not None
        target = self.exchanged + more
        async with asyncio.timeout(10):
            while self.exchanged < target:
                if task.done():
                    break
                self._progress.clear()
                waiter = asyncio.ensure_future(self._progress.wait())
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
        self._stopping = True  # at an exchange boundary: every message sent was answered
        async with asyncio.timeout(10):
            await task  # raises the failure, if any
        assert self.exchanged >= target
