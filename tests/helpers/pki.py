"""Certificates for tests, minted by wsproxy's own CA module (and a foreign CA for negatives)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wsproxy.ca.authority import CertificateAuthority
from wsproxy.clock import FixedClock


@dataclass
class Pki:
    root: Path
    ca: CertificateAuthority
    foreign: CertificateAuthority

    @property
    def ca_file(self) -> str:
        return str(self.ca.store.ca_cert)

    @property
    def crl_file(self) -> str:
        return str(self.ca.store.crl_file)

    def files(self, name: str) -> tuple[str, str]:
        store = self.ca.store
        return str(store.leaf_cert(name)), str(store.leaf_key(name))

    def issue_client_at(self, name: str, at: dt.datetime, days: int = 1) -> tuple[str, str]:
        clock = self.ca.clock
        self.ca.clock = FixedClock(at)
        try:
            issued = self.ca.issue_client(name, days=days)
        finally:
            self.ca.clock = clock
        return issued.cert_path, issued.key_path

    def issue_without_eku(self, name: str) -> tuple[str, str]:
        """A client certificate with no EKU at all: OpenSSL accepts it, wsproxy must not."""
        return self.sign_leaf(name, name, client_auth=False)

    def sign_leaf(self, stem: str, common_name: str, *, client_auth: bool) -> tuple[str, str]:
        """A leaf for ``common_name`` exactly as given (``wsproxy ca`` refuses some names; a CA
        elsewhere may sign them), signed by the test CA, as ``stem``.pem/.key; with the
        clientAuth EKU or with no EKU at all."""
        ca_cert = self.ca.ca_certificate
        ca_key = serialization.load_pem_private_key(self.ca.store.ca_key.read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if client_auth:
            eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
            builder = builder.add_extension(eku, critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        cert_path = self.root / f"{stem}.pem"
        key_path = self.root / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return str(cert_path), str(key_path)


def make_pki(root: Path) -> Pki:
    ca = CertificateAuthority(str(root / "certs"))
    ca.init("Test CA")
    ca.issue_server("edge", ["edge.internal", "localhost"], ["127.0.0.1"])
    ca.issue_server("other", ["*.other.internal"])
    ca.issue_client("alice")
    ca.issue_client("canary")
    ca.issue_server("server-only", ["not-a-client.internal"])
    foreign = CertificateAuthority(str(root / "foreign"))
    foreign.init("Foreign CA")
    foreign.issue_client("mallory")
    return Pki(root, ca, foreign)
