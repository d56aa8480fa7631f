"""``[proxy] workers = 2`` as real processes: traffic spread over workers, one admin API summing
them, a killed worker replaced while new connections keep succeeding, reload and drain reaching
every worker, and health checks run once per target with their results shared."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from asyncio.subprocess import PIPE, STDOUT
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers.process import RunningProxy, parse_metrics, start_proxy
from tests.helpers.servers import HealthEndpoints, closed_port
from tests.helpers.tools import require_tool
from tests.helpers.wsraw import RawWebSocket, upgrade_request
from wsproxy.demo import EchoTarget
from wsproxy.wire.wsframe import OP_TEXT


def config_text(targets: list[str], extra: str = "", grace: float = 3.0) -> str:
    listed = ", ".join(f'{{ address = "{address}" }}' for address in targets)
    return f"""
[proxy]
workers = 2
shutdown_grace_seconds = {grace}
[admin]
address = "127.0.0.1:0"
[listeners.edge]
address = "127.0.0.1:0"
websocket = true
default_target_group = "echo"
[target_groups.echo]
targets = [{listed}]
{extra}"""


async def start_workers(
    tmp_path: Path, proxies: list[RunningProxy], text: str
) -> tuple[Path, RunningProxy]:
    """Write ``text`` as the config, start wsproxy on it (stopped after the test)."""
    config = tmp_path / "workers.toml"
    config.write_text(text)
    proxy = await start_proxy(config)
    proxies.append(proxy)
    return config, proxy


async def admin_json(proxy: RunningProxy, path: str) -> Any:
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{proxy.admin}{path}") as response,
    ):
        assert response.status == 200, await response.text()
        return await response.json()


async def metrics_text(proxy: RunningProxy) -> str:
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{proxy.admin}/metrics") as response,
    ):
        return await response.text()


async def metrics(proxy: RunningProxy) -> Samples:
    return parse_metrics(await metrics_text(proxy))


Samples = dict[str, list[tuple[dict[str, str], float]]]


def value(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for found, v in samples.get(name, []) if labels.items() <= found.items())


async def round_trip(client: aiohttp.ClientSession, port: int, text: str) -> None:
    async with client.ws_connect(f"ws://127.0.0.1:{port}/{text}") as ws:
        await ws.send_str(text)
        assert await ws.receive_str(timeout=10) == text


async def test_sessions_spread_over_workers_and_metrics_sum(
    tmp_path: Path, echo: EchoTarget, proxies: list[RunningProxy]
) -> None:
    _config, proxy = await start_workers(tmp_path, proxies, config_text([str(echo.address)]))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        sockets = [await client.ws_connect(f"ws://127.0.0.1:{proxy.port}/s{i}") for i in range(24)]
        for round_number in range(5):
            for index, ws in enumerate(sockets):
                await ws.send_str(f"{index}.{round_number}")
                assert await ws.receive_str(timeout=5) == f"{index}.{round_number}"
        workers = (await admin_json(proxy, "/v1/workers"))["workers"]
        text = await metrics_text(proxy)
        samples = parse_metrics(text)
        listeners = (await admin_json(proxy, "/v1/listeners"))["listeners"]
        groups = (await admin_json(proxy, "/v1/target-groups"))["target_groups"]
        for ws in sockets:
            await ws.close()

    # The kernel spread the 24 connections over both workers' sockets (SO_REUSEPORT).
    assert [worker["ready"] for worker in workers] == [True, True]
    per_worker = [worker["connections"] for worker in workers]
    assert sum(per_worker) == 24 and min(per_worker) > 0, per_worker
    assert len({worker["pid"] for worker in workers}) == 2
    # One scrape shows the whole proxy: the workers' counts summed, targets once.
    assert value(samples, "wsproxy_listener_connections_total", listener="edge") == 24
    assert value(samples, "wsproxy_sessions_active", listener="edge") == 24
    assert value(samples, "wsproxy_websocket_messages_total", direction="client_to_target") == 120
    assert value(samples, "wsproxy_websocket_messages_total", direction="target_to_client") == 120
    assert value(samples, "wsproxy_target_connections_active", target=str(echo.address)) == 24
    assert value(samples, "wsproxy_target_state", state="initial") == 1  # once, not per worker
    assert value(samples, "wsproxy_workers") == 2
    assert value(samples, "wsproxy_listener_connections_limit") == 2 * 10000  # per worker
    assert listeners[0]["connections_active"] == 24 and listeners[0]["messages_in"] == 120
    assert groups[0]["targets"][0]["active_connections"] == 24
    # The merged page is still valid exposition with no naming warnings.
    promtool = require_tool("promtool", "prometheus")
    process = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=STDOUT
    )
    output, _ = await process.communicate(text.encode())
    assert process.returncode == 0 and not output.strip(), output.decode()


# How one round trip ended: echoed; cut (the connection ended under it, by EOF or reset: what a
# client sees of a proxy process killed outright); anything else is described.
OK, CUT = "ok", "cut"


async def try_round_trip(port: int, text: str) -> str:
    """A WebSocket round trip on a raw connection that says how it ended (OK, CUT or what went
    wrong). Raw, because aiohttp silently retries a GET whose connection was reset, which would
    hide a lost connection."""
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(upgrade_request(f"/{text}"))
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 101"):
                    return f"answered {head!r}"
                ws = RawWebSocket(reader, writer)
                ws.send(OP_TEXT, text.encode())
                answer = await ws.recv()
            finally:
                writer.close()
    except (asyncio.IncompleteReadError, ConnectionError):
        return CUT
    except TimeoutError:
        return "no answer within 10 s"
    return OK if answer == (OP_TEXT, text.encode()) else f"echoed {answer!r}"


async def stop_process(pid: int) -> float:
    """SIGSTOP ``pid`` and return ``time.monotonic()`` once it is stopped (state T in /proc):
    from then on it accepts nothing, and connections meant for its socket wait in the backlog."""
    os.kill(pid, signal.SIGSTOP)
    async with asyncio.timeout(10):
        while process_state(pid) != "T":
            await asyncio.sleep(0.001)
    return time.monotonic()


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R running, S sleeping, T stopped, Z zombie...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def kill_and_wait(pid: int) -> None:
    """SIGKILL ``pid`` (a worker: not this process's child) and return once it has exited: its
    pidfd turns readable only after the kernel closed every descriptor the process held."""
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    pidfd = os.pidfd_open(pid)
    try:
        loop.add_reader(pidfd, exited.set)
        os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(10):
            await exited.wait()
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


async def test_killed_worker_is_replaced_while_new_connections_succeed(
    tmp_path: Path, echo: EchoTarget, proxies: list[RunningProxy]
) -> None:
    """What docs/operations.md promises of a worker killed outright: the connections it had not
    accepted yet are served by its replacement (its slot's socket, and so its backlog, stays
    open in the supervisor) and new ones keep succeeding; the sessions it had accepted are lost
    with it. The victim is stopped before it is killed so that this line is visible from
    outside: nothing that connects after it stopped can be one of its sessions."""
    _config, proxy = await start_workers(tmp_path, proxies, config_text([str(echo.address)]))
    collector = asyncio.create_task(proxy.collect_stderr())
    trips: list[tuple[float, str]] = []  # when each round trip started (monotonic), its outcome

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        for index in range(20):  # spread over both slots: both workers are serving after this
            await round_trip(client, proxy.port, f"warm{index}")
        before = (await admin_json(proxy, "/v1/workers"))["workers"]
        assert [worker["ready"] for worker in before] == [True, True]
        victim = before[0]["pid"]
        counted = value(await metrics(proxy), "wsproxy_listener_connections_total")

        async def keep_connecting(until: float) -> None:
            index = 0
            while time.monotonic() < until:
                started = time.monotonic()
                trips.append((started, await try_round_trip(proxy.port, f"d{index}")))
                index += 1
                await asyncio.sleep(0.02)

        until = time.monotonic() + 4.0
        loops = [asyncio.create_task(keep_connecting(until)) for _ in range(4)]
        await asyncio.sleep(0.5)
        # The victim's counts as of this scrape are its last report: kept after it dies.
        reported = value(await metrics(proxy), "wsproxy_listener_connections_total")
        stopped = await stop_process(victim)
        await asyncio.sleep(0.3)  # each loop soon waits in the stopped worker's backlog
        await kill_and_wait(victim)
        await asyncio.gather(*loops)
        after = (await admin_json(proxy, "/v1/workers"))["workers"]
        samples = await metrics(proxy)

    # Everything begun once the victim had stopped was served: by the other worker, or queued
    # for the victim and taken by its replacement. Only a session it held could be cut.
    later = [outcome for started, outcome in trips if started >= stopped]
    assert later and later == [OK] * len(later), [o for o in later if o != OK]
    earlier = [outcome for started, outcome in trips if started < stopped]
    assert set(earlier) <= {OK, CUT}, earlier
    assert after[0]["pid"] != victim and after[0]["ready"] and after[0]["restarts"] == 1
    assert after[1]["pid"] == before[1]["pid"] and after[1]["restarts"] == 0
    assert value(samples, "wsproxy_worker_restarts_total") == 1
    # Counters stay monotonic: the killed worker's counts (as of its last report) are kept, and
    # every round trip begun after it stopped is counted by the others; none counted twice.
    total = value(samples, "wsproxy_listener_connections_total")
    assert reported + len(later) <= total <= counted + len(trips), (reported, total, counted)
    await proxy.stop()
    await collector
    assert any(f"pid {victim}) exited with signal SIGKILL" in line for line in proxy.stderr_lines)


async def test_reload_and_drain_reach_every_worker(
    tmp_path: Path, echo: EchoTarget, proxies: list[RunningProxy]
) -> None:
    config, proxy = await start_workers(tmp_path, proxies, config_text([str(echo.address)]))
    collector = asyncio.create_task(proxy.collect_stderr())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        sockets = [await client.ws_connect(f"ws://127.0.0.1:{proxy.port}/s{i}") for i in range(20)]
        # A second listener and a changed route: each worker must take both.
        config.write_text(
            config_text([str(echo.address)])
            + '\n[listeners.second]\naddress = "127.0.0.1:0"\nwebsocket = true\n'
            + 'default_target_group = "echo"\n'
        )
        proxy.process.send_signal(signal.SIGHUP)
        async with asyncio.timeout(10):
            while True:
                workers = (await admin_json(proxy, "/v1/workers"))["workers"]
                if all(w["reloads"] == {"success": 1, "error": 0} for w in workers):
                    break
                await asyncio.sleep(0.1)
        listeners = (await admin_json(proxy, "/v1/listeners"))["listeners"]
        second = next(row for row in listeners if row["name"] == "second")
        second_port = int(second["address"].rsplit(":", 1)[1])
        for index in range(20):
            await round_trip(client, second_port, f"second{index}")
        # Sessions opened before the reload still flow, on both workers.
        per_worker = [w["connections"] for w in workers]
        assert min(per_worker) > 0, per_worker
        for index, ws in enumerate(sockets):
            await ws.send_str(f"after-reload-{index}")
            assert await ws.receive_str(timeout=5) == f"after-reload-{index}"

        proxy.process.terminate()
        codes = []
        for ws in sockets:
            message = await ws.receive(timeout=10)
            assert message.type is aiohttp.WSMsgType.CLOSE, message
            codes.append(ws.close_code)
        async with asyncio.timeout(15):
            exit_code = await proxy.process.wait()
    await collector
    assert codes == [1001] * 20
    assert exit_code == 0


# Imported first thing by every Python process on the PYTHONPATH the test sets (site's
# sitecustomize hook): a worker process (it alone has the control channel's variable) waits
# there until the gate file exists, so its start provably spans the reload the test sends.
WORKER_GATE = """
import os, time
if os.environ.get("WSPROXY_CONTROL_FD"):
    deadline = time.monotonic() + 30
    while not os.path.exists(os.environ["TEST_WORKER_GATE"]) and time.monotonic() < deadline:
        time.sleep(0.01)
"""


async def test_a_reload_while_workers_start_reaches_them(
    tmp_path: Path, echo: EchoTarget, proxies: list[RunningProxy]
) -> None:
    """A reload asks the ready workers; one still starting was passed by, and went on accepting
    on the sockets the reload had closed in the supervisor, while the new ones, bound by the
    supervisor, queued connections nobody accepted (a client hung for minutes). It also read
    the file the reload had changed, and refused to start. A starting worker now takes the
    config text with its sockets and catches up with any reload once it is ready."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(WORKER_GATE)
    gate = tmp_path / "gate"
    path = tmp_path / "workers.toml"
    path.write_text(config_text([str(echo.address)]))
    env = dict(os.environ, TEST_WORKER_GATE=str(gate))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hooks), env.get("PYTHONPATH")]))
    proxy = await start_proxy(path, env=env)  # the supervisor's listener is up, workers not
    proxies.append(proxy)
    collector = asyncio.create_task(proxy.collect_stderr())

    # Pinned to the port the supervisor got: a changed listener, bound anew by the reload.
    path.write_text(
        config_text([str(echo.address)]).replace(
            '127.0.0.1:0"\nwebsocket', f'127.0.0.1:{proxy.port}"\nwebsocket'
        )
    )
    proxy.process.send_signal(signal.SIGHUP)
    async with asyncio.timeout(15):
        while not any("reloaded" in line for line in proxy.stderr_lines):
            assert not any("reload failed" in line for line in proxy.stderr_lines), (
                proxy.stderr_lines
            )
            await asyncio.sleep(0.05)
    assert not any(" started (pid " in line for line in proxy.stderr_lines), proxy.stderr_lines
    gate.touch()
    async with asyncio.timeout(15):
        while sum(" started (pid " in line for line in proxy.stderr_lines) < 2:
            assert proxy.process.returncode is None, "".join(proxy.stderr_lines)
            await asyncio.sleep(0.05)

    async with aiohttp.ClientSession() as client:
        for index in range(20):  # each socket of the group holds about half of them
            async with asyncio.timeout(10):
                await round_trip(client, proxy.port, f"after{index}")
        workers = (await admin_json(proxy, "/v1/workers"))["workers"]
    # A worker spawned after the reload starts on its generation; one spawned before catches up.
    assert [worker["reloads"]["error"] for worker in workers] == [0, 0]
    assert all(worker["ready"] for worker in workers)
    await proxy.stop()
    await collector
    assert not any("did not start" in line for line in proxy.stderr_lines), proxy.stderr_lines


async def test_health_checks_run_once_per_target_and_states_reach_workers(
    tmp_path: Path, echo_targets: list[EchoTarget], proxies: list[RunningProxy]
) -> None:
    fleet = HealthEndpoints()
    probed = await fleet.start(2)
    doomed, survivor = echo_targets[0], echo_targets[1]
    check = """
[target_groups.{name}.health_check]
protocol = "{protocol}"
path = "/"
interval_seconds = 0.5
timeout_seconds = 0.3
healthy_threshold = 2
unhealthy_threshold = 2
"""
    listed = ", ".join(f'{{ address = "{address}" }}' for address in probed)
    extra = (
        check.format(name="echo", protocol="http")
        + f"[target_groups.fleet]\ntargets = [{listed}]\n"
        + check.format(name="fleet", protocol="http")
    )
    _config, proxy = await start_workers(
        tmp_path, proxies, config_text([str(doomed.address), str(survivor.address)], extra)
    )
    try:
        # Probes of two targets at 2/s for 3 s: ~12 when checked once, ~24+ if every worker probed.
        await asyncio.sleep(0.5)
        start_count = fleet.answered
        await asyncio.sleep(3.0)
        probes = fleet.answered - start_count
        assert 8 <= probes <= 16, f"{probes} probes in 3 s"

        await doomed.stop()
        async with asyncio.timeout(10):
            while True:
                samples = await metrics(proxy)
                if value(samples, "wsproxy_target_state", target=str(doomed.address),
                         state="unhealthy") == 1:  # fmt: skip
                    break
                await asyncio.sleep(0.2)
        await asyncio.sleep(0.3)  # the snapshot reaches the workers within 0.1 s
        errors_before = value(samples, "wsproxy_target_connect_errors_total")
        served_before = survivor.sessions
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
            for index in range(16):
                await round_trip(client, proxy.port, f"after{index}")
        samples = await metrics(proxy)
    finally:
        fleet.close()
    # Every worker knew: no dial went to the unhealthy target.
    assert survivor.sessions - served_before == 16
    assert value(samples, "wsproxy_target_connect_errors_total") == errors_before


async def test_a_passive_failure_in_one_worker_takes_the_target_out_everywhere(
    tmp_path: Path, echo: EchoTarget, proxies: list[RunningProxy]
) -> None:
    dead = await closed_port()
    text = config_text([str(dead), str(echo.address)]) + "unhealthy_after_connect_failures = 1\n"
    _, proxy = await start_workers(tmp_path, proxies, text)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        # Round robin: the first dial of whichever worker gets a session may hit the dead target
        # (then the session is retried on the live one and the worker reports the failure).
        index = 0
        async with asyncio.timeout(10):
            while True:
                await round_trip(client, proxy.port, f"probe{index}")
                index += 1
                samples = await metrics(proxy)
                if value(samples, "wsproxy_target_state", target=str(dead), state="unhealthy"):
                    break
        await asyncio.sleep(0.3)  # the supervisor's snapshot reaches both workers
        errors = value(await metrics(proxy), "wsproxy_target_connect_errors_total")
        for later in range(20):
            await round_trip(client, proxy.port, f"later{later}")
        samples = await metrics(proxy)
    # Reported by one worker, applied by the supervisor, followed by every worker.
    assert value(samples, "wsproxy_target_connect_errors_total") == errors
    assert value(samples, "wsproxy_target_connect_errors_total") <= 2  # at most one per worker
