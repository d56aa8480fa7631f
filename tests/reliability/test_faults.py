"""Fault injection: targets killed, reset, black-holed, flapping; a reload storm under load.

Targets are real processes or real servers behind the chaos relay (tests/helpers/chaos.py);
every scenario says what passing means and is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.flows.test_websocket import exchange_raw, status_of, ws_config
from tests.helpers.chaos import ChaosRelay
from tests.helpers.process import TargetProcess
from tests.helpers.servers import full_accept_queue
from tests.helpers.wsraw import upgrade_request
from wsproxy.address import Address
from wsproxy.config import load_config
from wsproxy.demo import EchoTarget
from wsproxy.flows.websocket import WebSocketFlow
from wsproxy.proxy import Proxy
from wsproxy.relay.websocket import WebSocketRelay
from wsproxy.targets.target import TargetState


@pytest.fixture
async def target_processes() -> AsyncIterator[list[TargetProcess]]:
    started = [TargetProcess(), TargetProcess()]
    yield started
    for target in started:
        target.kill()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def echo_once(ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
    await ws.send_str(text)
    assert await ws.receive_str(timeout=5) == text


# --- 1. a target killed mid-stream --------------------------------------------------------------


async def test_a_killed_target_ends_only_its_sessions_and_leaks_nothing(
    make_proxy: ProxyFactory, target_processes: list[TargetProcess]
) -> None:
    doomed, survivor = target_processes
    proxy = await make_proxy(
        ws_config(
            ("echo", [doomed.address, survivor.address]),
            group_extra="unhealthy_after_connect_failures = 1",
        )
    )
    url = f"ws://{listener_address(proxy)}/"
    listener = proxy.listeners["edge"]
    baseline = open_descriptors()
    async with aiohttp.ClientSession() as client:
        sockets = [await client.ws_connect(url) for _ in range(10)]  # round robin: 5 and 5
        for index, ws in enumerate(sockets):
            await echo_once(ws, f"warm {index}")
        on_doomed = [
            flow
            for flow in listener.flows
            if flow.target is not None and flow.target.address == doomed.address
        ]
        assert len(on_doomed) == 5
        del on_doomed
        killed_at = time.monotonic()
        doomed.kill()
        closed_after: list[float] = []
        alive = []
        for ws in sockets:
            try:
                await ws.send_str("after")
                message = await ws.receive(timeout=3)
            except (ConnectionError, aiohttp.ClientError):
                closed_after.append(time.monotonic() - killed_at)
                continue
            if message.type is aiohttp.WSMsgType.TEXT:
                assert message.data == "after"
                alive.append(ws)
            else:
                closed_after.append(time.monotonic() - killed_at)
        assert len(alive) == 5 and len(closed_after) == 5
        assert max(closed_after) < 1.0, closed_after
        # New sessions: the dead target refuses once, is marked unhealthy, then left alone.
        for index in range(6):
            async with client.ws_connect(url) as ws:
                await echo_once(ws, f"new {index}")
        target = proxy.target_groups["echo"].find(doomed.address)
        assert target is not None and target.state is TargetState.UNHEALTHY
        for ws in sockets:
            await ws.close()
    await wait_for(lambda: listener.stats.active == 0)
    gc.collect()
    live = [
        o
        for o in gc.get_objects()
        if (isinstance(o, WebSocketFlow) and o.context is listener.context)
        or (isinstance(o, WebSocketRelay) and o.ticker is listener.ticker)
    ]
    assert live == [], "flows or relays outlived their connections"
    assert open_descriptors() <= baseline + 2


# --- 2. resets during and after the upgrade -----------------------------------------------------


async def test_a_target_killed_mid_session_is_logged_as_the_target_ending_it(
    make_proxy: ProxyFactory,
    target_processes: list[TargetProcess],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 12 §1.2: SIGKILL sends the target's FIN without a Close frame. The client sees
    1006 and the metric counted 1006, but the log said a clean end (closed, --)."""
    doomed = target_processes[0]
    proxy = await make_proxy(ws_config(("echo", [doomed.address])))
    listener = proxy.listeners["edge"]
    with caplog.at_level(logging.INFO, logger="wsproxy.access"):
        async with aiohttp.ClientSession() as client:
            ws = await client.ws_connect(f"ws://{listener_address(proxy)}/")
            await echo_once(ws, "before")
            doomed.kill()
            message = await ws.receive(timeout=5)
            assert message.type is aiohttp.WSMsgType.CLOSED and ws.close_code == 1006
        await wait_for(lambda: listener.stats.active == 0)
    (entry,) = [r.__dict__["connection"] for r in caplog.records if r.name == "wsproxy.access"]
    assert (entry["reason"], entry["termination"], entry["close_code"]) == (
        "target_closed", "SD", None
    )  # fmt: skip
    assert listener.stats.closes == {("none", "1006"): 1}


async def test_a_reset_during_the_upgrade_is_retried_and_after_it_is_not(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    chaos = ChaosRelay(echo_targets[0].address)
    await chaos.start()
    try:
        chaos.to_client.limit_data = 0  # the target's first byte (its 101) turns into a reset
        proxy = await make_proxy(
            ws_config(("echo", [chaos.address, echo_targets[1].address]), algorithm="round_robin")
        )
        url = f"ws://{listener_address(proxy)}/"
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(url) as ws:  # first pick: the resetting one
                await echo_once(ws, "retried")
            assert chaos.accepted == 1 and echo_targets[1].sessions == 1

            chaos.to_client.limit_data = None
            ws = await client.ws_connect(url)
            while chaos.accepted < 2:  # round robin: the next session goes through the relay
                await ws.close()
                ws = await client.ws_connect(url)
            await echo_once(ws, "through the relay")
            sessions_before = echo_targets[1].sessions
            chaos.reset_all()  # the target resets after the 101
            message = await ws.receive(timeout=3)
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            # Bytes had flowed: no retry elsewhere; the client is told and must reconnect.
            await asyncio.sleep(0.2)
            assert echo_targets[1].sessions == sessions_before
    finally:
        await chaos.stop()


# --- 3. a black-holed target --------------------------------------------------------------------


async def test_connect_timeout_is_honoured_within_20_percent(make_proxy: ProxyFactory) -> None:
    with full_accept_queue() as address:
        proxy = await make_proxy(
            ws_config(("chat", [address]), group_extra="connect_timeout_seconds = 1.0")
        )
        started = time.monotonic()
        response = await exchange_raw(listener_address(proxy), upgrade_request())
        waited = time.monotonic() - started
    assert status_of(response) == 504
    assert 0.8 <= waited <= 1.2, waited
    assert proxy.target_groups["chat"].stats.connect_errors[(str(address), "timeout")] == 1


async def test_a_black_holed_target_times_out_is_marked_down_and_avoided(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    chaos = ChaosRelay(echo_targets[0].address)
    await chaos.start()
    chaos.black_hole = True  # accepts, swallows, never answers
    try:
        proxy = await make_proxy(
            ws_config(
                ("echo", [chaos.address, echo_targets[1].address]),
                group_extra=(
                    "handshake_timeout_seconds = 1.0\n"
                    '[target_groups.echo.health_check]\nprotocol = "websocket"\n'
                    "interval_seconds = 0.5\ntimeout_seconds = 0.3\nunhealthy_threshold = 2\n"
                ),
            )
        )
        group = proxy.target_groups["echo"]
        black = group.find(chaos.address)
        assert black is not None
        await wait_for(lambda: black.state is TargetState.UNHEALTHY, timeout=5)
        async with aiohttp.ClientSession() as client:
            for index in range(8):  # all go to the healthy target, none waits on the hole
                started = time.monotonic()
                async with client.ws_connect(f"ws://{listener_address(proxy)}/") as ws:
                    await echo_once(ws, f"elsewhere {index}")
                assert time.monotonic() - started < 0.5
        assert echo_targets[1].sessions >= 8
    finally:
        await chaos.stop()


async def test_sessions_to_a_target_black_holed_mid_session_end_through_keepalive(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    chaos = ChaosRelay(echo_targets[0].address)
    await chaos.start()
    try:
        proxy = await make_proxy(
            ws_config(
                ("echo", [chaos.address]),
                listener="target_ping_interval_seconds = 0.3\nping_timeout_seconds = 0.5",
            )
        )
        async with aiohttp.ClientSession() as client:
            ws = await client.ws_connect(f"ws://{listener_address(proxy)}/")
            await echo_once(ws, "before")
            await asyncio.sleep(1.0)  # silent but alive: pings answered, pongs not forwarded
            await echo_once(ws, "still alive")
            chaos.to_target.stall = chaos.to_client.stall = True  # the target vanishes, no FIN
            started = time.monotonic()
            message = await ws.receive(timeout=5)
            waited = time.monotonic() - started
            assert message.type is aiohttp.WSMsgType.CLOSE, message
            assert ws.close_code == 1001
            # Silence is seen at the first tick a whole interval after the last byte, then the
            # ping waits its timeout; the ticker rounds each up to its 0.25 s slots.
            assert waited <= 2 * (0.3 + 0.25) + 0.5 + 0.25 + 0.5, waited
            await ws.close()
        stats = proxy.listeners["edge"].stats
        await wait_for(lambda: stats.closes[("proxy", "1001")] == 1)
    finally:
        await chaos.stop()


# --- 7. health flapping -------------------------------------------------------------------------


async def test_hysteresis_holds_while_a_target_flaps(make_proxy: ProxyFactory) -> None:
    answers = 0

    async def flapping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answers
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            status = b"200 OK" if answers % 2 == 0 else b"500 Oops"
            answers += 1
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(flapping, "127.0.0.1", 0)
    address = Address("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        proxy = await make_proxy(
            ws_config(
                ("echo", [address]),
                group_extra=(
                    '[target_groups.echo.health_check]\nprotocol = "http"\npath = "/"\n'
                    "interval_seconds = 0.5\ntimeout_seconds = 0.3\n"
                    "healthy_threshold = 3\nunhealthy_threshold = 2\n"
                ),
            )
        )
        group = proxy.target_groups["echo"]
        await asyncio.sleep(4.0)  # ~8 probes, alternating ok / failed
        assert answers >= 6
        target = group.targets[0]
        # initial -> healthy on the first (ok) result, then never two failures or three
        # successes in a row: no routing change after that first one.
        assert target.state is TargetState.HEALTHY
        assert group.stats.transitions.get(str(address), 0) == 0
    finally:
        server.close()


# --- 9. a reload storm under load ---------------------------------------------------------------


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_fifty_reloads_in_ten_seconds_drop_no_session_and_leak_nothing(
    tmp_path: Path, echo_targets: list[EchoTarget]
) -> None:
    path = tmp_path / "storm.toml"

    def variant(index: int) -> str:
        weight = 1 + index % 5
        rule = f'[[listeners.edge.rules]]\npath_prefix = "/v{index % 3}"\ntarget_group = "echo"\n'
        return (
            "[admin]\nenabled = false\n"
            + ws_config(("echo", [echo_targets[0].address]), listener=rule)
        ).replace(
            f'targets = [{{ address = "{echo_targets[0].address}" }}]',
            f'targets = [{{ address = "{echo_targets[0].address}", weight = {weight} }}, '
            f'{{ address = "{echo_targets[1].address}" }}]',
        )

    path.write_text(variant(0))
    proxy = Proxy(load_config(str(path)), path=str(path))
    await proxy.start()
    errors: list[str] = []
    try:
        url = f"ws://{listener_address(proxy)}/live"
        async with aiohttp.ClientSession() as client:
            sockets = [await client.ws_connect(f"{url}{i}") for i in range(20)]
            stop = asyncio.Event()
            exchanged = [0] * len(sockets)

            async def keep_talking(index: int, ws: aiohttp.ClientWebSocketResponse) -> None:
                while not stop.is_set():
                    await echo_once(ws, f"{index}:{exchanged[index]}")
                    exchanged[index] += 1
                    await asyncio.sleep(0.02)

            talkers = [asyncio.create_task(keep_talking(i, ws)) for i, ws in enumerate(sockets)]
            await asyncio.sleep(0.5)
            gc.collect()
            fds, rss = open_descriptors(), rss_bytes()
            for index in range(1, 51):
                broken = index % 10 == 5  # every tenth file is invalid: nothing may change
                path.write_text("[listeners.edge\n" if broken else variant(index))
                errors += await proxy.reload()
                await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*talkers)  # raises if any session broke
            gc.collect()
            fds_after, rss_after = open_descriptors(), rss_bytes()
            for ws in sockets:
                await ws.close()
    finally:
        await proxy.shutdown(grace=1.0)
    assert len(errors) == 5  # the five broken files, refused
    assert proxy.reloads == {"success": 45, "error": 5}
    assert min(exchanged) > 20
    # The last valid generation won: variant(50).
    assert proxy.config.listeners["edge"].rules[0].path_prefix == "/v2"
    weights = {t.address: t.weight for t in proxy.target_groups["echo"].targets}
    assert weights[echo_targets[0].address] == 1
    assert fds_after <= fds + 4, (fds, fds_after)
    assert rss_after - rss < 20 * 1024 * 1024, (rss, rss_after)
    print(f"\nreload storm: 50 reloads, {sum(exchanged)} messages, fds {fds} -> {fds_after}, "
          f"RSS {rss / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB")  # fmt: skip
