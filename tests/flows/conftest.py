"""Fixtures for flow tests: a canary session that must keep flowing beside every bad input."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import aiohttp
import pytest

from wsproxy.address import Address


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


@pytest.fixture
async def canary_factory() -> AsyncIterator[object]:
    opened: list[Canary] = []

    async def make(address: Address, path: str = "/canary") -> Canary:
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(f"ws://{address}{path}")
        canary = Canary(session, ws)
        opened.append(canary)
        await canary.check()
        return canary

    yield make
    for canary in opened:
        await canary.ws.close()
        await canary.session.close()
