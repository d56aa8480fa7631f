from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from wsproxy.config import Algorithm, Config, load_config, parse_config
from wsproxy.errors import ConfigError
from wsproxy.tls import check_files

MINIMAL = """
[listeners.edge]
address = "127.0.0.1:8080"
default_target_group = "chat"

[target_groups.chat]
targets = [{ address = "127.0.0.1:9001" }]
"""


def issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return [str(issue) for issue in caught.value.issues]


def test_minimal_config_defaults() -> None:
    config = parse_config(MINIMAL)
    listener = config.listeners["edge"]
    assert listener.idle_timeout_seconds == 350
    assert listener.max_frame_bytes == 16 * 1024 * 1024
    assert not listener.websocket
    group = config.target_groups["chat"]
    assert group.algorithm is Algorithm.LEAST_CONNECTIONS
    assert group.connect_timeout_seconds == 5
    assert config.proxy.shutdown_grace_seconds == 30
    assert str(config.admin.address) == "127.0.0.1:9900"


def test_config_is_frozen() -> None:
    config = parse_config(MINIMAL)
    with pytest.raises(Exception, match="frozen"):
        config.listeners["edge"].websocket = True  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x = [", "invalid TOML"),
        (
            MINIMAL
            + "[listeners.edge2]\naddress='127.0.0.1:1'\ndefault_target_group='chat'\nbogus=1",
            "listeners.edge2.bogus: unknown key",
        ),
        (
            MINIMAL.replace('"chat"\n\n', '"nope"\n\n', 1),
            "listeners.edge.default_target_group: unknown target group 'nope'",
        ),
        (
            MINIMAL.replace("9001", "99999"),
            "target_groups.chat.targets[0].address: port must be in 1-65535, got 99999",
        ),
        (
            MINIMAL.replace("127.0.0.1:9001", "localhost"),
            "target_groups.chat.targets[0].address: expected 'host:port'",
        ),
        (
            MINIMAL.replace("127.0.0.1:8080", "::1:80"),
            "listeners.edge.address: IPv6 addresses need brackets",
        ),
        (MINIMAL + "idle = 1\n", "target_groups.chat.idle: unknown key"),
        (
            MINIMAL.replace("[target_groups.chat]", "[target_groups.chat]\nalgorithm = 'fastest'"),
            "target_groups.chat.algorithm: input should be",
        ),
        (
            MINIMAL.replace(
                "[target_groups.chat]", "[target_groups.chat]\nconnect_timeout_seconds = -1"
            ),
            "target_groups.chat.connect_timeout_seconds: must be > 0, got -1",
        ),
        (
            MINIMAL.replace("default_target_group", "websocket_only = true\ndefault_target_group"),
            "websocket_only = true needs websocket = true",
        ),
        ("[target_groups.chat]\n", "listeners: required key is missing"),
        (
            MINIMAL.replace("[target_groups.chat]", "[target_groups.Chat]"),
            "target_groups.Chat: name 'Chat' must be lower-case",
        ),
        (
            MINIMAL.replace("}]", '}, { address = "127.0.0.1:9001" }]'),
            "target 127.0.0.1:9001 is listed twice",
        ),
    ],
)
def test_errors_name_the_key_path(text: str, expected: str) -> None:
    assert any(expected in issue for issue in issues(text)), issues(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            MINIMAL.replace('"chat"\n\n', '"chat"\nidle_timeout = 60\n\n', 1),
            "listeners.edge.idle_timeout: unknown key; did you mean idle_timeout_seconds?",
        ),
        (
            MINIMAL + "[target_groups.chat.health_check]\ninterval = 5\n",
            "target_groups.chat.health_check.interval: unknown key; did you mean interval_seconds?",
        ),
        (
            MINIMAL.replace("{ address", "{ adress"),
            "target_groups.chat.targets[0].adress: unknown key; did you mean address?",
        ),
        (
            MINIMAL + '[[listeners.edge.rules]]\npath_prefx = "/"\ntarget_group = "chat"\n',
            "listeners.edge.rules[0].path_prefx: unknown key; did you mean path_prefix?",
        ),
        (
            MINIMAL + "[proxy]\nworker = 2\n",
            "proxy.worker: unknown key; did you mean workers?",
        ),
        (
            MINIMAL + "[target_group.chat]\n",
            "target_group: unknown key; did you mean target_groups?",
        ),
        (
            MINIMAL + "[admin]\ntoken = 'x'\n",
            "admin.token: unknown key; did you mean token_file?",
        ),
        (  # nothing close: the section's keys are in docs/config.md
            MINIMAL + "[admin]\nzzz = 1\n",
            "admin.zzz: unknown key; [admin] takes enabled, address, token_file, unauthenticated",
        ),
    ],
)
def test_unknown_keys_suggest_the_closest_key_of_their_section(text: str, expected: str) -> None:
    assert expected in issues(text), issues(text)


@pytest.mark.parametrize(
    ("listener", "expected"),
    [
        ('protocol = "tls_passthrough"\nwebsocket = true', "cannot be websocket = true"),
        (
            'protocol = "tls_passthrough"\n[[listeners.edge.rules]]\npath_prefix = "/"\n'
            'target_group = "chat"',
            "tls_passthrough rules match 'sni' only",
        ),
        (
            'websocket = true\n[[listeners.edge.rules]]\nsni = "a.b"\ntarget_group = "chat"',
            "'sni' rules are for tls_passthrough listeners",
        ),
        ('protocol = "tls"', "protocol = 'tls' needs a [listeners.NAME.tls] section"),
    ],
)
def test_listener_protocol_rules(listener: str, expected: str) -> None:
    text = MINIMAL.replace(
        'default_target_group = "chat"', f'default_target_group = "chat"\n{listener}'
    )
    assert any(expected in issue for issue in issues(text)), issues(text)


def test_default_group_is_optional_only_for_passthrough() -> None:
    text = MINIMAL.replace('default_target_group = "chat"', 'protocol = "tls_passthrough"')
    assert parse_config(text).listeners["edge"].default_target_group is None
    plain = MINIMAL.replace('default_target_group = "chat"', "")
    assert any("default_target_group is required" in issue for issue in issues(plain))


def test_every_error_is_reported_at_once() -> None:
    text = """
[listeners.edge]
address = "127.0.0.1:8080"
websocket = true
default_target_group = "missing"
idle_timeout_seconds = 0
[[listeners.edge.rules]]
path_prefix = "no-slash"
target_group = "also-missing"
[target_groups.chat]
targets = [{ address = "127.0.0.1:0" }]
"""
    found = issues(text)
    assert len(found) == 5, found
    assert any(
        i.startswith("listeners.edge.rules[0].path_prefix: must start with '/'") for i in found
    )
    assert any(i.startswith("listeners.edge.idle_timeout_seconds: must be > 0") for i in found)
    assert any(i.startswith("listeners.edge.rules[0].target_group: unknown") for i in found)


def test_duplicate_listen_addresses() -> None:
    text = MINIMAL + '[listeners.two]\naddress = "127.0.0.1:8080"\ndefault_target_group = "chat"\n'
    assert any("already used by listeners.edge.address" in i for i in issues(text))


ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "deploy" / "wsproxy.example.toml"


def _nested(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """The section a field opens: ``("", M)`` a table, ``(".NAME", M)`` a table of named
    tables, ``("[]", M)`` an array of tables."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "", annotation
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is dict:
        inner = _nested(args[1])
        return (".NAME", inner[1]) if inner else None
    if origin is tuple:
        inner = _nested(args[0])
        return ("[]", inner[1]) if inner else None
    for arg in args:  # X | None
        found = _nested(arg)
        if found is not None:
            return found
    return None


def schema_keys(model: type[BaseModel] = Config, section: str = "") -> set[str]:
    """Every key config.py accepts, as ``listeners.NAME.tls.certificates[].cert``."""
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        path = f"{section}.{name}" if section else name
        keys.add(path)
        inner = _nested(field.annotation)
        if inner is not None:
            keys |= schema_keys(inner[1], path + inner[0])
    return keys


def document_keys(raw: Any, model: type[BaseModel] = Config, section: str = "") -> set[str]:
    """The keys a parsed TOML document sets, named as ``schema_keys`` names them."""
    keys: set[str] = set()
    for name, value in raw.items():
        path = f"{section}.{name}" if section else name
        keys.add(path)
        field = model.model_fields.get(name)
        inner = _nested(field.annotation) if field is not None else None
        if inner is None:
            continue
        suffix, sub = inner
        values = value.values() if suffix == ".NAME" else value if suffix == "[]" else [value]
        for item in values:
            keys |= document_keys(item, sub, path + suffix)
    return keys


def example_header_commands() -> list[str]:
    """The commands the example's header says to run (from the repository root)."""
    lines = EXAMPLE.read_text().splitlines()
    return [line.removeprefix("#   ") for line in lines if line.startswith("#   ")]


def test_example_config_sets_every_key() -> None:
    present = document_keys(tomllib.loads(EXAMPLE.read_text()))
    missing = sorted(schema_keys() - present)
    assert not missing, f"keys config.py accepts that {EXAMPLE.name} does not show: {missing}"


def test_example_config_is_valid_once_its_files_exist(tmp_path: Path) -> None:
    """The files the example names, minted by the commands its header prints (our CA)."""
    (tmp_path / "deploy").mkdir()
    copy = tmp_path / "deploy" / EXAMPLE.name
    shutil.copy(EXAMPLE, copy)
    with pytest.raises(ConfigError) as caught:  # nothing minted yet: the errors say what is missing
        check_files(load_config(copy), str(copy))
    assert any("certs/issued/edge.pem not found" in str(i) for i in caught.value.issues)
    commands = example_header_commands()
    assert len(commands) == 5, commands
    program = shlex.join([sys.executable, "-m", "wsproxy"])
    for command in commands:
        command = re.sub(r"^wsproxy ", f"{program} ", command)
        result = subprocess.run(
            ["/bin/sh", "-c", command], cwd=tmp_path, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, (command, result.stderr)
    config = check_files(load_config(copy), str(copy))
    assert config.listeners["edge-tls"].tls is not None
    assert config.admin.token_file == str(tmp_path / "deploy" / "admin.token")


DOCS = ROOT / "docs" / "config.md"


def doc_sections() -> dict[str, str]:
    """docs/config.md by section heading: ``## `[listeners.NAME]` `` -> listeners.NAME."""
    sections: dict[str, str] = {}
    current = ""
    for line in DOCS.read_text().splitlines():
        heading = re.match(r"^#+ `\[*([A-Za-z_.]+)\]*`", line)
        if heading:
            current = heading.group(1)
            sections[current] = ""
        elif line.startswith("#"):
            current = ""
        elif current:
            sections[current] += line + "\n"
    return sections


def test_docs_name_every_key() -> None:
    sections = doc_sections()
    missing: list[str] = []
    for key in sorted(schema_keys()):
        path = key.replace("[]", "")
        if any(heading == path or heading.startswith(f"{path}.") for heading in sections):
            continue  # a section of its own: [listeners.NAME.tls], [listeners.NAME]
        section, _, name = path.rpartition(".")
        while section and section not in sections:  # inline tables: tls = {...}, targets
            section = section.rpartition(".")[0]
        text = sections.get(section, "")
        spans = re.findall(r"`([^`]+)`", text)
        named = set(spans) | {
            word for span in spans if span.startswith("{") for word in re.findall(r"\w+", span)
        }
        if name not in named:
            missing.append(key)
    assert not missing, f"keys config.py accepts that docs/config.md does not name: {missing}"


def test_docs_tables_are_not_split() -> None:
    """A table row after a blank line starts a new paragraph, not more of the table."""
    lines = DOCS.read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith("|") and not lines[number - 1].startswith("|"):
            assert lines[number + 1].startswith("|---"), (
                f"docs/config.md:{number + 1}: a table row outside a table: {line[:60]}"
            )


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "absent.toml")
