"""Identity headers (issue 13, items 1, 7 and 11): what a target learns about the client.

The proxy vouches for the client's address (``X-Forwarded-*``) and certificate
(``X-Client-Cert-*``). A client must not be able to forge them under a spelling the target's
framework folds into the same name (WSGI, CGI, Rack and PHP read ``-`` and ``_`` as one), nor
have the next hop remove them by naming them in ``Connection``, nor break or extend them with the
bytes of its own certificate's subject.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import string
from collections.abc import Awaitable, Callable, Iterator
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import ProxyFactory, listener_address
from tests.flows.test_tls import client_context, leaf_certificate, tls_config
from tests.flows.test_websocket import exchange_raw, status_of, ws_config
from tests.helpers.pki import Pki, make_pki
from tests.helpers.servers import RawServer
from tests.helpers.wsgi import WsgiTarget, environ_of
from tests.helpers.wsraw import upgrade_request
from tests.reliability.test_smuggling import recording_target
from wsproxy.address import Address
from wsproxy.tls import header_value
from wsproxy.wire.http1 import RequestHead, parse_request_head

RawServers = Callable[..., Awaitable[RawServer]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def wsgi_target() -> Iterator[WsgiTarget]:
    target = WsgiTarget()
    yield target
    target.stop()


def issue_client_named(pki: Pki, common_name: str, stem: str) -> tuple[str, str]:
    """A client certificate for ``common_name`` exactly as given, signed by the test CA.

    Built here rather than by ``wsproxy ca``, which refuses control characters in names: a CA
    elsewhere may still sign them, and the proxy must forward whatever subject it verified."""
    return pki.sign_leaf(stem, common_name, client_auth=True)


async def exchange_tls(address: Address, context: ssl.SSLContext, data: bytes) -> bytes:
    """Send ``data`` over TLS to the edge listener; everything it answers until it closes
    (or, for a 101, the response head)."""
    reader, writer = await asyncio.open_connection(
        address.host, address.port, ssl=context, server_hostname="edge.internal"
    )
    writer.write(data)
    try:
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            if b" 101 " in head.split(b"\r\n", 1)[0]:
                # Aborted, not closed: a close_notify followed at once by the FIN trips a relay
                # error (write after write_eof) that is not what these tests are about.
                writer.transport.abort()
                return head
            return head + await reader.read(-1)
    finally:
        writer.close()


def fold(name: str) -> str:
    return name.lower().replace("_", "-")


def identity_fields(head: RequestHead) -> dict[str, list[str]]:
    """Every field a target folding ``_`` into ``-`` would read as one of the proxy's."""
    found: dict[str, list[str]] = {}
    for name, value in head.headers:
        key = fold(name)
        if key.startswith(("x-forwarded-", "x-client-cert-")):
            found.setdefault(key, []).append(value)
    return found


# --- item 1: identity headers spoofed with underscores ---------------------------------------

FORGED = (
    "X_Forwarded_For: 6.6.6.6",
    "x_forwarded_proto: https",
    "X-Forwarded_Host: evil.example",
    "X_Forwarded_Ssl: on",
    "X_Client_Cert_Subject: CN=admin",
    "X-Client-Cert_Serial: 01",
    "X_CLIENT_CERT_VERIFY: SUCCESS",
    "Forwarded: for=6.6.6.6;host=evil.example;proto=https",
)


def plain_request(*extra: str, connection: str = "close") -> bytes:
    lines = ["GET /whoami HTTP/1.1", "Host: test.internal", f"Connection: {connection}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_underscore_spellings_do_not_reach_a_wsgi_app(
    make_proxy: ProxyFactory, wsgi_target: WsgiTarget
) -> None:
    """Plain listener: the forged subject would be the app's only X-Client-Cert-Subject, and the
    forged address would come first in HTTP_X_FORWARDED_FOR."""
    proxy = await make_proxy(ws_config(("app", [wsgi_target.address])))
    address = listener_address(proxy)
    environ = environ_of(await exchange_raw(address, plain_request(*FORGED)))
    assert environ["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
    assert environ["HTTP_X_FORWARDED_PROTO"] == "http"
    assert environ["HTTP_X_FORWARDED_HOST"] == "test.internal"
    assert environ["HTTP_X_FORWARDED_PORT"] == str(address.port)
    for absent in ("SSL", "SUBJECT", "SERIAL", "VERIFY", "HTTP_FORWARDED"):
        assert not [key for key in environ if key.endswith(absent)], environ


async def test_underscore_spellings_do_not_reach_a_wsgi_app_under_mtls(
    make_proxy: ProxyFactory, wsgi_target: WsgiTarget, pki: Pki
) -> None:
    """mTLS listener: the forged subject would come first, before the verified one."""
    proxy = await make_proxy(tls_config(pki, wsgi_target.address, client_auth="required"))
    cert, key = pki.files("alice")
    serial = f"{leaf_certificate(cert).serial_number:x}"
    response = await exchange_tls(
        listener_address(proxy), client_context(pki, cert, key), plain_request(*FORGED)
    )
    environ = environ_of(response)
    assert environ["HTTP_X_CLIENT_CERT_SUBJECT"] == "CN=alice"
    assert environ["HTTP_X_CLIENT_CERT_SERIAL"] == serial
    assert environ["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
    assert environ["HTTP_X_FORWARDED_PROTO"] == "https"
    assert "HTTP_X_FORWARDED_SSL" not in environ
    assert "HTTP_X_CLIENT_CERT_VERIFY" not in environ
    assert "HTTP_FORWARDED" not in environ


@pytest.mark.parametrize("forged", FORGED)
@pytest.mark.parametrize("upgrade", [True, False], ids=["upgrade", "plain"])
async def test_underscore_spellings_are_dropped_on_the_wire(
    make_proxy: ProxyFactory, raw_servers: RawServers, forged: str, upgrade: bool
) -> None:
    record: list[bytes] = []
    server = await raw_servers(recording_target(record, upgrade=True))
    proxy = await make_proxy(ws_config(("app", [server.address])))
    address = listener_address(proxy)
    if upgrade:
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(upgrade_request(extra=(forged,)))
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
    else:
        response = await exchange_raw(address, plain_request(forged))
    assert status_of(response) == (101 if upgrade else 200), response
    assert identity_fields(parse_request_head(record[0])) == {
        "x-forwarded-for": ["127.0.0.1"],
        "x-forwarded-proto": ["http"],
        "x-forwarded-port": [str(address.port)],
        "x-forwarded-host": ["test.internal"],
    }


async def test_every_header_the_proxy_adds_is_reserved_in_any_spelling(
    make_proxy: ProxyFactory, raw_servers: RawServers, pki: Pki
) -> None:
    """Whatever header the proxy adds (today's and any added later), a client's copy spelled with
    ``_`` and another case must not reach the target: learnt from a clean request under mTLS,
    where the proxy adds the most."""
    record: list[bytes] = []
    server = await raw_servers(recording_target(record, upgrade=True))
    proxy = await make_proxy(tls_config(pki, server.address, client_auth="required"))
    context = client_context(pki, *pki.files("alice"))
    request = upgrade_request(host="edge.internal")
    assert status_of(await exchange_tls(listener_address(proxy), context, request)) == 101
    sent = {fold(name) for name, _ in parse_request_head(request).headers}
    added = [name for name, _ in parse_request_head(record[0]).headers if fold(name) not in sent]
    assert len(added) >= 8, added  # X-Forwarded-* and X-Client-Cert-*
    forged = tuple(f"{name.upper().replace('-', '_')}: forged" for name in added)
    response = await exchange_tls(
        listener_address(proxy), context, upgrade_request(host="edge.internal", extra=forged)
    )
    assert status_of(response) == 101
    heads = [data for data in record if data.startswith(b"GET ")]
    assert len(heads) == 2 and b"forged" not in heads[1], heads


# --- item 7: certificate subjects that break or inject headers --------------------------------


@pytest.mark.parametrize(
    ("common_name", "expected"),
    [
        ("Łukasz", "CN=%C5%81ukasz"),
        (
            "alice\r\nX-Client-Cert-Subject: CN=admin",
            "CN=alice%0D%0AX-Client-Cert-Subject: CN=admin",
        ),
        ("100% alice", "CN=100%25 alice"),
        ("a, b", "CN=a\\, b"),
    ],
    ids=["non-latin-1", "crlf", "percent", "rfc4514-escape"],
)
async def test_certificate_subjects_are_encoded_in_one_header_line(
    make_proxy: ProxyFactory,
    raw_servers: RawServers,
    pki: Pki,
    common_name: str,
    expected: str,
) -> None:
    """Before: a non-Latin-1 subject made every request fail (UnicodeEncodeError), and a CR LF in
    the CN put a second, forged X-Client-Cert-Subject line in front of the target."""
    record: list[bytes] = []
    server = await raw_servers(recording_target(record, upgrade=True))
    proxy = await make_proxy(tls_config(pki, server.address, client_auth="required"))
    stem = hashlib.sha256(common_name.encode()).hexdigest()[:12]
    cert, key = issue_client_named(pki, common_name, stem)
    request = upgrade_request(host="edge.internal")
    response = await exchange_tls(listener_address(proxy), client_context(pki, cert, key), request)
    assert status_of(response) == 101, response
    head = parse_request_head(record[0])
    assert head.get_all("x-client-cert-subject") == [expected]
    assert record[0].count(b"\r\nX-Client-Cert-Subject: ") == 1
    subject = leaf_certificate(cert).subject
    assert unquote(expected) == subject.rfc4514_string()


@given(st.text())
def test_header_value_is_one_printable_ascii_line_that_decodes_back(text: str) -> None:
    encoded = header_value(text)
    assert all(char in string.printable and char not in "\t\n\r\x0b\x0c" for char in encoded)
    assert encoded == encoded.strip()
    assert unquote(encoded, errors="strict") == text


# --- item 11: Connection names hop-by-hop headers; only ours go upstream ----------------------


async def test_upgrade_sends_only_connection_upgrade(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    """Before: the client's Connection went upstream unchanged, so a standards-following next hop
    removed the X-Forwarded-For the proxy had just set (CVE-2024-45410, one hop later)."""
    record: list[bytes] = []
    server = await raw_servers(recording_target(record, upgrade=True))
    proxy = await make_proxy(ws_config(("app", [server.address])))
    address = listener_address(proxy)
    request = upgrade_request(
        extra=("X-Trace: drop-me", "Keep-Alive: timeout=5", "Proxy-Connection: keep-alive")
    ).replace(
        b"Connection: Upgrade",
        b"Connection: keep-alive, Upgrade, X-Forwarded-For, X-Client-Cert-Subject, X-Trace",
    )
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(request)
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert status_of(response) == 101, response
    head = parse_request_head(record[0])
    assert head.get_all("connection") == ["Upgrade"]
    assert head.get_all("upgrade") == ["websocket"]
    assert head.get_all("x-trace") == []
    assert head.get_all("keep-alive") == head.get_all("proxy-connection") == []
    assert head.get_all("x-forwarded-for") == ["127.0.0.1"]


async def test_plain_request_drops_the_headers_its_connection_names(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    record: list[bytes] = []
    server = await raw_servers(recording_target(record, upgrade=False))
    proxy = await make_proxy(ws_config(("app", [server.address])))
    request = plain_request("X-Trace: drop-me", connection="keep-alive, X-Trace, X-Forwarded-For")
    response = await exchange_raw(listener_address(proxy), request)
    assert status_of(response) == 200, response
    head = parse_request_head(record[0])
    assert head.get_all("connection") == ["close"]
    assert head.get_all("x-trace") == []
    assert head.get_all("x-forwarded-for") == ["127.0.0.1"]


async def test_connection_cannot_remove_the_framing_the_proxy_forwards(
    make_proxy: ProxyFactory, raw_servers: RawServers
) -> None:
    """Host and the body's framing stay: without them the target would read the body as the
    next request. The proxy forwards the body exactly as framed, so it re-sends the framing."""
    record: list[bytes] = []
    server = await raw_servers(recording_target(record, upgrade=False))
    proxy = await make_proxy(ws_config(("app", [server.address])))
    request = (
        b"POST /form HTTP/1.1\r\nHost: test.internal\r\n"
        b"Connection: close, Content-Length, Transfer-Encoding, Host\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )
    response = await exchange_raw(listener_address(proxy), request)
    assert status_of(response) == 200, response
    head = parse_request_head(record[0])
    assert head.get_all("content-length") == ["5"]
    assert head.get_all("host") == ["test.internal"]
