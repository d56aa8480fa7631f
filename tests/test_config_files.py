"""The files a config names: ${NAME} in their paths, and what happens when one is unreadable.

An unreadable key is a config error (exit 78) that names the file, the uid the proxy runs as and
the fix, at ``check-config``, at ``run`` and at a reload (which keeps the running config). The
proxy runs as another uid in a subprocess: as root this process could read every file.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.helpers.as_user import shared_directory, wsproxy_as
from tests.helpers.pki import make_pki
from wsproxy.config import expand_variables, parse_config
from wsproxy.errors import ConfigError
from wsproxy.tls import check_files

UID = GID = 10001  # the uid deploy/kubernetes and deploy/container run as


# --- ${NAME} in file paths -----------------------------------------------------------------------


def test_variables_expand_in_file_paths_only() -> None:
    environ = {"CREDENTIALS_DIRECTORY": "/run/credentials/wsproxy.service", "TAG": "blue"}
    text = """
[admin]
token_file = "${CREDENTIALS_DIRECTORY}/admin-token"
[listeners.edge]
address = "127.0.0.1:0"
protocol = "tls"
default_target_group = "${TAG}"
[listeners.edge.tls]
certificates = [{ cert = "${CREDENTIALS_DIRECTORY}/edge.pem", key = "$${CREDENTIALS_DIRECTORY}/x" }]
[target_groups.g]
"""
    with pytest.raises(ConfigError) as caught:  # not a file path: no expansion
        parse_config(text, environ=environ)
    assert "default_target_group" in str(caught.value)
    config = parse_config(text.replace("${TAG}", "g"), environ=environ)
    credentials = Path(environ["CREDENTIALS_DIRECTORY"])
    assert Path(config.admin.token_file or "") == credentials / "admin-token"
    assert config.listeners["edge"].tls is not None
    files = config.listeners["edge"].tls.certificates[0]
    assert files.cert == "/run/credentials/wsproxy.service/edge.pem"
    assert files.key.endswith("/${CREDENTIALS_DIRECTORY}/x")  # $$ is a literal '$'


@pytest.mark.parametrize(
    ("value", "environ", "error"),
    [
        ("${HOME}/k", {"HOME": "/h"}, None),
        ("/a/${X}${Y}", {"X": "b", "Y": "c"}, None),
        ("$$x", {}, None),
        ("${CREDENTIALS_DIRECTORY}/k", {}, "systemd sets it for a unit with LoadCredential="),
        ("${MISSING}/k", {}, r"\$\{MISSING\} is not set in the environment; export MISSING"),
        ("${EMPTY}/k", {"EMPTY": ""}, "set but empty"),
        ("$HOME/k", {"HOME": "/h"}, r"'\$' must start \$\{NAME\}"),
        ("${1X}/k", {}, r"'\$' must start"),
        ("${X/k", {"X": "a"}, r"'\$' must start"),
    ],
)
def test_expand_variables(value: str, environ: dict[str, str], error: str | None) -> None:
    if error is None:
        expanded = expand_variables(value, environ)
        assert "$" not in expanded or value == "$$x"
        return
    with pytest.raises(ValueError, match=error):
        expand_variables(value, environ)


def test_every_file_key_expands_and_an_unset_variable_names_its_key() -> None:
    text = """
[admin]
token_file = "${T}"
[listeners.edge]
address = "127.0.0.1:0"
protocol = "tls"
websocket = true
default_target_group = "g"
[listeners.edge.tls]
certificates = [{ cert = "${A}", key = "${B}" }]
client_auth = "required"
client_ca = "${C}"
crl = "${D}"
[target_groups.g]
protocol = "tls"
tls = { ca = "${E}", client_cert = "${F}", client_key = "${G}" }
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ={})
    paths = {issue.path for issue in caught.value.issues}
    assert paths == {
        "admin.token_file",
        "listeners.edge.tls.certificates[0].cert",
        "listeners.edge.tls.certificates[0].key",
        "listeners.edge.tls.client_ca",
        "listeners.edge.tls.crl",
        "target_groups.g.tls.ca",
        "target_groups.g.tls.client_cert",
        "target_groups.g.tls.client_key",
    }
    environ = {name: f"/x/{name}" for name in "ABCDEFGT"}
    config = parse_config(text, environ=environ)
    assert config.target_groups["g"].tls is not None
    assert config.target_groups["g"].tls.client_key == "/x/G"


def test_parse_config_reads_no_file() -> None:
    """Validation and file checks are separate steps (check-config, run and reload do both)."""
    text = """
[admin]
token_file = "/nonexistent/token"
[listeners.edge]
address = "127.0.0.1:0"
protocol = "tls"
default_target_group = "g"
[listeners.edge.tls]
certificates = [{ cert = "/nonexistent/edge.pem", key = "/nonexistent/edge.key" }]
[target_groups.g]
"""
    config = parse_config(text)
    with pytest.raises(ConfigError) as caught:
        check_files(config, "<test>")
    paths = [issue.path for issue in caught.value.issues]
    assert paths == ["admin.token_file", "listeners.edge.tls"]


# --- unreadable files, as another uid ------------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    with shared_directory() as path:
        yield path


def all_files_config(directory: Path) -> tuple[Path, dict[str, tuple[Path, str]]]:
    """A config naming every kind of file, all readable by UID; and, per file, its key path."""
    pki = make_pki(directory / "pki")
    store = pki.ca.store
    token = directory / "admin-token"
    token.write_text("s3cret\n")
    files = {
        "listener cert": (Path(store.leaf_cert("edge")), "listeners.edge.tls"),
        "listener key": (Path(store.leaf_key("edge")), "listeners.edge.tls"),
        "client_ca": (Path(pki.ca_file), "listeners.edge.tls"),
        "crl": (Path(pki.crl_file), "listeners.edge.tls"),
        "target ca": (Path(pki.ca_file).with_name("target-ca.pem"), "target_groups.secure.tls"),
        "target client_cert": (Path(store.leaf_cert("alice")), "target_groups.secure.tls"),
        "target client_key": (Path(store.leaf_key("alice")), "target_groups.secure.tls"),
        "token_file": (token, "admin.token_file"),
    }
    shutil.copy(pki.ca_file, files["target ca"][0])
    for root, dirs, names in os.walk(directory):
        for name in dirs:
            Path(root, name).chmod(0o755)
        for name in names:
            os.chown(Path(root, name), UID, GID)  # as an fsGroup or LoadCredential= would
            Path(root, name).chmod(0o400)
    config = directory / "wsproxy.toml"
    config.write_text(
        f"""
[admin]
address = "127.0.0.1:0"
token_file = "{token}"
[listeners.edge]
address = "127.0.0.1:0"
protocol = "tls"
websocket = true
default_target_group = "secure"
[listeners.edge.tls]
certificates = [{{ cert = "{files["listener cert"][0]}", key = "{files["listener key"][0]}" }}]
client_auth = "optional"
client_ca = "{files["client_ca"][0]}"
crl = "{files["crl"][0]}"
[target_groups.secure]
protocol = "tls"
targets = [{{ address = "127.0.0.1:9" }}]
[target_groups.secure.tls]
ca = "{files["target ca"][0]}"
client_cert = "{files["target client_cert"][0]}"
client_key = "{files["target client_key"][0]}"
"""
    )
    config.chmod(0o644)
    return config, files


def as_proxy_user(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        wsproxy_as(UID, GID, (), *arguments),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def make_unreadable(path: Path) -> None:
    """What `wsproxy ca` leaves, and what the proxy's uid cannot read: root's, mode 0600."""
    os.chown(path, 0, 0)
    path.chmod(0o600)


def assert_names_file_uid_and_fix(text: str, path: Path, key: str) -> None:
    assert "Traceback" not in text, text
    assert f"{key}: " in text, text
    assert f"cannot read {path}" in text or f"file {path}" in text, text
    assert f"permission denied for uid {UID}" in text, text
    assert "owned by uid 0 gid 0 with mode 0600" in text, text
    assert "fsGroup" in text and "LoadCredential=" in text, text


def test_check_config_names_every_unreadable_file_its_uid_and_the_fix(shared_dir: Path) -> None:
    config, files = all_files_config(shared_dir)
    readable = as_proxy_user("check-config", str(config), cwd=shared_dir)
    assert readable.returncode == 0, readable.stderr
    for what, (path, key) in files.items():
        make_unreadable(path)
        try:
            result = as_proxy_user("check-config", str(config), cwd=shared_dir)
        finally:
            os.chown(path, UID, GID)
        assert result.returncode == 78, (what, result.stderr)
        assert_names_file_uid_and_fix(result.stderr, path, key)


def test_run_with_an_unreadable_key_exits_78_before_binding(shared_dir: Path) -> None:
    config, files = all_files_config(shared_dir)
    key, where = files["listener key"]
    make_unreadable(key)
    result = as_proxy_user("run", "-c", str(config), cwd=shared_dir)
    assert result.returncode == 78, result.stderr
    assert_names_file_uid_and_fix(result.stderr, key, where)
    assert "listening on" not in result.stderr


def test_an_unreadable_config_file_names_the_uid(shared_dir: Path) -> None:
    config, _ = all_files_config(shared_dir)
    make_unreadable(config)
    result = as_proxy_user("check-config", str(config), cwd=shared_dir)
    assert result.returncode == 78, result.stderr
    assert f"cannot read file: permission denied for uid {UID}" in result.stderr


async def test_a_reload_with_an_unreadable_key_keeps_the_running_config(
    shared_dir: Path,
) -> None:
    config, files = all_files_config(shared_dir)
    process = await asyncio.create_subprocess_exec(
        *wsproxy_as(UID, GID, (), "run", "-c", str(config)),
        cwd=shared_dir,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        ports: dict[str, int] = {}
        async with asyncio.timeout(15):
            while len(ports) < 2:
                line = (await process.stderr.readline()).decode()
                assert line, "wsproxy exited before it listened"
                if found := re.search(r"listener 'edge' listening on 127\.0\.0\.1:(\d+)", line):
                    ports["edge"] = int(found.group(1))
                if found := re.search(r"admin listening on http://127\.0\.0\.1:(\d+)", line):
                    ports["admin"] = int(found.group(1))
        key, _ = files["listener key"]
        make_unreadable(key)
        headers = {"Authorization": "Bearer s3cret"}
        admin = f"http://127.0.0.1:{ports['admin']}"
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{admin}/v1/reload", headers=headers) as response:
                assert response.status == 422
                errors = (await response.json())["errors"]
            async with session.get(f"{admin}/readyz") as response:
                assert response.status == 200
        (error,) = errors
        assert_names_file_uid_and_fix(error, key, "listeners.edge.tls")
        assert process.returncode is None
        # The running generation still serves TLS with the certificate it loaded.
        client = ssl.create_default_context(cafile=str(files["client_ca"][0]))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", ports["edge"], ssl=client, server_hostname="edge.internal"
        )
        writer.close()
        await writer.wait_closed()
        del reader
    finally:
        process.terminate()
        async with asyncio.timeout(15):
            await process.wait()
