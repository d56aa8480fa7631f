"""Two ``wsproxy run`` on one address. Listeners bind with SO_REUSEPORT (reloads and worker slots
share an address inside one process), which would also let a second process join silently and
take part of the connections. So the second is refused: exit 1, "address in use", naming the
listener, the address and ``share_address``; with ``share_address = true`` (the new process of
a blue/green handover) both serve. The admin listener never shares its port."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import aiohttp
import pytest

from tests.helpers.process import WSPROXY, RunningProxy, parse_metrics, start_proxy
from tests.process.test_workers import admin_json, round_trip
from wsproxy.address import Address
from wsproxy.demo import EchoTarget
from wsproxy.listener import ListeningSockets


def write_config(
    path: Path,
    echo: EchoTarget,
    *,
    port: int = 0,
    admin_port: int = 0,
    workers: int = 1,
    share: bool = False,
) -> Path:
    path.write_text(
        f"""
[proxy]
workers = {workers}
shutdown_grace_seconds = 1
[admin]
address = "127.0.0.1:{admin_port}"
[listeners.edge]
address = "127.0.0.1:{port}"
{"share_address = true" if share else ""}
websocket = true
default_target_group = "echo"
[target_groups.echo]
targets = [{{ address = "{echo.address}" }}]
"""
    )
    return path


async def run_until_exit(path: Path) -> tuple[int, str]:
    """``wsproxy run -c PATH`` that is expected to give up: (exit code, stderr)."""
    process = await asyncio.create_subprocess_exec(
        *WSPROXY, "run", "-c", str(path), stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(20):
            _, stderr = await process.communicate()
    finally:
        if process.returncode is None:  # it started serving instead: do not leave it running
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stderr.decode()


async def connections_total(proxy: RunningProxy) -> float:
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{proxy.admin}/metrics") as response,
    ):
        samples = parse_metrics(await response.text())
    return sum(value for _, value in samples.get("wsproxy_listener_connections_total", []))


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_second_run_on_a_listening_address_exits_1(
    tmp_path: Path, echo: EchoTarget, proxies: list[RunningProxy], workers: int
) -> None:
    first = await start_proxy(write_config(tmp_path / "first.toml", echo, workers=workers))
    proxies.append(first)
    second = write_config(tmp_path / "second.toml", echo, port=first.port, workers=workers)

    code, stderr = await run_until_exit(second)

    assert code == 1, stderr
    assert f"listener 'edge': cannot bind 127.0.0.1:{first.port}: address in use" in stderr
    assert "set listeners.edge.share_address = true" in stderr, stderr
    # The first keeps the address to itself and serves on.
    async with aiohttp.ClientSession() as client:
        for index in range(10):
            await round_trip(client, first.port, f"after{index}")
    assert await connections_total(first) == 10


async def test_with_share_address_both_serve_and_the_new_one_takes_over(
    tmp_path: Path, echo: EchoTarget, proxies: list[RunningProxy]
) -> None:
    """A blue/green handover: the new process opts in (the old one needs nothing: it listens
    with SO_REUSEPORT), both serve while they overlap, then the old one stops."""
    old = await start_proxy(write_config(tmp_path / "old.toml", echo))
    proxies.append(old)
    new = await start_proxy(write_config(tmp_path / "new.toml", echo, port=old.port, share=True))
    proxies.append(new)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        # The kernel spreads connections by their addresses: a few dozen reach both processes.
        counts = [0.0, 0.0]
        for batch in range(10):
            for index in range(20):
                await round_trip(client, old.port, f"both{batch}.{index}")
            counts = [await connections_total(old), await connections_total(new)]
            if min(counts) > 0:
                break
        assert min(counts) > 0, counts

        await old.stop()
        assert old.process.returncode == 0
        served = await connections_total(new)
        for index in range(20):
            await round_trip(client, old.port, f"after{index}")
        assert await connections_total(new) == served + 20


async def test_the_admin_port_is_never_shared(
    tmp_path: Path, echo: EchoTarget, proxies: list[RunningProxy]
) -> None:
    """``share_address`` is a listener's; the admin listener binds without SO_REUSEPORT, so the
    kernel refuses a second one on its port (two admin APIs behind one port would answer for
    either process at random)."""
    first = await start_proxy(write_config(tmp_path / "first.toml", echo))
    proxies.append(first)
    second = write_config(
        tmp_path / "second.toml", echo, port=first.port, admin_port=first.admin, share=True
    )

    code, stderr = await run_until_exit(second)

    assert code == 1, stderr
    assert f"admin listener: cannot bind 127.0.0.1:{first.admin}: " in stderr, stderr


async def test_a_supervisor_rebinding_its_own_address_in_a_reload_is_not_refused(
    tmp_path: Path, echo: EchoTarget, proxies: list[RunningProxy]
) -> None:
    """Reloads bind the new sockets before the old ones close: with workers, a listener pinned
    to the port it got, then renamed on that address, is bound again next to the supervisor's
    own sockets each time, which is sharing with itself."""
    path = write_config(tmp_path / "proxy.toml", echo, workers=2)
    proxy = await start_proxy(path)
    proxies.append(proxy)
    collector = asyncio.create_task(proxy.collect_stderr())
    async with asyncio.timeout(15):  # a reload while they start is test_workers.py's
        while sum(" started (pid " in line for line in proxy.stderr_lines) < 2:
            await asyncio.sleep(0.05)
    text = path.read_text()
    pinned = text.replace(
        'address = "127.0.0.1:0"\n\nwebsocket', f'address = "127.0.0.1:{proxy.port}"\n\nwebsocket'
    )
    assert pinned != text
    renamed = pinned.replace("[listeners.edge]", "[listeners.renamed]")
    async with aiohttp.ClientSession() as client:
        for done, step in enumerate([pinned, renamed], 1):
            path.write_text(step)
            proxy.process.send_signal(signal.SIGHUP)
            async with asyncio.timeout(15):  # the workers log "reloaded" too: ask each one
                while not all(
                    worker["reloads"]["success"] == done
                    for worker in (await admin_json(proxy, "/v1/workers"))["workers"]
                ):
                    failed = [line for line in proxy.stderr_lines if "reload failed" in line]
                    assert not failed, failed
                    await asyncio.sleep(0.05)
            for index in range(10):
                await round_trip(client, proxy.port, f"step{done}.{index}")
    await proxy.stop()
    await collector
    assert not any("address in use" in line for line in proxy.stderr_lines)


def test_sockets_of_this_process_share_an_address_others_are_refused() -> None:
    """The check at bind: a socket bound by the same ListeningSockets (a reload's old listener,
    the first worker slot) is sharing with itself; any other listening socket is another process
    as far as the check can tell."""
    edge = Address("127.0.0.1", 0)
    sockets = ListeningSockets()
    bind_listening_socket = sockets.bind
    first = bind_listening_socket(edge, listener="edge", share=False)
    port = first.getsockname()[1]
    here = Address("127.0.0.1", port)
    again = bind_listening_socket(here, listener="edge", share=False)
    again.close()
    first.close()

    foreign = socket.create_server(("127.0.0.1", port), reuse_port=True)  # not bound by wsproxy
    try:
        with pytest.raises(OSError, match=r"address in use: .*listeners\.edge\.share_address"):
            bind_listening_socket(here, listener="edge", share=False)
        bind_listening_socket(here, listener="edge", share=True).close()
    finally:
        foreign.close()
    bind_listening_socket(here, listener="edge", share=False).close()  # free again
