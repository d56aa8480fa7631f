"""Reload: a new configuration applies without dropping sessions; a bad one changes nothing."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import listener_address, wait_for
from tests.helpers.knock import Knocker
from wsproxy.config import load_config
from wsproxy.demo import EchoTarget
from wsproxy.proxy import Proxy


def write(path: Path, targets: list[EchoTarget], extra: str = "", listener: str = "") -> None:
    listed = ", ".join(f'{{ address = "{t.address}" }}' for t in targets)
    path.write_text(
        f"""
[admin]
address = "127.0.0.1:0"
[listeners.edge]
address = "127.0.0.1:{{port}}"
websocket = true
default_target_group = "chat"
{listener}
[target_groups.chat]
algorithm = "round_robin"
deregistration_delay_seconds = 0.5
targets = [{listed}]
{extra}
""".replace("{port}", str(getattr(path, "port", 0)))
    )


@pytest.fixture
async def running(
    tmp_path: Path, echo_targets: list[EchoTarget]
) -> AsyncIterator[tuple[Proxy, Path]]:
    path = tmp_path / "wsproxy.toml"
    write(path, [echo_targets[0]])
    proxy = Proxy(load_config(path), path=str(path))
    await proxy.start()
    # Pin the port the listener got, so later files describe the same listener.
    port = listener_address(proxy).port
    text = path.read_text().replace(
        'address = "127.0.0.1:0"\nwebsocket', f'address = "127.0.0.1:{port}"\nwebsocket'
    )
    path.write_text(text)
    assert await proxy.reload() == []
    yield proxy, path
    await proxy.shutdown(grace=1)


def pinned(path: Path, proxy: Proxy, targets: list[EchoTarget], **kw: str) -> None:
    write(path, targets, **kw)
    port = listener_address(proxy).port
    text = path.read_text().replace(
        'address = "127.0.0.1:0"\nwebsocket', f'address = "127.0.0.1:{port}"\nwebsocket'
    )
    path.write_text(text)


class Sessions:
    def __init__(self) -> None:
        self.session = aiohttp.ClientSession()
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []
        self.sent = 0

    async def open(self, url: str, count: int) -> None:
        for _ in range(count):
            self.sockets.append(await self.session.ws_connect(url))

    async def check(self, sockets: list[aiohttp.ClientWebSocketResponse] | None = None) -> None:
        for ws in sockets if sockets is not None else self.sockets:
            self.sent += 1
            payload = f"message {self.sent}"
            await ws.send_str(payload)
            assert await ws.receive_str(timeout=5) == payload

    async def close(self) -> None:
        for ws in self.sockets:
            await ws.close()
        await self.session.close()


async def test_changed_targets_apply_and_live_sessions_keep_flowing(
    running: tuple[Proxy, Path], echo_targets: list[EchoTarget]
) -> None:
    proxy, path = running
    first, second = echo_targets[0], echo_targets[1]
    url = f"ws://{listener_address(proxy)}/"
    live = Sessions()
    try:
        await live.open(url, 10)
        await live.check()
        pinned(path, proxy, [first, second])
        assert await proxy.reload() == []
        await live.check()  # nothing dropped, nothing reordered
        fresh = Sessions()
        await fresh.open(url, 4)
        assert second.sessions == 2  # round robin now includes the new target
        await fresh.close()
        # Remove the first target: its sessions drain with 1001, spread over 0.5 s.
        pinned(path, proxy, [second])
        assert await proxy.reload() == []
        for ws in live.sockets:
            message = await ws.receive(timeout=5)
            assert message.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 1001
        await wait_for(lambda: len(proxy.target_groups["chat"].targets) == 1)
        assert proxy.reloads["success"] >= 3
    finally:
        await live.close()


async def test_bad_reloads_change_nothing(
    running: tuple[Proxy, Path], echo_targets: list[EchoTarget], tmp_path: Path
) -> None:
    proxy, path = running
    url = f"ws://{listener_address(proxy)}/"
    live = Sessions()
    good = path.read_text()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        await live.open(url, 5)
        cases = {
            "syntax": "[listeners",
            "unknown key": good + "\nbogus = 1\n",
            "missing certificate": good.replace(
                "websocket = true",
                'protocol = "tls"\nwebsocket = true\n[listeners.edge.tls]\n'
                'certificates = [{ cert = "absent.pem", key = "absent.key" }]\n[listeners.x]\n'
                'address = "127.0.0.1:0"\ndefault_target_group = "chat"',
                1,
            ),
            "port in use": good
            + f'\n[listeners.other]\naddress = "127.0.0.1:{busy.getsockname()[1]}"\n'
            'default_target_group = "chat"\n',
        }
        for name, text in cases.items():
            path.write_text(text)
            errors = await proxy.reload()
            assert errors, name
            await live.check()
            assert set(proxy.listeners) == {"edge"}, name
        assert proxy.reloads["error"] == 4 and not proxy.last_reload_ok
        path.write_text(good)
        assert await proxy.reload() == [] and proxy.last_reload_ok
    finally:
        busy.close()
        await live.close()


async def test_changed_listener_is_rebound_without_refusing_connections(
    running: tuple[Proxy, Path], echo_targets: list[EchoTarget]
) -> None:
    proxy, path = running
    address = listener_address(proxy)
    url = f"ws://{address}/"
    live = Sessions()
    knocker = Knocker(address, pause=0.002)
    try:
        await live.open(url, 5)
        knocker.start()
        old = proxy.listeners["edge"]
        for timeout in (300, 200, 100):
            pinned(path, proxy, [echo_targets[0]], listener=f"idle_timeout_seconds = {timeout}")
            assert await proxy.reload() == []
            await live.check()  # sessions accepted by the old socket keep flowing
        assert await knocker.stop() == 0
        assert proxy.listeners["edge"] is not old
        assert proxy.listeners["edge"].config.idle_timeout_seconds == 100
    finally:
        await knocker.stop()
        await live.close()


async def test_admin_reload_endpoint(running: tuple[Proxy, Path]) -> None:
    proxy, path = running
    assert proxy.admin is not None and proxy.admin.address is not None
    url = f"http://{proxy.admin.address}/v1/reload"
    good = path.read_text()
    async with aiohttp.ClientSession() as session:
        path.write_text(good + "\nbogus = 1\n")
        async with session.post(url) as response:
            assert response.status == 422
            body = await response.json()
            assert body["reloaded"] is False and "unknown key" in body["errors"][0]
        path.write_text(good)
        async with session.post(url) as response:
            assert response.status == 200


async def test_sighup_reloads_a_running_process(
    tmp_path: Path, echo_targets: list[EchoTarget]
) -> None:
    path = tmp_path / "proxy.toml"
    base = f"""
[admin]
enabled = false
[listeners.edge]
address = "127.0.0.1:0"
default_target_group = "chat"
[target_groups.chat]
targets = [{{ address = "{echo_targets[0].address}" }}]
"""
    path.write_text(base)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wsproxy", "run", "-c", str(path), stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(15):
            while b"listening on" not in (line := await process.stderr.readline()):
                assert line, "wsproxy exited"
        path.write_text(
            base + '[listeners.added]\naddress = "127.0.0.1:0"\ndefault_target_group = "chat"\n'
        )
        os.kill(process.pid, signal.SIGHUP)
        port = 0  # the added listener binds port 0 and says which port it got
        async with asyncio.timeout(15):
            while b"reloaded" not in (line := await process.stderr.readline()):
                assert line, "wsproxy exited"
                if found := re.search(rb"listener 'added' listening on 127\.0\.0\.1:(\d+)", line):
                    port = int(found.group(1))
        assert port, "the added listener did not say where it listens"
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
    finally:
        process.terminate()
        assert await process.wait() == 0


async def test_reload_reads_renewed_certificates_for_new_handshakes(
    tmp_path: Path, echo_targets: list[EchoTarget]
) -> None:
    import shutil
    import ssl

    from tests.helpers.pki import make_pki

    pki = make_pki(tmp_path / "pki")
    cert, key = tmp_path / "edge.pem", tmp_path / "edge.key"
    for source, dest in zip(pki.files("edge"), (cert, key), strict=True):
        shutil.copy(source, dest)
    path = tmp_path / "tls.toml"
    path.write_text(
        f"""
[admin]
enabled = false
[listeners.edge]
address = "127.0.0.1:0"
protocol = "tls"
default_target_group = "chat"
[listeners.edge.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
[target_groups.chat]
targets = [{{ address = "{echo_targets[0].address}" }}]
"""
    )
    proxy = Proxy(load_config(path), path=str(path))
    await proxy.start()
    address = listener_address(proxy)
    context = ssl.create_default_context(cafile=pki.ca_file)

    async def served_serial() -> int:
        _, writer = await asyncio.open_connection(
            address.host, address.port, ssl=context, server_hostname="edge.internal"
        )
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        from cryptography import x509

        return x509.load_der_x509_certificate(der).serial_number

    try:
        before = await served_serial()
        pki.ca.revoke("edge")
        renewed = pki.ca.issue_server("edge", ["edge.internal"])
        shutil.copy(renewed.cert_path, cert)
        shutil.copy(renewed.key_path, key)
        assert await proxy.reload() == []
        assert await served_serial() == renewed.serial != before
    finally:
        await proxy.shutdown(grace=1)
