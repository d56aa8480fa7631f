"""TLS listeners: termination with certificates chosen by SNI, policies, client certificates."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.helpers.pki import Pki, make_pki
from tests.helpers.servers import RawServer, tcp_echo
from tests.helpers.wsraw import upgrade_request
from wsproxy.address import Address
from wsproxy.config import parse_config
from wsproxy.demo import EchoTarget
from wsproxy.errors import ConfigError
from wsproxy.proxy import Proxy
from wsproxy.tls import check_files

RawServers = Callable[..., Awaitable[RawServer]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_config(
    pki: Pki,
    target: Address,
    *,
    websocket: bool = True,
    client_auth: str = "none",
    crl: bool = False,
    policy: str = "intermediate",
    extra: str = "",
) -> str:
    edge_cert, edge_key = pki.files("edge")
    other_cert, other_key = pki.files("other")
    tls = f"""
[listeners.edge.tls]
certificates = [
  {{ cert = "{edge_cert}", key = "{edge_key}" }},
  {{ cert = "{other_cert}", key = "{other_key}" }},
]
policy = "{policy}"
client_auth = "{client_auth}"
"""
    if client_auth != "none":
        tls += f'client_ca = "{pki.ca_file}"\n'
    if crl:
        tls += f'crl = "{pki.crl_file}"\n'
    return f"""
[listeners.edge]
address = "127.0.0.1:0"
protocol = "tls"
websocket = {str(websocket).lower()}
default_target_group = "echo"
{extra}
{tls}
[target_groups.echo]
targets = [{{ address = "{target}" }}]
"""


def leaf_certificate(path: str) -> x509.Certificate:
    return x509.load_pem_x509_certificates(Path(path).read_bytes())[0]


def client_context(pki: Pki, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca_file)
    if cert:
        context.load_cert_chain(cert, key)
    return context


async def wss_echo(address: Address, context: ssl.SSLContext, host: str = "edge.internal") -> None:
    connector = aiohttp.TCPConnector(ssl=context)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.ws_connect(
            f"wss://{address}/tls", headers={"Host": host}, server_hostname=host
        ) as ws,
    ):
        await ws.send_str("secure")
        assert await ws.receive_str(timeout=5) == "secure"


async def test_wss_through_a_terminating_listener(
    make_proxy: ProxyFactory,
    echo_targets: list[EchoTarget],
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await make_proxy(tls_config(pki, echo_targets[0].address))
    with caplog.at_level(logging.INFO, logger="wsproxy.access"):
        await wss_echo(listener_address(proxy), client_context(pki))
        await wait_for(lambda: proxy.listeners["edge"].stats.active == 0)
    headers = echo_targets[0].last_headers
    assert headers is not None and headers["x-forwarded-proto"] == ["https"]
    entry = next(r.__dict__["connection"] for r in caplog.records if r.name == "wsproxy.access")
    assert entry["sni"] == "edge.internal"
    assert entry["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert proxy.listeners["edge"].stats.tls_handshakes["ok"] == 1


async def test_a_client_closing_its_tls_without_a_close_frame_logs_no_error(
    make_proxy: ProxyFactory,
    echo_targets: list[EchoTarget],
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A TLS close_notify right after the 101: the proxy passed the FIN on to the target
    (write_eof), then the client's transport closed and the session sent the target a goodbye
    Close: "Cannot call write() after write_eof()" came out of connection_lost. The session is
    logged as the client's abnormal end, and nothing else."""
    proxy = await make_proxy(tls_config(pki, echo_targets[0].address))
    address = listener_address(proxy)
    with caplog.at_level(logging.INFO):
        reader, writer = await asyncio.open_connection(
            address.host, address.port, ssl=client_context(pki), server_hostname="edge.internal"
        )
        writer.write(upgrade_request("/bye", host="edge.internal"))
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        writer.close()  # close_notify, no Close frame
        # The access line is written once both sockets are gone (after connection_lost).
        await wait_for(lambda: any(r.name == "wsproxy.access" for r in caplog.records))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    entry = next(r.__dict__["connection"] for r in caplog.records if r.name == "wsproxy.access")
    assert entry["reason"] == "client_closed"


async def peer_names(address: Address, pki: Pki, server_name: str) -> list[str]:
    context = client_context(pki)
    context.check_hostname = False
    _, writer = await asyncio.open_connection(
        address.host, address.port, ssl=context, server_hostname=server_name
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    cert = x509.load_der_x509_certificate(der)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(sans.get_values_for_type(x509.DNSName))


async def test_certificate_chosen_by_sni(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], pki: Pki
) -> None:
    proxy = await make_proxy(tls_config(pki, echo_targets[0].address))
    address = listener_address(proxy)
    assert "edge.internal" in await peer_names(address, pki, "edge.internal")
    assert await peer_names(address, pki, "chat.other.internal") == ["*.other.internal"]
    assert "edge.internal" in await peer_names(address, pki, "unknown.example")  # the default


async def test_modern_policy_refuses_tls12(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], pki: Pki
) -> None:
    proxy = await make_proxy(tls_config(pki, echo_targets[0].address, policy="modern"))
    address = listener_address(proxy)
    context = client_context(pki)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):  # an alert, or a reset racing it
        await asyncio.open_connection(
            address.host, address.port, ssl=context, server_hostname="edge.internal"
        )
    stats = proxy.listeners["edge"].stats
    await wait_for(lambda: stats.rejected["tls_protocol_version"] == 1)
    await wss_echo(address, client_context(pki))  # TLS 1.3 still works


async def test_intermediate_policy_accepts_tls12(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], pki: Pki
) -> None:
    proxy = await make_proxy(tls_config(pki, echo_targets[0].address))
    context = client_context(pki)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    await wss_echo(listener_address(proxy), context)


async def test_client_certificate_headers_reach_the_target(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], pki: Pki
) -> None:
    proxy = await make_proxy(
        tls_config(pki, echo_targets[0].address, client_auth="required", crl=True)
    )
    cert, key = pki.files("alice")
    await wss_echo(listener_address(proxy), client_context(pki, cert, key))
    headers = echo_targets[0].last_headers
    assert headers is not None
    leaf = leaf_certificate(cert)
    assert headers["x-client-cert-subject"] == ["CN=alice"]
    assert headers["x-client-cert-serial"] == [f"{leaf.serial_number:x}"]
    assert len(headers["x-client-cert-fingerprint-sha256"][0]) == 64
    assert proxy.listeners["edge"].stats.client_certs["ok"] == 1


async def test_client_supplied_cert_headers_are_removed(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], pki: Pki
) -> None:
    proxy = await make_proxy(tls_config(pki, echo_targets[0].address))
    connector = aiohttp.TCPConnector(ssl=client_context(pki))
    forged = {"X-Client-Cert-Subject": "CN=admin", "Host": "edge.internal"}
    url = f"wss://{listener_address(proxy)}/"
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.ws_connect(url, headers=forged, server_hostname="edge.internal") as ws,
    ):
        await ws.send_str("x")
        await ws.receive_str(timeout=5)
    headers = echo_targets[0].last_headers
    assert headers is not None and "x-client-cert-subject" not in headers


CLIENT_ROWS = ["missing", "foreign", "expired", "not_yet_valid", "revoked", "server_eku", "no_eku"]


@pytest.mark.parametrize("row", CLIENT_ROWS)
async def test_bad_client_certificates_are_rejected(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], pki: Pki, row: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    expected = {
        "missing": "missing",
        "foreign": "untrusted",
        "expired": "expired",
        "not_yet_valid": "expired",
        "revoked": "revoked",
        "server_eku": "bad_eku",
        "no_eku": "bad_eku",
    }[row]
    cert: str | None
    key: str | None
    if row == "missing":
        cert = key = None
    elif row == "foreign":
        cert = str(pki.foreign.store.leaf_cert("mallory"))
        key = str(pki.foreign.store.leaf_key("mallory"))
    elif row == "expired":
        cert, key = pki.issue_client_at(f"old-{id(row)}", now - dt.timedelta(days=10), days=2)
    elif row == "not_yet_valid":
        cert, key = pki.issue_client_at(f"future-{id(row)}", now + dt.timedelta(days=10))
    elif row == "revoked":
        issued = pki.ca.issue_client(f"revoked-{id(row)}")
        pki.ca.revoke(issued.name, "keyCompromise")
        cert, key = issued.cert_path, issued.key_path
    elif row == "server_eku":
        cert, key = pki.files("server-only")
    else:
        cert, key = pki.issue_without_eku(f"no-eku-{id(row)}")
    proxy = await make_proxy(
        tls_config(pki, echo_targets[0].address, client_auth="required", crl=True)
    )
    address = listener_address(proxy)
    canary_cert, canary_key = pki.files("canary")
    canary = client_context(pki, canary_cert, canary_key)
    sessions = echo_targets[0].sessions
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError, asyncio.TimeoutError)):
        await wss_echo(address, client_context(pki, cert, key))
    stats = proxy.listeners["edge"].stats
    await wait_for(lambda: stats.client_certs[expected] >= 1)  # aiohttp may retry once
    await wss_echo(address, canary)  # everyone else keeps working
    assert echo_targets[0].sessions == sessions + 1  # only the canary reached the target


async def test_garbage_and_plain_http_on_a_tls_port(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], pki: Pki
) -> None:
    proxy = await make_proxy(
        tls_config(pki, echo_targets[0].address, extra="tls_handshake_timeout_seconds = 0.3")
    )
    address = listener_address(proxy)
    stats = proxy.listeners["edge"].stats
    for payload in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 64, b""):
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(payload)
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
    await wait_for(lambda: sum(stats.rejected.values()) == 3)
    assert stats.rejected["tls_http_request"] == 1
    assert stats.rejected["tls_not_tls"] == 1
    assert stats.rejected["tls_handshake_timeout"] == 1
    await wss_echo(address, client_context(pki))


async def test_tls_stream_mode_relays_decrypted_bytes(
    make_proxy: ProxyFactory, raw_servers: RawServers, pki: Pki
) -> None:
    server = await raw_servers(tcp_echo)
    proxy = await make_proxy(tls_config(pki, server.address, websocket=False))
    address = listener_address(proxy)
    reader, writer = await asyncio.open_connection(
        address.host, address.port, ssl=client_context(pki), server_hostname="edge.internal"
    )
    writer.write(b"plain bytes inside TLS")
    assert await asyncio.wait_for(reader.readexactly(22), 5) == b"plain bytes inside TLS"
    writer.close()


def test_config_errors_name_the_listener_and_file(pki: Pki, tmp_path: Path) -> None:
    edge_cert, edge_key = pki.files("edge")
    _, alice_key = pki.files("alice")
    missing = str(tmp_path / "absent.pem")
    cases = [
        (missing, edge_key, f"file {missing} not found; run `wsproxy ca issue server"),
        (edge_cert, alice_key, "does not match certificate"),
    ]
    for cert, key, expected in cases:
        text = f"""
[listeners.edge]
address = "127.0.0.1:0"
protocol = "tls"
default_target_group = "g"
[listeners.edge.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
[target_groups.g]
"""
        with pytest.raises(ConfigError) as caught:
            check_files(parse_config(text), "<test>")
        message = str(caught.value)
        assert "listeners.edge.tls: listener 'edge'" in message
        assert expected in message, message


def test_expired_server_certificate_is_a_config_error(pki: Pki) -> None:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    from wsproxy.clock import FixedClock

    clock = pki.ca.clock
    pki.ca.clock = FixedClock(old)
    try:
        issued = pki.ca.issue_server("stale", ["stale.internal"], days=1)
    finally:
        pki.ca.clock = clock
    text = f"""
[listeners.edge]
address = "127.0.0.1:0"
protocol = "tls"
default_target_group = "g"
[listeners.edge.tls]
certificates = [{{ cert = "{issued.cert_path}", key = "{issued.key_path}" }}]
[target_groups.g]
"""
    with pytest.raises(ConfigError, match="expired on"):
        check_files(parse_config(text), "<test>")


async def test_relative_paths_follow_the_config_file(pki: Pki, tmp_path: Path) -> None:
    from wsproxy.config import load_config

    config = tmp_path / "conf" / "wsproxy.toml"
    config.parent.mkdir()
    link = config.parent / "certs"
    link.symlink_to(pki.ca.store.root)
    config.write_text(
        """
[admin]
enabled = false
[listeners.edge]
address = "127.0.0.1:0"
protocol = "tls"
default_target_group = "g"
[listeners.edge.tls]
certificates = [{ cert = "certs/issued/edge.pem", key = "certs/issued/edge.key" }]
[target_groups.g]
"""
    )
    loaded = load_config(config)
    proxy = Proxy(loaded)
    await proxy.start()
    await proxy.shutdown(grace=0.1)


async def test_revocation_ends_live_sessions(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], pki: Pki
) -> None:
    victim = pki.ca.issue_client("live-victim")
    bystander = pki.ca.issue_client("live-bystander")
    proxy = await make_proxy(
        tls_config(pki, echo_targets[0].address, client_auth="required", crl=True)
    )
    address = listener_address(proxy)

    async def open_session(
        cert: str, key: str
    ) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
        connector = aiohttp.TCPConnector(ssl=client_context(pki, cert, key))
        session = aiohttp.ClientSession(connector=connector)
        ws = await session.ws_connect(
            f"wss://{address}/", headers={"Host": "edge.internal"}, server_hostname="edge.internal"
        )
        await ws.send_str("hi")
        assert await ws.receive_str(timeout=5) == "hi"
        return session, ws

    victim_session, victim_ws = await open_session(victim.cert_path, victim.key_path)
    other_session, other_ws = await open_session(bystander.cert_path, bystander.key_path)
    try:
        started = asyncio.get_running_loop().time()
        pki.ca.revoke("live-victim", "keyCompromise")
        message = await victim_ws.receive(timeout=5)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert victim_ws.close_code == 1008
        assert asyncio.get_running_loop().time() - started < 5
        await other_ws.send_str("still here")
        assert await other_ws.receive_str(timeout=5) == "still here"
        # New handshakes use the new CRL.
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await wss_echo(address, client_context(pki, victim.cert_path, victim.key_path))
    finally:
        await other_ws.close()
        await victim_session.close()
        await other_session.close()
