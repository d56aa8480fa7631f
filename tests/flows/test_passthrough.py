"""TLS passthrough: SNI routing without decryption; the client's TLS session ends at the target."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.helpers.pki import Pki, make_pki
from tests.wire.test_clienthello import real_client_hello
from wsproxy.address import Address


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class TlsEcho:
    """A TLS echo target that prefixes each answer with its name."""

    def __init__(self, name: str, cert: str, key: str) -> None:
        self.name = name
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.cert_der = x509.load_pem_x509_certificates(Path(cert).read_bytes())[0].public_bytes(
            serialization.Encoding.DER
        )
        self.server: asyncio.Server | None = None
        self.address = Address("127.0.0.1", 0)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._echo, "127.0.0.1", 0, ssl=self.context)
        self.address = Address("127.0.0.1", self.server.sockets[0].getsockname()[1])

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(f"{self.name}: ".encode() + line)
            await writer.drain()
        writer.close()

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def tls_targets(pki: Pki) -> AsyncIterator[list[TlsEcho]]:
    targets = [
        TlsEcho("edge", *pki.files("edge")),
        TlsEcho("other", *pki.files("other")),
    ]
    for target in targets:
        await target.start()
    yield targets
    for target in targets:
        target.stop()


def passthrough_config(targets: list[TlsEcho], default: bool = True) -> str:
    edge, other = targets
    default_line = 'default_target_group = "edge"' if default else ""
    return f"""
[listeners.edge]
address = "127.0.0.1:0"
protocol = "tls_passthrough"
client_hello_timeout_seconds = 0.5
{default_line}

[[listeners.edge.rules]]
sni = "edge.internal"
target_group = "edge"

[[listeners.edge.rules]]
sni = "*.other.internal"
target_group = "other"

[target_groups.edge]
targets = [{{ address = "{edge.address}" }}]

[target_groups.other]
targets = [{{ address = "{other.address}" }}]
"""


async def talk(address: Address, pki: Pki, server_name: str) -> tuple[bytes, bytes]:
    context = ssl.create_default_context(cafile=pki.ca_file)
    context.check_hostname = server_name != "unknown.example"
    if not context.check_hostname:
        context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(
        address.host, address.port, ssl=context, server_hostname=server_name
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.write(b"hello\n")
    answer = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    return der, answer


async def test_routing_on_sni_with_the_targets_own_certificates(
    make_proxy: ProxyFactory, tls_targets: list[TlsEcho], pki: Pki
) -> None:
    proxy = await make_proxy(passthrough_config(tls_targets))
    address = listener_address(proxy)
    edge, other = tls_targets
    der, answer = await talk(address, pki, "edge.internal")
    assert (der, answer) == (edge.cert_der, b"edge: hello\n")  # the target's certificate, unchanged
    der, answer = await talk(address, pki, "chat.other.internal")
    assert (der, answer) == (other.cert_der, b"other: hello\n")
    _, answer = await talk(address, pki, "unknown.example")
    assert answer == b"edge: hello\n"  # default group
    await wait_for(lambda: proxy.listeners["edge"].stats.active == 0)


async def test_no_match_and_no_default_is_closed_and_counted(
    make_proxy: ProxyFactory, tls_targets: list[TlsEcho], pki: Pki
) -> None:
    proxy = await make_proxy(passthrough_config(tls_targets, default=False))
    address = listener_address(proxy)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await talk(address, pki, "unknown.example")
    await wait_for(lambda: proxy.listeners["edge"].stats.rejected["no_route"] == 1)
    _, answer = await talk(address, pki, "edge.internal")
    assert answer == b"edge: hello\n"


async def send_raw(address: Address, data: bytes, *, trickle: float = 0.0) -> bytes:
    reader, writer = await asyncio.open_connection(address.host, address.port)
    try:
        if trickle:
            for byte in data[:30]:  # 3 s at most: well past the 0.5 s deadline
                # The proxy may close (FIN or reset) between two bytes; stop writing then.
                if reader.at_eof() or writer.is_closing():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(trickle)
        else:
            writer.write(data)
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        return b""
    finally:
        writer.close()


HELLO = real_client_hello("edge.internal")


@pytest.mark.parametrize(
    ("name", "data", "reason", "trickle"),
    [
        ("garbage", b"\x00garbage", "tls_not_tls", 0.0),
        ("plain http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "tls_not_tls", 0.0),
        ("truncated", HELLO[:40], "tls_client_hello_timeout", 0.0),
        ("trickled past the deadline", HELLO, "tls_client_hello_timeout", 0.1),
        (
            "70 KiB hello",
            b"\x16\x03\x01\x00\x68\x01" + (70 * 1024).to_bytes(3, "big") + b"\x00" * 100,
            "tls_client_hello_too_large",
            0.0,
        ),
    ],
)
async def test_bad_client_hellos(
    make_proxy: ProxyFactory,
    tls_targets: list[TlsEcho],
    pki: Pki,
    name: str,
    data: bytes,
    reason: str,
    trickle: float,
) -> None:
    proxy = await make_proxy(passthrough_config(tls_targets))
    address = listener_address(proxy)
    assert await send_raw(address, data, trickle=trickle) == b""
    await wait_for(lambda: proxy.listeners["edge"].stats.rejected[reason] == 1)
    _, answer = await talk(address, pki, "edge.internal")  # others are unaffected
    assert answer == b"edge: hello\n"
