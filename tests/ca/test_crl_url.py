"""`--crl-url`: the CA remembers where its CRL is published and names it in what it issues."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from tests.helpers.tools import require_tool
from wsproxy.ca.authority import CertificateAuthority
from wsproxy.clock import FixedClock
from wsproxy.errors import CAError

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
URL = "http://wsproxy.internal:9900/v1/crl"


def distribution_points(cert_path: str) -> list[str] | None:
    """The URIs of the leaf's CRL Distribution Points, or None without the extension."""
    leaf = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())[0]
    try:
        extension = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    except x509.ExtensionNotFound:
        return None
    assert not extension.critical  # RFC 5280 §4.2.1.13: SHOULD be non-critical
    return [
        name.value
        for point in extension.value
        for name in point.full_name or []
        if isinstance(name, x509.UniformResourceIdentifier)
    ]


def test_every_certificate_issued_names_the_crl_url(tmp_path: Path) -> None:
    authority = CertificateAuthority(str(tmp_path / "certs"), clock=FixedClock(NOW))
    mirror = "http://10.0.0.5/crl"
    authority.init("Test CA", [URL, mirror])
    server = authority.issue_server("edge", ["edge.internal"])
    client = authority.issue_client("alice")
    assert server.crl_urls == (URL, mirror)
    assert distribution_points(server.cert_path) == [URL, mirror]
    assert distribution_points(client.cert_path) == [URL, mirror]
    # The root is not checked against a CRL it signs itself: it carries none.
    root = authority.ca_certificate
    with pytest.raises(x509.ExtensionNotFound):
        root.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    saved = json.loads(authority.store.settings_file.read_text())
    assert saved == {"version": 1, "crl_urls": [URL, mirror]}


def test_without_a_url_certificates_carry_no_distribution_point(tmp_path: Path) -> None:
    authority = CertificateAuthority(str(tmp_path / "certs"), clock=FixedClock(NOW))
    authority.init()
    assert distribution_points(authority.issue_client("alice").cert_path) is None


def test_a_ca_made_before_settings_existed_gets_the_url_later(tmp_path: Path) -> None:
    authority = CertificateAuthority(str(tmp_path / "certs"), clock=FixedClock(NOW))
    authority.init()
    authority.store.settings_file.unlink()  # as a CA directory from an earlier wsproxy
    before = authority.issue_client("before")
    assert authority.settings.crl_urls == []
    authority.set_crl_urls([URL])
    after = authority.issue_client("after")
    assert distribution_points(before.cert_path) is None  # issued certificates do not change
    assert distribution_points(after.cert_path) == [URL]
    authority.set_crl_urls([])
    assert distribution_points(authority.issue_client("cleared").cert_path) is None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://wsproxy.internal/v1/crl", "must be an http:// URL"),
        ("ldap://directory/cn=crl", "must be an http:// URL"),
        ("wsproxy.internal:9900/v1/crl", "must be an http:// URL"),
        ("http:///v1/crl", "names no host"),
        ("http://wsproxy.internal:99999/v1/crl", "out of range"),
        ("http://wsproxy.internal/v1/crl#x", "fragment"),
        ("http://wsproxy internal/v1/crl", "without spaces"),
        ("http://prøxy.internal/v1/crl", "ASCII"),
    ],
)
def test_bad_crl_urls_are_refused_before_anything_is_written(
    tmp_path: Path, url: str, message: str
) -> None:
    authority = CertificateAuthority(str(tmp_path / "certs"), clock=FixedClock(NOW))
    with pytest.raises(CAError, match=message) as raised:
        authority.init(crl_urls=[url])
    assert repr(url) in str(raised.value)
    assert not authority.store.exists()
    authority.init()
    with pytest.raises(CAError, match=message):
        authority.set_crl_urls([url])
    assert authority.settings.crl_urls == []


def test_corrupted_settings_are_reported(tmp_path: Path) -> None:
    authority = CertificateAuthority(str(tmp_path / "certs"), clock=FixedClock(NOW))
    authority.init()
    authority.store.settings_file.write_text("{not json")
    with pytest.raises(CAError, match=r"corrupted.*wsproxy ca settings"):
        authority.issue_client("alice")
    authority.store.settings_file.write_text('{"version": 1, "crl_urls": "http://x/"}')
    with pytest.raises(CAError, match="expected fields"):
        authority.issue_client("alice")


def test_crl_url_on_the_command_line_and_as_openssl_reads_it(tmp_path: Path) -> None:
    openssl = require_tool("openssl", "openssl")

    def ca(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "wsproxy", "ca", *args, "--dir", str(tmp_path / "c")],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    created = ca("init", "--crl-url", URL)
    assert created.returncode == 0, created.stderr
    assert URL in created.stdout
    issued = ca("issue", "server", "--name", "edge", "--dns", "edge.internal")
    assert issued.returncode == 0 and f"CRL distribution point: {URL}" in issued.stdout
    text = subprocess.run(
        [openssl, "x509", "-noout", "-ext", "crlDistributionPoints",
         "-in", str(tmp_path / "c" / "issued" / "edge.pem")],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "X509v3 CRL Distribution Points" in text and f"URI:{URL}" in text
    assert f"crl_urls: {URL}" in ca("settings").stdout
    changed = ca("settings", "--crl-url", "http://crl.example/ca.crl")
    assert changed.returncode == 0 and "http://crl.example/ca.crl" in changed.stdout
    assert "crl_urls: none" in ca("settings", "--no-crl-url").stdout
    refused = ca("settings", "--crl-url", "https://crl.example/ca.crl")
    assert refused.returncode == 2 and "must be an http:// URL" in refused.stderr
    both = ca("settings", "--crl-url", URL, "--no-crl-url")
    assert both.returncode == 2  # argparse: mutually exclusive
