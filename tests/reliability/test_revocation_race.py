"""A client certificate revoked while its handshake is in flight must not get a session.

OpenSSL checks the certificate against the CRL of the context the handshake started with; a
CRL reloaded in between (a fresh context) is not seen by that handshake. The client here drives
TLS by hand through ``ssl.MemoryBIO``, so the test decides when its final flight (Certificate,
CertificateVerify, Finished) reaches the proxy: after the revocation and the CRL reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.flows.test_tls import client_context, tls_config
from tests.helpers.pki import Pki, make_pki
from tests.helpers.wsraw import upgrade_request
from wsproxy.address import Address
from wsproxy.demo import EchoTarget


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class HeldBackClient:
    """A TLS client whose last handshake flight is sent only when the test says so."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext
    ) -> None:
        self.reader, self.writer = reader, writer
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="edge.internal")
        self.held = b""

    @classmethod
    async def start(cls, address: Address, context: ssl.SSLContext) -> HeldBackClient:
        """Connect, send the ClientHello and read the server's flight; hold the answer."""
        reader, writer = await asyncio.open_connection(address.host, address.port)
        client = cls(reader, writer, context)
        tls, incoming, outgoing = client.tls, client.incoming, client.outgoing
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        writer.write(outgoing.read())  # the ClientHello
        while True:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "the proxy closed during the handshake"
            incoming.write(data)
            try:
                tls.do_handshake()
                break  # TLS 1.3: the client is done once it has written its final flight
            except ssl.SSLWantReadError:
                if outgoing.pending:  # TLS 1.2: its final flight waits for the server's Finished
                    break
        client.held = outgoing.read()
        assert client.held, "no final flight to hold back"
        return client

    async def finish_and_upgrade(self) -> bytes:
        """Send the held flight and an upgrade request; what the proxy answers (b"" if it
        closed the connection or sent an alert)."""
        self.writer.write(self.held)
        answer = b""
        try:
            while True:
                try:
                    self.tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self.writer.write(self.outgoing.read())
                    data = await asyncio.wait_for(self.reader.read(65536), 5)
                    if not data:
                        return b""
                    self.incoming.write(data)
            self.tls.write(upgrade_request(host="edge.internal"))
            self.writer.write(self.outgoing.read())
            while b"\r\n\r\n" not in answer:
                data = await asyncio.wait_for(self.reader.read(65536), 5)
                if not data:
                    break
                self.incoming.write(data)
                try:
                    answer += self.tls.read(65536)
                except ssl.SSLWantReadError:
                    continue
                except ssl.SSLZeroReturnError:
                    break
        except (ssl.SSLError, ConnectionError):
            pass
        return answer

    def close(self) -> None:
        self.writer.close()


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"]
)
async def test_a_certificate_revoked_during_its_handshake_gets_no_session(
    make_proxy: ProxyFactory,
    echo_targets: list[EchoTarget],
    pki: Pki,
    version: ssl.TLSVersion,
) -> None:
    name = f"in-flight-{version.name}"
    victim = pki.ca.issue_client(name)
    proxy = await make_proxy(
        tls_config(pki, echo_targets[0].address, client_auth="required", crl=True)
    )
    listener = proxy.listeners["edge"]
    context = client_context(pki, victim.cert_path, victim.key_path)
    context.minimum_version = context.maximum_version = version

    # Unrevoked, the same client gets its 101: the refusal below is the revocation's doing.
    control = await HeldBackClient.start(listener_address(proxy), context)
    try:
        assert (await control.finish_and_upgrade()).startswith(b"HTTP/1.1 101")
    finally:
        control.close()

    client = await HeldBackClient.start(listener_address(proxy), context)
    try:
        before = listener.tls
        pki.ca.revoke(name, "keyCompromise")
        await wait_for(lambda: listener.tls is not before)  # the CRL watcher took the new CRL
        answer = await client.finish_and_upgrade()
    finally:
        client.close()
    assert not answer.startswith(b"HTTP/1.1 101"), "a revoked certificate got a session"
    await wait_for(lambda: listener.stats.client_certs["revoked"] == 1)
    await wait_for(lambda: listener.stats.active == 0)
    assert listener.stats.rejected["client_cert_revoked"] == 1


async def test_a_handshake_that_spans_a_crl_reload_keeps_its_sni(
    make_proxy: ProxyFactory,
    echo_targets: list[EchoTarget],
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The SNI is recorded by the contexts the handshake started with; the connection is
    checked by the current ones, which must still know it (the log line, the PROXY header)."""
    client_cert = pki.ca.issue_client("spans-reload")
    bystander = pki.ca.issue_client("spans-reload-revoked")
    proxy = await make_proxy(
        tls_config(pki, echo_targets[0].address, client_auth="required", crl=True)
    )
    listener = proxy.listeners["edge"]
    context = client_context(pki, client_cert.cert_path, client_cert.key_path)
    with caplog.at_level(logging.INFO, logger="wsproxy.access"):
        client = await HeldBackClient.start(listener_address(proxy), context)
        try:
            before = listener.tls
            pki.ca.revoke(bystander.name, "superseded")  # a new CRL, not about this client
            await wait_for(lambda: listener.tls is not before)
            answer = await client.finish_and_upgrade()
        finally:
            client.close()
        assert answer.startswith(b"HTTP/1.1 101"), answer
        await wait_for(lambda: listener.stats.active == 0)
    entry = next(r.__dict__["connection"] for r in caplog.records if r.name == "wsproxy.access")
    assert entry["sni"] == "edge.internal"
