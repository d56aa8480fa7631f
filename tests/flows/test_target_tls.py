"""TLS toward targets: the proxy verifies the target and presents its own client certificate."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.conftest import ProxyFactory, listener_address
from tests.flows.test_websocket import exchange_raw, status_of
from tests.helpers.pki import Pki, make_pki
from tests.helpers.wsraw import upgrade_request
from wsproxy.demo import EchoTarget


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    pki.ca.issue_client("wsproxy")
    return pki


def target_context(pki: Pki, *, require_client: bool, server: str = "edge") -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki.ca_file)
    context.load_cert_chain(*pki.files(server))
    context.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_NONE
    return context


@pytest.fixture
async def wss_target(pki: Pki) -> AsyncIterator[EchoTarget]:
    target = EchoTarget("wss", greeting=False, ssl_context=target_context(pki, require_client=True))
    await target.start()
    yield target
    await target.stop()


def config(pki: Pki, target: EchoTarget, tls: str) -> str:
    return f"""
[listeners.edge]
address = "127.0.0.1:0"
websocket = true
default_target_group = "secure"

[target_groups.secure]
protocol = "tls"
targets = [{{ address = "{target.address}" }}]
tls = {{ {tls} }}
"""


async def test_wss_target_that_requires_the_proxys_certificate(
    make_proxy: ProxyFactory, wss_target: EchoTarget, pki: Pki
) -> None:
    cert, key = pki.files("wsproxy")
    tls = (
        f'ca = "{pki.ca_file}", server_name = "edge.internal", '
        f'client_cert = "{cert}", client_key = "{key}"'
    )
    proxy = await make_proxy(config(pki, wss_target, tls))
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://{listener_address(proxy)}/") as ws,
    ):
        await ws.send_str("through TLS")
        assert await ws.receive_str(timeout=5) == "through TLS"
    assert wss_target.sessions == 1


@pytest.mark.parametrize(
    ("name", "tls_of"),
    [
        ("no client certificate", lambda p: f'ca = "{p.ca_file}", server_name = "edge.internal"'),
        ("untrusted target", lambda p: f'ca = "{p.foreign.store.ca_cert}"'),
        ("name mismatch", lambda p: f'ca = "{p.ca_file}", server_name = "wrong.internal"'),
    ],
)
async def test_target_tls_failures_are_502_never_plaintext(
    make_proxy: ProxyFactory, wss_target: EchoTarget, pki: Pki, name: str, tls_of: object
) -> None:
    proxy = await make_proxy(config(pki, wss_target, tls_of(pki)))  # type: ignore[operator]
    response = await exchange_raw(listener_address(proxy), upgrade_request())
    assert status_of(response) == 502
    assert wss_target.sessions == 0
    if name != "no client certificate":  # TLS 1.3: the target refuses only after the handshake
        assert proxy.target_groups["secure"].stats.connect_errors_by_reason() == {"tls": 1}


def test_target_tls_files_are_checked(pki: Pki, tmp_path: object) -> None:
    from wsproxy.config import parse_config
    from wsproxy.errors import ConfigError
    from wsproxy.tls import check_files

    text = """
[listeners.edge]
address = "127.0.0.1:0"
default_target_group = "secure"
[target_groups.secure]
protocol = "tls"
tls = { client_cert = "/nonexistent/wsproxy.pem", client_key = "/nonexistent/wsproxy.key" }
"""
    with pytest.raises(ConfigError, match="wsproxy ca issue client --name wsproxy"):
        check_files(parse_config(text), "<test>")
    with pytest.raises(ConfigError, match="client_cert and client_key go together"):
        parse_config(text.replace(', client_key = "/nonexistent/wsproxy.key"', ""))
    with pytest.raises(ConfigError, match="a tls table needs protocol = 'tls'"):
        parse_config(text.replace('protocol = "tls"', ""))
