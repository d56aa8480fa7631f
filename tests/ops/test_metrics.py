"""/metrics as Prometheus sees it: every documented family, valid exposition, bounded labels."""

from __future__ import annotations

import asyncio
import time
from asyncio.subprocess import PIPE, STDOUT
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.flows.test_tls import client_context, tls_config
from tests.helpers.pki import Pki, make_pki
from tests.helpers.process import parse_metrics
from tests.helpers.tools import require_tool
from wsproxy.demo import EchoTarget
from wsproxy.ops.metrics import close_code_label

# Every family issue #5 names, exactly so (counters with their _total).
REQUIRED = (
    "wsproxy_build_info",
    "wsproxy_listener_connections_total",
    "wsproxy_listener_connections_active",
    "wsproxy_listener_connections_rejected_total",
    "wsproxy_tls_handshakes_total",
    "wsproxy_tls_handshake_duration_seconds",
    "wsproxy_client_cert_verifications_total",
    "wsproxy_websocket_upgrades_total",
    "wsproxy_websocket_messages_total",
    "wsproxy_websocket_frames_total",
    "wsproxy_websocket_closes_total",
    "wsproxy_sessions_active",
    "wsproxy_session_duration_seconds",
    "wsproxy_bytes_total",
    "wsproxy_target_connections_active",
    "wsproxy_target_connect_errors_total",
    "wsproxy_target_connect_duration_seconds",
    "wsproxy_target_state",
    "wsproxy_target_group_healthy_targets",
    "wsproxy_target_group_unhealthy_targets",
    "wsproxy_health_checks_total",
    "wsproxy_target_health_transitions_total",
    "wsproxy_config_reloads_total",
    "wsproxy_config_last_reload_successful",
    "wsproxy_config_last_reload_success_timestamp_seconds",
    "wsproxy_draining",
    "wsproxy_certificate_not_after_timestamp_seconds",
    "wsproxy_event_loop_lag_seconds",
    "wsproxy_log_lines_dropped_total",
    "process_resident_memory_bytes",
    "process_open_fds",
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def declared_families(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    return sum(v for found, v in samples.get(name, []) if labels.items() <= found.items())


async def scrape(admin: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{admin}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return await response.text()


async def test_every_family_counts_what_happened_and_promtool_accepts_it(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], pki: Pki
) -> None:
    alice_cert, alice_key = pki.files("alice")
    config = tls_config(pki, echo_targets[0].address, client_auth="required", crl=True)
    config += (
        "[target_groups.echo.health_check]\n"
        "interval_seconds = 0.5\ntimeout_seconds = 0.2\nhealthy_threshold = 1\n"
    )
    proxy = await make_proxy(config)
    assert proxy.admin is not None
    admin = f"http://{proxy.admin.address}"
    address = listener_address(proxy)
    await wait_for(lambda: proxy.target_groups["echo"].targets[0].state == "healthy")
    client_host = "evil-host.example"
    connector = aiohttp.TCPConnector(ssl=client_context(pki, alice_cert, alice_key))
    async with aiohttp.ClientSession(connector=connector) as session:
        sockets = [
            await session.ws_connect(
                f"wss://{address}/very-secret-path", headers={"Host": client_host},
                server_hostname="edge.internal",
            )
            for _ in range(3)
        ]  # fmt: skip
        for ws in sockets:
            for i in range(5):
                await ws.send_str(f"m{i}")
                assert await ws.receive_str(timeout=5) == f"m{i}"
        # A foreign client certificate is refused during the handshake, and counted.
        mallory = pki.foreign.store
        foreign = client_context(
            pki, str(mallory.leaf_cert("mallory")), str(mallory.leaf_key("mallory"))
        )
        with pytest.raises(aiohttp.ClientError):
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=foreign)
            ) as rejected:
                await rejected.ws_connect(f"wss://{address}/", server_hostname="edge.internal")
        await wait_for(lambda: proxy.listeners["edge"].stats.client_certs["untrusted"] >= 1)

        live = parse_metrics(text := await scrape(admin))
        # Sessions still open: messages and bytes are counted live, not at the end.
        assert value(live, "wsproxy_websocket_messages_total", direction="client_to_target") == 15
        assert value(live, "wsproxy_websocket_frames_total", direction="target_to_client") == 15
        assert value(live, "wsproxy_sessions_active", listener="edge", target_group="echo") == 3
        assert value(live, "wsproxy_tls_handshakes_total", result="ok") >= 3
        assert value(live, "wsproxy_client_cert_verifications_total", result="ok") >= 3
        assert value(live, "wsproxy_client_cert_verifications_total", result="untrusted") >= 1
        assert value(live, "wsproxy_tls_handshake_duration_seconds_count") >= 3
        assert value(live, "wsproxy_target_group_healthy_targets", target_group="echo") == 1
        assert value(live, "wsproxy_health_checks_total", result="ok") >= 1
        expiries = {
            labels["role"]: when
            for labels, when in live["wsproxy_certificate_not_after_timestamp_seconds"]
        }
        assert set(expiries) == {"server", "client_ca", "crl"}
        assert all(when > time.time() for when in expiries.values())

        # A client close with an application code: counted under its range, not its number.
        for ws in sockets[1:]:
            await ws.close()
        await sockets[0].close(code=4321)
    await wait_for(lambda: not proxy.listeners["edge"].flows)
    done = parse_metrics(final := await scrape(admin))
    assert value(done, "wsproxy_websocket_closes_total", initiator="client", code="4xxx") == 1
    assert value(done, "wsproxy_websocket_closes_total", initiator="client", code="1000") == 2
    assert value(done, "wsproxy_session_duration_seconds_count", listener="edge") == 3
    assert value(done, "wsproxy_websocket_messages_total", direction="client_to_target") == 15

    missing = [name for name in REQUIRED if name not in declared_families(final)]
    assert not missing, missing
    # Label values come from configuration and closed sets only, never from what clients send.
    for page in (text, final):
        assert client_host not in page and "very-secret-path" not in page

    promtool = require_tool("promtool", "prometheus")
    process = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=STDOUT
    )
    output, _ = await process.communicate(final.encode())
    assert process.returncode == 0 and not output.strip(), output.decode()


@pytest.mark.parametrize(
    ("code", "label"),
    [(1000, "1000"), (1001, "1001"), (1004, "other"), (1015, "1015"), (1016, "other"),
     (2999, "other"), (3000, "3xxx"), (3999, "3xxx"), (4000, "4xxx"), (4999, "4xxx"),
     (5000, "other"), (0, "other")],
)  # fmt: skip
def test_close_codes_fold_into_a_bounded_set(code: int, label: str) -> None:
    assert close_code_label(code) == label


async def test_counts_survive_a_reload_that_rebinds_the_listener(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], tmp_path: Path
) -> None:
    base = f"""
[listeners.edge]
address = "127.0.0.1:0"
websocket = true
default_target_group = "echo"
{{extra}}
[target_groups.echo]
targets = [{{{{ address = "{echo_targets[0].address}" }}}}]
"""
    proxy = await make_proxy(base.format(extra=""))
    assert proxy.admin is not None
    admin = f"http://{proxy.admin.address}"
    async with aiohttp.ClientSession() as session:
        old = await session.ws_connect(f"ws://{listener_address(proxy)}/")
        await old.send_str("before")
        await old.receive_str(timeout=5)
        path = tmp_path / "reload.toml"
        path.write_text('[admin]\naddress = "127.0.0.1:0"\n' + base.format(
            extra="idle_timeout_seconds = 300"))  # fmt: skip
        assert await proxy.reload(str(path)) == []
        new = await session.ws_connect(f"ws://{listener_address(proxy)}/")
        await new.send_str("after")
        await new.receive_str(timeout=5)
        samples = parse_metrics(await scrape(admin))
        # One series per listener name: the retired listener's session is still in it.
        assert value(samples, "wsproxy_listener_connections_total", listener="edge") == 2
        assert value(samples, "wsproxy_sessions_active", listener="edge") == 2
        assert value(samples, "wsproxy_websocket_messages_total", direction="client_to_target") == 2
        await old.close()
        await new.close()
    await asyncio.sleep(0)
