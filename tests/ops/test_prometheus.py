"""A real Prometheus server scrapes wsproxy every second; its query API must show what we did."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ProxyFactory, listener_address
from tests.helpers.tools import require_tool
from wsproxy.demo import EchoTarget


class Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base

    async def query(self, session: aiohttp.ClientSession, promql: str) -> list[float]:
        async with session.get(f"{self.base}/api/v1/query", params={"query": promql}) as r:
            body = await r.json()
        assert body["status"] == "success", body
        return [float(item["value"][1]) for item in body["data"]["result"]]

    async def wait_until(
        self,
        session: aiohttp.ClientSession,
        promql: str,
        check: Callable[[list[float]], bool],
        timeout: float = 20.0,
    ) -> list[float]:
        """Poll ``promql`` until ``check`` accepts the result; fail with the last one seen."""
        deadline = time.monotonic() + timeout
        result: list[float] = []
        while time.monotonic() < deadline:
            result = await self.query(session, promql)
            if check(result):
                return result
            await asyncio.sleep(0.5)
        pytest.fail(f"{promql} never matched; last result {result}")


async def listening_port(log: asyncio.StreamReader) -> int:
    """The port in Prometheus' ``msg="Listening on" address=127.0.0.1:PORT`` log line."""
    seen: list[str] = []
    async with asyncio.timeout(30):
        while line := (await log.readline()).decode():
            seen.append(line)
            if found := re.search(r'msg="Listening on" address=127\.0\.0\.1:(\d+)', line):
                return int(found.group(1))
    raise AssertionError("prometheus exited before listening:\n" + "".join(seen))


async def discard(log: asyncio.StreamReader) -> None:
    while await log.read(65536):
        pass


@contextlib.asynccontextmanager
async def prometheus_scraping(admin: str, tmp_path: Path) -> AsyncIterator[Prometheus]:
    binary = require_tool("prometheus", "prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: wsproxy\n"
        f"    static_configs:\n      - targets: ['{admin}']\n"
    )
    # Port 0, read back from its log: Prometheus logs the address it bound ("Listening on"),
    # so no other process can take the port between a probe and the bind.
    process = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        "--web.listen-address=127.0.0.1:0",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    drain: asyncio.Task[None] | None = None
    try:
        base = f"http://127.0.0.1:{await listening_port(process.stderr)}"
        # Keep reading its log, so a full pipe never stalls it.
        drain = asyncio.create_task(discard(process.stderr))
        async with aiohttp.ClientSession() as session, asyncio.timeout(30):
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{base}/-/ready") as response:
                        if response.status == 200:
                            break
                assert process.returncode is None, "prometheus exited at start"
                await asyncio.sleep(0.2)
        yield Prometheus(base)
    finally:
        process.terminate()
        async with asyncio.timeout(15):
            await process.wait()
        if drain is not None:
            await drain


async def test_prometheus_sees_sessions_messages_and_target_health(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], tmp_path: Path
) -> None:
    standby = echo_targets[1]
    proxy = await make_proxy(
        f"""
[listeners.edge]
address = "127.0.0.1:0"
websocket = true
default_target_group = "chat"
[target_groups.chat]
targets = [{{ address = "{echo_targets[0].address}" }}]
[target_groups.standby]
targets = [{{ address = "{standby.address}" }}]
[target_groups.standby.health_check]
interval_seconds = 0.5
timeout_seconds = 0.2
healthy_threshold = 1
unhealthy_threshold = 1
"""
    )
    assert proxy.admin is not None and proxy.admin.address is not None
    url = f"ws://{listener_address(proxy)}/"
    sent = 0
    stop = asyncio.Event()

    async def chatter(session: aiohttp.ClientSession) -> None:
        """20 checked messages a second until told to stop."""
        nonlocal sent
        async with session.ws_connect(url) as ws:
            while not stop.is_set():
                await ws.send_str(f"m{sent}")
                await ws.receive_str(timeout=5)
                sent += 1
                await asyncio.sleep(0.05)

    async with (
        prometheus_scraping(str(proxy.admin.address), tmp_path) as prometheus,
        aiohttp.ClientSession() as session,
    ):
        sessions = [asyncio.create_task(chatter(session)) for _ in range(5)]
        try:
            await prometheus.wait_until(
                session,
                'sum(wsproxy_sessions_active{listener="edge",target_group="chat"})',
                lambda result: result == [5.0],
            )
            # 5 sessions x at most 20 messages/s: up to 100 a second (less on a busy machine).
            rates = await prometheus.wait_until(
                session,
                'sum(rate(wsproxy_websocket_messages_total{direction="client_to_target"}[5s]))',
                lambda result: bool(result) and 30 <= result[0] <= 110,
            )
            await prometheus.wait_until(
                session,
                'wsproxy_target_group_healthy_targets{target_group="standby"}',
                lambda result: result == [1.0],
            )
            await standby.stop()  # the health checks notice, then Prometheus does
            await prometheus.wait_until(
                session,
                'wsproxy_target_group_healthy_targets{target_group="standby"}',
                lambda result: result == [0.0],
            )
            await prometheus.wait_until(
                session,
                'wsproxy_target_state{target_group="standby",state="unhealthy"}',
                lambda result: result == [1.0],
            )
        finally:
            stop.set()
            await asyncio.gather(*sessions)
        await prometheus.wait_until(
            session,
            'sum(wsproxy_sessions_active{listener="edge"}) or vector(0)',
            lambda result: result == [0.0],
        )
        # Every message the clients sent, exactly, as Prometheus stored it.
        await prometheus.wait_until(
            session,
            'sum(wsproxy_websocket_messages_total{direction="client_to_target"})',
            lambda result: result == [float(sent)],
        )
    print(f"\nprometheus saw {rates[0]:.1f} messages/s; {sent} messages sent in all")
