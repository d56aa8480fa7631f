"""The certificate authority: an ECDSA P-256 root that issues server and client certificates,
revokes them, and publishes a CRL. Built on ``cryptography``; time comes from an injected clock."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import shlex
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wsproxy.ca.names import check_common_name, check_dns_name
from wsproxy.ca.store import (
    LOCK_TIMEOUT_SECONDS,
    CAStore,
    Index,
    IndexEntry,
    Settings,
    check_name,
    read_private_key_file,
    write_atomic,
)
from wsproxy.clock import Clock, SystemClock
from wsproxy.errors import CAError, CAInputError

KeyType = Literal["ec-p256", "ed25519", "rsa-3072"]
KEY_TYPES: tuple[KeyType, ...] = ("ec-p256", "ed25519", "rsa-3072")
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey

CA_DAYS = 3650
SERVER_DAYS = 397  # the CA/Browser Forum's cap for server certificates
CLIENT_DAYS = 90
# A CRL's lifetime (nextUpdate - thisUpdate) and how often it should be published again: daily,
# so six runs can fail in a row before a CRL expires (and the proxy refuses every client
# certificate). deploy/systemd/wsproxy-crl.timer and docs/operations.md give the same numbers;
# tests/ca/test_crl_lifetime.py holds them to these.
CRL_DAYS = 7
CRL_REFRESH_HOURS = 24
# Backdating absorbs clock skew between the CA and the machines that verify its certificates.
BACKDATE = dt.timedelta(minutes=5)
REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "caCompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
}


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type == "rsa-3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise CAInputError(f"unknown key type {key_type!r}; use one of {', '.join(KEY_TYPES)}")


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(**granted: bool) -> x509.KeyUsage:
    """A KeyUsage with only the named bits set (the constructor wants all nine spelled out)."""
    bits = [
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    ]
    return x509.KeyUsage(**{bit: granted.get(bit, False) for bit in bits})


def check_crl_url(url: str) -> str:
    """An ``http://`` URL with a host, fit for a CRL Distribution Point; raises ``CAError``.

    Plain http only: RFC 5280 §4.2.1.13 has an HTTP distribution point serve one DER CRL, and the
    CRL carries its own signature; an https URL would need a revocation check of its own, so
    TLS stacks and scanners expect http (the CA/Browser Forum's Baseline Requirements do too).
    """
    hint = "e.g. http://wsproxy.internal:9900/v1/crl (the admin listener serves the CRL there)"
    if not url.isascii() or any(char.isspace() or not char.isprintable() for char in url):
        raise CAInputError(f"--crl-url {url!r}: must be ASCII without spaces (percent-encode them)")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "http":
        raise CAInputError(
            f"--crl-url {url!r}: must be an http:// URL (clients fetch CRLs over plain HTTP; "
            f"the CRL is signed, so it needs no TLS); {hint}"
        )
    try:
        _ = parsed.port  # reading it parses it: a bad port raises here
    except ValueError as exc:
        raise CAInputError(f"--crl-url {url!r}: {exc}; {hint}") from None
    if not parsed.hostname:
        raise CAInputError(f"--crl-url {url!r}: names no host; {hint}")
    if parsed.fragment:
        raise CAInputError(f"--crl-url {url!r}: a fragment (#...) means nothing to a CRL client")
    return url


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Issued:
    name: str
    serial: int
    cert_path: str
    key_path: str
    not_after: dt.datetime
    crl_urls: tuple[str, ...] = ()  # its CRL Distribution Points


@dataclass(frozen=True, slots=True)
class Listing:
    name: str
    serial: str
    kind: str
    not_after: str
    status: str  # valid | revoked | expired | not_yet_valid


class CertificateAuthority:
    """One CA directory. Every operation reads what it needs from disk and writes atomically;
    one that changes the directory holds its lock (``CAStore.lock``) throughout, waiting up to
    ``lock_timeout_seconds`` for another command to finish."""

    def __init__(
        self,
        directory: str,
        clock: Clock | None = None,
        *,
        lock_timeout_seconds: float = LOCK_TIMEOUT_SECONDS,
    ) -> None:
        self.store = CAStore(directory)
        self.clock = clock or SystemClock()
        self.lock_timeout_seconds = lock_timeout_seconds

    def _locked(self, command: str) -> contextlib.AbstractContextManager[None]:
        return self.store.lock(command, self.lock_timeout_seconds)

    @property
    def _dir(self) -> str:
        """The CA directory as a ``--dir`` value for the commands that hints print."""
        return shlex.quote(str(self.store.root))

    # --- init -----------------------------------------------------------------------------------

    def init(self, name: str = "wsproxy CA", crl_urls: Sequence[str] = ()) -> x509.Certificate:
        """Create the root; refuses to overwrite an existing CA. ``crl_urls`` (http) go into
        every certificate it issues, as their CRL Distribution Points."""
        store = self.store
        check_common_name(name, "--name")
        urls = [check_crl_url(url) for url in crl_urls]
        if store.exists():
            raise CAError(f"a CA already exists in {store.ca_dir}; refusing to overwrite it")
        with self._locked("init"):
            # Checked again under the lock: two concurrent inits must not both write a root.
            if store.exists():
                raise CAError(f"a CA already exists in {store.ca_dir}; refusing to overwrite it")
            return self._init(name, urls)

    def _init(self, name: str, urls: list[str]) -> x509.Certificate:
        store = self.store
        now = self.clock.now()
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                _key_usage(key_cert_sign=True, crl_sign=True),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        write_atomic(store.ca_key, _key_pem(key), 0o600)
        write_atomic(store.ca_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        # 0700: it holds the leaf keys. (ca/ stays traversable: the proxy reads ca/crl.pem.)
        store.issued_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        store.save_settings(Settings(crl_urls=urls))
        index = Index()
        store.save_index(index)
        self._write_crl(cert, key, index)
        return cert

    # --- loading --------------------------------------------------------------------------------

    def _load_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        self.store.require()
        cert = x509.load_pem_x509_certificate(self.store.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(
            read_private_key_file(self.store.ca_key), password=None
        )
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{self.store.ca_key} is not an EC key")
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
            raise CAError(f"{self.store.ca_key} does not match {self.store.ca_cert}")
        return cert, key

    @property
    def settings(self) -> Settings:
        self.store.require()
        return self.store.load_settings()

    def set_crl_urls(self, crl_urls: Sequence[str]) -> Settings:
        """Replace the CRL URLs written into certificates issued from now on (``[]``: none).
        Certificates issued before keep what they carry; re-issue them to change it."""
        urls = [check_crl_url(url) for url in crl_urls]
        self.store.require()
        with self._locked("settings"):
            settings = self.store.load_settings()
            settings.crl_urls = urls
            self.store.save_settings(settings)
        return settings

    @property
    def ca_certificate(self) -> x509.Certificate:
        self.store.require()
        return x509.load_pem_x509_certificate(self.store.ca_cert.read_bytes())

    # --- issuing --------------------------------------------------------------------------------

    def issue_server(
        self,
        name: str,
        dns: list[str],
        ips: list[str] | None = None,
        days: int = SERVER_DAYS,
        key_type: KeyType = "ec-p256",
    ) -> Issued:
        """A serverAuth certificate for ``dns`` names and ``ips`` (at least one of them)."""
        sans: list[x509.GeneralName] = [x509.DNSName(check_dns_name(d)) for d in dns]
        for ip in ips or []:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
            except ValueError:
                raise CAInputError(f"--ip {ip!r} is not an IP address") from None
        if not sans:
            raise CAInputError("a server certificate needs at least one --dns or --ip")
        common_name = dns[0] if dns else str(ips[0] if ips else name)
        if len(common_name) > 64:  # a DNS name may have 253; the SAN carries it, the CN cannot
            common_name = name
        return self._issue(
            name, "server", common_name, sans, ExtendedKeyUsageOID.SERVER_AUTH, days, key_type
        )

    def issue_client(
        self,
        name: str,
        cn: str | None = None,
        days: int = CLIENT_DAYS,
        key_type: KeyType = "ec-p256",
    ) -> Issued:
        """A clientAuth certificate whose subject CN is ``cn`` (default: the name)."""
        if cn:
            check_common_name(cn, "--cn")
        return self._issue(
            name, "client", cn or name, [], ExtendedKeyUsageOID.CLIENT_AUTH, days, key_type
        )

    def _issue(
        self,
        name: str,
        kind: str,
        common_name: str,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        days: int,
        key_type: KeyType,
    ) -> Issued:
        check_name(name)
        if days <= 0:
            raise CAInputError(f"--days must be > 0, got {days}")
        self.store.require()
        # Generated before taking the lock: an RSA key can take a second, and needs no state.
        key = _new_key(key_type)
        with self._locked(f"issue {kind}"):
            return self._issue_locked(name, kind, common_name, sans, usage, days, key, key_type)

    def _issue_locked(
        self,
        name: str,
        kind: str,
        common_name: str,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        days: int,
        key: PrivateKey,
        key_type: KeyType,
    ) -> Issued:
        ca_cert, ca_key = self._load_ca()
        crl_urls = self.store.load_settings().crl_urls
        index = self.store.load_index()
        current = [e for e in index.certificates if e.name == name and e.status == "valid"]
        if current:
            raise CAError(
                f"a valid certificate named {name!r} exists (serial {current[-1].serial}); "
                f"revoke it first (`wsproxy ca revoke {name} --dir {self._dir}`) or pick another "
                "name"
            )
        now = self.clock.now()
        # Capped at the CA's own lifetime (which ends before then anyway): a huge --days
        # would overflow the datetime.
        not_after = min(now + dt.timedelta(days=min(days, CA_DAYS)), ca_cert.not_valid_after_utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        serial = x509.random_serial_number()  # 159 random bits (RFC 5280 §4.1.2.2 allows 20 octets)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(
                    digital_signature=True, key_encipherment=isinstance(key, rsa.RSAPrivateKey)
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if crl_urls:
            # One distribution point, several names: the same CRL at each URL (RFC 5280
            # §4.2.1.13, which also asks for the extension to be non-critical).
            point = x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(url) for url in crl_urls],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
            builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        store = self.store
        chain = cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(
            serialization.Encoding.PEM
        )
        entry = IndexEntry(
            name=name,
            serial=f"{serial:x}",
            kind=kind,
            subject=cert.subject.rfc4514_string(),
            not_before=_iso(cert.not_valid_before_utc),
            not_after=_iso(cert.not_valid_after_utc),
            key_type=key_type,
        )
        # The index first: a crash after it leaves an entry without files (revocable, harmless),
        # never a certificate on disk that the index does not know and so cannot revoke.
        index.certificates.append(entry)
        store.save_index(index)
        try:
            write_atomic(store.leaf_key(name), _key_pem(key), 0o600)
            write_atomic(store.leaf_cert(name), chain, 0o644)
        except BaseException:
            index.certificates.remove(entry)
            store.save_index(index)
            raise
        return Issued(
            name,
            serial,
            str(store.leaf_cert(name)),
            str(store.leaf_key(name)),
            not_after,
            tuple(crl_urls),
        )

    # --- revocation -----------------------------------------------------------------------------

    def revoke(self, name_or_serial: str, reason: str = "unspecified") -> IndexEntry:
        """Mark a certificate revoked and publish a fresh CRL."""
        if reason not in REASONS:
            raise CAInputError(f"unknown reason {reason!r}; use one of {', '.join(REASONS)}")
        self.store.require()
        with self._locked("revoke"):
            ca_cert, ca_key = self._load_ca()
            index = self.store.load_index()
            entry = index.find(name_or_serial, self._dir)
            if entry.status == "revoked":
                raise CAError(
                    f"certificate {entry.name} (serial {entry.serial}) is already revoked"
                )
            entry.status = "revoked"
            entry.revoked_at = _iso(self.clock.now())
            entry.revocation_reason = reason
            self._write_crl(ca_cert, ca_key, index)
        return entry

    def crl(self) -> x509.CertificateRevocationList:
        """Publish a fresh CRL, valid ``CRL_DAYS``; publish again every ``CRL_REFRESH_HOURS``."""
        self.store.require()
        with self._locked("crl"):
            ca_cert, ca_key = self._load_ca()
            return self._write_crl(ca_cert, ca_key, self.store.load_index())

    def _write_crl(
        self, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, index: Index
    ) -> x509.CertificateRevocationList:
        now = self.clock.now()
        index.crl_number += 1
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - BACKDATE)
            .next_update(now + dt.timedelta(days=CRL_DAYS))
            .add_extension(x509.CRLNumber(index.crl_number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
        )
        for entry in index.certificates:
            if entry.status != "revoked" or entry.revoked_at is None:
                continue
            revoked = (
                x509.RevokedCertificateBuilder()
                .serial_number(int(entry.serial, 16))
                .revocation_date(dt.datetime.fromisoformat(entry.revoked_at.replace("Z", "+00:00")))
                .add_extension(
                    x509.CRLReason(REASONS[entry.revocation_reason or "unspecified"]),
                    critical=False,
                )
                .build()
            )
            builder = builder.add_revoked_certificate(revoked)
        crl = builder.sign(ca_key, hashes.SHA256())
        # The CRL is written before the index: a crash in between leaves a CRL that already
        # lists the revocation, never an index that claims one the CRL does not show.
        write_atomic(self.store.crl_file, crl.public_bytes(serialization.Encoding.PEM), 0o644)
        self.store.save_index(index)
        return crl

    # --- listing and export ---------------------------------------------------------------------

    def list(self) -> list[Listing]:
        self.store.require()
        now = _iso(self.clock.now())
        rows = []
        for entry in self.store.load_index().certificates:
            status = entry.status
            if status == "valid" and entry.not_after < now:
                status = "expired"
            elif status == "valid" and entry.not_before > now:
                status = "not_yet_valid"
            rows.append(Listing(entry.name, entry.serial, entry.kind, entry.not_after, status))
        return rows

    def export_p12(self, name: str, password: str | None = None) -> str:
        """Write issued/NAME.p12 (key, certificate, CA) for browsers and curl."""
        store = self.store
        store.require()
        cert_path, key_path = store.leaf_cert(name), store.leaf_key(name)
        if not cert_path.exists():
            raise CAError(f"{cert_path} not found; see `wsproxy ca list --dir {self._dir}`")
        certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
        key = serialization.load_pem_private_key(read_private_key_file(key_path), password=None)
        if not isinstance(
            key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
        ):
            raise CAError(f"{key_path}: unsupported key type")
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password.encode())
            if password
            else serialization.NoEncryption()
        )
        blob = pkcs12.serialize_key_and_certificates(
            name.encode(), key, certs[0], certs[1:], encryption
        )
        path = store.leaf_p12(name)
        with self._locked("export-p12"):
            write_atomic(path, blob, 0o600)
        return str(path)
