"""TLS on listeners: SSL contexts chosen by SNI, client-certificate checks, failure reasons.

Each configured certificate gets its own ``SSLContext`` with identical settings; an SNI callback
on the first (the default) switches the connection to the context whose certificate names the
requested host: exact SAN first, then a wildcard SAN, then the default. Contexts are built once
per config generation and never changed afterwards.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import ssl
import stat
import weakref
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from wsproxy.ca.hints import ca_hint, issue_hint
from wsproxy.clock import Clock, SystemClock
from wsproxy.config import (
    Config,
    ListenerTls,
    TargetTls,
    admin_file_issues,
    api_file_issues,
    describe_unreadable,
)
from wsproxy.errors import ClientCertRejected, ConfigError, ConfigIssue, Reason, TlsConfigError
from wsproxy.openssl import GROUPS, ListenerContext, disable_resumption, limit_groups

log = logging.getLogger(__name__)

# Mozilla's "intermediate" TLS 1.2 suites (TLS 1.3 suites are always on and not configurable).
INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    )
)

# OpenSSL X509_V_ERR_* codes → the reasons wsproxy reports for client certificates.
_VERIFY_RESULTS = {
    9: "expired",  # certificate is not yet valid
    10: "expired",
    23: "revoked",
    26: "bad_eku",  # unsupported certificate purpose
}


def _limit_groups(context: ssl.SSLContext, where: str) -> None:
    why = limit_groups(context)
    if why is not None:
        log.warning(
            "%s: TLS key-exchange groups not limited to %s: %s; OpenSSL's defaults, which add "
            "X448 and P-521, are offered",
            where,
            ", ".join(GROUPS),
            why,
        )


def _fix_hint(path: str, *, expired: bool = False) -> str:
    return issue_hint(path, "server", expired=expired)


def _require_readable(path: str, where: str, what: str, missing_hint: str) -> None:
    """Raise ``TlsConfigError`` unless ``path`` is a regular file this process can open.

    OpenSSL's loaders report an unreadable file as a bare ``PermissionError`` naming no file,
    so each file is opened here first: the error then names the file, the uid and the fix.
    """
    try:
        info = os.stat(path)
        if stat.S_ISREG(info.st_mode):
            with open(path, "rb"):
                return
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as exc:
        raise TlsConfigError(
            f"{where}: cannot read {what} {path}: {describe_unreadable(path, exc)}"
        ) from None
    raise TlsConfigError(f"{where}: {what} {path} not found; {missing_hint}")


@dataclass(frozen=True, slots=True)
class ServerCertificate:
    context: ssl.SSLContext
    dns_names: tuple[str, ...]
    not_after: dt.datetime
    path: str


# Printable ASCII but "%": what an identity header value may hold as it is (RFC 9110 §5.5).
_HEADER_SAFE = "".join(chr(code) for code in range(0x20, 0x7F) if chr(code) != "%")


def header_value(text: str) -> str:
    """``text`` as one header-safe line: its UTF-8 bytes outside printable ASCII, and ``%``
    itself, percent-encoded (AWS ALB and Traefik URL-encode their client certificate headers);
    a leading or trailing space too, which parsers would strip. ``urllib.parse.unquote`` gives
    ``text`` back."""
    encoded = quote(text, safe=_HEADER_SAFE)
    if encoded.startswith(" "):
        encoded = "%20" + encoded[1:]
    if encoded.endswith(" "):
        encoded = encoded[:-1] + "%20"
    return encoded


@dataclass(frozen=True, slots=True)
class CrlFacts:
    """What wsproxy reads of a listener's CRL file itself (OpenSSL reads its own copy).

    ``revoked``: serials in lower-case hex, empty unless ``signed``; times are Unix seconds.
    """

    issuer: x509.Name
    number: int | None  # the CRLNumber extension (RFC 5280 §5.2.3), None when absent
    last_update: float
    next_update: float | None
    signed: bool  # by a certificate of client_ca
    revoked: frozenset[str]


# A CRL is near its nextUpdate within the shorter of these: a day leaves time to notice a
# publishing job that stopped; a tenth of its lifetime keeps a CRL re-published every hour
# from warning all the time.
CRL_WARN_SECONDS = 24 * 3600.0
CRL_WARN_FRACTION = 0.1


def crl_staleness(facts: CrlFacts, path: str, now: float) -> str | None:
    """Why the CRL at ``path`` needs re-publishing soon (``now`` in Unix seconds), or None.

    Past its nextUpdate OpenSSL refuses every client certificate ("CRL has expired"); near it
    (see ``CRL_WARN_SECONDS``) that is about to happen.
    """
    if facts.next_update is None:
        return None  # no nextUpdate: OpenSSL never calls it expired
    left = facts.next_update - now
    when = dt.datetime.fromtimestamp(facts.next_update, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    hint = ca_hint(path, "crl")
    if left <= 0:
        return (
            f"CRL {path} expired at {when} (its nextUpdate): every client certificate is "
            f"refused until a new one is published; {hint}"
        )
    lifetime = facts.next_update - facts.last_update
    if left < min(CRL_WARN_SECONDS, CRL_WARN_FRACTION * lifetime):
        return (
            f"CRL {path} expires at {when} (its nextUpdate, in {left / 3600:.1f} h), then every "
            f"client certificate is refused; {hint}, and check the job that re-publishes it"
        )
    return None


def crl_rollback(current: CrlFacts, fresh: CrlFacts, path: str) -> str | None:
    """Why ``fresh`` must not replace the ``current`` CRL, or None.

    CRLNumber only grows (RFC 5280 §5.2.3): a lower one from the same issuer is an older CRL (a
    restored backup, a CA directory copied before a revocation), which would un-revoke every
    certificate revoked since.
    """
    if fresh.issuer != current.issuer or fresh.number is None or current.number is None:
        return None  # another CA, or numbers to compare missing: nothing to say
    if fresh.number >= current.number:
        return None
    return (
        f"CRL {path} has CRLNumber {fresh.number}, lower than the {current.number} of the CRL "
        "in use: it is older and would un-revoke certificates revoked since; publish a current "
        "one with `wsproxy ca crl` from the CA that issued the newer CRL"
    )


def read_crl(crl_path: str, client_ca: str | None) -> CrlFacts:
    """The facts of the PEM CRL at ``crl_path``; ``OSError`` or ``ValueError`` if unreadable."""
    crl = x509.load_pem_x509_crl(Path(crl_path).read_bytes())
    issuers = x509.load_pem_x509_certificates(Path(client_ca).read_bytes()) if client_ca else []
    signed = any(
        issuer.subject == crl.issuer and crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]  # CA keys are EC or RSA, which CRLs accept
        for issuer in issuers
    )
    try:
        number: int | None = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = None
    next_update = crl.next_update_utc
    return CrlFacts(
        issuer=crl.issuer,
        number=number,
        last_update=crl.last_update_utc.timestamp(),
        next_update=next_update.timestamp() if next_update is not None else None,
        signed=signed,
        revoked=frozenset(f"{entry.serial_number:x}" for entry in crl) if signed else frozenset(),
    )


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """What the proxy vouches for about a verified client certificate, ready for headers.

    ``subject`` is the RFC 4514 string (``\\`` escapes ``,+"\\<>;``, NUL, a leading ``#`` or
    space and a trailing space), passed through ``header_value``: a subject such as
    ``CN=Łukasz`` or one holding CR LF can neither fail the request nor add a header line. The
    log shows the same string.
    """

    subject: str
    serial: str
    fingerprint_sha256: str
    not_after: str

    def headers(self) -> tuple[tuple[str, str], ...]:
        return (
            ("X-Client-Cert-Subject", self.subject),
            ("X-Client-Cert-Serial", self.serial),
            ("X-Client-Cert-Fingerprint-SHA256", self.fingerprint_sha256),
            ("X-Client-Cert-Not-After", self.not_after),
        )


class ServerTls:
    """The TLS side of one listener, built from its ``[listeners.NAME.tls]`` section."""

    def __init__(
        self,
        listener: str,
        config: ListenerTls,
        *,
        alpn: list[str] | None = None,
        clock: Clock | None = None,
        previous: ServerTls | None = None,
    ) -> None:
        """``previous``: the contexts these replace (a reload, a new CRL); a CRL older than
        theirs raises ``TlsConfigError`` (see ``crl_rollback``)."""
        self.listener = listener
        self.config = config
        self._clock = clock or SystemClock()
        self.alpn = alpn
        self._sni: weakref.WeakKeyDictionary[ssl.SSLObject, str] = weakref.WeakKeyDictionary()
        if previous is not None:
            # Shared: a handshake that started under the previous contexts is checked by these.
            self._sni = previous._sni
        self.certificates = [
            self._load(index, files.cert, files.key)
            for index, files in enumerate(config.certificates)
        ]
        for certificate in self.certificates:
            certificate.context.sni_callback = self._on_sni
        # The CRL as it was when these contexts were built: a handshake that started under an
        # older one is checked against this one when it completes (``client_certificate``).
        self.crl: CrlFacts | None = None
        if config.crl:
            # Unreadable here but accepted by OpenSSL: its own check in the handshake stands.
            with contextlib.suppress(OSError, ValueError):
                self.crl = read_crl(config.crl, config.client_ca)
        if previous is not None and previous.crl is not None and self.crl is not None:
            why = crl_rollback(previous.crl, self.crl, config.crl or "")
            if why is not None:
                raise TlsConfigError(f"listener '{listener}': {why}")
        self.expiries = self._expiries()

    @property
    def context(self) -> ssl.SSLContext:
        return self.certificates[0].context

    @property
    def verifies_clients(self) -> bool:
        return self.config.client_auth != "none"

    # --- building -------------------------------------------------------------------------------

    def _base_context(self) -> ssl.SSLContext:
        config = self.config
        context = ListenerContext(ssl.PROTOCOL_TLS_SERVER)  # refused handshakes send an alert
        _limit_groups(context, f"listener '{self.listener}'")
        if config.policy == "modern":
            context.minimum_version = ssl.TLSVersion.TLSv1_3
        else:
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.set_ciphers(INTERMEDIATE_CIPHERS)
        context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
        if self.alpn:
            context.set_alpn_protocols(self.alpn)
        if config.client_auth != "none":
            if config.client_ca is None:
                raise TlsConfigError(f"listener '{self.listener}': client_auth needs client_ca")
            self._load_verify(
                context, config.client_ca, "client_ca", ca_hint(config.client_ca, "ca")
            )
            context.verify_mode = (
                ssl.CERT_REQUIRED if config.client_auth == "required" else ssl.CERT_OPTIONAL
            )
            # A resumed session skips certificate verification (no certificate is sent), so a
            # client revoked or expired since, or refused by a stricter reload, could resume:
            # no resumption at all on listeners that verify clients.
            why = disable_resumption(context)
            if why is not None:
                log.warning(
                    "listener '%s': TLS 1.2 session ids still resume on this client_auth "
                    "listener: %s",
                    self.listener,
                    why,
                )
            if config.crl:
                self._load_verify(context, config.crl, "crl", ca_hint(config.crl, "crl"))
                context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return context

    def _load_verify(self, context: ssl.SSLContext, path: str, key: str, hint: str) -> None:
        where = f"listener '{self.listener}'"
        _require_readable(path, where, f"{key} file", hint)
        try:
            context.load_verify_locations(cafile=path)
        except ssl.SSLError as exc:
            raise TlsConfigError(
                f"{where}: {key} file {path} is not usable PEM ({exc.reason})"
            ) from None
        except OSError as exc:
            problem = f"cannot read {key} file {path}: {exc.strerror}"
            raise TlsConfigError(f"{where}: {problem}") from None

    def _load(self, index: int, cert_path: str, key_path: str) -> ServerCertificate:
        where = f"listener '{self.listener}'"
        for path in (cert_path, key_path):
            _require_readable(path, where, "file", _fix_hint(path))
        try:
            leaf = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())[0]
        except ValueError:
            raise TlsConfigError(f"{where}: {cert_path} holds no PEM certificate") from None
        except OSError as exc:
            raise TlsConfigError(f"{where}: cannot read {cert_path}: {exc.strerror}") from None
        now = self._clock.now()
        if leaf.not_valid_after_utc < now:
            raise TlsConfigError(
                f"{where}: certificate {cert_path} expired on "
                f"{leaf.not_valid_after_utc:%Y-%m-%d}; {_fix_hint(cert_path, expired=True)}"
            )
        context = self._base_context()
        try:
            context.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise TlsConfigError(
                f"{where}: key {key_path} does not match certificate {cert_path} "
                f"({exc.reason or exc})"
            ) from None
        except OSError as exc:  # replaced or made unreadable since the check above
            raise TlsConfigError(
                f"{where}: cannot read {cert_path} or {key_path}: {exc.strerror}"
            ) from None
        try:
            sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = tuple(name.lower() for name in sans.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            names = ()
        return ServerCertificate(context, names, leaf.not_valid_after_utc, cert_path)

    def _expiries(self) -> dict[str, float]:
        """Unix times when this listener's TLS material runs out, by role: the earliest server
        certificate, the earliest client CA certificate, the CRL's next update (for alerts)."""
        found = {"server": min(c.not_after.timestamp() for c in self.certificates)}
        config = self.config
        try:
            if config.client_ca:
                cas = x509.load_pem_x509_certificates(Path(config.client_ca).read_bytes())
                found["client_ca"] = min(ca.not_valid_after_utc.timestamp() for ca in cas)
            if self.crl is not None and self.crl.next_update is not None:
                found["crl"] = self.crl.next_update
        except (OSError, ValueError):
            pass  # OpenSSL accepted these files; what cryptography cannot read goes unreported
        return found

    def crl_staleness(self) -> str | None:
        """Why this listener's CRL needs re-publishing soon (see ``crl_staleness``), or None."""
        if self.crl is None or not self.config.crl:
            return None
        return crl_staleness(self.crl, self.config.crl, self._clock.now().timestamp())

    def revoked_serials(self) -> set[str]:
        """Serials (lower-case hex) listed by the CRL, after checking its signature."""
        if not self.config.crl or not self.config.client_ca:
            return set()
        if self.crl is None:
            raise TlsConfigError(f"CRL {self.config.crl} cannot be read as a PEM CRL")
        if not self.crl.signed:
            raise TlsConfigError(f"CRL {self.config.crl} is not signed by client_ca")
        return set(self.crl.revoked)

    # --- per connection -------------------------------------------------------------------------

    def select(self, server_name: str | None) -> ssl.SSLContext:
        """The context for ``server_name``: exact SAN, then wildcard SAN, then the default."""
        if server_name:
            name = server_name.lower().rstrip(".")
            for certificate in self.certificates:
                if name in certificate.dns_names:
                    return certificate.context
            parent = name.partition(".")[2]
            if parent:
                for certificate in self.certificates:
                    if f"*.{parent}" in certificate.dns_names:
                        return certificate.context
        return self.context

    def _on_sni(
        self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext
    ) -> int | None:
        """OpenSSL's server-name callback: switch to the certificate chosen for the name.

        It runs inside OpenSSL, where CPython can only report an exception as "unraisable"
        (on stderr, from the event loop's thread): so nothing escapes; the handshake is refused
        with a fatal internal_error alert, counted as ``tls_bad_server_name``. A name that is
        not ASCII never gets here: CPython refuses it the same way before calling (RFC 6066 §3:
        a HostName is ASCII), and ``ops.logs.report_unraisable`` logs its report.
        """
        try:
            if server_name:
                self._sni[ssl_object] = server_name
            chosen = self.select(server_name)
            if chosen is not context:
                ssl_object.context = chosen
        except Exception:  # inside OpenSSL, where nothing may escape: refuse, log, go on
            log.exception("listener '%s': server name %r refused", self.listener, server_name)
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        return None

    def server_name(self, ssl_object: ssl.SSLObject) -> str | None:
        return self._sni.get(ssl_object)

    def client_certificate(self, ssl_object: ssl.SSLObject) -> ClientCertificate | None:
        """Check the verified peer certificate for what OpenSSL leaves to us.

        OpenSSL has checked the chain, validity and CRL during the handshake; a certificate with
        no EKU at all still passes there, so the clientAuth EKU is checked here.
        """
        der = ssl_object.getpeercert(binary_form=True)
        if not der:
            if self.config.client_auth == "required":
                raise ClientCertRejected("missing", "no client certificate")
            return None
        cert = x509.load_der_x509_certificate(der)
        try:
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise ClientCertRejected(
                "bad_eku", "client certificate has no extended key usage (needs clientAuth)"
            ) from None
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            raise ClientCertRejected("bad_eku", "client certificate lacks the clientAuth EKU")
        serial = f"{cert.serial_number:x}"
        if self.crl is not None and serial in self.crl.revoked:
            # OpenSSL checked the CRL of the context this handshake started with; a newer CRL
            # (these contexts) may have revoked the certificate since.
            raise ClientCertRejected(
                "revoked", "client certificate revoked by a CRL loaded during its handshake"
            )
        return ClientCertificate(
            subject=header_value(cert.subject.rfc4514_string()),
            serial=serial,
            fingerprint_sha256=hashlib.sha256(der).hexdigest(),
            not_after=cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )


def classify_handshake_failure(exc: BaseException) -> tuple[Reason, str]:
    """(reason, detail) for a failed server-side handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        result = _VERIFY_RESULTS.get(exc.verify_code, "untrusted")
        return Reason.client_cert(result), exc.verify_message or str(exc)
    if isinstance(exc, ssl.SSLError):
        tag = (exc.reason or "").upper()
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in tag or "CERTIFICATE_REQUIRED" in tag:
            return Reason.CLIENT_CERT_MISSING, "no client certificate"
        if tag == "CALLBACK_FAILED":  # the only callback that refuses is the SNI one (_on_sni)
            return Reason.TLS_BAD_SERVER_NAME, "server name refused (not ASCII, or unusable)"
        if tag == "HTTP_REQUEST":
            return Reason.TLS_HTTP_REQUEST, "plain HTTP sent to a TLS listener"
        if tag in ("WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"):
            return Reason.TLS_NOT_TLS, f"bytes that are not a TLS ClientHello ({exc.reason})"
        if "VERSION" in tag or "UNSUPPORTED_PROTOCOL" in tag:
            return Reason.TLS_PROTOCOL_VERSION, f"TLS version refused ({exc.reason})"
        if "CIPHER" in tag or tag == "NO_SUITABLE_KEY_SHARE":  # TLS 1.3: no group in common
            return Reason.TLS_NO_SHARED_CIPHER, f"no cipher in common ({exc.reason})"
        return Reason.TLS_HANDSHAKE_ERROR, f"TLS handshake failed ({exc.reason or exc})"
    if isinstance(exc, TimeoutError) or (
        # asyncio and uvloop report ssl_handshake_timeout as this abort.
        isinstance(exc, ConnectionAbortedError) and "longer than" in str(exc)
    ):
        return Reason.TLS_HANDSHAKE_TIMEOUT, "TLS handshake did not finish in time"
    if isinstance(exc, ConnectionError | EOFError):
        return Reason.CLIENT_CLOSED, "client left during the TLS handshake"
    return Reason.TLS_HANDSHAKE_ERROR, f"TLS handshake failed ({exc!r})"


def check_listener_files(listener: str, config: ListenerTls) -> list[ConfigIssue]:
    """Every problem with a TLS listener's files, for ``check-config`` (no socket opened).

    A CRL past or near its nextUpdate is logged as a warning, not an issue: refusing to start
    (or to reload) would not let any more clients in.
    """
    try:
        tls = ServerTls(listener, config)
    except TlsConfigError as exc:
        return [ConfigIssue(f"listeners.{listener}.tls", str(exc))]
    stale = tls.crl_staleness()
    if stale is not None:
        log.warning("listener '%s': %s", listener, stale)
    return []


def target_context(
    group: str, config: TargetTls, *, alpn: list[str] | None = None
) -> ssl.SSLContext:
    """The client context the proxy uses toward a ``protocol = "tls"`` or ``"https"`` target
    group.

    The target's certificate is verified against ``ca`` (or the system store) and
    ``server_name``; the proxy presents ``client_cert`` when one is configured, so targets can
    require that traffic came through the proxy.
    """
    where = f"target group '{group}'"
    if config.ca is not None:
        _require_readable(config.ca, where, "ca file", ca_hint(config.ca, "ca"))
    try:
        context = ssl.create_default_context(cafile=config.ca)
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"{where}: ca file {config.ca} is not usable PEM ({exc.reason})"
        ) from None
    except OSError as exc:
        raise TlsConfigError(f"{where}: cannot read ca file {config.ca}: {exc.strerror}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _limit_groups(context, where)
    if alpn:
        context.set_alpn_protocols(alpn)
    if config.client_cert is not None and config.client_key is not None:
        for path in (config.client_cert, config.client_key):
            _require_readable(path, where, "client certificate file", issue_hint(path, "client"))
        try:
            context.load_cert_chain(config.client_cert, config.client_key)
        except ssl.SSLError as exc:
            raise TlsConfigError(
                f"{where}: client_key {config.client_key} does not match client_cert "
                f"{config.client_cert} ({exc.reason or exc})"
            ) from None
        except OSError as exc:  # replaced or made unreadable since the check above
            raise TlsConfigError(
                f"{where}: cannot read {config.client_cert} or {config.client_key}: {exc.strerror}"
            ) from None
    return context


def check_target_group_files(group: str, config: TargetTls) -> list[ConfigIssue]:
    """Every problem with a ``tls`` or ``https`` target group's files (no socket opened)."""
    try:
        target_context(group, config)
    except TlsConfigError as exc:
        return [ConfigIssue(f"target_groups.{group}.tls", str(exc))]
    return []


def check_files(config: Config, source: str) -> Config:
    """Read every file ``config`` names, as starting it would; returns ``config`` unchanged.

    Listener certificates, keys, client CAs and CRLs, target-group TLS files and the admin
    token file: each must exist, be readable by this process and make sense (cert and key
    match, not expired). Raises ``ConfigError`` listing every problem; opens no socket.
    ``check-config``, ``run``, ``demo`` and every reload call it after ``parse_config``.
    """
    issues = admin_file_issues(config) + api_file_issues(config)
    for name, listener in config.listeners.items():
        if listener.tls is not None:
            issues += check_listener_files(name, listener.tls)
    for name, api in config.apis.items():
        management = api.management
        if management is not None and management.tls is not None:
            issues += check_listener_files(f"{name}-management", management.tls)
    for name, group in config.target_groups.items():
        if group.protocol in ("tls", "https"):
            issues += check_target_group_files(name, group.tls or TargetTls())
    if issues:
        raise ConfigError(source, issues)
    return config
