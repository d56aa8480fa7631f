"""Plain requests and routing through the WebSocket flow (issue 13, items 9, 10, 12 and 16):
interim 1xx answers, which requests may be retried elsewhere, request lines, absolute-form
targets and path normalisation. Real clients (raw sockets, curl), real targets, 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.flows.test_websocket import exchange_raw, status_of, ws_config
from tests.helpers.servers import Handler, RawServer, closed_port, read_head
from tests.helpers.tools import require_tool
from tests.helpers.wsraw import upgrade_request
from wsproxy.address import Address
from wsproxy.config import parse_config
from wsproxy.errors import ConfigError
from wsproxy.wire.http1 import parse_request_head
from wsproxy.wire.upgrade import accept_key

RawServers = Callable[..., Awaitable[RawServer]]


def answering_target(record: list[bytes], *, interim: tuple[bytes, ...] = ()) -> Handler:
    """Reads one request head, records it, sends the ``interim`` 1xx heads when the request
    says ``Expect: 100-continue``, reads the Content-Length body, records it, answers 200 with
    ``got N bytes`` and closes. An Upgrade with a key gets a real 101 and then echoes bytes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        record.append(head)
        request = parse_request_head(head)
        key = request.get("sec-websocket-key")
        if key:
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n"
                + f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n".encode()
            )
            await writer.drain()
            await reader.read()
            return
        if (request.get("expect") or "").lower() == "100-continue":
            for response in interim:
                writer.write(response)
            await writer.drain()
        body = await reader.readexactly(int(request.get("content-length") or 0))
        record.append(body)
        text = f"got {len(body)} bytes".encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))
        await writer.drain()

    return handler


async def read_response_head(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(5):
        return await reader.readuntil(b"\r\n\r\n")


# --- item 9: Expect: 100-continue -------------------------------------------------------------

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"


async def test_expect_100_continue_reaches_a_client_that_waits_for_it(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    """Item 9: the target's 100 (and a 103) went nowhere and the client got a 502. A client
    that waits for the 100 before sending its body must get it, then the final answer."""
    record: list[bytes] = []
    server = await raw_servers(answering_target(record, interim=(EARLY_HINTS, CONTINUE)))
    proxy = await make_proxy(ws_config(("web", [server.address])))
    address = listener_address(proxy)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    try:
        writer.write(
            b"PUT /upload HTTP/1.1\r\nHost: web\r\nContent-Length: 11\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        first = await read_response_head(reader)
        assert first.startswith(b"HTTP/1.1 103 Early Hints\r\n"), first
        assert b"\r\nLink: </style.css>; rel=preload\r\n" in first
        assert await read_response_head(reader) == CONTINUE
        assert record[1:] == [], "the body was not sent yet"
        writer.write(b"hello world")
        async with asyncio.timeout(5):
            final = await reader.read()
    finally:
        writer.close()
    assert status_of(final) == 200 and final.endswith(b"got 11 bytes")
    assert record[1] == b"hello world"
    await wait_for(lambda: proxy.listeners["edge"].stats.active == 0)
    assert proxy.listeners["edge"].stats.rejected.get("bad_target_response", 0) == 0


async def test_curl_expect_100_continue(
    make_proxy: ProxyFactory, raw_servers: RawServers, tmp_path: object
) -> None:
    """The same with curl, which sends Expect: 100-continue for a large upload by itself. With
    --expect100-timeout at 60 s, curl only sends the body early if the 100 reaches it."""
    curl = require_tool("curl", "curl")
    record: list[bytes] = []
    server = await raw_servers(answering_target(record, interim=(CONTINUE,)))
    proxy = await make_proxy(ws_config(("web", [server.address])))
    body = b"x" * 2_000_000
    process = await asyncio.create_subprocess_exec(
        curl,
        "-sS",
        "-v",
        "--expect100-timeout",
        "60",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        "@-",
        "-w",
        "\n%{http_code}",
        f"http://{listener_address(proxy)}/upload",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate(body)
    assert process.returncode == 0, err
    assert out.splitlines()[-2:] == [b"got 2000000 bytes", b"200"], out
    assert b"< HTTP/1.1 100 Continue" in err, err
    assert len(record[1]) == len(body)


async def test_interim_answers_are_not_sent_to_an_http_1_0_client(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    """RFC 9110 §15.2: HTTP/1.0 defines no 1xx, so a 1.0 client gets the final answer only."""
    record: list[bytes] = []
    server = await raw_servers(answering_target(record, interim=(CONTINUE,)))
    proxy = await make_proxy(ws_config(("web", [server.address])))
    response = await exchange_raw(
        listener_address(proxy),
        b"POST /form HTTP/1.0\r\nHost: web\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc",
    )
    assert status_of(response) == 200 and response.endswith(b"got 3 bytes")
    assert b" 100 " not in response


async def test_endless_interim_answers_are_a_502(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    record: list[bytes] = []
    server = await raw_servers(answering_target(record, interim=(EARLY_HINTS,) * 40))
    proxy = await make_proxy(ws_config(("web", [server.address])))
    response = await exchange_raw(
        listener_address(proxy),
        b"POST /form HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
    )
    assert response.count(b"HTTP/1.1 103 Early Hints\r\n") == 16
    assert response.split(b"\r\n\r\n")[-2].startswith(b"HTTP/1.1 502 ")


async def test_a_101_to_a_request_that_did_not_ask_for_an_upgrade_is_a_502(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    record: list[bytes] = []
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
    server = await raw_servers(answering_target(record, interim=(switch,)))
    proxy = await make_proxy(ws_config(("web", [server.address])))
    response = await exchange_raw(
        listener_address(proxy),
        b"POST /x HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
    )
    assert status_of(response) == 502


# --- item 10: retries --------------------------------------------------------------------------


def read_then_close(record: list[bytes]) -> Handler:
    """A target that reads the request head, records it and closes without a word."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record.append(await read_head(reader))

    return handler


@pytest.mark.parametrize("method", ["POST", "DELETE", "PUT", "PATCH"])
async def test_a_request_that_reached_a_target_is_not_retried_unless_it_is_safe(
    make_proxy: ProxyFactory, raw_servers: RawServers, method: str
) -> None:
    """Item 10: a body-less POST (or DELETE) that the first target read before closing was sent
    again to a second target. Now it reaches exactly one target; the client gets a 502."""
    first: list[bytes] = []
    second: list[bytes] = []
    closing = await raw_servers(read_then_close(first))
    answering = await raw_servers(answering_target(second))
    proxy = await make_proxy(ws_config(("web", [closing.address, answering.address])))
    statuses = []
    for _ in range(4):
        response = await exchange_raw(
            listener_address(proxy), f"{method} /charge HTTP/1.1\r\nHost: web\r\n\r\n".encode()
        )
        statuses.append(status_of(response))
    requests_at_second = [head for head in second if head.startswith(method.encode())]
    assert len(first) + len(requests_at_second) == 4, "each request reached one target"
    assert statuses.count(502) == len(first) > 0
    assert statuses.count(200) == len(requests_at_second)


@pytest.mark.parametrize("body", [b"1\r\nxx\r\n", b"0x1\r\nx\r\n0\r\n\r\n", b"1\nx\r\n0\r\n\r\n"])
async def test_a_malformed_request_body_is_the_clients_400_not_a_target_failure(
    make_proxy: ProxyFactory,
    raw_servers: RawServers,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
) -> None:
    """Found by the review of issue 13: a client's broken chunked body made the proxy abort the
    target connection, and the flow then read that as the target's end: 502, `target_closed`,
    termination SU, so any client could inflate the target-failure metrics and alerts."""
    record: list[bytes] = []

    async def waits_for_the_body(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        record.append(await read_head(reader))
        await reader.read()  # the rest of the body, until the proxy lets go

    server = await raw_servers(waits_for_the_body)
    proxy = await make_proxy(ws_config(("web", [server.address])))
    head = b"POST /upload HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
    with caplog.at_level(logging.INFO, logger="wsproxy.access"):
        response = await exchange_raw(listener_address(proxy), head + body)
        await wait_for(lambda: any(r.name == "wsproxy.access" for r in caplog.records))
    assert status_of(response) == 400, response
    entry = next(r.__dict__["connection"] for r in caplog.records if r.name == "wsproxy.access")
    assert (entry["reason"], entry["termination"][0]) == ("malformed_body", "P")
    assert len(record) == 1  # the head went on; the target is not blamed for what followed


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
async def test_a_safe_request_is_retried_after_a_target_closed_without_answering(
    make_proxy: ProxyFactory, raw_servers: RawServers, method: str
) -> None:
    first: list[bytes] = []
    second: list[bytes] = []
    closing = await raw_servers(read_then_close(first))
    answering = await raw_servers(answering_target(second))
    proxy = await make_proxy(ws_config(("web", [closing.address, answering.address])))
    for _ in range(4):
        response = await exchange_raw(
            listener_address(proxy), f"{method} /page HTTP/1.1\r\nHost: web\r\n\r\n".encode()
        )
        assert status_of(response) == 200
    assert len(first) > 0 and len([h for h in second if h.startswith(method.encode())]) == 4


async def test_a_post_is_retried_when_nothing_was_sent_to_the_first_target(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    second: list[bytes] = []
    dead = await closed_port()
    answering = await raw_servers(answering_target(second))
    proxy = await make_proxy(ws_config(("web", [dead, answering.address])))
    for _ in range(4):
        response = await exchange_raw(
            listener_address(proxy), b"POST /charge HTTP/1.1\r\nHost: web\r\n\r\n"
        )
        assert status_of(response) == 200
    assert len([h for h in second if h.startswith(b"POST")]) == 4


# --- item 12: request lines and absolute-form targets ------------------------------------------


def admin_rules(*, host_rule: bool = False) -> str:
    rules = """
[[listeners.edge.rules]]
path_prefix = "/admin"
target_group = "admin"
"""
    if host_rule:
        rules += """
[[listeners.edge.rules]]
host = "internal"
target_group = "admin"
"""
    return rules


async def two_groups(
    make_proxy: ProxyFactory, raw_servers: RawServers, listener: str
) -> tuple[Address, list[bytes], list[bytes]]:
    """A proxy whose default group 'public' and group 'admin' each record what they get."""
    public: list[bytes] = []
    admin: list[bytes] = []
    public_target = await raw_servers(answering_target(public))
    admin_target = await raw_servers(answering_target(admin))
    proxy = await make_proxy(
        ws_config(
            ("public", [public_target.address]),
            ("admin", [admin_target.address]),
            listener=listener,
        )
    )
    return listener_address(proxy), public, admin


async def test_absolute_form_is_routed_on_its_path_and_authority(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    """Item 12: `GET http://internal/admin` with `Host: public` went to the default group,
    whose target (accepting absolute-form, as RFC 9112 §3.2.2 requires of it) served /admin."""
    address, public, admin = await two_groups(make_proxy, raw_servers, admin_rules())
    response = await exchange_raw(
        address, b"GET http://internal/admin/users HTTP/1.1\r\nHost: public\r\n\r\n"
    )
    assert status_of(response) == 200
    assert public == []
    (head,) = [h for h in admin if h.startswith(b"GET")]
    forwarded = parse_request_head(head)
    assert forwarded.target == "/admin/users", "sent on in origin-form"
    assert forwarded.get_all("host") == ["internal"], "the authority replaced Host"
    assert forwarded.get_all("x-forwarded-host") == ["internal"]


async def test_absolute_form_authority_is_the_host_rules_see(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    address, public, admin = await two_groups(make_proxy, raw_servers, admin_rules(host_rule=True))
    response = await exchange_raw(
        address, b"GET http://INTERNAL:80/page HTTP/1.1\r\nHost: public\r\n\r\n"
    )
    assert status_of(response) == 200
    assert public == [] and len(admin) == 2


BAD_REQUEST_LINES: list[tuple[str, bytes, int, str]] = [
    ("HTTP/0.9", b"GET / HTTP/0.9\r\nHost: x\r\n\r\n", 505, "http_version_not_supported"),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505, "http_version_not_supported"),
    ("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", 505, "http_version_not_supported"),
    (
        "HTTP/2.0 upgrade",
        upgrade_request().replace(b"HTTP/1.1", b"HTTP/2.0", 1),
        505,
        "http_version_not_supported",
    ),
    (
        "TE on HTTP/1.0",
        b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "CONNECT",
        b"CONNECT internal:443 HTTP/1.1\r\nHost: internal:443\r\n\r\n",
        400,
        "bad_request_target",
    ),
    ("GET *", b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request_target"),
    ("ftp URL", b"GET ftp://internal/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request_target"),
    ("userinfo", b"GET http://a@internal/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request_target"),
    (
        "encoded slash",
        b"GET /public/..%2Fadmin HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_request_target",
    ),
    ("backslash", b"GET /public\\..\\admin HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request_target"),
    ("bad escape", b"GET /a%zz HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request_target"),
    ("NUL escape", b"GET /a%00.txt HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request_target"),
    ("upgrade to %2F", upgrade_request(path="/public/..%2fadmin"), 400, "bad_request_target"),
    (
        "dot segment with ;params",
        b"GET /public/..;/admin HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_request_target",
    ),
    (
        "absolute-form with ;params",
        b"GET http://x/public/..;/admin HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_request_target",
    ),
]


@pytest.mark.parametrize(
    ("name", "request_bytes", "status", "reason"),
    BAD_REQUEST_LINES,
    ids=[row[0] for row in BAD_REQUEST_LINES],
)
async def test_bad_request_lines_and_targets(
    make_proxy: ProxyFactory,
    raw_servers: RawServers,
    name: str,
    request_bytes: bytes,
    status: int,
    reason: str,
) -> None:
    record: list[bytes] = []
    server = await raw_servers(answering_target(record))
    proxy = await make_proxy(ws_config(("web", [server.address])))
    response = await exchange_raw(listener_address(proxy), request_bytes)
    assert status_of(response) == status, response
    await wait_for(lambda: proxy.listeners["edge"].stats.rejected[reason] == 1)
    assert record == [], "nothing may reach the target"


async def test_options_asterisk_and_http_1_0_still_go_through(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    record: list[bytes] = []
    server = await raw_servers(answering_target(record))
    proxy = await make_proxy(ws_config(("web", [server.address])))
    address = listener_address(proxy)
    response = await exchange_raw(address, b"OPTIONS * HTTP/1.1\r\nHost: web\r\n\r\n")
    assert status_of(response) == 200
    response = await exchange_raw(
        address, b"POST /f HTTP/1.0\r\nHost: web\r\nContent-Length: 2\r\n\r\nhi"
    )
    assert status_of(response) == 200 and response.endswith(b"got 2 bytes")
    assert record[0].startswith(b"OPTIONS * HTTP/1.1\r\n")
    assert record[2].startswith(b"POST /f HTTP/1.0\r\n")


# --- item 16: paths are normalised before rules match them -------------------------------------

PUBLIC_RULE = """
[[listeners.edge.rules]]
path_prefix = "/public/"
target_group = "admin"
"""


@pytest.mark.parametrize(
    "path",
    [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2E/admin",
        "/public/.%2e/admin",
        "/public//../admin",
        "/public/./../admin",
        "/public/x/../../admin",
    ],
)
async def test_dot_segments_cannot_leave_a_path_prefix(
    make_proxy: ProxyFactory, raw_servers: RawServers, path: str
) -> None:
    """Item 16: these matched `path_prefix = "/public/"` as sent, and a target that resolves
    them served /admin from the group of /public/. Now the rules see /admin, and so does the
    target: the normalised path is what goes on. (Here the group of /public/ is named 'admin'
    and the default 'public', so a wrong match shows as a request in 'admin'.)"""
    address, default, prefixed = await two_groups(make_proxy, raw_servers, PUBLIC_RULE)
    response = await exchange_raw(address, f"GET {path}?q=1 HTTP/1.1\r\nHost: web\r\n\r\n".encode())
    assert status_of(response) == 200
    assert prefixed == []
    (head,) = [h for h in default if h.startswith(b"GET")]
    assert head.startswith(b"GET /admin?q=1 HTTP/1.1\r\n")


async def test_an_upgrade_is_routed_and_sent_on_with_its_normalised_path(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    address, default, prefixed = await two_groups(make_proxy, raw_servers, PUBLIC_RULE)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    try:
        writer.write(upgrade_request(path="/public/%2e%2e/admin"))
        head = await read_response_head(reader)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 101 ")
    assert prefixed == []
    assert default[0].startswith(b"GET /admin HTTP/1.1\r\n")


async def test_a_normalised_path_still_matches_its_own_prefix(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    address, default, prefixed = await two_groups(make_proxy, raw_servers, PUBLIC_RULE)
    for path in ("/public/a/../b", "/%70ublic/b", "//public/b"):
        response = await exchange_raw(address, f"GET {path} HTTP/1.1\r\nHost: w\r\n\r\n".encode())
        assert status_of(response) == 200
    assert default == []
    assert [h.split(b" ")[1] for h in prefixed if h] == [b"/public/b"] * 3


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        ("/a/../b", "write '/b'"),
        ("/%7euser/", "write '/~user/'"),
        ("//v2/", "write '/v2/'"),
        ("/a%2Fb", "%2F"),
    ],
)
def test_a_path_prefix_not_in_normal_form_is_a_config_error(prefix: str, message: str) -> None:
    text = f"""
[listeners.edge]
address = "127.0.0.1:0"
websocket = true
default_target_group = "web"
[[listeners.edge.rules]]
path_prefix = "{prefix}"
target_group = "web"
[target_groups.web]
targets = [{{ address = "127.0.0.1:9" }}]
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "<test>")
    assert "listeners.edge.rules" in str(caught.value) and message in str(caught.value)
