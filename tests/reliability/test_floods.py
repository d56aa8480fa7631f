"""Connection floods against a real wsproxy process: 10,000 connections opened and left silent,
slowloris heads, and SIGTERM with 1,000 live sessions. Each flood ends at its deadline, frees its
slots, and leaves a canary session beside it untouched."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.flows.test_websocket import ws_config
from tests.helpers.process import RunningProxy, start_proxy
from wsproxy.demo import EchoTarget

SILENT = 10_000


def drain_stderr(proxy: RunningProxy) -> None:
    """Read the proxy's log lines as they come (one per connection here)."""
    task = asyncio.get_running_loop().create_task(proxy.collect_stderr())
    _readers.add(task)
    task.add_done_callback(_readers.discard)


_readers: set[asyncio.Task[None]] = set()


def own_descriptor_room(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return min(wanted, hard - 1000)


async def listeners(proxy: RunningProxy) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{proxy.admin}/v1/listeners") as response,
    ):
        data: dict[str, Any] = (await response.json())["listeners"][0]
        return data


async def open_silent(port: int, count: int) -> list[tuple[asyncio.StreamReader, Any]]:
    opened: list[tuple[asyncio.StreamReader, Any]] = []
    for start in range(0, count, 500):  # batches: the listen backlog is 1,024
        batch = min(500, count - start)
        opened += await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", port) for _ in range(batch))
        )
    return opened


async def test_ten_thousand_silent_connections_are_closed_at_their_deadline(
    tmp_path: Path, echo: EchoTarget, proxies: list[RunningProxy]
) -> None:
    count = own_descriptor_room(SILENT)
    config = tmp_path / "silent.toml"
    config.write_text(
        '[admin]\naddress = "127.0.0.1:0"\n'
        + ws_config(
            ("echo", [echo.address]),
            listener="request_head_timeout_seconds = 8\nmax_connections = 50000",
        )
    )
    # The proxy holds one descriptor per silent connection (its limit here: 20,000).
    proxy = await start_proxy(config)
    proxies.append(proxy)
    drain_stderr(proxy)
    async with aiohttp.ClientSession() as client:
        canary = await client.ws_connect(f"ws://127.0.0.1:{proxy.port}/canary")
        started = time.monotonic()
        silent = await open_silent(proxy.port, count)
        opened_in = time.monotonic() - started
        await canary.send_str("during the flood")
        assert await canary.receive_str(timeout=5) == "during the flood"
        async with asyncio.timeout(5):  # the proxy accepts what the kernel queued for it
            while (await listeners(proxy))["connections_active"] < count + 1:
                await asyncio.sleep(0.1)

        async def closed(reader: asyncio.StreamReader) -> bytes:
            return await reader.read()  # the proxy's 408, then its close

        answers = await asyncio.wait_for(
            asyncio.gather(*(closed(reader) for reader, _ in silent), return_exceptions=True),
            timeout=30,
        )
        all_closed_in = time.monotonic() - started
        for _, writer in silent:
            writer.close()
        timed_out = sum(
            1 for a in answers if isinstance(a, bytes) and a.startswith(b"HTTP/1.1 408")
        )
        await canary.send_str("after the flood")
        assert await canary.receive_str(timeout=5) == "after the flood"
        row = await listeners(proxy)
        await canary.close()
    print(
        f"\n{count} silent connections: opened in {opened_in:.1f} s, all closed "
        f"{all_closed_in:.1f} s after the first ({timed_out} with a 408)"
    )
    assert timed_out == count
    assert row["connections_active"] == 1  # the canary: every slot came back
    assert all_closed_in <= opened_in + 8 + 5


async def test_slowloris_heads_are_cut_at_the_deadline_not_kept_alive_by_each_byte(
    tmp_path: Path, echo: EchoTarget, proxies: list[RunningProxy]
) -> None:
    config = tmp_path / "slowloris.toml"
    config.write_text(
        '[admin]\naddress = "127.0.0.1:0"\n'
        + ws_config(("echo", [echo.address]), listener="request_head_timeout_seconds = 1.5")
    )
    proxy = await start_proxy(config)
    proxies.append(proxy)
    drain_stderr(proxy)
    head = b"GET /slow HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n" + b"X-Pad: y\r\n" * 100

    async def trickle() -> float:
        # Started before the connect: with 200 clients connecting at once, the proxy may accept
        # (and start its deadline) well before this coroutine sees open_connection return.
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        answer = asyncio.ensure_future(reader.read())  # the 408, whenever it comes
        with contextlib.suppress(ConnectionError):
            for byte in head:
                if answer.done() or writer.is_closing():
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(0.1)  # one byte every 0.1 s: never idle, never done
        text = await asyncio.wait_for(answer, 10)
        writer.close()
        assert text.startswith(b"HTTP/1.1 408"), text[:40]
        return time.monotonic() - started

    async with aiohttp.ClientSession() as client:
        canary = await client.ws_connect(f"ws://127.0.0.1:{proxy.port}/canary")
        waits = await asyncio.gather(*(trickle() for _ in range(200)))
        await canary.send_str("fine")
        assert await canary.receive_str(timeout=5) == "fine"
        await canary.close()
    assert all(1.3 <= wait <= 3.0 for wait in waits), (min(waits), max(waits))
    assert (await listeners(proxy))["connections_active"] == 0


async def test_sigterm_with_a_thousand_sessions(
    tmp_path: Path, echo: EchoTarget, proxies: list[RunningProxy]
) -> None:
    """Readiness turns false first; no connection is refused before it did; every session gets
    1001; the process exits 0 within the grace period."""
    grace = 6.0
    config = tmp_path / "drain.toml"
    config.write_text(
        f'[proxy]\nshutdown_grace_seconds = {grace}\n[admin]\naddress = "127.0.0.1:0"\n'
        + ws_config(("echo", [echo.address]))
    )
    proxy = await start_proxy(config)
    proxies.append(proxy)
    drain_stderr(proxy)
    own_descriptor_room(3000)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as client:
        sockets = await asyncio.gather(
            *(client.ws_connect(f"ws://127.0.0.1:{proxy.port}/s{i}") for i in range(1000))
        )
        for index, ws in enumerate(sockets[:50]):
            await ws.send_str(f"m{index}")
            assert await ws.receive_str(timeout=5) == f"m{index}"
        readiness_when_refused: list[int] = []
        stop = asyncio.Event()

        async def keep_connecting() -> None:
            """Open sessions until one is refused; then readiness must already say 503."""
            while not stop.is_set():
                try:
                    async with client.ws_connect(f"ws://127.0.0.1:{proxy.port}/new") as ws:
                        await ws.send_str("x")
                        await ws.receive(timeout=5)
                except (aiohttp.ClientError, ConnectionError):
                    url = f"http://127.0.0.1:{proxy.admin}/readyz"
                    async with client.get(url) as response:
                        readiness_when_refused.append(response.status)
                    return
                await asyncio.sleep(0.005)

        watchers = [asyncio.create_task(keep_connecting()) for _ in range(3)]
        await asyncio.sleep(0.3)
        signalled = time.monotonic()
        proxy.process.terminate()
        codes = []
        for ws in sockets:
            message = await ws.receive(timeout=grace + 5)
            assert message.type is aiohttp.WSMsgType.CLOSE, message
            codes.append(ws.close_code)
        async with asyncio.timeout(grace + 5):
            exit_code = await proxy.process.wait()
        exited_after = time.monotonic() - signalled
        stop.set()
        await asyncio.gather(*watchers, return_exceptions=True)
    assert exit_code == 0
    assert codes == [1001] * 1000
    assert exited_after <= grace + 1.5, exited_after
    assert readiness_when_refused == [503] * 3, readiness_when_refused
