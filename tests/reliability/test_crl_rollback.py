"""An older CRL (lower CRLNumber) must not replace the one in use: it would un-revoke every
certificate revoked since (a restored backup, a CA directory copied before a revocation)."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import listener_address, wait_for
from tests.flows.test_tls import client_context, tls_config, wss_echo
from tests.helpers.pki import Pki, make_pki
from wsproxy.config import load_config
from wsproxy.demo import EchoTarget
from wsproxy.proxy import Proxy

REFUSED = (aiohttp.ClientError, ssl.SSLError, ConnectionError)


def read_file(path: str) -> bytes:
    return Path(path).read_bytes()


def write_file(path: str, data: bytes) -> None:
    Path(path).write_bytes(data)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")  # per test: these tests revoke


async def test_an_older_crl_is_refused_by_the_watcher_and_by_a_reload(
    echo_targets: list[EchoTarget],
    pki: Pki,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    victim = pki.ca.issue_client("rolled-back")
    before_revocation = read_file(pki.crl_file)
    config = tmp_path / "mtls.toml"
    config.write_text(
        "[admin]\nenabled = false\n"
        + tls_config(pki, echo_targets[0].address, client_auth="required", crl=True)
    )
    proxy = Proxy(load_config(str(config)), path=str(config))
    await proxy.start()
    try:
        listener = proxy.listeners["edge"]
        address = listener_address(proxy)
        context = client_context(pki, victim.cert_path, victim.key_path)
        await wss_echo(address, context)
        assert listener.tls is not None and listener.tls.crl is not None
        old_number = listener.tls.crl.number
        assert old_number is not None

        current = listener.tls
        pki.ca.revoke("rolled-back", "keyCompromise")
        await wait_for(lambda: listener.tls is not current)
        assert listener.tls is not None and listener.tls.crl is not None
        assert listener.tls.crl.number == old_number + 1
        with pytest.raises(REFUSED):
            await wss_echo(address, context)

        # The older CRL comes back: the watcher keeps the newer one and says why.
        current = listener.tls
        with caplog.at_level(logging.ERROR, logger="wsproxy"):
            write_file(pki.crl_file, before_revocation)
            await wait_for(
                lambda: (
                    listener.tls is not current
                    or any("lower than" in r.getMessage() for r in caplog.records)
                )
            )
        assert listener.tls is current, "the watcher took an older CRL"
        message = next(r.getMessage() for r in caplog.records if "lower than" in r.getMessage())
        assert f"CRLNumber {old_number}, lower than the {old_number + 1}" in message
        with pytest.raises(REFUSED):
            await wss_echo(address, context)  # still revoked

        # A reload reads the files again: the same refusal, and the old config is kept.
        errors = await proxy.reload()
        assert any("lower than" in error for error in errors), errors
        assert proxy.listeners["edge"].tls is current
        with pytest.raises(REFUSED):
            await wss_echo(address, context)
    finally:
        await proxy.shutdown(grace=1.0)
