"""The CA module: what it writes, what it refuses, and that its certificates work in real TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from wsproxy.ca.authority import CertificateAuthority
from wsproxy.clock import FixedClock
from wsproxy.errors import CAError

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def authority(tmp_path: Path) -> CertificateAuthority:
    ca = CertificateAuthority(str(tmp_path / "certs"), clock=FixedClock(NOW))
    ca.init("Test CA")
    return ca


def mode(path: Path | str) -> int:
    return stat.S_IMODE(Path(path).stat().st_mode)


def load_chain(path: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(Path(path).read_bytes())


def test_init_writes_a_constrained_root(authority: CertificateAuthority) -> None:
    store = authority.store
    cert = authority.ca_certificate
    assert mode(store.ca_key) == 0o600
    assert mode(store.ca_cert) == 0o644
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert cert.not_valid_after_utc - NOW >= dt.timedelta(days=3649)
    cert.verify_directly_issued_by(cert)
    assert json.loads(store.index_file.read_text())["certificates"] == []
    assert x509.load_pem_x509_crl(store.crl_file.read_bytes()).is_signature_valid(cert.public_key())  # type: ignore[arg-type]


def test_init_refuses_to_overwrite(authority: CertificateAuthority) -> None:
    before = authority.store.ca_key.read_bytes()
    with pytest.raises(CAError, match="refusing to overwrite"):
        authority.init()
    assert authority.store.ca_key.read_bytes() == before


@pytest.mark.parametrize("key_type", ["ec-p256", "ed25519", "rsa-3072"])
def test_server_certificate(authority: CertificateAuthority, key_type: str) -> None:
    issued = authority.issue_server(
        "edge",
        ["edge.internal", "*.edge.internal"],
        ["127.0.0.1", "::1"],
        key_type=key_type,  # type: ignore[arg-type]
    )
    leaf, root = load_chain(issued.cert_path)
    assert root == authority.ca_certificate
    assert mode(issued.key_path) == 0o600
    assert 0 < leaf.serial_number < 2**159
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["edge.internal", "*.edge.internal"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert leaf.not_valid_after_utc - NOW == dt.timedelta(days=397)
    verifier = (
        PolicyBuilder()
        .store(Store([root]))
        .time(NOW)
        .build_server_verifier(x509.DNSName("edge.internal"))
    )
    verifier.verify(leaf, [])


def test_client_certificate(authority: CertificateAuthority) -> None:
    issued = authority.issue_client("alice", cn="alice@example.com")
    leaf, root = load_chain(issued.cert_path)
    assert leaf.subject.rfc4514_string() == "CN=alice@example.com"
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert leaf.not_valid_after_utc - NOW == dt.timedelta(days=90)
    # cryptography's client verifier insists on a SAN (web PKI); mTLS needs only the chain,
    # which the real handshake test below exercises.
    leaf.verify_directly_issued_by(root)


def test_bad_issue_requests(authority: CertificateAuthority) -> None:
    with pytest.raises(CAError, match="at least one --dns or --ip"):
        authority.issue_server("edge", [])
    with pytest.raises(CAError, match="not an IP address"):
        authority.issue_server("edge", [], ["nope"])
    with pytest.raises(CAError, match="must be 1-64"):
        authority.issue_client("../escape")
    with pytest.raises(CAError, match="--days must be > 0"):
        authority.issue_client("x", days=0)
    authority.issue_client("dup")
    with pytest.raises(CAError, match="revoke it first"):
        authority.issue_client("dup")


def test_revoke_publishes_a_crl(authority: CertificateAuthority) -> None:
    alice = authority.issue_client("alice")
    bob = authority.issue_client("bob")
    authority.revoke("alice", "keyCompromise")
    authority.revoke(f"{bob.serial:X}")  # by serial, as openssl prints it
    crl = x509.load_pem_x509_crl(authority.store.crl_file.read_bytes())
    assert crl.is_signature_valid(authority.ca_certificate.public_key())  # type: ignore[arg-type]
    revoked = crl.get_revoked_certificate_by_serial_number(alice.serial)
    assert revoked is not None
    assert revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise
    )
    assert crl.get_revoked_certificate_by_serial_number(bob.serial) is not None
    assert crl.next_update_utc is not None and crl.next_update_utc - NOW == dt.timedelta(days=7)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == 3  # init, then two revocations
    with pytest.raises(CAError, match="already revoked"):
        authority.revoke("alice")
    with pytest.raises(CAError, match="no certificate named"):
        authority.revoke("carol")
    with pytest.raises(CAError, match="unknown reason"):
        authority.revoke("bob", "boredom")
    # A revoked name can be issued again.
    authority.issue_client("alice")
    assert [row.status for row in authority.list()] == ["revoked", "revoked", "valid"]


def test_list_reports_expiry_with_the_injected_clock(tmp_path: Path) -> None:
    clock = FixedClock(NOW)
    authority = CertificateAuthority(str(tmp_path / "certs"), clock=clock)
    authority.init()
    authority.issue_client("short", days=1)
    authority.issue_client("long", days=30)
    clock.advance(dt.timedelta(days=2))
    assert {row.name: row.status for row in authority.list()} == {
        "short": "expired",
        "long": "valid",
    }
    clock.at = NOW - dt.timedelta(days=1)
    assert {row.status for row in authority.list()} == {"not_yet_valid"}


def test_export_p12(authority: CertificateAuthority) -> None:
    authority.issue_client("alice")
    path = authority.export_p12("alice", "s3cret")
    assert mode(path) == 0o600
    key, cert, extra = pkcs12.load_key_and_certificates(Path(path).read_bytes(), b"s3cret")
    assert key is not None and cert is not None
    assert extra == [authority.ca_certificate]
    with pytest.raises(ValueError, match="password"):
        pkcs12.load_key_and_certificates(Path(path).read_bytes(), b"wrong")
    with pytest.raises(CAError, match="not found"):
        authority.export_p12("nobody")


def test_readable_ca_key_is_refused(authority: CertificateAuthority) -> None:
    authority.store.ca_key.chmod(0o644)
    with pytest.raises(CAError, match="chmod 600"):
        authority.issue_client("alice")


def test_corrupted_index_is_reported(authority: CertificateAuthority) -> None:
    authority.store.index_file.write_text('{"version": 1, "certif')
    with pytest.raises(CAError, match="corrupted"):
        authority.issue_client("alice")
    authority.store.index_file.write_text('{"version": 1}')
    with pytest.raises(CAError, match="expected fields"):
        authority.list()


def test_a_failed_write_leaves_the_old_index(
    authority: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    authority.issue_client("alice")
    before = authority.store.index_file.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        authority.issue_client("bob")
    monkeypatch.undo()
    assert authority.store.index_file.read_bytes() == before
    leftovers = [p.name for p in authority.store.root.rglob(".*.tmp")]
    assert leftovers == []


async def test_certificates_work_in_a_real_mutual_tls_handshake(
    authority: CertificateAuthority,
) -> None:
    authority.clock = FixedClock(dt.datetime.now(dt.UTC))  # the TLS stack uses the real time
    server = authority.issue_server("edge", ["edge.internal"], ["127.0.0.1"])
    client = authority.issue_client("alice")
    ca_file = str(authority.store.ca_cert)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca_file)
    server_ctx.load_cert_chain(server.cert_path, server.key_path)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=ca_file)
    client_ctx.load_cert_chain(client.cert_path, client.key_path)
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert")
        seen.append(dict(x[0] for x in peer["subject"])["commonName"])
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = listener.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="edge.internal"
        )
        writer.write(b"hello\n")
        assert await reader.readline() == b"hello\n"
        writer.close()
        assert seen == ["alice"]
    finally:
        listener.close()


def test_ca_command_line(tmp_path: Path) -> None:
    def ca(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "wsproxy", "ca", *args, "--dir", str(tmp_path / "c")],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    assert ca("init").returncode == 0
    assert "refusing to overwrite" in ca("init").stderr
    assert ca("issue", "server", "--name", "edge", "--dns", "edge.internal").returncode == 0
    assert ca("issue", "client", "--name", "alice", "--key-type", "ed25519").returncode == 0
    assert ca("revoke", "alice", "--reason", "keyCompromise").returncode == 0
    assert ca("crl").returncode == 0
    listing = ca("list").stdout.splitlines()
    assert listing[0].split() == ["NAME", "SERIAL", "KIND", "NOT", "AFTER", "STATUS"]
    assert [line.split()[-1] for line in listing[1:]] == ["valid", "revoked"]
    assert ca("export-p12", "edge").returncode == 0
    failed = ca("revoke", "nobody")
    assert failed.returncode == 1 and "wsproxy ca list" in failed.stderr
