"""Echo targets for the TLS benchmark, in their own process: one TLS port, one plain TCP port.

Usage: python -m loadtest.tls_echo_server CERT KEY
It prints "TLS_PORT TCP_PORT", then serves until its stdin closes.
"""

from __future__ import annotations

import asyncio
import ssl
import sys

import uvloop


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(cert: str, key: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    tls = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=context, backlog=1024)
    plain = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=1024)
    ports = (tls.sockets[0].getsockname()[1], plain.sockets[0].getsockname()[1])
    print(*ports, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], sys.argv[2]))
