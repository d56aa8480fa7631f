"""The Host header (issue 13, adversarial review): one value, and one a target cannot read as
another host than the rules did. Raw sockets through a real in-process proxy, real targets.

Host rules compare the value up to its port; a target that parses ``http://`` + Host as a URL
reads ``chat.internal:80@evil.example`` as host ``evil.example`` (``chat.internal:80`` being
userinfo), so the rules and the target disagreed on where a request was going. Values with
spaces, ``/``, ``?``, an open ``[``, control or non-ASCII bytes, or a comma were forwarded too,
and copied into ``X-Forwarded-Host``, where a comma makes a list whose last element (the one
Werkzeug's ProxyFix trusts) the client chose."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.flows.test_requests import RawServers, answering_target
from tests.flows.test_websocket import exchange_raw, status_of, ws_config
from tests.helpers.wsraw import upgrade_request
from wsproxy.address import Address
from wsproxy.wire.http1 import parse_request_head

CHAT_RULE = """
[[listeners.edge.rules]]
host = "chat.internal"
target_group = "chat"
"""

BAD_HOSTS: list[tuple[str, bytes]] = [
    ("userinfo after a port", b"chat.internal:80@evil.example"),
    ("userinfo before the host", b"evil.example:@chat.internal"),
    ("space", b"a b"),
    ("path and query", b"x/admin?"),
    ("unclosed IP literal", b"[::1"),
    ("tab", b"x\tz"),
    ("non-ASCII bytes", b"\xff\xfe"),
    ("comma", b"a,evil"),
    ("port that is not a number", b"chat.internal:http"),
    ("two ports", b"chat.internal:80:81"),
]


def plain_request(host: bytes) -> bytes:
    return b"GET /page HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"


def upgrade_with_host(host: bytes) -> bytes:
    return upgrade_request(path="/chat").replace(b"Host: test.internal", b"Host: " + host, 1)


async def host_routed_groups(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> tuple[Address, list[bytes], list[bytes], dict[str, int]]:
    """A proxy whose default group 'public' and group 'chat' (Host ``chat.internal``) each
    record what they get; also the edge listener's rejection counts."""
    public: list[bytes] = []
    chat: list[bytes] = []
    public_target = await raw_servers(answering_target(public))
    chat_target = await raw_servers(answering_target(chat))
    proxy = await make_proxy(
        ws_config(
            ("public", [public_target.address]),
            ("chat", [chat_target.address]),
            listener=CHAT_RULE,
        )
    )
    return listener_address(proxy), public, chat, proxy.listeners["edge"].stats.rejected


@pytest.mark.parametrize("upgrade", [False, True], ids=["plain", "upgrade"])
@pytest.mark.parametrize(("name", "host"), BAD_HOSTS, ids=[row[0] for row in BAD_HOSTS])
async def test_a_host_that_is_not_a_host_and_port_is_a_400(
    make_proxy: ProxyFactory, raw_servers: RawServers, name: str, host: bytes, upgrade: bool
) -> None:
    address, public, chat, rejected = await host_routed_groups(make_proxy, raw_servers)
    request = upgrade_with_host(host) if upgrade else plain_request(host)
    response = await exchange_raw(address, request)
    assert status_of(response) == 400, response
    assert b"Host" in response, "the answer says what was wrong"
    await wait_for(lambda: rejected["bad_request"] == 1)
    assert public == [] and chat == [], "nothing may reach a target"


@pytest.mark.parametrize("upgrade", [False, True], ids=["plain", "upgrade"])
async def test_more_than_one_host_is_a_400(
    make_proxy: ProxyFactory, raw_servers: RawServers, upgrade: bool
) -> None:
    """RFC 9112 §3.2: a request with more than one Host is a 400, even when they agree."""
    address, public, chat, rejected = await host_routed_groups(make_proxy, raw_servers)
    host = b"chat.internal\r\nHost: chat.internal"
    request = upgrade_with_host(host) if upgrade else plain_request(host)
    response = await exchange_raw(address, request)
    assert status_of(response) == 400, response
    await wait_for(lambda: rejected["bad_request"] == 1)
    assert public == [] and chat == []


async def response_head(address: Address, request: bytes) -> bytes:
    """The head of the proxy's answer to ``request`` (a tunnel after a 101 stays open)."""
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(request)
    try:
        async with asyncio.timeout(5):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


GOOD_HOSTS: list[tuple[bytes, str]] = [
    (b"chat.internal", "chat"),
    (b"CHAT.Internal", "chat"),
    (b"chat.internal:8080", "chat"),
    (b"chat.internal.", "chat"),
    (b"example.com", "public"),
    (b"127.0.0.1:8080", "public"),
    (b"[::1]:8080", "public"),
    (b"[::1]", "public"),
    (b"my-host_1.example~x", "public"),
]


@pytest.mark.parametrize("upgrade", [False, True], ids=["plain", "upgrade"])
@pytest.mark.parametrize(("host", "group"), GOOD_HOSTS, ids=[row[0].decode() for row in GOOD_HOSTS])
async def test_host_names_and_addresses_with_ports_still_go_through(
    make_proxy: ProxyFactory, raw_servers: RawServers, host: bytes, group: str, upgrade: bool
) -> None:
    address, public, chat, _ = await host_routed_groups(make_proxy, raw_servers)
    request = upgrade_with_host(host) if upgrade else plain_request(host)
    response = await response_head(address, request)
    assert status_of(response) == (101 if upgrade else 200), response
    record = chat if group == "chat" else public
    other = public if group == "chat" else chat
    assert other == []
    forwarded = parse_request_head(record[0])
    assert forwarded.get_all("host") == [host.decode()]
    assert forwarded.get_all("x-forwarded-host") == [host.decode()]
