from __future__ import annotations

import pytest

from wsproxy.routing import Router, Rule, host_without_port

ROUTER = Router(
    (
        Rule("v2", host="chat.internal", path_prefix="/v2/"),
        Rule("chat", host="Chat.Internal"),
        Rule("api", path_prefix="/api"),
    ),
    "default",
)


@pytest.mark.parametrize(
    ("host", "path", "group"),
    [
        ("chat.internal", "/v2/room", "v2"),
        ("CHAT.internal:8080", "/v2/", "v2"),
        ("chat.internal", "/v1/room", "chat"),
        ("chat.internal.", "/", "chat"),
        ("other", "/api/x", "api"),
        ("other", "/apix", "api"),
        ("other", "/", "default"),
        ("[::1]:80", "/", "default"),
    ],
)
def test_first_match_wins(host: str, path: str, group: str) -> None:
    assert ROUTER.route(host, path) == group


def test_host_without_port() -> None:
    assert host_without_port("[::1]:8080") == "[::1]"
    assert host_without_port("Example.COM:80") == "example.com"


def test_sni_router_exact_then_longest_suffix_then_default() -> None:
    from wsproxy.routing import SniRouter

    router = SniRouter(
        [("*.example.com", "wide"), ("*.eu.example.com", "eu"), ("api.example.com", "api")],
        "default",
    )
    assert router.route("api.example.com") == "api"
    assert router.route("API.Example.COM.") == "api"
    assert router.route("x.eu.example.com") == "eu"
    assert router.route("a.b.example.com") == "wide"
    assert router.route("example.com") == "default"
    assert router.route(None) == "default"
    assert SniRouter([], None).route("x") is None
