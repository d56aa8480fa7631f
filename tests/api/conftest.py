"""Fixtures of the API tests: a recording integration backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from wsproxy.address import Address

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Backend:
    """An integration backend: records every call, answers as each path's handler says."""

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


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    server = Backend()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.address = Address(host, port)
    yield server
    await runner.cleanup()
