"""``[apis.NAME.management]``: the @connections API on its own TLS listener, where backends
authenticate with client certificates from our CA instead of the admin token."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import pytest

from tests.api.test_api_flow import ECHO
from tests.conftest import ProxyFactory
from tests.helpers.api_backend import Backend, api_config, url
from tests.helpers.pki import Pki, make_pki
from wsproxy.address import Address
from wsproxy.api.management_listener import ManagementListener
from wsproxy.config import parse_config
from wsproxy.errors import ConfigError
from wsproxy.tls import check_files


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def management(pki: Pki, client_auth: str = "required") -> str:
    cert, key = pki.files("edge")
    return f"""
[apis.chat.management]
address = "127.0.0.1:0"

[apis.chat.management.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
client_auth = "{client_auth}"
client_ca = "{pki.ca_file}"
"""


def client_context(pki: Pki, name: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca_file)
    if name is not None:
        context.load_cert_chain(*pki.files(name))
    return context


async def test_a_backend_with_a_client_certificate_needs_no_token(
    make_proxy: ProxyFactory, backend: Backend, pki: Pki
) -> None:
    proxy = await make_proxy(api_config(backend.address, ECHO) + management(pki))
    (listener,) = proxy.management_listeners
    assert listener.address is not None
    base = f"https://localhost:{listener.address.port}"
    async with aiohttp.ClientSession() as session, session.ws_connect(url(proxy)) as ws:
        (connection_id,) = proxy.apis["chat"].registry.ids()
        alice = client_context(pki, "alice")
        async with session.post(
            f"{base}/@connections/{connection_id}", data=b"via mTLS", ssl=alice
        ) as response:
            assert response.status == 200, await response.text()
        assert await ws.receive_bytes(timeout=5) == b"via mTLS"
        # Without a certificate the handshake fails (client_auth = "required").
        with pytest.raises(aiohttp.ClientError):
            async with session.get(
                f"{base}/@connections/{connection_id}", ssl=client_context(pki, None)
            ):
                pass


def test_a_management_listener_open_to_the_network_needs_a_way_to_authenticate(
    pki: Pki,
) -> None:
    text = api_config(Address("127.0.0.1", 1), ECHO)
    text += '\n[apis.chat.management]\naddress = "0.0.0.0:9443"\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert "nothing authenticates callers" in str(caught.value)
    parse_config(text.replace("0.0.0.0:9443", "127.0.0.1:9443"))  # loopback: allowed
    parse_config('[admin]\ntoken_file = "t"\n' + text)  # the admin token protects it


def test_an_empty_admin_token_never_opens_a_management_listener(tmp_path: Path) -> None:
    """With [admin] off, its token file still guards the management listener: an empty one is
    a config error, never "no token, so no check"."""
    token = tmp_path / "admin.token"
    token.write_text("  \n")
    text = (
        f'[admin]\nenabled = false\ntoken_file = "{token}"\n'
        + api_config(Address("127.0.0.1", 1), ECHO)
        + '\n[apis.chat.management]\naddress = "0.0.0.0:0"\n'
    )
    config = parse_config(text)
    with pytest.raises(ConfigError) as caught:
        check_files(config, "<test>")
    assert "is empty" in str(caught.value)
    with pytest.raises(ConfigError):
        ManagementListener("chat", config.apis["chat"].management, None, str(token))  # type: ignore[arg-type]


async def test_a_tokenless_loopback_management_listener_refuses_browsers(
    make_proxy: ProxyFactory, backend: Backend
) -> None:
    proxy = await make_proxy(
        api_config(backend.address, ECHO) + '\n[apis.chat.management]\naddress = "127.0.0.1:0"\n'
    )
    (listener,) = proxy.management_listeners
    assert listener.address is not None
    base = f"http://127.0.0.1:{listener.address.port}"
    async with aiohttp.ClientSession() as session:
        headers = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
        async with session.post(f"{base}/@groups/room", data="x", headers=headers) as response:
            assert response.status == 403
            assert "Origin" in (await response.json())["error"]
        async with session.post(f"{base}/@groups/room", data="x") as response:
            assert response.status == 200  # curl and backends send no Origin
