"""A raw WebSocket client for tests that need to send what a well-behaved library would not."""

from __future__ import annotations

import asyncio
import base64
import os
import struct

from wsproxy.address import Address
from wsproxy.wire.upgrade import accept_key
from wsproxy.wire.wsframe import OP_CLOSE, encode_frame


def upgrade_request(
    path: str = "/", host: str = "test.internal", extra: tuple[str, ...] = (), key: str = ""
) -> bytes:
    key = key or base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class RawWebSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, address: Address, path: str = "/") -> RawWebSocket:
        reader, writer = await asyncio.open_connection(address.host, address.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(upgrade_request(path, key=key))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert f"Sec-WebSocket-Accept: {accept_key(key)}".encode() in head
        return cls(reader, writer)

    def send(self, opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> None:
        self.writer.write(
            encode_frame(opcode, payload, fin=fin, mask=os.urandom(4) if masked else b"")
        )

    async def recv(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """One unmasked frame from the server: (opcode, payload)."""
        async with asyncio.timeout(timeout):
            b0, b1 = await self.reader.readexactly(2)
            length = b1 & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            assert not b1 & 0x80, "server frames must not be masked"
            return b0 & 0x0F, await self.reader.readexactly(length)

    async def recv_close(self, timeout: float = 5.0) -> int:
        """Read frames until a Close; return its code."""
        while True:
            opcode, payload = await self.recv(timeout)
            if opcode == OP_CLOSE:
                return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005

    async def closed(self, timeout: float = 5.0) -> bytes:
        """Everything until the proxy closes the TCP connection."""
        async with asyncio.timeout(timeout):
            return await self.reader.read()

    def abort(self) -> None:
        self.writer.transport.abort()
