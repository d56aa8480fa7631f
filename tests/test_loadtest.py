"""A smoke run of every load-test scenario (seconds, tiny sizes): the tool keeps working.
No timing is asserted; the checks are that each scenario runs end to end, reports the figures it
promises as one JSON line, and that traffic really went through."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
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
    """``python -m loadtest args``: its first line of output as JSON, and the rest."""
    first, _, rest = (await run_module("loadtest", *args, timeout=timeout)).partition("\n")
    return json.loads(first), rest


async def run_module(module: str, *args: str, timeout: float = 120) -> str:
    """The output of ``python -m module args``, which must succeed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(timeout):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()[-3000:]
    return out.decode()


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


@pytest.mark.parametrize("mode", ["websocket", "tls"])
async def test_session_memory_attributes_an_idle_session_to_lines(mode: str) -> None:
    result, text = await loadtest(
        "session-memory", "--mode", mode, "--sessions", "40", "--top", "30", timeout=120
    )
    assert result["scenario"] == "session-memory" and result["sessions"] == 40
    assert result["errors"] == {}
    assert result["bytes_per_session"] > 1000  # two sockets cannot cost less
    # The frame trackers of the websocket relay are among the lines an idle session keeps.
    assert any("relay/websocket.py" in line["where"] for line in result["lines"])
    assert "bytes per idle session" in text


ROOT = Path(__file__).resolve().parent.parent


async def test_ab_runs_both_versions_in_alternating_rounds(tmp_path: Path) -> None:
    out = tmp_path / "results"
    document, text = await loadtest(
        "ab", "--base", str(ROOT), "--head", str(ROOT), "--rounds", "2", "--seconds", "0.3",
        "--sessions", "4", "--scenarios", "connect-ws,echo-100-stream", "--out", str(out),
        "--name", "smoke", timeout=180,
    )  # fmt: skip
    summary = document["summary"]
    assert list(summary) == ["connect-ws", "echo-100-stream"]
    for entry in summary.values():
        for label in ("A", "B"):
            assert entry[label]["median"] > 0 and entry[label]["errors"] == 0
        assert entry["ratio"] > 0 and entry["verdict"].startswith("n/a")  # 2 rounds: no verdict
    assert [v["root"] for v in document["versions"]] == [str(ROOT), str(ROOT)]
    saved = json.loads((out / "smoke.json").read_text())
    # A then B in the first round, B then A in the second.
    order = [(r["round"], r["version"]) for r in saved["runs"] if r["scenario"] == "connect-ws"]
    assert order == [(0, "A"), (0, "B"), (1, "B"), (1, "A")]
    assert saved["summary"] == summary
    assert "| connect-ws | ms/handshake |" in (out / "smoke.md").read_text()
    assert "B/A" in text


GIT = shutil.which("git")


def _git(*args: str) -> str:
    assert GIT is not None
    return subprocess.run(
        [GIT, "-C", str(ROOT), *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def _worktree_gone(path: str) -> bool:
    """Neither on disk nor in git's list of worktrees."""
    return not Path(path).exists() and path not in _git("worktree", "list", "--porcelain")


@pytest.mark.skipif(GIT is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
async def test_ab_checks_out_a_revision_and_removes_its_worktree(tmp_path: Path) -> None:
    document, _text = await loadtest(
        "ab", "--base", "HEAD", "--rounds", "1", "--seconds", "0.3", "--hold", "30",
        "--scenarios", "connect-stream,hold-ws", "--out", str(tmp_path), timeout=180,
    )  # fmt: skip
    base, head = document["versions"]
    assert base["commit"] == _git("rev-parse", "HEAD").strip()
    assert base["root"] != str(ROOT) and head["root"] == str(ROOT)
    summary = document["summary"]
    assert summary["connect-stream"]["A"]["median"] > 0
    # Bytes per idle session, each version in a process of its own started for it.
    assert summary["hold-ws"]["A"]["alive"] == summary["hold-ws"]["B"]["alive"] == [30]
    assert summary["hold-ws"]["A"]["median"] is not None
    assert summary["hold-ws"]["unit"] == "B/session"
    # The worktree made for the base is gone, from disk and from git's list.
    assert _worktree_gone(base["root"])


async def test_ab_refuses_what_is_neither_a_revision_nor_a_checkout(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest", "ab", "--base", "no-such-revision-0123",
        "--scenarios", "connect-ws", "--out", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        _out, err = await process.communicate()
    assert process.returncode == 2
    assert "neither a directory holding wsproxy/ nor a revision" in err.decode()


async def test_the_launcher_refuses_a_wsproxy_from_another_source(tmp_path: Path) -> None:
    """An A/B run that imported the same wsproxy twice would compare a version with itself."""
    from loadtest.ports import WSPROXY

    env = {**os.environ, "LOADTEST_WSPROXY_ROOT": str(tmp_path)}
    process = await asyncio.create_subprocess_exec(
        *WSPROXY, "--version", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        _out, err = await process.communicate()
    assert process.returncode == 1
    assert f"not from {tmp_path}" in err.decode()


async def test_call_counts_counts_the_bytecodes_of_a_connection(tmp_path: Path) -> None:
    output = await run_module(
        "loadtest.call_counts", "--mode", "stream", "--connects", "8", "--opcodes"
    )
    result = json.loads(output)
    assert result["connects"] == 8 and result["figure"] == "opcodes"
    assert result["opcodes_per_connect"] > 100  # accept, dial, relay, teardown: Python all
    # The flow's own teardown runs once per connection, exactly.
    finish = [f for f in result["functions"] if f["function"].rsplit(":", 1)[1] == "finish"]
    assert [f["calls"] for f in finish] == [1.0]
    saved = tmp_path / "calls.json"
    saved.write_text(output)
    text = await run_module("loadtest.call_counts", "--diff", str(saved), str(saved))
    assert text.startswith("per connect: calls A") and "opcodes A" in text
