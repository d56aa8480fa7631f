"""A WebSocket echo target on asyncio Protocols (uvloop): the fastest honest target we can write
in Python, so that the target is not what limits a benchmark.

    python -m loadtest.echo_target [--tls-cert C --tls-key K]

Prints ``PORT`` (and ``TLS_PORT`` when given a certificate) on one line, serves until stdin
closes. Binds 127.0.0.1 only. Every message is echoed as one unmasked frame of the same type; pings
get pongs; a Close is answered and the connection closed.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from typing import cast

import uvloop

from loadtest.wsproto import OP_CLOSE, OP_PING, OP_PONG, FrameReader, accept_key, encode

MAX_HEAD = 16 * 1024


class EchoProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.reader: FrameReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if self.reader is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD:
                    transport.close()
                return
            head, rest = self.head[:end], self.head[end + 4 :]
            self.head = b""
            key = b""
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            if not key:
                transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                transport.close()
                return
            transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n"
            )
            self.reader = FrameReader()
            if not rest:
                return
            data = rest
        out = []
        for opcode, payload in self.reader.feed(data):
            if opcode == OP_PING:
                out.append(encode(OP_PONG, payload, masked=False))
            elif opcode == OP_CLOSE:
                out.append(encode(OP_CLOSE, payload[:2], masked=False))
                transport.write(b"".join(out))
                transport.close()
                return
            elif opcode != OP_PONG:
                out.append(encode(opcode, payload, masked=False))
        if out:
            transport.write(b"".join(out) if len(out) > 1 else out[0])


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, "127.0.0.1", 0, backlog=4096)
    ports = [str(server.sockets[0].getsockname()[1])]
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
        tls_server = await loop.create_server(
            EchoProtocol, "127.0.0.1", 0, ssl=context, backlog=4096
        )
        ports.append(str(tls_server.sockets[0].getsockname()[1]))
    print(" ".join(ports), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    uvloop.run(main(parser.parse_args()))
