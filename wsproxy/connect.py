"""``wsproxy connect URL``: stdin lines become text messages, received messages go to stdout."""

from __future__ import annotations

import asyncio
import ssl
import sys
import threading

import aiohttp


def client_ssl_context(
    cacert: str | None, cert: str | None, key: str | None, insecure: bool
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cacert)
    if cert:
        context.load_cert_chain(cert, key)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str]:
    """Lines of stdin, read by a daemon thread ("" at its end). Not the loop's executor: a
    thread blocked in readline would keep the process from exiting after the server closed the
    session, until the user pressed Enter."""
    lines: asyncio.Queue[str] = asyncio.Queue()

    def read() -> None:
        while True:
            line = sys.stdin.readline()
            try:
                loop.call_soon_threadsafe(lines.put_nowait, line)
            except RuntimeError:  # the loop is closed: the session is over
                return
            if not line:
                return

    threading.Thread(target=read, name="wsproxy-connect-stdin", daemon=True).start()
    return lines


async def run_connect(
    url: str,
    headers: list[tuple[str, str]],
    subprotocols: list[str],
    ssl_context: ssl.SSLContext | None,
    linger: float = 0.5,
) -> int:
    """Returns the exit code. After stdin ends, replies are still printed until none has come
    for ``linger`` seconds, so ``echo hi | wsproxy connect URL`` shows the answer."""
    loop = asyncio.get_running_loop()
    activity = asyncio.Event()
    closing = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        # aiohttp sends an idempotent request (the Upgrade GET) again on a new connection when
        # the first one fails after its TLS handshake, which is where a TLS 1.3 server refuses
        # a client certificate: one refused attempt would be refused, counted and logged twice.
        # No public switch (aio-libs/aiohttp#10790); aiohttp's own test client clears this one.
        if hasattr(session, "_retry_connection"):
            session._retry_connection = False
        try:
            ws = await session.ws_connect(
                url,
                headers=headers,
                protocols=subprotocols,
                ssl=ssl_context if ssl_context is not None else True,
                autoping=True,
                max_msg_size=0,
            )
        except aiohttp.WSServerHandshakeError as exc:
            print(f"handshake refused: {exc.status} {exc.message}", file=sys.stderr)
            return 1
        except aiohttp.ClientError as exc:
            print(f"cannot connect to {url}: {exc}", file=sys.stderr)
            return 1
        print(f"connected to {url} (subprotocol: {ws.protocol or '-'})", file=sys.stderr)

        lines = _stdin_lines(loop)

        async def pump_stdin() -> None:
            while True:
                line = await lines.get()
                if not line:
                    while True:  # until no reply for `linger` seconds
                        activity.clear()
                        try:
                            async with asyncio.timeout(linger):
                                await activity.wait()
                        except TimeoutError:
                            break
                    closing.set()
                    await ws.close()
                    return
                await ws.send_str(line.rstrip("\n"))

        sender = asyncio.create_task(pump_stdin())
        try:
            async for message in ws:
                activity.set()
                if message.type is aiohttp.WSMsgType.TEXT:
                    print(message.data, flush=True)
                elif message.type is aiohttp.WSMsgType.BINARY:
                    print(
                        f"<binary {len(message.data)} bytes> {message.data[:64].hex()}", flush=True
                    )
        finally:
            if closing.is_set():
                await sender  # let our Close handshake finish
            else:
                sender.cancel()  # the server closed first; stdin may still be open
        print(f"closed: code {ws.close_code}", file=sys.stderr)
        return 0
