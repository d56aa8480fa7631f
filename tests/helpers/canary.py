"""A canary session: a long-lived WebSocket session through the proxy that must keep flowing,
byte-exact, beside every bad input a test throws at the proxy."""

from __future__ import annotations

import os

import aiohttp


class Canary:
    """A long-lived WebSocket session through the proxy; ``check`` proves it still works intact."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session = session
        self.ws = ws
        self.exchanged = 0

    async def check(self) -> None:
        payload = os.urandom(1000 + self.exchanged)
        await self.ws.send_bytes(payload)
        message = await self.ws.receive(timeout=5)
        assert message.type is aiohttp.WSMsgType.BINARY, message
        assert message.data == payload
        self.exchanged += 1
