"""A minimal WebSocket client on asyncio Protocols, cheap enough that one process drives
thousands of sessions (aiohttp's client costs several times more CPU per message)."""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
from collections import deque
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

from loadtest.wsproto import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameReader,
    accept_key,
    encode,
    upgrade_request,
)


class HandshakeFailed(Exception):
    """The server did not answer the upgrade with a valid 101."""


@dataclass(frozen=True)
class Endpoint:
    """Where sessions go: ``ws://`` or ``wss://`` URL parts, TLS settings, and the Host header."""

    host: str
    port: int
    path: str
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None
    host_header: str | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        cacert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        insecure: bool = False,
        server_hostname: str | None = None,
    ) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"expected ws://HOST:PORT/PATH or wss://..., got {url!r}")
        context = None
        if parts.scheme == "wss":
            context = ssl.create_default_context(cafile=cacert)
            if insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if cert:
                context.load_cert_chain(cert, key)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return cls(parts.hostname, port, path, context, server_hostname or parts.hostname)

    @property
    def authority(self) -> str:
        return self.host_header or f"{self.host}:{self.port}"


class Session(asyncio.Protocol):
    """One WebSocket connection: ``send`` a message, ``receive`` the next one, ``close``."""

    def __init__(self, key: bytes) -> None:
        self.transport: asyncio.Transport | None = None
        self._head = b""
        self._key = key
        self._reader: FrameReader | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._messages: deque[tuple[int, bytes]] = deque()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._reader is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self._head[:end], self._head[end + 4 :]
            self._head = b""
            if not head.startswith(b"HTTP/1.1 101") or accept_key(self._key) not in head:
                self._fail(HandshakeFailed(head.split(b"\r\n", 1)[0].decode(errors="replace")))
                return
            self._reader = FrameReader()
            if not self.opened.done():
                self.opened.set_result(None)
            if not data:
                return
        for opcode, payload in self._reader.feed(data):
            if opcode == OP_PING:
                self._write(encode(OP_PONG, payload, masked=True))
                continue
            if opcode == OP_PONG:
                continue
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result((opcode, payload))
                self._waiter = None
            else:
                self._messages.append((opcode, payload))

    def connection_lost(self, exc: Exception | None) -> None:
        error = exc or ConnectionResetError("connection closed")
        if not self.opened.done():
            self.opened.set_exception(error)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)
        if not self.closed.done():
            self.closed.set_result(None)

    # API

    def _fail(self, error: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send(self, payload: bytes, opcode: int = OP_BINARY) -> None:
        self._write(encode(opcode, payload, masked=True))

    def send_raw(self, frames: bytes) -> None:
        self._write(frames)

    async def receive(self) -> tuple[int, bytes]:
        if self._messages:
            return self._messages.popleft()
        if self.closed.done():
            raise ConnectionResetError("connection closed")
        self._waiter = asyncio.get_running_loop().create_future()
        return await self._waiter

    async def close(self, timeout: float = 5.0) -> None:
        """Close handshake: send Close 1000, wait for the peer's Close or the connection's end."""
        self._write(encode(OP_CLOSE, b"\x03\xe8", masked=True))
        try:
            async with asyncio.timeout(timeout):
                while not self.closed.done():
                    opcode, _ = await self.receive()
                    if opcode == OP_CLOSE:
                        break
        except (TimeoutError, ConnectionError):
            pass
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_session(endpoint: Endpoint, timeout: float = 10.0) -> Session:
    loop = asyncio.get_running_loop()
    key = base64.b64encode(os.urandom(16))
    session = Session(key)
    async with asyncio.timeout(timeout):
        await loop.create_connection(
            lambda: session,
            endpoint.host,
            endpoint.port,
            ssl=endpoint.tls,
            server_hostname=endpoint.server_hostname if endpoint.tls else None,
        )
        session.send_raw(upgrade_request(endpoint.authority, endpoint.path, key))
        await session.opened
    return session
