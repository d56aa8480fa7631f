"""The two ends of a proxied connection as the conformance suite sees them: the client, and the
target's accepted connection. One interface over opaque streams (TCP, TLS) and WebSocket frames,
so the same property runs against every flow kind (tests/flows/test_conformance.py).

A chunk is what one ``send`` passes: bytes on a stream (the proxy may split or merge them), one
binary message on a WebSocket (its boundaries survive the proxy). ``ending`` reads a connection
to its end and names how it ended: ``"eof"`` (FIN, or TLS close_notify then FIN), ``"reset"``
(RST), or ``"close CODE"`` (a WebSocket Close frame, answered, then the TCP close).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Protocol

from tests.helpers.chaos import reset_connection
from tests.helpers.wsraw import RawWebSocket
from wsproxy.wire.wsframe import (
    CLOSE_NORMAL,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
)

READ_BYTES = 64 * 1024
# Longest wait for one read or one ending: far above any healthy step on 127.0.0.1.
STEP_SECONDS = 10.0


class Side(Protocol):
    """One end of a flow, driven by a test."""

    async def send(self, data: bytes, *, more: bool = False) -> None:
        """Send one chunk and wait until our transport took it (``more``: a message fragment
        that the next ``send`` continues; streams have no messages and ignore it)."""

    async def receive(self) -> bytes:
        """The next chunk; ``b""`` once the peer ended its sending direction."""

    def send_eof(self) -> None:
        """End our sending direction and keep receiving (a half-close)."""

    def close(self) -> None:
        """End the connection cleanly from this side."""

    def abort(self) -> None:
        """End the connection with a TCP reset."""

    async def ending(self) -> str:
        """Read to the end of the connection (discarding data); how it ended."""

    def send_buffered(self) -> int:
        """Bytes our own transport holds unsent: above its high-water mark, the peer (the proxy)
        is not reading and ``send`` waits."""


class StreamSide:
    """A TCP or TLS connection as an asyncio stream pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes, *, more: bool = False) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def receive(self) -> bytes:
        async with asyncio.timeout(STEP_SECONDS):
            return await self.reader.read(READ_BYTES)

    def send_eof(self) -> None:
        self.writer.write_eof()  # TLS transports raise here: they cannot half-close

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        reset_connection(self.writer)

    async def ending(self) -> str:
        try:
            async with asyncio.timeout(STEP_SECONDS):
                while await self.reader.read(READ_BYTES):
                    pass
        except ConnectionResetError:
            return "reset"
        except ssl.SSLError as exc:
            return f"tls error {exc.reason}"
        finally:
            self.writer.close()  # as any peer does once the other side is done
        return "eof"

    def send_buffered(self) -> int:
        return self.writer.transport.get_write_buffer_size()


class WebSocketSide:
    """A WebSocket after its upgrade, client or server side: each chunk one binary message.

    Pings are answered; a Close ends ``receive`` (its code in ``close_code``). A half-close is our
    Close frame: we send nothing more, the peer may still send until its own Close (RFC 6455
    §5.5.1)."""

    def __init__(self, ws: RawWebSocket) -> None:
        self.ws = ws
        self.close_code: int | None = None  # from the peer's Close
        self.close_sent = False
        self._in_message = False

    async def send(self, data: bytes, *, more: bool = False) -> None:
        self.ws.send(OP_CONTINUATION if self._in_message else OP_BINARY, data, fin=not more)
        self._in_message = more
        await self.ws.writer.drain()

    async def receive(self) -> bytes:
        """The next whole message. A Close inside a fragmented message fails the test: after a
        Close no data frame may follow, so the message would be lost."""
        parts: list[bytes] = []
        while True:
            try:
                opcode, fin, payload = await self.ws.recv_frame(STEP_SECONDS)
            except asyncio.IncompleteReadError:
                assert not parts, "the connection ended inside a message"
                return b""  # TCP ended without a Close
            if opcode == OP_PING:
                self.ws.send(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                assert not parts, "a Close arrived inside a message: the message is cut"
                self.close_code = int.from_bytes(payload[:2], "big") if payload else 1005
                return b""
            elif opcode != OP_PONG:
                parts.append(payload)
                if fin:
                    return b"".join(parts)

    def _send_close(self, code: int) -> None:
        if not self.close_sent:
            self.close_sent = True
            self.ws.send(OP_CLOSE, code.to_bytes(2, "big"))

    def send_eof(self) -> None:
        self._send_close(CLOSE_NORMAL)

    def close(self) -> None:
        self._send_close(CLOSE_NORMAL)
        self.ws.writer.close()

    def abort(self) -> None:
        reset_connection(self.ws.writer)

    async def ending(self) -> str:
        try:
            while self.close_code is None:
                if not await self.receive() and self.close_code is None:
                    return "eof"
            self._send_close(self.close_code)  # answer the Close with its code (RFC 6455 §5.5.1)
            async with asyncio.timeout(STEP_SECONDS):
                while await self.ws.reader.read(READ_BYTES):
                    pass
        except ConnectionResetError:
            return "reset"
        finally:
            self.ws.writer.close()
        return f"close {self.close_code}"

    def send_buffered(self) -> int:
        return self.ws.writer.transport.get_write_buffer_size()
