"""The reason registry and the termination codes of the connection log (issue 12 §1.2, §3.1)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.flows.test_tls import client_context, tls_config, wss_echo
from tests.flows.test_websocket import ws_config
from tests.helpers.pki import Pki, make_pki
from tests.helpers.wsraw import RawWebSocket
from wsproxy import errors
from wsproxy.demo import EchoTarget
from wsproxy.errors import Cause, Reason, WsproxyError
from wsproxy.ops.termination import Phase, PhaseCode, replace_tables, termination
from wsproxy.wire.wsframe import OP_PING

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def test_every_reason_has_a_cause_a_doc_and_a_plausible_code() -> None:
    for reason in Reason:
        assert isinstance(reason.cause, Cause), reason
        assert reason.doc and not reason.doc.endswith("."), reason
        code = reason.code
        assert code is None or 400 <= code <= 599 or 1000 <= code <= 1015, reason


def test_every_error_class_carries_a_registered_reason() -> None:
    classes: list[type[WsproxyError]] = [WsproxyError]
    seen = []
    while classes:
        cls = classes.pop()
        seen.append(cls)
        classes.extend(cls.__subclasses__())
        assert isinstance(cls.reason, Reason), cls
    assert len(seen) > 25
    # Errors that answer a client carry a status, frame errors a close code: both from the
    # registry, so the docs table and what clients get cannot drift apart.
    assert errors.NoRoute("x").status == 404
    assert errors.TargetConnectTimeout("x").status == 504
    assert errors.FrameTooLarge("x", 0).close_code == 1009
    assert errors.ClientCertRejected("bad_eku", "x").reason is Reason.CLIENT_CERT_BAD_EKU


def test_the_docs_tables_are_generated_from_the_registry() -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert replace_tables(text) == text, (
        "docs/operations.md is stale: run `python -m wsproxy.ops.termination --write "
        "docs/operations.md`"
    )
    for reason in Reason:
        assert f"| `{reason}` |" in text


@pytest.mark.parametrize(
    ("reason", "phase", "code"),
    [
        (Reason.CLOSED, Phase.DATA, "--"),
        (Reason.PING_TIMEOUT, Phase.DATA, "cD"),
        (Reason.CLOSE_TIMEOUT, Phase.DATA, "cD"),
        (Reason.TARGET_PING_TIMEOUT, Phase.DATA, "sD"),
        (Reason.TARGET_CLOSE_TIMEOUT, Phase.DATA, "sD"),
        (Reason.TARGET_CLOSED, Phase.DATA, "SD"),
        (Reason.CLIENT_CERT_REVOKED, Phase.TLS, "PT"),
        (Reason.SESSION_REVOKED, Phase.DATA, "KD"),
        (Reason.NO_ROUTE, Phase.REQUEST, "PR"),
    ],
)
def test_termination_codes(reason: Reason, phase: PhaseCode, code: str) -> None:
    """Issue 12 §1.2: ping_timeout and close_timeout came out as PD (no mapping), a revoked
    certificate refused in the handshake as KT (docs: PT)."""
    assert termination(reason, phase) == code


def connection_entries(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.__dict__["connection"] for r in caplog.records if r.name == "wsproxy.access"]


async def test_a_client_that_never_answers_pings_is_logged_as_a_client_timeout(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await make_proxy(
        ws_config(
            ("chat", [echo_targets[0].address]),
            listener="ping_interval_seconds = 0.2\nping_timeout_seconds = 0.3",
        )
    )
    with caplog.at_level(logging.INFO, logger="wsproxy.access"):
        ws = await RawWebSocket.connect(listener_address(proxy))
        opcode, _ = await ws.recv(timeout=3)
        assert opcode == OP_PING  # and it is never answered
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(ws.reader.read(), 3)
        await wait_for(lambda: bool(connection_entries(caplog)))
    (entry,) = connection_entries(caplog)
    assert (entry["reason"], entry["termination"]) == ("ping_timeout", "cD")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("row", ["revoked", "no_eku"])
async def test_a_client_certificate_refused_in_the_handshake_is_logged_pt(
    make_proxy: ProxyFactory,
    echo_targets: list[EchoTarget],
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    row: str,
) -> None:
    if row == "revoked":
        issued = pki.ca.issue_client("termination-revoked")
        pki.ca.revoke(issued.name, "keyCompromise")
        cert, key = issued.cert_path, issued.key_path
    else:
        cert, key = pki.issue_without_eku("termination-no-eku")
    proxy = await make_proxy(
        tls_config(pki, echo_targets[0].address, client_auth="required", crl=True)
    )
    with caplog.at_level(logging.INFO, logger="wsproxy.access"):
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError, TimeoutError)):
            await wss_echo(listener_address(proxy), client_context(pki, cert, key))
        await wait_for(lambda: bool(connection_entries(caplog)))
    reasons = {(e["reason"], e["termination"]) for e in connection_entries(caplog)}
    expected = "client_cert_revoked" if row == "revoked" else "client_cert_bad_eku"
    assert reasons == {(expected, "PT")}


async def test_a_session_revoked_while_connected_is_logged_kd(
    make_proxy: ProxyFactory,
    echo_targets: list[EchoTarget],
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    victim = pki.ca.issue_client("termination-live")
    proxy = await make_proxy(
        tls_config(pki, echo_targets[0].address, client_auth="required", crl=True)
    )
    address = listener_address(proxy)
    connector = aiohttp.TCPConnector(ssl=client_context(pki, victim.cert_path, victim.key_path))
    with caplog.at_level(logging.INFO, logger="wsproxy.access"):
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.ws_connect(
                f"wss://{address}/",
                headers={"Host": "edge.internal"},
                server_hostname="edge.internal",
            ) as ws,
        ):
            await ws.send_str("hi")
            assert await ws.receive_str(timeout=5) == "hi"
            pki.ca.revoke(victim.name, "keyCompromise")
            message = await ws.receive(timeout=5)
            assert message.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 1008
        await wait_for(lambda: bool(connection_entries(caplog)))
    (entry,) = connection_entries(caplog)
    assert (entry["reason"], entry["termination"]) == ("session_revoked", "KD")
