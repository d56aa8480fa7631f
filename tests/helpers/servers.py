"""Real target servers for tests, on 127.0.0.1 and ephemeral ports."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import socket
from collections.abc import Awaitable, Callable, Iterator
from ssl import SSLContext

from tests.helpers.wsraw import accept_upgrade
from wsproxy.address import Address

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """An asyncio stream server running ``handler`` per connection (after the TLS handshake,
    given ``ssl``); records what it received."""

    def __init__(self, handler: Handler, ssl: SSLContext | None = None) -> None:
        self._handler = handler
        self._ssl = ssl
        self._server: asyncio.Server | None = None
        self.address = Address("127.0.0.1", 0)
        self.connections = 0
        self.received: list[bytes] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Address:
        self._server = await asyncio.start_server(self._run, "127.0.0.1", 0, ssl=self._ssl)
        port = self._server.sockets[0].getsockname()[1]
        self.address = Address("127.0.0.1", port)
        return self.address

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # stop() cancels a handler still running and awaits it; let the task end normally,
            # as asyncio's streams log a client callback that ends cancelled as an error.
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def fixed_response(response: bytes, record: list[bytes] | None = None) -> Handler:
    """Read one request head, answer ``response``, then record anything else that arrives."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        if record is not None:
            record.append(head)
        writer.write(response)
        await writer.drain()
        while True:
            more = await reader.read(65536)
            if not more:
                return
            if record is not None:
                record.append(more)

    return handler


async def accept_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        data = await reader.read(65536)
        if not data:
            if writer.can_write_eof():
                writer.write_eof()
            return
        writer.write(data)
        await writer.drain()


# Sockets behind closed_port(): held until the test process exits (a few descriptors).
_REFUSING: list[socket.socket] = []


@atexit.register
def _release_refusing() -> None:
    for held in _REFUSING:
        held.close()


async def closed_port() -> Address:
    """An address on 127.0.0.1 where nothing listens: connections to it are refused (RST).

    The port stays bound by a socket that never listens, for the rest of the test run: the kernel
    refuses connections to it, and no other program can take the port meanwhile (a port bound,
    then closed, could be reused by anyone before the test connects)."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    _REFUSING.append(held)
    return Address("127.0.0.1", held.getsockname()[1])


class HealthEndpoints:
    """200 tiny HTTP servers that answer every request 200 and count what they answered."""

    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []
        self.answered = 0

    async def start(self, count: int) -> list[str]:
        for _ in range(count):
            self.servers.append(await asyncio.start_server(self._answer, "127.0.0.1", 0))
        return [f"127.0.0.1:{server.sockets[0].getsockname()[1]}" for server in self.servers]

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            self.answered += 1
        writer.close()

    def close(self) -> None:
        for server in self.servers:
            server.close()


def upgrading_target(received: list[bytes]) -> Handler:
    """A raw WebSocket target: answers the upgrade with a correct 101, then records every byte
    the proxy sends after it (frames, Close), for tests that check what reached a target."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept_upgrade(reader, writer)
        while data := await reader.read(65536):
            received.append(data)

    return handler


@contextlib.contextmanager
def full_accept_queue() -> Iterator[Address]:
    """An address whose listen queue is full: the kernel drops SYNs to it, so a connect there
    times out (a black-holed target, on loopback, without firewall rules)."""
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(blackhole.getsockname())
            fillers.append(filler)
        yield Address("127.0.0.1", blackhole.getsockname()[1])
    finally:
        for filler in fillers:
            filler.close()
        blackhole.close()
