"""Running under systemd: the unit file, sd_notify states, and config watching (ConfigMaps)."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.helpers.as_user import shared_directory, wsproxy_as
from tests.helpers.tools import require_tool
from wsproxy.ca.authority import CertificateAuthority
from wsproxy.config import load_config
from wsproxy.demo import EchoTarget
from wsproxy.proxy import Proxy

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "wsproxy.service"
UNIT_CONFIG = UNIT.with_name("wsproxy.toml")


def unit_for_this_machine(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart pointing at this environment's wsproxy (verify checks
    that the executables exist)."""
    wsproxy = Path(sys.executable).parent / "wsproxy"
    unit = tmp_path / "wsproxy.service"
    unit.write_text(UNIT.read_text().replace("/opt/wsproxy/venv/bin/wsproxy", str(wsproxy)))
    return unit


def test_unit_file_verifies_and_is_hardened(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    unit = unit_for_this_machine(tmp_path)
    verify = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stderr
    # systemd's own exposure score: 0 (locked down) to 10 (exposed); "OK" is below 2.5 here.
    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=25", str(unit)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert security.returncode == 0, security.stdout[-2000:]
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "RestartPreventExitStatus=78",
        "LimitNOFILE=1048576",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
    ):
        assert f"\n{line}\n" in text, line


def unit_settings(name: str) -> list[str]:
    return [
        line.split("=", 1)[1]
        for line in UNIT.read_text().splitlines()
        if line.startswith(f"{name}=")
    ]


# A uid from systemd's DynamicUser= range (61184-65519), with no other group.
DYNAMIC_UID = 61234


def test_the_dynamic_user_reads_its_keys_through_load_credential() -> None:
    """systemd's side done by hand: the files as `wsproxy ca` writes them (the key root's, 0600),
    each LoadCredential= copied into a credentials directory owned by the unit's user (0400
    files, as systemd makes them), $CREDENTIALS_DIRECTORY set; then the unit's ExecStartPre
    (check-config) and ExecStart (run) as that user, on the config the unit ships."""
    with shared_directory() as root:
        etc = root / "etc" / "wsproxy"
        (etc / "certs").mkdir(parents=True)
        ca = CertificateAuthority(str(root / "ca"))
        ca.init("systemd test CA")
        issued = ca.issue_server("server", ["wsproxy.example.com"])
        shutil.copy(issued.cert_path, etc / "certs" / "server.pem")
        shutil.copy(issued.key_path, etc / "certs" / "server.key")  # keeps mode 0600
        (etc / "admin-token").write_text("s3cret\n")
        (etc / "admin-token").chmod(0o600)
        for path in (root / "etc", etc, etc / "certs"):
            path.chmod(0o755)
        # Ports above 1024 on loopback: this user has no CAP_NET_BIND_SERVICE here.
        config = UNIT_CONFIG.read_text().replace("0.0.0.0:443", "127.0.0.1:0")
        config = re.sub(r'"127\.0\.0\.1:9900"', '"127.0.0.1:0"', config)
        (etc / "wsproxy.toml").write_text(config)
        (etc / "wsproxy.toml").chmod(0o644)

        credentials = root / "run" / "credentials" / "wsproxy.service"
        credentials.mkdir(parents=True)
        (root / "run").chmod(0o755)
        (root / "run" / "credentials").chmod(0o755)
        loaded = unit_settings("LoadCredential")
        assert loaded, "the unit hands the dynamic user no credential"
        for setting in loaded:
            name, source = setting.split(":", 1)
            copy = credentials / name
            shutil.copy(root / source.lstrip("/"), copy)
            os.chown(copy, DYNAMIC_UID, DYNAMIC_UID)
            copy.chmod(0o400)
        os.chown(credentials, DYNAMIC_UID, DYNAMIC_UID)
        credentials.chmod(0o500)

        def as_unit_user(setting: str) -> list[str]:
            """The wsproxy arguments of an Exec*= line, paths moved under ``root``."""
            (executable, *arguments) = shlex.split(setting)
            assert executable.endswith("/wsproxy"), setting
            moved = [str(root / a.lstrip("/")) if a.startswith("/etc/") else a for a in arguments]
            return wsproxy_as(DYNAMIC_UID, DYNAMIC_UID, (), *moved)

        environment = {**os.environ, "CREDENTIALS_DIRECTORY": str(credentials)}
        (check,) = unit_settings("ExecStartPre")
        result = subprocess.run(
            as_unit_user(check), env=environment, cwd=root,
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        (start,) = unit_settings("ExecStart")
        process = subprocess.Popen(
            as_unit_user(start), env=environment, cwd=root,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert process.stderr is not None
            for line in process.stderr:
                if "admin_up" in line or "admin listening" in line:
                    break
            else:
                raise AssertionError(f"wsproxy run exited {process.wait()}")
        finally:
            process.terminate()
            assert process.wait(timeout=30) == 0

        # Without the credentials: the same config is a clear config error, no traceback.
        del environment["CREDENTIALS_DIRECTORY"]
        unset = subprocess.run(
            as_unit_user(check), env=environment, cwd=root,
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert unset.returncode == 78, unset.stderr
        assert "${CREDENTIALS_DIRECTORY} is not set" in unset.stderr
        assert "LoadCredential=" in unset.stderr and "Traceback" not in unset.stderr
        # And naming root's key directly (no LoadCredential=) is the error issue 12 found.
        direct = config.replace("${CREDENTIALS_DIRECTORY}", str(etc / "certs"))
        direct = direct.replace(str(etc / "certs") + "/admin-token", str(etc / "admin-token"))
        (etc / "direct.toml").write_text(direct)
        (etc / "direct.toml").chmod(0o644)
        refused = subprocess.run(
            wsproxy_as(DYNAMIC_UID, DYNAMIC_UID, (), "check-config", str(etc / "direct.toml")),
            env=environment, cwd=root, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert refused.returncode == 78, refused.stderr
        assert f"permission denied for uid {DYNAMIC_UID}" in refused.stderr
        assert "Traceback" not in refused.stderr


async def test_ready_reloading_and_stopping_are_notified(
    tmp_path: Path, echo_targets: list[EchoTarget]
) -> None:
    config = tmp_path / "wsproxy.toml"
    config.write_text(
        f'[admin]\nenabled = false\n[listeners.edge]\naddress = "127.0.0.1:0"\n'
        f'default_target_group = "g"\n[target_groups.g]\n'
        f'targets = [{{ address = "{echo_targets[0].address}" }}]\n'
    )
    notify_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(notify_path))
        manager.setblocking(False)
        loop = asyncio.get_running_loop()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wsproxy", "run", "-c", str(config),
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip

        async def next_message() -> dict[str, str]:
            async with asyncio.timeout(15):
                data = await loop.sock_recv(manager, 4096)
            return dict(line.split("=", 1) for line in data.decode().splitlines())

        try:
            ready = await next_message()
            assert ready["READY"] == "1"
            assert ready["STATUS"].startswith("1 listener(s), 0 connection(s)")
            process.send_signal(signal.SIGHUP)
            reloading = await next_message()
            assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
            assert (await next_message())["READY"] == "1"
            process.terminate()
            assert (await next_message())["STOPPING"] == "1"
            async with asyncio.timeout(15):
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


def swap_configmap(directory: Path, generation: str, text: str) -> None:
    """What the kubelet does to a mounted ConfigMap: write a new timestamped directory, then
    atomically repoint the ``..data`` symlink at it (the file itself is a symlink into ..data)."""
    (directory / generation).mkdir()
    (directory / generation / "wsproxy.toml").write_text(text)
    staging = directory / "..data_tmp"
    staging.symlink_to(generation)
    os.replace(staging, directory / "..data")
    link = directory / "wsproxy.toml"
    if not link.is_symlink():
        link.symlink_to("..data/wsproxy.toml")


async def test_config_watcher_follows_a_configmap_symlink_swap(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], tmp_path: Path
) -> None:
    def text(*targets: EchoTarget) -> str:
        listed = ", ".join(f'{{ address = "{target.address}" }}' for target in targets)
        return f"""
[proxy]
watch_config = true
[admin]
address = "127.0.0.1:0"
[listeners.edge]
address = "127.0.0.1:0"
websocket = true
default_target_group = "chat"
[target_groups.chat]
targets = [{listed}]
"""

    mount = tmp_path / "config"
    mount.mkdir()
    swap_configmap(mount, "..2026_11_28_15_00_00.1", text(echo_targets[0]))
    path = str(mount / "wsproxy.toml")
    proxy = Proxy(load_config(path), path=path)
    await proxy.start()
    try:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"ws://{listener_address(proxy)}/")
            swap_configmap(mount, "..2026_11_28_15_01_00.2", text(*echo_targets[:2]))
            await wait_for(lambda: proxy.reloads["success"] == 1, timeout=5)
            addresses = [t.address for t in proxy.target_groups["chat"].targets]
            assert echo_targets[1].address in addresses
            await ws.send_str("kept")  # an established session is untouched by the reload
            assert await ws.receive_str(timeout=5) == "kept"
            # An invalid update is refused and counted; the running config stays.
            swap_configmap(mount, "..2026_11_28_15_02_00.3", "[listeners\n")
            await wait_for(lambda: proxy.reloads["error"] == 1, timeout=5)
            assert proxy.last_reload_ok is False
            await ws.close()
        await asyncio.sleep(1.5)  # unchanged content: no further reloads
        assert proxy.reloads == {"success": 1, "error": 1}
    finally:
        await proxy.shutdown(grace=1)
