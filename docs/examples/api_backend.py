"""A backend for a wsproxy WebSocket API (docs/api.md): routes $connect, answers messages, and
pushes a result to the client later through the @connections API.

    pip install aiohttp cloudevents
    WSPROXY_ADMIN=http://127.0.0.1:9900 WSPROXY_TOKEN=... python docs/examples/api_backend.py
"""

from __future__ import annotations

import asyncio
import os
from typing import Any
from urllib.parse import parse_qs

from aiohttp import ClientSession, web
from cloudevents.core.bindings.http import HTTPMessage, from_binary_event

ADMIN = os.environ.get("WSPROXY_ADMIN", "http://127.0.0.1:9900")
AUTH = {"Authorization": f"Bearer {os.environ.get('WSPROXY_TOKEN', '')}"}
SESSION = web.AppKey("session", ClientSession)
TASKS = web.AppKey("tasks", set)


async def event_of(request: web.Request) -> Any:
    """The integration call as a CloudEvent (binary mode: ce-* headers, the body is the data)."""
    return from_binary_event(HTTPMessage(dict(request.headers), await request.read()))


async def connect(request: web.Request) -> web.Response:
    query = parse_qs((await event_of(request)).get_data()["query"])
    user = query.get("user", ["guest"])[0]
    return web.json_response({"user": user, "groups": ["lobby"]})  # 2xx: the upgrade completes


async def message(request: web.Request) -> web.Response:
    event = await event_of(request)
    task = asyncio.create_task(push_later(request.app, event.get_extension("connectionid")))
    request.app[TASKS].add(task)
    task.add_done_callback(request.app[TASKS].discard)
    return web.json_response({"received": event.get_data(), "id": event.get_id()})


async def push_later(app: web.Application, connection_id: str) -> None:
    await asyncio.sleep(2)  # the slow work; the client's socket stays with the proxy
    url = f"{ADMIN}/@connections/{connection_id}"
    async with app[SESSION].post(url, json={"done": True}, headers=AUTH) as response:
        if response.status == 410:
            return  # the client has gone: forget it
        response.raise_for_status()


async def lifetime(app: web.Application) -> Any:
    app[SESSION], app[TASKS] = ClientSession(), set()
    yield
    for task in app[TASKS]:
        task.cancel()
    await asyncio.gather(*app[TASKS], return_exceptions=True)
    await app[SESSION].close()


async def ok(request: web.Request) -> web.Response:
    return web.Response()  # $disconnect and health checks: nothing to do here


def make_app() -> web.Application:
    app = web.Application()
    app.add_routes([web.post("/connect", connect), web.post("/messages", message)])
    app.add_routes([web.post("/disconnect", ok), web.get("/healthz", ok)])
    app.cleanup_ctx.append(lifetime)
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=9001)
