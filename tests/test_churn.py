"""Connection churn against a real wsproxy process: thousands of connections opened and dropped
in every way a client can, on every kind of listener. The process must survive it (uvloop 0.23
crashed with "double free or corruption" when a protocol paused reading inside connection_made)
and keep serving."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import struct
from pathlib import Path

import aiohttp
import pytest

from tests.helpers.pki import make_pki
from tests.helpers.process import RunningProxy, start_proxy
from wsproxy.demo import EchoTarget

ROUNDS = 1500  # per listener; a few seconds each on 2 cores


async def churn_once(port: int, rng: random.Random, context: ssl.SSLContext | None) -> None:
    """One short-lived connection, ended in one of several ways."""
    style = rng.randrange(5)
    with contextlib.suppress(OSError, asyncio.TimeoutError, ssl.SSLError):
        async with asyncio.timeout(5):
            if context is not None and style >= 3:
                _reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=context, server_hostname="edge.internal"
                )
            else:
                _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if style == 1:
                writer.write(b"GET / HTTP/1.1\r\nHost: churn\r\n")  # half a head, then gone
            elif style == 2:
                writer.write(b"\x16\x03\x01" + bytes(rng.randrange(256) for _ in range(40)))
            elif style == 4:
                writer.write(b"GET / HTTP/1.1\r\nHost: churn\r\n\r\n")
            if style % 2 == 0:
                # RST instead of FIN: SO_LINGER with a zero timeout.
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()


async def churn(port: int, context: ssl.SSLContext | None, seed: int) -> None:
    rng = random.Random(seed)
    in_flight: set[asyncio.Task[None]] = set()
    for _ in range(ROUNDS):
        if len(in_flight) >= 64:
            _done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        in_flight.add(asyncio.create_task(churn_once(port, rng, context)))
    await asyncio.gather(*in_flight)


@pytest.mark.slow
async def test_the_process_survives_connection_churn_on_every_listener(
    tmp_path: Path, echo_targets: list[EchoTarget]
) -> None:
    pki = make_pki(tmp_path / "pki")
    cert, key = pki.files("edge")
    config = tmp_path / "churn.toml"
    config.write_text(
        f"""
[admin]
address = "127.0.0.1:0"
[listeners.edge]
address = "127.0.0.1:0"
websocket = true
default_target_group = "echo"
[listeners.stream]
address = "127.0.0.1:0"
default_target_group = "echo"
[listeners.secure]
address = "127.0.0.1:0"
protocol = "tls"
websocket = true
default_target_group = "echo"
[listeners.secure.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
[target_groups.echo]
targets = [{{ address = "{echo_targets[0].address}" }}]
"""
    )
    proxy: RunningProxy = await start_proxy(config, listeners=("edge", "stream", "secure"))
    collector = asyncio.create_task(proxy.collect_stderr())
    context = ssl.create_default_context(cafile=pki.ca_file)
    try:
        await asyncio.gather(
            churn(proxy.ports["edge"], None, 1),
            churn(proxy.ports["stream"], None, 2),
            churn(proxy.ports["secure"], context, 3),
        )
        assert proxy.process.returncode is None, "".join(proxy.stderr_lines[-20:])
        # Still serving on every listener.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
            for url in (
                f"ws://127.0.0.1:{proxy.ports['edge']}/",
                f"ws://127.0.0.1:{proxy.ports['stream']}/",
                f"wss://127.0.0.1:{proxy.ports['secure']}/",
            ):
                async with session.ws_connect(url, server_hostname="edge.internal") as ws:
                    await ws.send_str("after the churn")
                    assert await ws.receive_str(timeout=5) == "after the churn"
            async with session.get(f"http://127.0.0.1:{proxy.admin}/healthz") as response:
                assert response.status == 200
    finally:
        await proxy.stop()
        collector.cancel()
    assert not any("Traceback" in line for line in proxy.stderr_lines), proxy.stderr_lines[-40:]
