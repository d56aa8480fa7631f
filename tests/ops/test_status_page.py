"""The status page in a real headless Chromium: it renders, refreshes, and shows a target die."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.conftest import ProxyFactory, listener_address
from tests.helpers.browser import chromium_page
from wsproxy.demo import EchoTarget


async def test_status_page_shows_a_killed_target_turn_unhealthy(
    make_proxy: ProxyFactory, echo_targets: list[EchoTarget], tmp_path: Path
) -> None:
    doomed = echo_targets[1]
    proxy = await make_proxy(
        f"""
[listeners.edge]
address = "127.0.0.1:0"
websocket = true
default_target_group = "chat"
[target_groups.chat]
targets = [{{ address = "{echo_targets[0].address}" }}, {{ address = "{doomed.address}" }}]
[target_groups.chat.health_check]
interval_seconds = 0.5
timeout_seconds = 0.2
healthy_threshold = 1
unhealthy_threshold = 2
"""
    )
    assert proxy.admin is not None
    status_url = f"http://{proxy.admin.address}/status"
    row = f"document.querySelector('tr[data-target=\"{doomed.address}\"]')"
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://{listener_address(proxy)}/") as ws,
        chromium_page(tmp_path / "profile") as page,
    ):
        await ws.send_str("hello")
        await ws.receive_str(timeout=5)
        await page.navigate(status_url)
        assert await page.wait_for(f"{row} && {row}.dataset.state === 'healthy'")
        listener_row = "document.querySelector('tr[data-listener=\"edge\"]')"
        cells = await page.wait_for(
            f"{listener_row} && [...{listener_row}.cells].map(c => c.textContent)"
        )
        assert cells[0] == "edge" and cells[2] == "plain websocket"
        assert cells[3] == "1 / 10000"  # the open session, and the default limit
        before = await page.screenshot(tmp_path / "healthy.png")

        await doomed.stop()
        assert await page.wait_for(f"{row}.dataset.state === 'unhealthy'", timeout=15)
        reason = await page.evaluate(f"{row}.cells[2].textContent")
        assert reason == "Target.FailedHealthChecks"
        failures = await page.evaluate(f"{row}.querySelectorAll('.check-failed').length")
        assert failures >= 2
        after = await page.screenshot(tmp_path / "unhealthy.png")
        banner = await page.evaluate("document.getElementById('banner').textContent")
        assert banner.startswith("serving")
    for shot in (before, after):
        assert shot.startswith(b"\x89PNG\r\n\x1a\n") and len(shot) > 10_000
    assert before != after
