"""A small chaos relay for fault injection, after Toxiproxy: a TCP proxy on 127.0.0.1 whose
toxics can be changed while it runs.

Put it between wsproxy and a target (or a client and wsproxy). Toxics, per direction
(``to_target`` = toward the target, ``to_client`` = back):
- ``latency``: seconds added before each chunk is forwarded;
- ``bandwidth``: bytes per second (0 = unlimited);
- ``slicer``: forward at most this many bytes per write (1 = byte by byte);
- ``limit_data``: after this many bytes, reset both connections (None = no limit);
- ``stall``: read and discard, forward nothing (a black hole for connections already open).
Whole-relay toxics: ``black_hole`` (accept, read and discard, never connect or answer) and
``reset_all()`` (RST every live connection now).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field

from wsproxy.address import Address


@dataclass
class Toxics:
    latency: float = 0.0
    bandwidth: int = 0
    slicer: int = 0
    limit_data: int | None = None
    stall: bool = False


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    target: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def reset_connection(writer: asyncio.StreamWriter) -> None:
    """Close with RST: SO_LINGER on, zero timeout (the TCP socket beneath TLS too)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):  # ValueError: closed already
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class ChaosRelay:
    def __init__(self, target: Address) -> None:
        self.target = target
        self.to_target = Toxics()
        self.to_client = Toxics()
        self.black_hole = False
        self.address = Address("127.0.0.1", 0)
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()

    async def start(self) -> Address:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = Address("127.0.0.1", self._server.sockets[0].getsockname()[1])
        return self.address

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.reset_all()

    def reset_all(self) -> None:
        for link in list(self._links):
            self._cut(link)

    def _cut(self, link: _Link) -> None:
        for writer in (link.client, link.target):
            if writer is not None:
                reset_connection(writer)
        for task in link.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._links.discard(link)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(writer)
        self._links.add(link)
        try:
            if self.black_hole:
                while await reader.read(65536):
                    pass  # swallow, never answer
                return
            target_reader, target_writer = await asyncio.open_connection(
                self.target.host, self.target.port
            )
            link.target = target_writer
            link.tasks = [
                asyncio.create_task(self._pump(reader, target_writer, self.to_target, link)),
                asyncio.create_task(self._pump(target_reader, writer, self.to_client, link)),
            ]
            await asyncio.gather(*link.tasks, return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._links.discard(link)
            writer.close()
            if link.target is not None:
                link.target.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        toxics: Toxics,
        link: _Link,
    ) -> None:
        sent = 0
        try:
            while data := await reader.read(65536):
                if toxics.stall:
                    continue
                if toxics.limit_data is not None and sent + len(data) > toxics.limit_data:
                    data = data[: toxics.limit_data - sent]
                    if data:
                        writer.write(data)
                        await writer.drain()
                    self._cut(link)
                    return
                if toxics.latency:
                    await asyncio.sleep(toxics.latency)
                step = toxics.slicer or len(data)
                for start in range(0, len(data), step):
                    piece = data[start : start + step]
                    writer.write(piece)
                    await writer.drain()
                    if toxics.bandwidth:
                        await asyncio.sleep(len(piece) / toxics.bandwidth)
                    elif toxics.slicer:
                        await asyncio.sleep(0.001)
                sent += len(data)
            if writer.can_write_eof():
                writer.write_eof()  # half-close travels on
        except (OSError, asyncio.CancelledError):
            pass
