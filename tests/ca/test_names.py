"""Names that ``wsproxy ca`` writes into certificates: control characters are refused.

A subject or SAN ends up in HTTP headers (``X-Client-Cert-Subject``), logs and terminals; a CN
holding CR LF injected a header line at the target (issue 13, item 7). Letters of any script stay
allowed: the CN is a UTF8String.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from wsproxy.ca.authority import CertificateAuthority
from wsproxy.clock import FixedClock
from wsproxy.errors import CAInputError

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)

# C0 (with the CR LF of the review, TAB and ESC), DEL, C1 (NEL, CSI), the Unicode line and
# paragraph separators (str.splitlines breaks on them) and a bidi override (text that reads
# differently from what it is).
BAD_CHARACTERS = [
    "\x00", "\r\n", "\n", "\t", "\x1b", "\x7f", "\x85", "\x9b", "\u2028", "\u2029", "\u202e",
]  # fmt: skip


@pytest.fixture
def authority(tmp_path: Path) -> CertificateAuthority:
    ca = CertificateAuthority(str(tmp_path / "certs"), clock=FixedClock(NOW))
    ca.init("Test CA")
    return ca


def attempts(authority: CertificateAuthority, bad: str) -> dict[str, Callable[[], object]]:
    """Every name the CA takes, each carrying ``bad``."""
    fresh = CertificateAuthority(str(authority.store.root.parent / "fresh"))
    injected = f"alice{bad}X-Client-Cert-Subject: CN=admin"
    return {
        "--cn": lambda: authority.issue_client("alice", cn=injected),
        "--dns": lambda: authority.issue_server("edge", [f"edge{bad}.internal"]),
        "second --dns": lambda: authority.issue_server("edge", ["ok.internal", f"x{bad}y"]),
        "client --name": lambda: authority.issue_client(f"alice{bad}"),
        "server --name": lambda: authority.issue_server(f"edge{bad}", ["edge.internal"]),
        "init --name": lambda: fresh.init(f"Evil{bad}CA"),
        "export-p12 name": lambda: authority.export_p12(f"alice{bad}"),
    }  # fmt: skip


@pytest.mark.parametrize("bad", BAD_CHARACTERS, ids=lambda c: f"U+{ord(c[0]):04X}")
def test_control_characters_are_refused_everywhere(
    authority: CertificateAuthority, bad: str
) -> None:
    index_before = authority.store.index_file.read_bytes()
    for where, attempt in attempts(authority, bad).items():
        with pytest.raises(CAInputError) as raised:
            attempt()
        message = str(raised.value)
        assert f"U+{ord(bad[0]):04X}" in message, (where, message)
        assert "\r" not in message and "\n" not in message  # the error itself stays one line
    assert authority.store.index_file.read_bytes() == index_before
    assert not (authority.store.root.parent / "fresh" / "ca" / "ca.pem").exists()


def test_letters_of_any_script_stay_allowed(authority: CertificateAuthority) -> None:
    issued = authority.issue_client("lukasz", cn="Łukasz Żółć")
    leaf = x509.load_pem_x509_certificates(Path(issued.cert_path).read_bytes())[0]
    assert leaf.subject.rfc4514_string() == "CN=Łukasz Żółć"
    # A UTF8String (tag 0x0c), not a PrintableString or a Latin-1 guess.
    encoded = "Łukasz Żółć".encode()
    assert bytes([0x0C, len(encoded)]) + encoded in leaf.subject.public_bytes()
    fresh = CertificateAuthority(str(authority.store.root.parent / "other"))
    fresh.init("Zażółć CA")
    assert fresh.ca_certificate.subject.rfc4514_string() == "CN=Zażółć CA"
    issued = authority.issue_server("wild", ["*.edge.internal", "xn--kasz-9ua.internal"])
    leaf = x509.load_pem_x509_certificates(Path(issued.cert_path).read_bytes())[0]
    assert leaf.public_bytes(serialization.Encoding.PEM)  # it encodes


def test_other_malformed_names_get_a_clear_error(authority: CertificateAuthority) -> None:
    with pytest.raises(CAInputError, match=r"at most 64 characters.*RFC 5280"):
        authority.issue_client("long", cn="x" * 65)
    with pytest.raises(CAInputError, match=r"A-label.*xn--ukasz-"):
        authority.issue_server("idn", ["łukasz.internal"])
    with pytest.raises(CAInputError, match="not a DNS name"):
        authority.issue_server("spaces", ["edge internal"])
    with pytest.raises(CAInputError, match="not a DNS name"):
        authority.issue_server("empty-label", ["edge..internal"])
    with pytest.raises(CAInputError, match="not valid UTF-8"):
        # What Python makes of the byte 0xff in a command-line argument (surrogateescape).
        authority.issue_client("raw", cn="\udcff")
    assert json.loads(authority.store.index_file.read_text())["certificates"] == []


def test_the_command_line_refuses_them_as_bad_input(tmp_path: Path) -> None:
    def ca(*args: str | bytes) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "wsproxy", "ca", *args, "--dir", str(tmp_path / "c")],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    assert ca("init").returncode == 0
    injected = ca("issue", "client", "--name", "a", "--cn", "a\r\nX-Client-Cert-Subject: CN=admin")
    assert injected.returncode == 2, injected.stderr
    assert "--cn" in injected.stderr and "U+000D" in injected.stderr
    assert "Traceback" not in injected.stderr
    raw = ca("issue", "client", "--name", "b", "--cn", b"\xff")  # not UTF-8 at all
    assert raw.returncode == 2 and "not valid UTF-8" in raw.stderr, raw.stderr
    dns = ca("issue", "server", "--name", "e", "--dns", "e\n.internal")
    assert dns.returncode == 2 and "--dns" in dns.stderr and "U+000A" in dns.stderr
    ok = ca("issue", "client", "--name", "lukasz", "--cn", "Łukasz")
    assert ok.returncode == 0, ok.stderr
    assert [line.split()[0] for line in ca("list").stdout.splitlines()[1:]] == ["lukasz"]
