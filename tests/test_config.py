from __future__ import annotations

from pathlib import Path

import pytest

from wsproxy.config import Algorithm, load_config, parse_config
from wsproxy.errors import ConfigError

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
            "target_groups.chat.health_check.interval: unknown key; "
            "did you mean interval_seconds?",
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
            "admin.zzz: unknown key; [admin] takes enabled, address, token_file",
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


def test_example_config_is_valid() -> None:
    example = Path(__file__).parent.parent / "deploy" / "wsproxy.example.toml"
    config = load_config(example)
    assert config.listeners


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "absent.toml")
