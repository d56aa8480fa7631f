"""The command line, run as a user runs it: a real process, real signals, real exit codes."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.helpers.process import WSPROXY, start_proxy
from wsproxy.ca.authority import CertificateAuthority
from wsproxy.cli import build_parser
from wsproxy.clock import FixedClock
from wsproxy.demo import EchoTarget


def run_cli(
    *args: str, stdin: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WSPROXY, *args], capture_output=True, text=True, input=stdin, timeout=timeout, check=False
    )


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("wsproxy ")


def test_usage_error_exits_2() -> None:
    assert run_cli("run").returncode == 2


def all_parsers(
    parser: argparse.ArgumentParser, path: str = "wsproxy"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the command tree, with the command line that reaches it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from all_parsers(child, f"{path} {name}")


def hidden_commands(parser: argparse.ArgumentParser) -> set[str]:
    hidden: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {choice.dest for choice in action._choices_actions}
            hidden |= set(action.choices) - listed
    return hidden


def test_every_option_of_every_command_has_help() -> None:
    missing: list[str] = []
    for path, parser in all_parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue  # its commands are checked below, each in its own parser's listing
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [
                    f"{path} {choice.dest} (command)"
                    for choice in action._choices_actions
                    if not choice.help
                ]
    assert not missing, "options without help text:\n" + "\n".join(missing)


def test_help_shows_the_commands_users_run() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "``" not in result.stdout, result.stdout
    listed = [  # the command list: "    NAME   help", continuation lines indented further
        line.split()[0]
        for line in result.stdout.splitlines()
        if line.startswith("    ") and not line.startswith("     ")
    ]
    assert listed == ["run", "check-config", "demo", "connect", "ca", "asyncapi"], result.stdout
    assert "worker" not in result.stdout, result.stdout
    assert hidden_commands(build_parser()) == {"worker"}
    for path, parser in all_parsers(build_parser()):
        assert "``" not in parser.format_help(), path
    # Hidden, not gone: `wsproxy run` starts its workers with it.
    assert run_cli("worker", "--help").returncode == 0


@pytest.mark.parametrize(
    "args",
    [
        ["run", "-c", "{bad}", "--log-level", "debug"],
        ["run", "--log-format", "json", "-c", "{bad}"],
        ["--log-level", "debug", "check-config", "{bad}", "--log-format", "json"],
        ["check-config", "{bad}", "--log-level", "warning", "--log-format", "text"],
    ],
)
def test_global_options_before_or_after_the_command(tmp_path: Path, args: list[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[listeners.edge]\n")
    result = run_cli(*(arg.format(bad=bad) for arg in args))
    assert result.returncode == 78, result.stderr  # not 2: the options were understood


def test_global_options_after_the_command_take_effect(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "busy.toml"
        path.write_text(
            f'[admin]\nenabled = false\n[listeners.edge]\naddress = "127.0.0.1:{port}"\n'
            'default_target_group = "g"\n[target_groups.g]\n'
        )
        result = run_cli("--log-format", "text", "run", "-c", str(path), "--log-format", "json")
    assert result.returncode == 1
    errors = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(f"cannot bind 127.0.0.1:{port}" in e.get("message", "") for e in errors), (
        result.stderr
    )


def test_ca_commands_take_global_options_too(tmp_path: Path) -> None:
    ca = str(tmp_path / "ca")
    result = run_cli("ca", "init", "--dir", ca, "--log-level", "debug")
    assert result.returncode == 0, result.stderr
    result = run_cli(
        "ca", "issue", "client", "--name", "alice", "--dir", ca, "--log-format", "json"
    )
    assert result.returncode == 0, result.stderr


def test_check_config_ok_on_the_example_once_its_files_exist(tmp_path: Path) -> None:
    """deploy/wsproxy.example.toml names certificates and a token file beside it: minted here
    with our CA, check-config accepts it."""
    example = tmp_path / "wsproxy.example.toml"
    shutil.copy(Path(__file__).parent.parent / "deploy" / "wsproxy.example.toml", example)
    authority = CertificateAuthority(str(tmp_path / "certs"))
    authority.init()
    authority.issue_server("edge", ["chat.internal"], [])
    authority.issue_client("wsproxy")
    (tmp_path / "admin.token").write_text("s3cret\n")
    (tmp_path / "chat.key").write_text("a signing key\n")
    result = run_cli("check-config", str(example))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    assert "ok: 5 listener(s), 6 target group(s), 7 target(s), 1 API(s)" in result.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[listeners", "invalid TOML"),
        (
            '[listeners.edge]\naddress = "nowhere"\ndefault_target_group = "x"\nunknown = 1\n',
            [
                "listeners.edge.address: expected 'host:port'",
                "listeners.edge.unknown: unknown key",
                "listeners.edge.default_target_group: unknown target group 'x'",
            ],
        ),
    ],
)
def test_check_config_lists_every_error_and_exits_78(
    tmp_path: Path, text: str, expected: str | list[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = run_cli("check-config", str(path))
    assert result.returncode == 78
    for line in [expected] if isinstance(expected, str) else expected:
        assert line in result.stderr, result.stderr


def test_run_with_bad_config_exits_78(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[listeners.edge]\n")
    result = run_cli("run", "-c", str(path))
    assert result.returncode == 78
    assert "listeners.edge.address: required key is missing" in result.stderr


def test_run_on_a_busy_port_exits_1(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "busy.toml"
        path.write_text(
            f'[admin]\nenabled = false\n[listeners.edge]\naddress = "127.0.0.1:{port}"\n'
            'default_target_group = "g"\n[target_groups.g]\n'
        )
        result = run_cli("run", "-c", str(path))
    assert result.returncode == 1
    assert f"listener 'edge': cannot bind 127.0.0.1:{port}" in result.stderr


HINTED = re.compile(r"`(wsproxy [^`]+)`")


def follow_hints(args: list[str], depth: int = 0) -> list[str]:
    """Run `wsproxy ARGS`; while it fails, run the commands its first hinted error names, as
    printed (HOST -> localhost), following their own hints likewise, then retry. Returns every
    command followed; fails when an error names none or the hints go round in circles."""
    assert depth < 4, args
    followed: list[str] = []
    for _attempt in range(6):
        result = run_cli(*args)
        if result.returncode == 0:
            return followed
        line = next((line for line in result.stderr.splitlines() if HINTED.search(line)), None)
        assert line is not None, (args, result.stderr)
        for hint in HINTED.findall(line):
            assert "--dir " in hint, line
            followed.append(hint)
            followed += follow_hints(shlex.split(hint.replace("HOST", "localhost"))[1:], depth + 1)
    raise AssertionError(f"the hints did not fix {args}: {followed}")


TLS_CONFIG = """
[admin]
enabled = false
[listeners.edge]
address = "127.0.0.1:0"
protocol = "tls"
websocket = true
default_target_group = "app"
[listeners.edge.tls]
certificates = [{ cert = "pki/issued/edge.pem", key = "pki/issued/edge.key" }]
client_auth = "required"
client_ca = "pki/ca/ca.pem"
crl = "pki/ca/crl.pem"
[target_groups.app]
protocol = "tls"
[target_groups.app.tls]
ca = "pki/ca/ca.pem"
client_cert = "pki/issued/wsproxy.pem"
client_key = "pki/issued/wsproxy.key"
"""


def test_check_config_hints_mint_every_missing_file_as_printed(tmp_path: Path) -> None:
    """The CA lives in pki/ beside the config, not in the default certs/: every hint must name
    it (--dir) and the file's certificate name, and following them makes the config valid."""
    config = tmp_path / "wsproxy.toml"
    config.write_text(TLS_CONFIG)
    pki = tmp_path / "pki"
    followed = follow_hints(["check-config", str(config)])
    assert followed == [
        f"wsproxy ca issue server --name edge --dns HOST --dir {pki}",
        f"wsproxy ca init --dir {pki}",
        f"wsproxy ca issue client --name wsproxy --dir {pki}",
    ]
    (pki / "ca" / "crl.pem").unlink()
    assert follow_hints(["check-config", str(config)]) == [f"wsproxy ca crl --dir {pki}"]


def test_an_expired_certificate_hint_renews_it_as_printed(tmp_path: Path) -> None:
    config = tmp_path / "wsproxy.toml"
    config.write_text(TLS_CONFIG)
    pki = tmp_path / "pki"
    authority = CertificateAuthority(str(pki))
    authority.init()
    authority.issue_client("wsproxy")
    authority.clock = FixedClock(dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    authority.issue_server("edge", ["localhost"], [], days=1)
    followed = follow_hints(["check-config", str(config)])
    assert followed == [
        f"wsproxy ca revoke edge --dir {pki} --reason superseded",
        f"wsproxy ca issue server --name edge --dns HOST --dir {pki}",
    ]


def test_a_file_outside_the_ca_layout_gets_a_hint_saying_where_to_point(tmp_path: Path) -> None:
    config = tmp_path / "wsproxy.toml"
    config.write_text(TLS_CONFIG.replace("pki/issued/edge.", "edge-cert."))
    result = run_cli("check-config", str(config))
    assert result.returncode == 78
    assert (
        "`wsproxy ca issue server --name edge-cert --dns HOST --dir DIR` "
        "(DIR: the CA's directory) and point cert and key at DIR/issued/edge-cert.pem and "
        "DIR/issued/edge-cert.key"
    ) in result.stderr, result.stderr


def test_ca_errors_hint_commands_with_the_ca_directory(tmp_path: Path) -> None:
    ca = str(tmp_path / "elsewhere")
    assert run_cli("ca", "init", "--dir", ca).returncode == 0
    assert run_cli("ca", "issue", "client", "--name", "alice", "--dir", ca).returncode == 0
    for args in (
        ["ca", "issue", "client", "--name", "alice", "--dir", ca],  # exists: revoke it first
        ["ca", "revoke", "nobody", "--dir", ca],
        ["ca", "export-p12", "nobody", "--dir", ca],
    ):
        result = run_cli(*args)
        assert result.returncode == 1, result.stderr
        (hint,) = HINTED.findall(result.stderr)
        assert f"--dir {ca}" in hint, result.stderr
        assert run_cli(*shlex.split(hint)[1:]).returncode == 0, hint


def proxy_config(tmp_path: Path, echo: EchoTarget, grace: float) -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(
        f"""
[proxy]
shutdown_grace_seconds = {grace}
[admin]
address = "127.0.0.1:0"
[listeners.edge]
address = "127.0.0.1:0"
websocket = true
default_target_group = "echo"
[target_groups.echo]
targets = [{{ address = "{echo.address}" }}]
"""
    )
    return path


async def test_sigterm_drains_with_1001_and_exits_0(tmp_path: Path, echo: EchoTarget) -> None:
    proxy = await start_proxy(proxy_config(tmp_path, echo, grace=5), "--log-format", "json")
    collector = asyncio.create_task(proxy.collect_stderr())
    async with aiohttp.ClientSession() as session:
        sockets = [await session.ws_connect(f"ws://127.0.0.1:{proxy.port}/s{i}") for i in range(5)]
        for ws in sockets:
            await ws.send_str("before")
            assert await ws.receive_str(timeout=5) == "before"
        async with session.get(f"http://127.0.0.1:{proxy.admin}/readyz") as response:
            assert response.status == 200
        proxy.process.send_signal(signal.SIGTERM)
        for ws in sockets:
            message = await ws.receive(timeout=10)
            assert message.type is aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 1001
    async with asyncio.timeout(10):
        assert await proxy.process.wait() == 0
    await collector
    entries = [json.loads(line) for line in proxy.stderr_lines if line.startswith("{")]
    connections = [e for e in entries if e.get("event") == "connection"]
    assert len(connections) == 5
    assert all(e["close_code"] == 1001 and e["reason"] == "draining" for e in connections)


async def test_second_signal_exits_at_once(tmp_path: Path, echo: EchoTarget) -> None:
    proxy = await start_proxy(proxy_config(tmp_path, echo, grace=60))
    _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET / HTTP/1.1\r\n")  # a half-sent head keeps a connection open
    await writer.drain()
    await asyncio.sleep(0.2)
    proxy.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    assert proxy.process.returncode is None  # still draining, grace is 60 s
    proxy.process.send_signal(signal.SIGINT)
    async with asyncio.timeout(5):
        assert await proxy.process.wait() == 1
    writer.close()


async def test_connect_command_round_trip(make_proxy: object, echo: EchoTarget) -> None:
    loop = asyncio.get_running_loop()
    url = f"ws://{echo.address}/"

    def run() -> subprocess.CompletedProcess[str]:
        return run_cli("connect", url, "--header", "X-Test: 1", stdin="hello\nworld\n")

    result = await loop.run_in_executor(None, run)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["hello", "world"]
    assert echo.last_headers is not None and echo.last_headers["x-test"] == ["1"]


def test_connect_bad_header_is_a_usage_error() -> None:
    assert run_cli("connect", "ws://127.0.0.1:1/", "--header", "nocolon").returncode == 2


API_CONFIG = """
[listeners.public]
address = "127.0.0.1:8443"
api = "chat"

[apis.chat]
route_selection_expression = "$request.body.meta.action"

[[apis.chat.routes]]
key = "whoami"
target_group = "backend"
respond = true

[target_groups.backend]
protocol = "http"
targets = [{ address = "127.0.0.1:1" }]
"""


def test_asyncapi_writes_the_document_of_the_only_api(tmp_path: Path) -> None:
    path = tmp_path / "api.toml"
    path.write_text(API_CONFIG)
    result = run_cli("asyncapi", "-c", str(path))
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["asyncapi"] == "3.0.0"
    assert doc["servers"]["public"]["host"] == "127.0.0.1:8443"
    assert "whoami" in doc["components"]["messages"]
    out = tmp_path / "chat.json"
    result = run_cli("asyncapi", "-c", str(path), "--api", "chat", "-o", str(out))
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    assert json.loads(out.read_text()) == doc


@pytest.mark.parametrize(
    ("extra", "args", "code", "says"),
    [
        ("", ["--api", "nope"], 2, "has no API 'nope'; --api takes one of: chat"),
        ("[apis.other]\n", [], 2, "defines 2 APIs: choose one with --api (chat, other)"),
        ("[apis.chat.bogus]\n", [], 78, "apis.chat.bogus"),
    ],
)
def test_asyncapi_errors(tmp_path: Path, extra: str, args: list[str], code: int, says: str) -> None:
    path = tmp_path / "api.toml"
    path.write_text(API_CONFIG + extra)
    result = run_cli("asyncapi", "-c", str(path), *args)
    assert result.returncode == code, result.stderr
    assert says in result.stderr
    assert result.stdout == ""


def test_asyncapi_on_a_config_without_apis_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "plain.toml"
    path.write_text(
        '[listeners.edge]\naddress = "127.0.0.1:0"\ndefault_target_group = "g"\n[target_groups.g]\n'
    )
    result = run_cli("asyncapi", "-c", str(path))
    assert result.returncode == 2
    assert "defines no API; add an [apis.NAME] section" in result.stderr


def without_venv() -> dict[str, str]:
    """The environment of a terminal where the venv is not activated: PATH lacks its bin/."""
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p and p != venv_bin
    )
    return env


def run_as_printed(
    command: str, cwd: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a printed command line as a user pastes it: through a shell, outside the venv."""
    return subprocess.run(
        ["/bin/sh", "-c", command],
        cwd=cwd,
        env=without_venv(),
        capture_output=True,
        text=True,
        input=stdin,
        timeout=30,
        check=False,
    )


async def start_demo(launcher: list[str], ca_dir: Path) -> tuple[asyncio.subprocess.Process, str]:
    """Start `wsproxy demo` on free ports; returns the process and what it printed."""
    demo = await asyncio.create_subprocess_exec(
        *launcher, "demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--dir", str(ca_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert demo.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(60):
        while not lines or lines[-1] != "Stop with Ctrl-C.":
            line = (await demo.stdout.readline()).decode()
            assert line, "".join(lines)
            lines.append(line.rstrip("\n"))
    return demo, "\n".join(lines)


def printed_commands(text: str) -> list[str]:
    """The command lines the demo prints for the user to paste: one per indented line."""
    return [
        line.strip()
        for line in text.splitlines()
        if line.startswith("  ")
        and (" connect " in line or " ca " in line or line.strip().startswith("curl "))
    ]


# The console script a user runs (`.venv/bin/wsproxy`), else the interpreter form.
CONSOLE_SCRIPT = Path(sys.executable).with_name("wsproxy")
LAUNCHER = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.is_file() else WSPROXY


async def test_demo_prints_commands_that_work_as_printed(tmp_path: Path) -> None:
    """Every command the demo prints runs as printed, from another directory, in a shell whose
    PATH lacks the venv (a second terminal where it is not activated)."""
    demo, text = await start_demo(LAUNCHER, tmp_path / "ca")
    assert "connected to echo-1" in text and "connected to echo-tls" in text
    commands = printed_commands(text)
    connects = [c for c in commands if " connect " in c]
    assert len(connects) == 5, text
    (api,) = [c for c in connects if "?user=" in c]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    loop = asyncio.get_running_loop()
    for command in connects:
        if command == api:
            continue
        result = await loop.run_in_executor(
            None, functools.partial(run_as_printed, command, elsewhere, "hello\n")
        )
        assert result.returncode == 0, (command, result.stderr)
        assert result.stdout.splitlines()[-1] == "hello", (command, result.stdout)
    # The API: a route response, and a message to everyone in the lobby.
    said = '{"action": "whoami"}\n{"action": "sendmessage", "text": "hi"}\n'
    result = await loop.run_in_executor(
        None, functools.partial(run_as_printed, api, elsewhere, said)
    )
    assert result.returncode == 0, (api, result.stderr)
    whoami, broadcast = (json.loads(line) for line in result.stdout.splitlines()[-2:])
    assert whoami["user"] == "alice" and len(whoami["connectionId"]) == 24, result.stdout
    assert broadcast == {"from": "alice", "text": "hi"}

    curls = [c for c in commands if c.startswith("curl ")]
    assert len(curls) == 2, text
    for curl in curls:
        result = await loop.run_in_executor(None, run_as_printed, curl, elsewhere)
        assert result.returncode == 0, (curl, result.stderr)
        answer = json.loads(result.stdout)
        if "/@groups/lobby" in curl:
            assert answer == {"delivered": 0, "dropped_slow": 0}  # nobody in the lobby now
        else:
            groups = answer["target_groups"]
            assert {group["name"] for group in groups} == {"echo", "echo-v2", "echo-tls", "chat"}

    # "Revoke the demo client and watch its session end": an open mTLS session, then the
    # printed revoke command; the session ends (Close 1008) while its stdin is still open.
    (revoke,) = [c for c in commands if " ca revoke " in c]
    (mtls,) = [c for c in connects if "--cert" in c]
    session = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", mtls, cwd=elsewhere, env=without_venv(),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert session.stdout is not None and session.stderr is not None
    async with asyncio.timeout(15):
        greeting = (await session.stdout.readline()).decode()
    assert greeting.startswith("connected to echo-"), greeting
    result = await loop.run_in_executor(None, run_as_printed, revoke, elsewhere)
    assert result.returncode == 0, (revoke, result.stderr)
    stderr: list[str] = []
    async with asyncio.timeout(15):
        while not stderr or not stderr[-1].startswith("closed: "):
            line = (await session.stderr.readline()).decode()
            assert line, stderr
            stderr.append(line.strip())
    assert stderr[-1] == "closed: code 1008", stderr
    # The client exits by itself, its stdin still open: a reader blocked in readline once kept
    # it waiting for the user's next line.
    async with asyncio.timeout(15):
        assert await session.wait() == 0
    assert session.stdin is not None
    session.stdin.close()

    demo.send_signal(signal.SIGINT)
    async with asyncio.timeout(15):
        assert await demo.wait() == 0


async def test_demo_run_as_a_module_prints_the_interpreter(tmp_path: Path) -> None:
    """`python -m wsproxy demo`: the printed commands name that interpreter, so they work
    without the venv on PATH too."""
    demo, text = await start_demo(WSPROXY, tmp_path / "ca")
    command = next(c for c in printed_commands(text) if " connect ws://" in c)
    assert command.startswith(f"{sys.executable} -m wsproxy connect "), command
    loop = asyncio.get_running_loop()
    result = await loop.run_in_executor(
        None, functools.partial(run_as_printed, command, tmp_path, "hello\n")
    )
    assert result.returncode == 0, (command, result.stderr)
    assert result.stdout.splitlines()[-1] == "hello"
    demo.send_signal(signal.SIGINT)
    async with asyncio.timeout(15):
        assert await demo.wait() == 0
