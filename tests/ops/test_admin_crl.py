"""The admin listener publishes the CRL the listeners check, where certificates say it is."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from tests.conftest import ProxyFactory
from tests.helpers.pki import Pki, make_pki
from tests.helpers.tools import require_tool
from wsproxy.config import parse_config
from wsproxy.demo import EchoTarget
from wsproxy.proxy import Proxy


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)  # per test: these tests revoke


def mtls_listener(name: str, pki: Pki, crl: str | None) -> str:
    cert, key = pki.files("edge")
    line = f'crl = "{crl}"' if crl else ""
    return f"""
[listeners.{name}]
address = "127.0.0.1:0"
protocol = "tls"
websocket = true
default_target_group = "echo"
[listeners.{name}.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
client_auth = "required"
client_ca = "{pki.ca_file}"
{line}
"""


def group(target: EchoTarget) -> str:
    return f'[target_groups.echo]\ntargets = [{{ address = "{target.address}" }}]\n'


def admin_url(proxy: Proxy) -> str:
    assert proxy.admin is not None and proxy.admin.address is not None
    return f"http://{proxy.admin.address}"


async def run(*command: str) -> tuple[int, str]:
    """A subprocess that does not block the loop the admin listener answers on."""
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(30):
        output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_the_crl_url_in_a_certificate_serves_the_current_crl(
    make_proxy: ProxyFactory, echo: EchoTarget, pki: Pki, tmp_path: Path
) -> None:
    openssl = require_tool("openssl", "openssl")
    proxy = await make_proxy(mtls_listener("edge", pki, pki.crl_file) + group(echo))
    url = f"{admin_url(proxy)}/v1/crl"
    pki.ca.set_crl_urls([url])
    bob = pki.ca.issue_client("bob")
    chain = await asyncio.to_thread(Path(bob.cert_path).read_bytes)
    leaf = x509.load_pem_x509_certificates(chain)[0]
    points = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [name.value for name in points[0].full_name or []] == [url]
    # openssl follows the certificate's distribution point itself, as a client outside would.
    verify = [openssl, "verify", "-CAfile", pki.ca_file, "-crl_check", "-crl_download"]
    code, output = await run(*verify, bob.cert_path)
    assert code == 0 and output.strip().endswith("OK"), output

    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/pkix-crl"
            assert response.headers["Cache-Control"] == "no-cache"
            before = x509.load_der_x509_crl(await response.read())
        assert before.get_revoked_certificate_by_serial_number(bob.serial) is None
        pki.ca.revoke("bob", "keyCompromise")
        async with session.get(url) as response:
            after = x509.load_der_x509_crl(await response.read())
        revoked = after.get_revoked_certificate_by_serial_number(bob.serial)
        assert revoked is not None  # the revocation shows at the next fetch, no reload
        assert after.is_signature_valid(pki.ca.ca_certificate.public_key())  # type: ignore[arg-type]
        async with session.get(f"{url}.pem") as response:
            assert response.headers["Content-Type"] == "application/x-pem-file"
            pem = await response.read()
        assert x509.load_pem_x509_crl(pem) == after
        der_file, pem_file = tmp_path / "crl.der", tmp_path / "crl.pem"
        async with session.get(url) as response:
            der_file.write_bytes(await response.read())
        pem_file.write_bytes(pem)

    code, output = await run(*verify, bob.cert_path)
    assert code != 0 and "certificate revoked" in output, output
    for path, form in ((der_file, "DER"), (pem_file, "PEM")):
        code, text = await run(openssl, "crl", "-inform", form, "-in", str(path), "-noout", "-text")
        assert code == 0, text
        serials = re.findall(r"Serial Number: ([0-9A-F]+)", text)
        assert [int(serial, 16) for serial in serials] == [bob.serial]


async def test_which_crl_is_served_and_what_is_said_when_none_is(
    make_proxy: ProxyFactory, echo: EchoTarget, pki: Pki, tmp_path: Path
) -> None:
    other_crl = tmp_path / "other-crl.pem"
    shutil.copy(pki.crl_file, other_crl)
    proxy = await make_proxy(
        mtls_listener("edge", pki, pki.crl_file)
        + mtls_listener("api", pki, str(other_crl))
        + mtls_listener("plain", pki, None)
        + group(echo)
    )
    base = admin_url(proxy)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/v1/crl") as response:
            assert response.status == 409
            error = (await response.json())["error"]
        assert "/v1/listeners/NAME/crl" in error and str(other_crl) in error
        cases = [
            ("/v1/listeners/edge/crl", 200, "application/pkix-crl"),
            ("/v1/listeners/api/crl.pem", 200, "application/x-pem-file"),
            ("/v1/listeners/plain/crl", 404, "application/json"),
            ("/v1/listeners/nope/crl", 404, "application/json"),
        ]
        for path, status, content_type in cases:
            async with session.get(f"{base}{path}") as response:
                assert (response.status, response.content_type) == (status, content_type), path
        other_crl.write_text("not a CRL")
        async with session.get(f"{base}/v1/listeners/api/crl") as response:
            assert response.status == 503
            assert "wsproxy ca crl" in (await response.json())["error"]
        other_crl.unlink()
        async with session.get(f"{base}/v1/listeners/api/crl") as response:
            assert response.status == 503
            assert "cannot read the CRL" in (await response.json())["error"]


async def test_no_listener_checks_a_crl(make_proxy: ProxyFactory, echo: EchoTarget) -> None:
    proxy = await make_proxy(
        f"""
[listeners.edge]
address = "127.0.0.1:0"
default_target_group = "echo"
{group(echo)}
"""
    )
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{admin_url(proxy)}/v1/crl") as response,
    ):
        assert response.status == 404
        assert "[listeners.NAME.tls]" in (await response.json())["error"]


async def test_clients_fetch_the_crl_without_the_admin_token(
    echo: EchoTarget, pki: Pki, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    admin = f'[admin]\naddress = "127.0.0.1:0"\ntoken_file = "{token}"\n'
    proxy = Proxy(parse_config(admin + mtls_listener("edge", pki, pki.crl_file) + group(echo)))
    await proxy.start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{admin_url(proxy)}/v1/crl") as response,
        ):
            # A CRL is signed public data, and CRL clients (TLS stacks, scanners) send no token.
            assert response.status == 200
    finally:
        await proxy.shutdown(grace=0)
