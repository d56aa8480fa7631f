"""mTLS with TLS session resumption: a resumed session must not carry a client in past a
revocation or a stricter reload (a resumed handshake presents no certificate to verify again).

The client is Python's blocking ``ssl`` in a thread (asyncio cannot offer a saved session); the
test first proves that resumption does happen, so the checks after it mean something.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import pytest

from tests.conftest import listener_address, wait_for
from tests.flows.test_tls import client_context, tls_config
from tests.helpers.pki import Pki, make_pki
from tests.helpers.wsraw import upgrade_request
from wsproxy.address import Address
from wsproxy.config import load_config
from wsproxy.demo import EchoTarget
from wsproxy.proxy import Proxy


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def upgrade(
    address: Address, context: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[bytes, ssl.SSLSession | None, bool]:
    """One TLS connection and a WebSocket upgrade: (answer, session to resume, was resumed)."""
    with (
        socket.create_connection((address.host, address.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="edge.internal", session=session) as tls,
    ):
        resumed = bool(tls.session_reused)
        try:
            tls.sendall(upgrade_request(host="edge.internal"))
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = tls.recv(4096)  # TLS 1.3 tickets arrive here too
                if not chunk:
                    break
                answer += chunk
        except (ssl.SSLError, OSError):
            answer = b""
        return answer, tls.session, resumed


async def test_a_resumed_session_does_not_outlive_a_revocation(
    echo_targets: list[EchoTarget], pki: Pki, tmp_path: Path
) -> None:
    victim = pki.ca.issue_client("resumer")
    config = tmp_path / "mtls.toml"
    config.write_text(
        "[admin]\nenabled = false\n"
        + tls_config(pki, echo_targets[0].address, client_auth="required", crl=True)
    )
    proxy = Proxy(load_config(str(config)), path=str(config))
    await proxy.start()
    try:
        address = listener_address(proxy)
        context = client_context(pki, victim.cert_path, victim.key_path)
        answer, session, _ = await asyncio.to_thread(upgrade, address, context, None)
        assert answer.startswith(b"HTTP/1.1 101"), answer
        answer, session, resumed = await asyncio.to_thread(upgrade, address, context, session)
        assert resumed, "the server does not resume sessions: this test would prove nothing"
        assert answer.startswith(b"HTTP/1.1 101")

        stats = proxy.listeners["edge"].stats
        pki.ca.revoke("resumer", "keyCompromise")
        await asyncio.sleep(1.5)  # the CRL watcher polls once a second
        answer, _, resumed = await asyncio.to_thread(upgrade, address, context, session)
        assert not answer.startswith(b"HTTP/1.1 101"), "a revoked client got in by resuming"
        if resumed:  # the old ticket still opened TLS: then the proxy's own check refused it
            await wait_for(lambda: stats.client_certs["revoked"] >= 1)
        print(f"\nafter revocation: resumed={resumed}, refused either way")
    finally:
        await proxy.shutdown(grace=1.0)


async def test_a_resumed_session_does_not_survive_a_stricter_reload(
    echo_targets: list[EchoTarget], pki: Pki, tmp_path: Path
) -> None:
    config = tmp_path / "mtls.toml"
    lenient = "[admin]\nenabled = false\n" + tls_config(pki, echo_targets[0].address)
    config.write_text(lenient)
    proxy = Proxy(load_config(str(config)), path=str(config))
    await proxy.start()
    try:
        address = listener_address(proxy)
        context = client_context(pki)  # no client certificate: fine while none is asked for
        answer, session, _ = await asyncio.to_thread(upgrade, address, context, None)
        assert answer.startswith(b"HTTP/1.1 101"), answer
        _, session, resumed = await asyncio.to_thread(upgrade, address, context, session)
        assert resumed

        config.write_text(
            lenient.replace('client_auth = "none"', 'client_auth = "required"').replace(
                'policy = "intermediate"\n',
                f'policy = "intermediate"\nclient_ca = "{pki.ca_file}"\n',
            )
        )
        assert await proxy.reload() == []
        assert proxy.listeners["edge"].config.tls is not None
        assert proxy.listeners["edge"].config.tls.client_auth == "required"
        address = listener_address(proxy)  # rebound (port 0 in this config): a fresh context
        answer, _, resumed = await asyncio.to_thread(upgrade, address, context, session)
        assert not resumed
        assert not answer.startswith(b"HTTP/1.1 101"), "resumption skipped the new requirement"
    finally:
        await proxy.shutdown(grace=1.0)
