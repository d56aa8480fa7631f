"""The admin listener: health, readiness and Prometheus metrics read from the proxy's registry."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.helpers.wsraw import upgrade_request
from wsproxy.demo import EchoTarget


async def test_metrics_health_and_target_groups(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget]
) -> None:
    proxy = await make_proxy(
        f"""
[listeners.edge]
address = "127.0.0.1:0"
websocket = true
default_target_group = "chat"
[target_groups.chat]
algorithm = "round_robin"
targets = [{{ address = "{echo_targets[0].address}" }}]
"""
    )
    assert proxy.admin is not None and proxy.admin.address is not None
    admin = f"http://{proxy.admin.address}"
    address = listener_address(proxy)
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(upgrade_request().replace(b"Version: 13", b"Version: 7"))
    await reader.read()
    writer.close()
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"ws://{address}/")
        await ws.send_bytes(b"x" * 1000)
        await ws.receive_bytes(timeout=5)
        await wait_for(lambda: proxy.listeners["edge"].stats.rejected["upgrade_required"] == 1)
        async with session.get(f"{admin}/metrics") as response:
            assert response.status == 200
            text = await response.text()
        assert 'wsproxy_listener_connections_total{listener="edge"} 2.0' in text
        assert 'wsproxy_listener_connections_active{listener="edge"} 1.0' in text
        rejected = (
            'wsproxy_listener_connections_rejected_total{listener="edge",reason="upgrade_required"}'
        )
        assert f"{rejected} 1.0" in text
        assert (
            'wsproxy_websocket_upgrades_total{listener="edge",result="ok",target_group="chat"}'
            in text
        )
        target = f'target="{echo_targets[0].address}",target_group="chat"'
        assert f"wsproxy_target_connections_active{{{target}}} 1.0" in text
        # Live sessions' bytes are counted at scrape time, before they end.
        line = next(
            row for row in text.splitlines()
            if row.startswith('wsproxy_bytes_total{direction="client_to_target",listener="edge"}')
        )  # fmt: skip
        assert float(line.split()[-1]) > 1000
        async with session.get(f"{admin}/healthz") as response:
            assert response.status == 200
        async with session.get(f"{admin}/readyz") as response:
            assert response.status == 200
        async with session.get(f"{admin}/v1/target-groups/chat") as response:
            body = await response.json()
        assert body["targets"][0]["active_connections"] == 1
        assert body["algorithm"] == "round_robin"
        async with session.get(f"{admin}/v1/target-groups/nope") as response:
            assert response.status == 404
        await ws.close()
