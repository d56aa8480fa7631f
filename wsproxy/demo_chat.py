"""The demo's chat integration: a plain HTTP backend behind the demo's WebSocket API.

It holds no socket to any client. ``$connect`` names the user (``?user=NAME``, else a guest
name) and puts the connection in the group ``lobby``; ``sendmessage`` broadcasts the text to
that group with one call to the proxy's ``POST /@groups/lobby``; ``whoami`` answers with a
route response; anything else gets a route response that says what to send.
"""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any

import aiohttp
from aiohttp import web

from wsproxy.address import Address

log = logging.getLogger(__name__)

GROUP = "lobby"
HELP = (
    'send {"action": "sendmessage", "text": "hi"} to everyone in the lobby, or {"action": "whoami"}'
)


class ChatIntegration:
    """See the module docstring. ``admin`` is the proxy's admin URL, set once it listens."""

    def __init__(self) -> None:
        self.admin = ""
        self.users: dict[str, str] = {}  # connection id -> user, from $connect
        self._guests = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.address: Address | None = None

    async def start(self) -> Address:
        app = web.Application()
        app.router.add_post("/connect", self._connect)
        app.router.add_post("/disconnect", self._disconnect)
        app.router.add_post("/messages", self._message)
        app.router.add_post("/whoami", self._whoami)
        app.router.add_post("/default", self._default)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.address = Address(str(host), int(port))
        self._session = aiohttp.ClientSession()
        return self.address

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _connect(self, request: web.Request) -> web.Response:
        event = await request.json()
        query = dict(item.split("=", 1) for item in event["query"].split("&") if "=" in item)
        user = query.get("user") or f"guest-{next(self._guests)}"
        self.users[request.headers["ce-connectionid"]] = user
        return web.json_response({"user": user, "groups": [GROUP]})

    async def _disconnect(self, request: web.Request) -> web.Response:
        self.users.pop(request.headers["ce-connectionid"], None)
        return web.Response(status=204)

    async def _message(self, request: web.Request) -> web.Response:
        message: dict[str, Any] = await request.json()
        user = self.users.get(request.headers["ce-connectionid"], "someone")
        text = json.dumps({"from": user, "text": str(message.get("text", ""))})
        if self._session is None:
            return web.Response(status=503)
        async with self._session.post(
            f"{self.admin}/@groups/{GROUP}", data=text, headers={"Content-Type": "application/json"}
        ) as answer:
            if answer.status != 200:
                log.warning(
                    "demo chat: the broadcast got %d: %s", answer.status, await answer.text()
                )
        return web.Response(status=204)

    async def _whoami(self, request: web.Request) -> web.Response:
        connection = request.headers["ce-connectionid"]
        return web.json_response(
            {
                "connectionId": connection,
                "user": self.users.get(connection),
                "sourceIp": request.headers["ce-sourceip"],
                "route": request.headers["ce-routekey"],
            }
        )

    async def _default(self, request: web.Request) -> web.Response:
        return web.json_response({"help": HELP})
