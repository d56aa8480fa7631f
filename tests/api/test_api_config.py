"""[apis.NAME], routes and listeners with ``api = ...``: what is accepted and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsproxy.config import parse_config
from wsproxy.errors import ConfigError

BASE = """
[listeners.public]
address = "127.0.0.1:0"
api = "chat"

[apis.chat]

[[apis.chat.routes]]
key = "$connect"
target_group = "auth"
path = "/connect"

[[apis.chat.routes]]
key = "sendmessage"
target_group = "auth"
path = "/messages"
respond = true

[target_groups.auth]
protocol = "http"
targets = [{ address = "127.0.0.1:1" }]
"""


def test_an_api_listener_with_defaults_from_api_gateway() -> None:
    config = parse_config(BASE)
    api = config.apis["chat"]
    assert config.listeners["public"].api == "chat"
    assert api.route_selection_expression == "$request.body.action"
    assert (api.max_frame_bytes, api.max_message_bytes) == (32768, 131072)
    assert api.integration_timeout_seconds == 29
    assert api.max_in_flight_per_connection == 1
    route = api.route("sendmessage")
    assert route is not None and route.respond and route.path == "/messages"
    assert api.route("$default") is None


@pytest.mark.parametrize(
    ("change", "where", "says"),
    [
        (('api = "chat"', 'api = "nope"'), "listeners.public.api", "unknown API 'nope'"),
        (
            ('api = "chat"', 'api = "chat"\nwebsocket = true'),
            "listeners.public",
            "cannot be set too",
        ),
        (
            ('api = "chat"', 'api = "chat"\ndefault_target_group = "auth"'),
            "listeners.public",
            "default_target_group",
        ),
        (
            ('address = "127.0.0.1:0"', 'address = "127.0.0.1:0"\nprotocol = "tls_passthrough"'),
            "listeners.public",
            "cannot serve an API",
        ),
        (('protocol = "http"', 'protocol = "tcp"'), "apis.chat.routes[0].target_group", "http"),
        (
            ('target_group = "auth"\npath = "/connect"', 'target_group = "gone"'),
            "apis.chat.routes[0].target_group",
            "unknown target group 'gone'",
        ),
        (
            (
                'key = "sendmessage"\ntarget_group = "auth"\npath = "/messages"\nrespond = true',
                'key = "$connect"\ntarget_group = "auth"',
            ),
            "apis.chat",
            "listed twice",
        ),
        (
            ("[apis.chat]", '[apis.chat]\nroute_selection_expression = "$request.header.x"'),
            "apis.chat.route_selection_expression",
            "must start with",
        ),
        (
            ("[apis.chat]", "[apis.chat]\nmax_frame_bytes = 200000"),
            "apis.chat",
            "over max_message_bytes",
        ),
        (
            (
                'key = "$connect"\ntarget_group = "auth"',
                'key = "$connect"\nrespond = true\ntarget_group = "auth"',
            ),
            "apis.chat.routes[0]",
            "message routes",
        ),
        (("[apis.chat]", "[apis.chat]\nmax_in_flight_per_connection = 0"), "apis.chat", ">= 1"),
    ],
)
def test_bad_api_config_names_the_key(change: tuple[str, str], where: str, says: str) -> None:
    text = BASE.replace(*change, 1)
    assert text != BASE
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    issues = caught.value.issues
    assert any(issue.path.startswith(where) and says in issue.message for issue in issues), issues


def test_file_paths_of_an_api_are_taken_from_the_config_directory() -> None:
    text = BASE.replace("[apis.chat]", '[apis.chat]\nsigning_secret_file = "secrets/chat.key"')
    config = parse_config(text, base_dir=Path("/etc/wsproxy"))
    secret_file = config.apis["chat"].signing_secret_file
    assert secret_file == "/etc/wsproxy/secrets/chat.key"  # noqa: S105 (a path, not a secret)
