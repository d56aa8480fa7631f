"""A smoke run of every load-test scenario (seconds, tiny sizes): the tool keeps working.
No timing is asserted; the checks are that each scenario runs end to end, reports the figures it
promises as one JSON line, and that traffic really went through."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.process import RunningProxy, start_proxy


@pytest.fixture
async def echo_target() -> AsyncIterator[int]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.echo_target",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None and process.stdin is not None
    async with asyncio.timeout(15):
        port = int((await process.stdout.readline()).split()[0])
    yield port
    process.stdin.close()
    async with asyncio.timeout(10):
        await process.wait()


@pytest.fixture
async def proxy(tmp_path: Path, echo_target: int) -> AsyncIterator[RunningProxy]:
    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[admin]\naddress = "127.0.0.1:0"\n[listeners.edge]\naddress = "127.0.0.1:0"\n'
        f'websocket = true\ndefault_target_group = "echo"\n[target_groups.echo]\n'
        f'targets = [{{ address = "127.0.0.1:{echo_target}" }}]\n'
    )
    running = await start_proxy(config, "--log-level", "info")
    collector = asyncio.create_task(running.collect_stderr())
    yield running
    await running.stop()
    await collector


async def loadtest(*args: str, timeout: float = 120) -> tuple[dict[str, Any], str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(timeout):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()[-3000:]
    first, _, rest = out.decode().partition("\n")
    return json.loads(first), rest


@pytest.mark.parametrize("processes", [1, 2])
async def test_echo_through_wsproxy(proxy: RunningProxy, processes: int) -> None:
    result, text = await loadtest(
        "echo", "--url", f"ws://127.0.0.1:{proxy.port}/", "--sessions", "4", "--size", "64",
        "--seconds", "0.5", "--pid", str(proxy.process.pid), "--processes", str(processes),
    )  # fmt: skip
    assert result["scenario"] == "echo" and result["sessions"] == 4
    assert result["messages"] > 0 and not result["errors"]
    assert set(result["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert result["proxy_cpu_seconds"] is not None
    assert "messages/s" in text and "proxy CPU" in text
    if processes == 2:
        assert result["processes"] == 2


async def test_throughput_connect_hold_and_sweep(proxy: RunningProxy) -> None:
    url = f"ws://127.0.0.1:{proxy.port}/"
    pid = str(proxy.process.pid)
    throughput, _ = await loadtest(
        "throughput", "--url", url, "--sessions", "2", "--size", "4096", "--seconds", "0.5",
        "--pid", pid,
    )  # fmt: skip
    assert throughput["bytes_each_way"] > 0 and throughput["mib_per_second"] > 0
    connect, _ = await loadtest("connect", "--url", url, "--workers", "2", "--seconds", "0.5")
    assert connect["handshakes"] > 0 and connect["tls"] is False and not connect["errors"]
    hold, _text = await loadtest("hold", "--url", url, "--steps", "5,20", "--pid", pid)
    assert [step["sessions"] for step in hold["steps"]] == [5, 20]
    assert all(step["rss_bytes"] > 0 and step["fds"] > 0 for step in hold["steps"])
    assert hold["alive_at_end"] == 20
    sweep, _ = await loadtest(
        "sweep", "--url", url, "--sessions", "1,3", "--size", "32", "--seconds", "0.3"
    )
    assert [point["sessions"] for point in sweep["points"]] == [1, 3]
    assert all(point["messages"] > 0 for point in sweep["points"])


async def test_compare_runs_end_to_end_and_writes_its_reports(tmp_path: Path) -> None:
    out = tmp_path / "results"
    summary, _text = await loadtest(
        "compare", "--systems", "direct,wsproxy", "--rounds", "1", "--seconds", "0.3",
        "--hold", "30", "--sessions", "4", "--throughput-size", "4096", "--out", str(out),
        "--scenarios", "echo-100,echo-1,throughput,connect-ws,connect-wss,echo-tls,hold",
        timeout=300,
    )  # fmt: skip
    table = summary["summary"]
    assert set(table["echo-100"]) == {"direct", "wsproxy-stream", "wsproxy-ws"}
    assert set(table["connect-wss"]) == {"direct-tls", "wsproxy-tls", "wsproxy-passthrough"}
    assert all(entry["errors"] == 0 for entry in table["echo-100"].values())
    assert table["echo-100"]["wsproxy-ws"]["cpu_per_op"] > 0
    assert table["hold"]["wsproxy-tls"]["alive"] == 30
    assert table["hold"]["wsproxy-tls"]["bytes_per_session"] is not None
    assert (out / "results.md").read_text().startswith("Medians of 1 rounds")
    assert json.loads((out / "results.json").read_text())["summary"] == table


async def test_scaling_runs_one_worker_beside_two(tmp_path: Path) -> None:
    out = tmp_path / "results"
    document, _text = await loadtest(
        "scaling", "--rounds", "1", "--seconds", "0.3", "--sessions", "4",
        "--processes", "1", "--out", str(out), timeout=120,
    )  # fmt: skip
    summary = document["summary"]
    for kind in ("echo", "connect"):
        assert set(summary[kind]) == {"1 worker", "2 workers"}
        assert all(entry["rate"] > 0 and entry["errors"] == 0 for entry in summary[kind].values())
        assert all(entry["cpu_us_per_op"] > 0 for entry in summary[kind].values())
    assert (out / "scaling.md").read_text().startswith("wsproxy scaling:")


async def test_session_memory_attributes_an_idle_session_to_lines() -> None:
    result, text = await loadtest(
        "session-memory", "--mode", "websocket", "--sessions", "40", "--top", "30", timeout=120
    )
    assert result["scenario"] == "session-memory" and result["sessions"] == 40
    assert result["errors"] == {}
    assert result["bytes_per_session"] > 1000  # two sockets cannot cost less
    # The frame trackers of the websocket relay are among the lines an idle session keeps.
    assert any("relay/websocket.py" in line["where"] for line in result["lines"])
    assert "bytes per idle session" in text
