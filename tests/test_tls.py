"""wsproxy/tls.py (and wsproxy/openssl.py) seen from other TLS stacks: the alert a refused client
certificate gets, the key-exchange groups a listener and a target-side context accept."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl

import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.flows.test_tls import client_context, tls_config, wss_echo
from tests.helpers.pki import Pki, make_pki
from tests.helpers.tools import require_tool
from wsproxy.address import Address
from wsproxy.config import TargetTls
from wsproxy.connect import run_connect
from wsproxy.demo import EchoTarget
from wsproxy.openssl import limit_groups
from wsproxy.tls import target_context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    # Ed25519: a server key whose use does not depend on the client's groups (an ECDSA P-256
    # key needs P-256 among a TLS 1.2 client's groups), so only key exchange picks a group.
    pki.ca.issue_server("ed", ["edge.internal"], key_type="ed25519")
    return pki


async def s_client(address: Address, *args: str, hold: bool = False) -> str:
    """``openssl s_client`` output (stdout and stderr) once it ends. With ``hold``, its stdin
    stays open, so a TLS 1.3 client, whose handshake ends before the server has judged its
    certificate, goes on reading until the server's alert or close ends it; else it ends after
    the handshake."""
    openssl = require_tool("openssl", "openssl")
    process = await asyncio.create_subprocess_exec(
        openssl, "s_client", "-connect", f"{address.host}:{address.port}", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    if not hold:
        process.stdin.close()
    try:
        async with asyncio.timeout(20):
            output = await process.stdout.read()
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        process.stdin.close()
    return output.decode(errors="replace")


# --- the alert of a refused client certificate ----------------------------------------------

# (row, TLS version) -> the alert OpenSSL names (RFC 8446 §6.2, RFC 5246 §7.2.2), the result
# wsproxy reports. A missing certificate is certificate_required (116) in TLS 1.3 and
# handshake_failure (40) in TLS 1.2.
ALERTS = {
    "missing": ("handshake failure", 40, "missing"),
    "untrusted": ("unknown ca", 48, "untrusted"),
    "expired": ("certificate expired", 45, "expired"),
    "not_yet_valid": ("bad certificate", 42, "expired"),
    "revoked": ("certificate revoked", 44, "revoked"),
    "server_eku": ("unsupported certificate", 43, "bad_eku"),  # OpenSSL's own purpose check
}


def client_files(pki: Pki, row: str) -> list[str]:
    now = dt.datetime.now(dt.UTC)
    if row == "missing":
        return []
    if row == "untrusted":
        store = pki.foreign.store
        return ["-cert", str(store.leaf_cert("mallory")), "-key", str(store.leaf_key("mallory"))]
    if row == "expired":
        cert, key = pki.issue_client_at("expired", now - dt.timedelta(days=10), days=2)
    elif row == "not_yet_valid":
        cert, key = pki.issue_client_at("future", now + dt.timedelta(days=10))
    elif row == "revoked":
        issued = pki.ca.issue_client("revoked")
        pki.ca.revoke(issued.name, "keyCompromise")
        cert, key = issued.cert_path, issued.key_path
    else:
        cert, key = pki.files("server-only")
    return ["-cert", cert, "-key", key]


@pytest.fixture(scope="module")
def refused_clients(pki: Pki) -> dict[str, list[str]]:
    """s_client arguments per row, minted once (the CRL must list the revoked one before any
    listener of the module reads it)."""
    return {row: client_files(pki, row) for row in ALERTS}


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
@pytest.mark.parametrize("row", list(ALERTS))
async def test_a_refused_client_certificate_gets_its_tls_alert(
    make_proxy: ProxyFactory,
    echo_targets: list[EchoTarget],
    pki: Pki,
    refused_clients: dict[str, list[str]],
    caplog: pytest.LogCaptureFixture,
    row: str,
    version: str,
) -> None:
    alert, number, result = ALERTS[row]
    if row == "missing" and version == "-tls1_3":
        alert, number = "certificate required", 116
    # A refused client must not hold its handshake slot: one slot, and a timeout far beyond
    # s_client's 20 s, so a refusal that waited for it would fail the test.
    extra = "max_handshakes_in_flight = 1\ntls_handshake_timeout_seconds = 60"
    proxy = await make_proxy(
        tls_config(pki, echo_targets[0].address, client_auth="required", crl=True, extra=extra)
    )
    address = listener_address(proxy)
    listener = proxy.listeners["edge"]
    with caplog.at_level(logging.INFO, logger="wsproxy.access"):
        output = await s_client(
            address, version, "-servername", "edge.internal", "-CAfile", pki.ca_file,
            *refused_clients[row], hold=True,
        )  # fmt: skip
        await wait_for(lambda: listener.context.handshakes == 0)
    assert f"alert {alert}" in output and f"SSL alert number {number}" in output, output
    assert "unexpected eof" not in output
    assert dict(listener.stats.tls_handshakes) == {f"client_cert_{result}": 1}
    assert dict(listener.stats.client_certs) == {result: 1}
    lines = [r.__dict__["connection"] for r in caplog.records if r.name == "wsproxy.access"]
    assert [line["reason"] for line in lines] == [f"client_cert_{result}"]
    canary_cert, canary_key = pki.files("canary")
    await wss_echo(address, client_context(pki, canary_cert, canary_key))  # the slot is free


async def test_a_refused_wsproxy_connect_is_one_attempt_and_names_the_alert(
    make_proxy: ProxyFactory,
    echo_targets: list[EchoTarget],
    pki: Pki,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # TLS 1.3: the client's handshake is over before the proxy refuses it, so the refusal meets
    # the Upgrade request, which aiohttp would retry once on a new connection.
    proxy = await make_proxy(
        tls_config(pki, echo_targets[0].address, client_auth="required", crl=True)
    )
    address = listener_address(proxy)
    listener = proxy.listeners["edge"]
    context = client_context(pki)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    code = await run_connect(f"wss://localhost:{address.port}/", [], [], context)
    assert code == 1
    assert "alert certificate required" in capsys.readouterr().err
    # Every connection the client made was accepted, and so is counted once it ends.
    await wait_for(lambda: listener.context.handshakes == 0)
    assert listener.stats.connections == 1
    assert dict(listener.stats.tls_handshakes) == {"client_cert_missing": 1}


# --- key-exchange groups --------------------------------------------------------------------

GROUPS = {"X25519": "X25519", "P-256": "ECDH, prime256v1", "P-384": "ECDH, secp384r1"}


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
@pytest.mark.parametrize("group", ["X25519", "P-256", "P-384", "X448", "P-521", "ffdhe2048"])
async def test_a_listener_accepts_exactly_x25519_p256_p384(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], pki: Pki, group: str, version: str
) -> None:
    cert, key = pki.files("ed")
    config = f"""
[listeners.edge]
address = "127.0.0.1:0"
protocol = "tls"
default_target_group = "echo"

[listeners.edge.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]

[target_groups.echo]
targets = [{{ address = "{echo_targets[0].address}" }}]
"""
    proxy = await make_proxy(config)
    listener = proxy.listeners["edge"]
    output = await s_client(
        listener_address(proxy), version, "-groups", group, "-servername", "edge.internal",
        "-CAfile", pki.ca_file,
    )  # fmt: skip
    await wait_for(lambda: listener.context.handshakes == 0)
    if group in GROUPS:
        assert f"Server Temp Key: {GROUPS[group]}" in output, output
        assert listener.stats.tls_handshakes["ok"] == 1
    else:
        assert "alert handshake failure" in output, output
        assert dict(listener.stats.tls_handshakes) == {"tls_no_shared_cipher": 1}


def handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> str | None:
    """An in-memory handshake: None when both sides finished, else the reason OpenSSL gave."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    sides = [
        client.wrap_bio(to_client, to_server, server_hostname="edge.internal"),
        server.wrap_bio(to_server, to_client, server_side=True),
    ]
    for _ in range(10):
        for side in list(sides):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                continue
            except ssl.SSLError as exc:
                return str(exc.reason)
            sides.remove(side)
        if not sides:
            return None
    raise AssertionError("the handshake did not end")


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1_2", "tls1_3"]
)
@pytest.mark.parametrize(
    ("curve", "accepted"),
    [("X25519", True), ("prime256v1", True), ("secp384r1", True), ("X448", False),
     ("secp521r1", False)],
)  # fmt: skip
def test_target_contexts_offer_exactly_x25519_p256_p384(
    pki: Pki, curve: str, accepted: bool, version: ssl.TLSVersion
) -> None:
    cert, key = pki.files("ed")
    target = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    target.load_cert_chain(cert, key)
    target.minimum_version = target.maximum_version = version
    target.set_ecdh_curve(curve)  # OpenSSL 3: this one group and no other
    client = target_context("chat", TargetTls(ca=pki.ca_file, server_name="edge.internal"))
    failure = handshake(client, target)
    if accepted:
        assert failure is None
    else:  # TLS 1.3: no key share to use; TLS 1.2: no ECDHE suite without a common group
        assert failure in ("NO_SUITABLE_KEY_SHARE", "NO_SHARED_CIPHER"), failure


def test_groups_are_limited_on_this_python() -> None:
    # Not the "could not" path with its warning: CPython with OpenSSL's symbols reachable.
    assert limit_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)) is None
