"""mTLS with TLS session resumption: a resumed session must not carry a client in past a
revocation or a stricter reload (a resumed handshake presents no certificate to verify again).
Listeners that verify clients therefore resume nothing, in TLS 1.2 or 1.3.

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
from tests.helpers.tools import require_tool
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
        # Listeners that verify clients resume nothing (test_client_auth_listeners_resume_no_
        # session shows with s_client that other listeners do): every handshake checks the CRL.
        assert not resumed, "a client_auth listener resumed a session"
        assert answer.startswith(b"HTTP/1.1 101")

        stats = proxy.listeners["edge"].stats
        pki.ca.revoke("resumer", "keyCompromise")
        await asyncio.sleep(1.5)  # the CRL watcher polls once a second
        answer, _, resumed = await asyncio.to_thread(upgrade, address, context, session)
        assert not resumed
        assert not answer.startswith(b"HTTP/1.1 101"), "a revoked client got in by resuming"
        await wait_for(lambda: stats.client_certs["revoked"] >= 1)
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


async def s_client_session(
    address: Address,
    pki: Pki,
    client: tuple[str, str],
    version: str,
    session_file: Path,
    *,
    resume: bool,
) -> str:
    """One ``openssl s_client`` connection that sends a plain GET and reads until the proxy
    closes (so TLS 1.3 tickets, sent after the handshake, arrive); saves its session to
    ``session_file``, or offers the one saved there with ``resume``. Its output."""
    openssl = require_tool("openssl", "openssl")
    session = ["-sess_in", str(session_file)] if resume else ["-sess_out", str(session_file)]
    process = await asyncio.create_subprocess_exec(
        openssl, "s_client", "-connect", f"{address.host}:{address.port}", version,
        "-servername", "edge.internal", "-CAfile", pki.ca_file, "-cert", client[0],
        "-key", client[1], "-ign_eof", *session,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    request = b"GET / HTTP/1.1\r\nHost: edge.internal\r\n\r\n"
    try:
        async with asyncio.timeout(20):
            output, _ = await process.communicate(request)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return output.decode(errors="replace")


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
async def test_client_auth_listeners_resume_no_session(
    echo_targets: list[EchoTarget], pki: Pki, tmp_path: Path, version: str
) -> None:
    """Neither a TLS 1.2 session id nor a TLS 1.3 ticket (stateful: OP_NO_TICKET) resumes on a
    listener that verifies clients, while a listener that does not still resumes (so the
    s_client runs below can show a resumption at all)."""
    issued = pki.ca.issue_client(f"s-client-{version}")
    client = (issued.cert_path, issued.key_path)
    for client_auth, expect_reused in (("required", False), ("none", True)):
        config = tmp_path / f"{client_auth}.toml"
        config.write_text(
            "[admin]\nenabled = false\n"
            + tls_config(
                pki, echo_targets[0].address, client_auth=client_auth, crl=client_auth != "none"
            )
        )
        proxy = Proxy(load_config(str(config)), path=str(config))
        await proxy.start()
        try:
            address = listener_address(proxy)
            session_file = tmp_path / f"{client_auth}{version}.session"
            first = await s_client_session(
                address, pki, client, version, session_file, resume=False
            )
            assert "New, TLSv1" in first, first
            second = await s_client_session(
                address, pki, client, version, session_file, resume=True
            )
        finally:
            await proxy.shutdown(grace=1.0)
        reused = "Reused, TLSv1" in second
        assert reused == expect_reused, (client_auth, version, second)
