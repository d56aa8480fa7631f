"""`wsproxy asyncapi`'s documents, validated by the official AsyncAPI parser.

The parser (`@asyncapi/parser`, pinned in package.json and package-lock.json beside this file)
checks a document against the AsyncAPI JSON Schemas and the spec's own rules (every $ref
resolves, an operation's messages belong to its channel, ...). `.ci/run` installs it with
`npm ci`; elsewhere a test without it is skipped with that command, as for other tools.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from wsproxy.api.asyncapi import document
from wsproxy.config import Config, parse_config
from wsproxy.errors import ApiError
from wsproxy.wire.route_selection import parse_expression, select_route

HERE = Path(__file__).parent
VALIDATOR = HERE / "validate.mjs"

TARGETS = """
[target_groups.backend]
protocol = "http"
targets = [{ address = "127.0.0.1:1" }]
"""

ONE_ROUTE = (
    """
[listeners.public]
address = "127.0.0.1:8080"
api = "chat"

[apis.chat]

[[apis.chat.routes]]
key = "sendmessage"
target_group = "backend"
path = "/messages"
"""
    + TARGETS
)

NESTED = (
    """
[listeners.public]
address = "0.0.0.0:8080"
api = "chat"

[apis.chat]
route_selection_expression = "$request.body.meta.route.action"

[[apis.chat.routes]]
key = "join"
target_group = "backend"

[[apis.chat.routes]]
key = "leave"
target_group = "backend"
"""
    + TARGETS
)

RESPOND = (
    """
[listeners.public]
address = "127.0.0.1:8080"
api = "chat"

[apis.chat]

[[apis.chat.routes]]
key = "$connect"
target_group = "backend"
path = "/connect"

[[apis.chat.routes]]
key = "$disconnect"
target_group = "backend"
path = "/disconnect"

[[apis.chat.routes]]
key = "whoami"
target_group = "backend"
respond = true

[[apis.chat.routes]]
key = "$default"
target_group = "backend"
respond = true

# Route keys are free text; component keys are not: these must still get their own.
[[apis.chat.routes]]
key = "send message/now~"
target_group = "backend"

[[apis.chat.routes]]
key = "send_message_now_"
target_group = "backend"

[[apis.chat.routes]]
key = "default"
target_group = "backend"
"""
    + TARGETS
)

TLS = (
    """
[listeners.public]
address = "[::]:8443"
protocol = "tls"
api = "chat"

[listeners.public.tls]
certificates = [{ cert = "certs/issued/edge.pem", key = "certs/issued/edge.key" }]
client_auth = "required"
client_ca = "certs/ca/ca.pem"

[listeners.plain]
address = "127.0.0.1:8080"
api = "chat"

[listeners.other]
address = "127.0.0.1:8081"
api = "other"

[apis.chat]

[[apis.chat.routes]]
key = "sendmessage"
target_group = "backend"
respond = true

[apis.other]
"""
    + TARGETS
)

CONFIGS = {"one_route": ONE_ROUTE, "nested": NESTED, "respond": RESPOND, "tls": TLS}


def require_parser() -> None:
    message = f"the AsyncAPI parser is not installed; run `cd {HERE} && npm ci --ignore-scripts`"
    if shutil.which("node") is None:
        message = "node not found; install it with `apt-get install nodejs npm`"
    elif (HERE / "node_modules" / "@asyncapi" / "parser").is_dir():
        return
    if os.environ.get("WSPROXY_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def validate(doc: dict[str, Any]) -> dict[str, Any]:
    """The official parser's verdict: ``{"valid": bool, "diagnostics": [...]}``."""
    require_parser()
    result = subprocess.run(
        ["node", str(VALIDATOR)],  # noqa: S607 (node from PATH, as a user runs it)
        input=json.dumps(doc),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    verdict: dict[str, Any] = json.loads(result.stdout)
    return verdict


def problems(verdict: dict[str, Any]) -> list[dict[str, Any]]:
    """Errors and warnings; information (e.g. 'a newer AsyncAPI version exists') is not one."""
    return [d for d in verdict["diagnostics"] if d["severity"] in ("error", "warning")]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_official_parser_accepts_the_document(name: str) -> None:
    doc = document(parse_config(CONFIGS[name]), "chat")
    verdict = validate(doc)
    assert verdict["valid"], verdict
    assert problems(verdict) == [], verdict


def test_the_parser_refuses_a_broken_document() -> None:
    """The check is not vacuous: a send operation naming a message of no channel fails."""
    doc = document(parse_config(ONE_ROUTE), "chat")
    doc["operations"]["send.sendmessage"]["messages"] = [
        {"$ref": "#/channels/connection/messages/nonexistent"}
    ]
    verdict = validate(doc)
    assert not verdict["valid"]
    assert any(d["severity"] == "error" for d in verdict["diagnostics"]), verdict


def example(schema: dict[str, Any]) -> object:
    """The smallest value a route message's payload schema accepts (objects of ``const``s)."""
    if "const" in schema:
        return schema["const"]
    assert schema["type"] == "object"
    return {name: example(sub) for name, sub in schema["properties"].items()}


def route_messages(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The messages of the send operations, by route key."""
    messages = doc["components"]["messages"]
    found: dict[str, dict[str, Any]] = {}
    for operation in doc["operations"].values():
        if operation["action"] == "send":
            (ref,) = operation["messages"]
            message = messages[ref["$ref"].rsplit("/", 1)[1]]
            found[message["name"]] = message
    return found


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_payload_schema_describes_what_the_router_selects(name: str) -> None:
    """A message built from a route's payload schema goes to that route, through the same
    router the proxy runs (the schema and the routing cannot drift apart)."""
    config = parse_config(CONFIGS[name])
    api = config.apis["chat"]
    fields = parse_expression(api.route_selection_expression)
    keys = [route.key for route in api.routes]
    messages = route_messages(document(config, "chat"))
    expected = [key for key in keys if key not in ("$connect", "$disconnect")]
    assert sorted(messages) == sorted(expected)
    for key, message in messages.items():
        if key == "$default":
            assert message["payload"] == {}  # any message at all
            continue
        body = json.dumps(example(message["payload"]))
        assert select_route(body, fields, keys) == key, body


def test_nested_expression_gives_nested_required_fields() -> None:
    doc = document(parse_config(NESTED), "chat")
    payload = doc["components"]["messages"]["join"]["payload"]
    assert example(payload) == {"meta": {"route": {"action": "join"}}}
    assert payload["required"] == ["meta"]
    leaf = payload["properties"]["meta"]["properties"]["route"]["properties"]["action"]
    assert leaf == {"type": "string", "const": "join"}


def test_respond_routes_have_receive_operations_and_replies() -> None:
    doc = document(parse_config(RESPOND), "chat")
    operations = doc["operations"]
    receives = {
        name: op["messages"][0]["$ref"]
        for name, op in operations.items()
        if op["action"] == "receive"
    }
    base = "#/channels/connection/messages/"
    assert receives == {
        "receive.whoami.response": base + "whoami.response",
        "receive.default.response": base + "default.response",
        "receive.error": base + "error",
        "receive.push": base + "push",
    }
    assert operations["send.whoami"]["reply"]["messages"] == [{"$ref": base + "whoami.response"}]
    assert "reply" not in operations["send.default-2"]  # the custom key "default"
    # $connect and $disconnect are not messages: the channel says what they do.
    description = doc["channels"]["connection"]["description"]
    assert "POST /connect" in description and "POST /disconnect" in description


def test_the_error_message_takes_its_values_from_the_registry() -> None:
    doc = document(parse_config(ONE_ROUTE), "chat")
    payload = doc["components"]["messages"]["error"]["payload"]
    assert payload["required"] == ["message", "error", "connectionId", "requestId"]
    assert payload["properties"]["error"]["enum"] == [error.value for error in ApiError]
    for name in ("message", "connectionId", "requestId"):
        assert payload["properties"][name]["type"] == "string"


def test_servers_are_the_listeners_of_that_api() -> None:
    config: Config = parse_config(TLS)
    doc = document(config, "chat")
    assert doc["servers"] == {
        "public": doc["servers"]["public"] | {"host": "[::]:8443", "protocol": "wss"},
        "plain": doc["servers"]["plain"] | {"host": "127.0.0.1:8080", "protocol": "ws"},
    }
    assert {server["pathname"] for server in doc["servers"].values()} == {"/"}
    assert doc["servers"]["public"]["security"] == [
        {"$ref": "#/components/securitySchemes/required"}
    ]
    assert doc["components"]["securitySchemes"]["required"]["type"] == "X509"
    assert "security" not in doc["servers"]["plain"]
    # The other API: its own listener, no routes, still a valid document.
    other = document(config, "other")
    assert list(other["servers"]) == ["other"]
    verdict = validate(other)
    assert verdict["valid"] and problems(verdict) == [], verdict


def test_pushes_are_described() -> None:
    doc = document(parse_config(ONE_ROUTE), "chat")
    assert "/@connections/{connectionId}" in doc["info"]["description"]
    assert (
        "POST /@connections/{connectionId}" in doc["components"]["messages"]["push"]["description"]
    )
