"""A raw WebSocket endpoint (client or server side) for tests that need to send what a
well-behaved library would not, or see exactly which frames arrived."""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import struct

from wsproxy.address import Address
from wsproxy.wire.http1 import parse_request_head
from wsproxy.wire.upgrade import accept_key
from wsproxy.wire.wsframe import OP_CLOSE


def mask_bytes(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``key`` repeated (RFC 6455 §5.3), fast for megabytes:
    one big-integer XOR instead of a Python loop per byte."""
    if not key or not payload:
        return payload
    length = len(payload)
    stream = (key * (length // 4 + 1))[:length]
    mixed = int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")
    return mixed.to_bytes(length, "big")


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes = b"") -> bytes:
    """One frame, encoded here rather than by wsproxy's encoder, so a test does not lean on the
    code it checks; ``mask`` is the key of a client frame, empty for a server frame."""
    length = len(payload)
    head = bytearray([(0x80 if fin else 0) | opcode])
    bit = 0x80 if mask else 0
    if length < 126:
        head.append(bit | length)
    elif length < 1 << 16:
        head += struct.pack("!BH", bit | 126, length)
    else:
        head += struct.pack("!BQ", bit | 127, length)
    return bytes(head) + mask + mask_bytes(payload, mask)


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


async def accept_upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """Server side: read an upgrade request head and answer a correct 101; returns the head."""
    head = await reader.readuntil(b"\r\n\r\n")
    accept = accept_key(parse_request_head(head).get("sec-websocket-key") or "")
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        + f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
    )
    return head


class RawWebSocket:
    """Frames over asyncio streams. A client masks what it sends and refuses masked frames; a
    server (``client=False``) does the opposite (RFC 6455 §5.1)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, client: bool = True
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.client = client

    @classmethod
    async def connect(
        cls,
        address: Address,
        path: str = "/",
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> RawWebSocket:
        """Upgrade a new connection to ``address`` (over TLS given ``tls``); fails unless the
        answer is a 101 with the right Sec-WebSocket-Accept."""
        reader, writer = await asyncio.open_connection(
            address.host, address.port, ssl=tls, server_hostname=server_hostname if tls else None
        )
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(upgrade_request(path, key=key))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert f"Sec-WebSocket-Accept: {accept_key(key)}".encode() in head
        return cls(reader, writer)

    def send(
        self, opcode: int, payload: bytes, *, fin: bool = True, masked: bool | None = None
    ) -> None:
        """One frame; masked as the role says unless ``masked`` says otherwise."""
        masked = self.client if masked is None else masked
        self.writer.write(frame(opcode, payload, fin=fin, mask=os.urandom(4) if masked else b""))

    async def recv(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """One frame from the peer, unmasked: (opcode, payload)."""
        opcode, _, payload = await self.recv_frame(timeout)
        return opcode, payload

    async def recv_frame(self, timeout: float = 5.0) -> tuple[int, bool, bytes]:
        """One frame from the peer, unmasked: (opcode, fin, payload)."""
        async with asyncio.timeout(timeout):
            b0, b1 = await self.reader.readexactly(2)
            length = b1 & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            masked = bool(b1 & 0x80)
            if self.client:
                assert not masked, "server frames must not be masked"
            else:
                assert masked, "client frames must be masked"
            key = await self.reader.readexactly(4) if masked else b""
            payload = mask_bytes(await self.reader.readexactly(length), key)
            return b0 & 0x0F, bool(b0 & 0x80), payload

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
