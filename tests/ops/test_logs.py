"""Connection log lines with termination codes, lifecycle events, and a logger that never blocks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.flows.test_websocket import exchange_raw, ws_config
from tests.helpers.servers import closed_port
from tests.helpers.wsraw import upgrade_request
from wsproxy.demo import EchoTarget
from wsproxy.ops.logs import JsonFormatter, NonBlockingHandler
from wsproxy.proxy import Proxy


def connection_entries(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        json.loads(JsonFormatter().format(record))
        for record in caplog.records
        if record.name == "wsproxy.access"
    ]


async def clean_session(proxy: Proxy) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://{listener_address(proxy)}/") as ws,
    ):
        await ws.send_str("x")
        await ws.receive_str(timeout=5)


async def bad_request(proxy: Proxy) -> None:
    await exchange_raw(listener_address(proxy), b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")


async def slow_head(proxy: Proxy) -> None:
    await exchange_raw(listener_address(proxy), b"GET / HTTP/1.1\r\n", timeout=5)


async def idle_session(proxy: Proxy) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://{listener_address(proxy)}/") as ws,
    ):
        message = await ws.receive(timeout=5)  # the proxy closes the idle session
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def drained_session(proxy: Proxy) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://{listener_address(proxy)}/") as ws,
    ):
        drain = asyncio.create_task(proxy.drain(grace=2.0))
        message = await ws.receive(timeout=5)
        assert message.type is aiohttp.WSMsgType.CLOSE
        await drain


Scenario = Callable[[Proxy], Awaitable[None]]


@pytest.mark.parametrize(
    ("scenario", "listener", "expected"),
    [
        (clean_session, "", ("closed", "--")),
        (bad_request, "", ("bad_request", "PR")),
        (slow_head, "request_head_timeout_seconds = 0.3", ("request_timeout", "cR")),
        (idle_session, "idle_timeout_seconds = 0.3", ("idle_timeout", "cD")),
        (drained_session, "", ("draining", "DD")),
    ],
    ids=["clean", "bad-request", "slow-head", "idle", "drained"],
)
async def test_termination_codes(
    make_proxy: ProxyFactory,
    echo_targets: list[EchoTarget],
    caplog: pytest.LogCaptureFixture,
    scenario: Scenario,
    listener: str,
    expected: tuple[str, str],
) -> None:
    proxy = await make_proxy(ws_config(("chat", [echo_targets[0].address]), listener=listener))
    with caplog.at_level(logging.INFO, logger="wsproxy.access"):
        await scenario(proxy)
        await wait_for(lambda: not proxy.listeners["edge"].flows and bool(caplog.records))
    entries = connection_entries(caplog)
    assert [(e["reason"], e["termination"]) for e in entries] == [expected]


async def test_termination_of_a_refused_target(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await make_proxy(ws_config(("chat", [await closed_port()])))
    with caplog.at_level(logging.INFO, logger="wsproxy.access"):
        await exchange_raw(listener_address(proxy), upgrade_request())
        await wait_for(lambda: bool(connection_entries(caplog)))
    (entry,) = connection_entries(caplog)
    assert (entry["status"], entry["reason"], entry["termination"]) == (
        502, "target_refused", "SC"
    )  # fmt: skip


async def test_lifecycle_events_are_json_with_their_fields(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        proxy = await make_proxy(
            ws_config(("chat", [echo_targets[0].address]))
            + "[target_groups.chat.health_check]\ninterval_seconds = 0.5\n"
            "timeout_seconds = 0.2\nhealthy_threshold = 1\n"
        )
        await wait_for(lambda: proxy.target_groups["chat"].targets[0].state == "healthy")
        await proxy.drain(grace=0.5)
    events = [json.loads(JsonFormatter().format(r)) for r in caplog.records if hasattr(r, "event")]
    by_kind = {entry["event"]: entry for entry in events}
    assert by_kind["listener_up"]["listener"] == "edge"
    assert (
        by_kind["target_state"].items()
        >= {
            "target_group": "chat",
            "target": str(echo_targets[0].address),
            "previous_state": "initial",
            "state": "healthy",
        }.items()
    )
    assert {e["phase"] for e in events if e["event"] == "drain"} == {"start", "done"}
    assert all(isinstance(e["message"], str) and e["level"] for e in events)


def test_a_blocked_stderr_drops_lines_instead_of_blocking() -> None:
    """A pipe nobody reads fills up; the handler keeps accepting lines without blocking, drops
    and counts what does not fit, and what it did write arrives whole and in order."""
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    handler = NonBlockingHandler(stream, capacity=100)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("tests.blocked")
    logger.propagate = False
    logger.addHandler(handler)
    finished = threading.Event()

    def flood() -> None:
        for i in range(20_000):
            logger.warning("line %05d %s", i, "x" * 100)
        finished.set()

    try:
        thread = threading.Thread(target=flood)
        thread.start()
        # 20,000 lines of ~110 bytes are 2 MB: far more than a pipe holds (64 KiB).
        assert finished.wait(30), "logging blocked on a full stderr"
        thread.join()
        dropped = handler.dropped
        assert dropped > 0
        os.set_blocking(read_end, False)
        received = b""
        while True:
            try:
                chunk = os.read(read_end, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            received += chunk
    finally:
        logger.removeHandler(handler)
        os.close(read_end)
        handler.close(timeout=1.0)
        with contextlib.suppress(OSError):
            stream.close()
    lines = received.decode().splitlines()
    whole = [line for line in lines if len(line) == len("line 00000 ") + 100]
    numbers = [int(line.split()[1]) for line in whole]
    assert numbers == sorted(numbers) and numbers[0] == 0  # in order, from the first
    assert len(numbers) + dropped <= 20_000
