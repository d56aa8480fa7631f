"""A web page the operator opens must not be able to change the proxy through its admin API.

A page can send a form-like POST to http://127.0.0.1:PORT/ without a CORS preflight (the
review of issue 13 registered an attacker's target that way with ``Content-Type: text/plain``),
and a DNS name it controls can be rebound to 127.0.0.1 so the request even looks same-origin.
Browsers name the page in ``Origin`` and ``Sec-Fetch-Site``, and a rebound request names the
attacker's host in ``Host``: state-changing requests carrying them are refused with 403, while
curl and other clients (no Origin, an address or localhost in Host) keep working.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ProxyFactory
from wsproxy.demo import EchoTarget
from wsproxy.proxy import Proxy

LISTENER = """
[listeners.edge]
address = "127.0.0.1:0"
default_target_group = "chat"
[target_groups.chat]
"""


async def register(proxy: Proxy, headers: dict[str, str], token: str | None = None) -> int:
    assert proxy.admin is not None and proxy.admin.address is not None
    if token is not None:
        headers = {**headers, "Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://{proxy.admin.address}/v1/target-groups/chat/targets",
            data=b'{"address": "127.0.0.1:19050"}',
            headers={"Content-Type": "text/plain", **headers},
        ) as response,
    ):
        if response.status == 403:
            assert "error" in await response.json()
        return response.status


def registered(proxy: Proxy) -> list[str]:
    return [str(target.address) for target in proxy.target_groups["chat"].targets]


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},  # a sandboxed frame or a file:// page
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Host": "evil.example:9901", "Origin": "http://evil.example:9901"},  # rebound DNS
        {"Host": "evil.example"},
    ],
    ids=["origin", "null-origin", "cross-site", "same-site", "rebinding", "foreign-host"],
)
async def test_a_browsers_cross_site_change_is_refused(
    make_proxy: ProxyFactory, echo: EchoTarget, headers: dict[str, str]
) -> None:
    proxy = await make_proxy(f'{LISTENER}targets = [{{ address = "{echo.address}" }}]\n')
    assert await register(proxy, headers) == 403
    assert registered(proxy) == [str(echo.address)]


@pytest.mark.parametrize(
    "headers",
    [
        {},  # curl
        {"Host": "localhost"},
        {"Host": "[::1]:9901"},
        {"Sec-Fetch-Site": "same-origin"},  # the status page's own scripts
        {"Sec-Fetch-Site": "none"},  # typed into the address bar
    ],
    ids=["curl", "localhost", "ipv6", "same-origin", "none"],
)
async def test_clients_that_are_not_cross_site_still_change_it(
    make_proxy: ProxyFactory, echo: EchoTarget, headers: dict[str, str]
) -> None:
    proxy = await make_proxy(f'{LISTENER}targets = [{{ address = "{echo.address}" }}]\n')
    assert await register(proxy, headers) == 201
    assert "127.0.0.1:19050" in registered(proxy)


async def test_with_a_token_any_host_name_may_be_used(
    make_proxy: ProxyFactory, echo: EchoTarget, tmp_path: Path
) -> None:
    """A browser never adds the bearer token by itself, so a rebound name gains nothing: with
    a token the Host check is not needed (a Service's DNS name keeps working), the Origin check
    still is."""
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    proxy = await make_proxy(
        f'token_file = "{token}"\n{LISTENER}targets = [{{ address = "{echo.address}" }}]\n'
    )
    assert await register(proxy, {"Host": "wsproxy-admin.default.svc"}, "s3cret") == 201
    assert await register(proxy, {"Origin": "http://evil.example"}, "s3cret") == 403
