"""A CRL past or near its nextUpdate: OpenSSL then refuses every client certificate, so
check-config, start, reload and the CRL watcher warn, and /metrics exposes its nextUpdate."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import sys
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from tests.conftest import ProxyFactory, wait_for
from tests.flows.test_tls import tls_config
from tests.helpers.pki import Pki, make_pki
from wsproxy.clock import FixedClock
from wsproxy.demo import EchoTarget
from wsproxy.tls import CrlFacts, crl_staleness

HOUR = 3600.0
DAY = 24 * HOUR


def facts(lifetime: float | None, left: float, now: float = 1_000_000_000.0) -> CrlFacts:
    next_update = None if lifetime is None else now + left
    last_update = now + left - (lifetime or 0)
    return CrlFacts(x509.Name([]), 1, last_update, next_update, True, frozenset())


# (lifetime, time left until nextUpdate) -> the warning's start, or None
ROWS = {
    "expired": (7 * DAY, -HOUR, "CRL crl.pem expired at"),
    "7-day CRL, 12 h left": (7 * DAY, 12 * HOUR, "CRL crl.pem expires at"),
    "7-day CRL, 20 h left (over 10 % of its life)": (7 * DAY, 20 * HOUR, None),
    "30-day CRL, 23 h left": (30 * DAY, 23 * HOUR, "CRL crl.pem expires at"),
    "30-day CRL, 2 days left": (30 * DAY, 2 * DAY, None),
    "hourly CRL, 30 min left": (HOUR, 0.5 * HOUR, None),
    "hourly CRL, 5 min left": (HOUR, 300, "CRL crl.pem expires at"),
    "no nextUpdate": (None, 0, None),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_when_a_crl_counts_as_near_its_next_update(row: str) -> None:
    lifetime, left, expected = ROWS[row]
    found = crl_staleness(facts(lifetime, left), "crl.pem", 1_000_000_000.0)
    if expected is None:
        assert found is None
    else:
        assert found is not None and found.startswith(expected), found
        assert "wsproxy ca crl" in found


def publish_crl_at(pki: Pki, at: dt.datetime) -> x509.CertificateRevocationList:
    """A CRL whose thisUpdate is ``at`` (so its nextUpdate is ``at`` + the CA's lifetime)."""
    clock = pki.ca.clock
    pki.ca.clock = FixedClock(at)
    try:
        return pki.ca.crl()
    finally:
        pki.ca.clock = clock


def crl_next_update(pki: Pki) -> float:
    crl = x509.load_pem_x509_crl(Path(pki.crl_file).read_bytes())
    assert crl.next_update_utc is not None
    return crl.next_update_utc.timestamp()


def crl_lifetime(pki: Pki) -> dt.timedelta:
    crl = x509.load_pem_x509_crl(Path(pki.crl_file).read_bytes())
    assert crl.next_update_utc is not None
    return crl.next_update_utc - crl.last_update_utc


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")  # per test: these tests re-publish the CRL


async def check_config(path: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wsproxy", "check-config", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, output.decode()


@pytest.mark.parametrize("state", ["expired", "near", "fresh"])
async def test_check_config_warns_of_a_crl_past_or_near_its_next_update(
    pki: Pki, tmp_path: Path, echo: EchoTarget, state: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    lifetime = crl_lifetime(pki)
    if state == "expired":
        publish_crl_at(pki, now - lifetime - dt.timedelta(hours=1))
    elif state == "near":
        publish_crl_at(pki, now - lifetime + dt.timedelta(hours=1))
    config = tmp_path / "mtls.toml"
    config.write_text(
        "[admin]\nenabled = false\n"
        + tls_config(pki, echo.address, client_auth="required", crl=True)
    )
    code, output = await check_config(config)
    assert code == 0, output  # a warning, not an error: refusing to start lets nobody in
    warned = {"expired": "expired at", "near": "expires at", "fresh": None}[state]
    if warned is None:
        assert "CRL" not in output, output
    else:
        assert f"listener 'edge': CRL {pki.crl_file} {warned}" in output, output
        assert "wsproxy ca crl" in output


async def test_the_crl_watcher_and_a_reload_warn_and_metrics_show_the_next_update(
    make_proxy: ProxyFactory,
    echo_targets: list[EchoTarget],
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    proxy = await make_proxy(
        tls_config(pki, echo_targets[0].address, client_auth="required", crl=True)
    )
    listener = proxy.listeners["edge"]
    assert proxy.admin is not None
    metrics_url = f"http://{proxy.admin.address}/metrics"

    async def next_update_metric() -> float:
        async with aiohttp.ClientSession() as session, session.get(metrics_url) as response:
            text = await response.text()
        found = re.search(
            r'^wsproxy_crl_next_update_timestamp_seconds\{listener="edge"\} (\S+)$', text, re.M
        )
        assert found is not None, text
        return float(found.group(1))

    next_update = crl_next_update(pki)
    assert await next_update_metric() == next_update

    before = listener.tls
    now = dt.datetime.now(dt.UTC)
    with caplog.at_level(logging.WARNING, logger="wsproxy"):
        expired = publish_crl_at(pki, now - crl_lifetime(pki) - dt.timedelta(hours=1))
        await wait_for(lambda: listener.tls is not before)  # the watcher took it
        await wait_for(lambda: any("expired at" in r.getMessage() for r in caplog.records))
    assert expired.next_update_utc is not None
    assert await next_update_metric() == expired.next_update_utc.timestamp()
    caplog.clear()

    config = tmp_path / "reload.toml"
    config.write_text(
        '[admin]\naddress = "127.0.0.1:0"\n'
        + tls_config(pki, echo_targets[0].address, client_auth="required", crl=True)
    )
    with caplog.at_level(logging.WARNING, logger="wsproxy"):
        assert await proxy.reload(str(config)) == []  # a warning does not fail the reload
    assert any(f"CRL {pki.crl_file} expired at" in r.getMessage() for r in caplog.records)
