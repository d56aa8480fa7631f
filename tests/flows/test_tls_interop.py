"""Interoperability with another TLS stack: the openssl command-line client."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable

import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.flows.test_tls import tls_config
from tests.helpers.pki import Pki, make_pki
from tests.helpers.servers import RawServer, tcp_echo
from wsproxy.address import Address

RawServers = Callable[..., Awaitable[RawServer]]
OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def s_client(address: Address, *args: str, stdin: bytes = b"") -> tuple[int, str]:
    """Run s_client; with ``stdin``, send it and keep reading until it comes back echoed."""
    process = await asyncio.create_subprocess_exec(
        str(OPENSSL), "s_client", "-connect", f"{address.host}:{address.port}", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    output = b""
    if stdin:
        process.stdin.write(stdin)
        async with asyncio.timeout(10):
            while (line := await process.stdout.readline()) and line != stdin:
                output += line
            output += line
    process.stdin.close()
    rest, _ = await asyncio.wait_for(process.communicate(), 20)
    return process.returncode or 0, (output + rest).decode(errors="replace")


async def test_openssl_client_with_a_client_certificate(
    make_proxy: ProxyFactory, raw_servers: RawServers, pki: Pki
) -> None:
    server = await raw_servers(tcp_echo)
    proxy = await make_proxy(
        tls_config(pki, server.address, websocket=False, client_auth="required", crl=True)
    )
    cert, key = pki.files("alice")
    _, output = await s_client(
        listener_address(proxy),
        "-servername", "edge.internal", "-CAfile", pki.ca_file, "-cert", cert, "-key", key,
        "-verify_return_error",
        stdin=b"echo me\n",
    )  # fmt: skip
    assert "Verify return code: 0 (ok)" in output
    assert "subject=CN" in output and "edge.internal" in output
    assert output.rstrip().endswith("echo me") or "\necho me\n" in output
    assert proxy.listeners["edge"].stats.client_certs["ok"] == 1


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
async def test_old_tls_clients_are_refused_on_the_intermediate_policy(
    make_proxy: ProxyFactory, raw_servers: RawServers, pki: Pki, version: str
) -> None:
    server = await raw_servers(tcp_echo)
    proxy = await make_proxy(tls_config(pki, server.address, websocket=False))
    _, output = await s_client(
        listener_address(proxy), version, "-cipher", "DEFAULT@SECLEVEL=0",
        "-servername", "edge.internal",
    )  # fmt: skip
    assert "echo" not in output
    stats = proxy.listeners["edge"].stats
    await wait_for(lambda: stats.rejected["tls_protocol_version"] == 1)
