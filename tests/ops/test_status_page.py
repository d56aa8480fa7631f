"""The status page: server-rendered for clients without scripts (curl), then, in a real
headless Chromium, refreshed by its script, showing a target die."""

from __future__ import annotations

import json
from html import escape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.helpers.browser import chromium_page
from wsproxy.config import parse_config
from wsproxy.demo import EchoTarget
from wsproxy.ops import status_page
from wsproxy.ops.admin import _STATUS_PAGE
from wsproxy.proxy import Proxy
from wsproxy.targets.target import TargetState

# Lands in a health check's detail (a websocket check's reply) and in the page: it must show
# as text, never become markup.
HOSTILE = """<img src=x onerror="alert(1)">'&</td><script>alert(2)</script>"""


class Rows(HTMLParser):
    """The page as a client without scripts reads it: table rows with their data attributes,
    cell texts and the titles of the health-check marks; the banner's text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self.banner = ""
        self.tags: set[str] = set()
        self._in_banner = False
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        self.tags.add(tag)
        if tag == "tr":
            self.rows.append({"attrs": values, "cells": [], "titles": []})
        elif tag == "td" and self.rows:
            self._cell = []
        elif tag == "span" and "title" in values and self.rows:
            self.rows[-1]["titles"].append(values["title"])
        elif values.get("id") == "banner":
            self._in_banner = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1]["cells"].append("".join(self._cell))
            self._cell = None
        elif tag == "div":
            self._in_banner = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        elif self._in_banner:
            self.banner += data

    def row(self, attribute: str, value: str) -> dict[str, Any]:
        return next(row for row in self.rows if row["attrs"].get(attribute) == value)


def scripted_config(echo: EchoTarget, dead: str) -> str:
    return f"""
[listeners.edge]
address = "127.0.0.1:0"
websocket = true
default_target_group = "chat"
[target_groups.chat]
targets = [{{ address = "{echo.address}" }}, {{ address = "{dead}" }}]
[target_groups.chat.health_check]
interval_seconds = 0.5
timeout_seconds = 0.2
healthy_threshold = 1
unhealthy_threshold = 1
[target_groups.odd]
targets = [{{ address = "{echo.address}" }}]
[target_groups.odd.health_check]
protocol = "websocket"
send = {json.dumps(HOSTILE)}
expect = "pong"
interval_seconds = 0.5
timeout_seconds = 0.2
unhealthy_threshold = 1
"""


async def test_curl_sees_target_states_without_running_scripts(
    make_proxy: ProxyFactory, echo: EchoTarget
) -> None:
    dead = "127.0.0.1:1"  # nothing listens on port 1
    proxy = await make_proxy(scripted_config(echo, dead))
    assert proxy.admin is not None

    def state(group: str, address: str) -> TargetState:
        targets = proxy.target_groups[group].targets
        return next(t.state for t in targets if str(t.address) == address)

    await wait_for(
        lambda: (
            state("chat", str(echo.address)) is TargetState.HEALTHY
            and state("chat", dead) is TargetState.UNHEALTHY
            and state("odd", str(echo.address)) is TargetState.UNHEALTHY
        )
    )
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{proxy.admin.address}/status") as response,
    ):
        assert response.status == 200 and response.content_type == "text/html"
        html = await response.text()
    page = Rows(html)
    assert page.banner.startswith("serving · wsproxy ")
    listener = page.row("data-listener", "edge")
    edge = str(listener_address(proxy))
    assert listener["cells"][:4] == ["edge", edge, "plain websocket", "0 / 10000"]
    healthy = page.row("data-target", str(echo.address))
    assert healthy["attrs"]["data-state"] == "healthy"
    assert healthy["cells"][1] == "healthy"
    unhealthy = page.row("data-target", dead)
    assert unhealthy["attrs"]["data-state"] == "unhealthy"
    assert unhealthy["cells"][1:3] == ["unhealthy", "Target.FailedHealthChecks"]
    assert "ConnectionRefusedError" in unhealthy["titles"][-1]
    # The target's reply (the hostile text echoed, cut at 60 characters) is a title, as text.
    odd = page.rows[-1]  # the "odd" group's one target, after "chat"'s
    assert odd["attrs"]["data-state"] == "unhealthy"
    assert '<img src=x onerror="alert(1)">' in odd["titles"][-1]
    assert "</td><script>alert(2)" in odd["titles"][-1]
    assert "<img" not in html and "<script>alert" not in html and "img" not in page.tags


async def test_without_the_token_the_page_shows_no_data(echo: EchoTarget, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    text = f"""
[admin]
address = "127.0.0.1:0"
token_file = "{token}"
[listeners.edge]
address = "127.0.0.1:0"
default_target_group = "chat"
[target_groups.chat]
targets = [{{ address = "{echo.address}" }}]
"""
    proxy = Proxy(parse_config(text))
    await proxy.start()
    try:
        assert proxy.admin is not None
        url = f"http://{proxy.admin.address}/status"
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as response:
                assert response.status == 200
                locked = Rows(await response.text())
            headers = {"Authorization": "Bearer s3cret"}
            async with session.get(url, headers=headers) as response:
                shown = Rows(await response.text())
    finally:
        await proxy.shutdown(grace=0)
    assert all(not {"data-target", "data-listener"} & set(r["attrs"]) for r in locked.rows)
    assert str(echo.address) not in str(locked.rows)
    assert "needs a token" in locked.banner
    assert shown.row("data-target", str(echo.address))["attrs"]["data-state"] == "initial"


def test_everything_rendered_is_escaped() -> None:
    listener = {
        "name": HOSTILE,
        "address": HOSTILE,
        "mode": HOSTILE,
        "connections_active": 1,
        "max_connections": 2,
        "certificate_not_after": {HOSTILE: 86400.0 * 11},
    }
    group = {
        "name": HOSTILE,
        "algorithm": HOSTILE,
        "failing_open": True,
        "targets": [
            {
                "address": HOSTILE,
                "weight": 1,
                "state": HOSTILE,
                "reason": HOSTILE,
                "active_connections": 0,
                "health_checks": [{"ok": False, "detail": HOSTILE}],
            }
        ],
    }
    html = status_page.render(
        _STATUS_PAGE,
        version=HOSTILE,
        draining=True,
        listeners=[listener],
        target_groups=[group],
        now=86400.0,
    )
    assert "<img" not in html and "<script>alert" not in html
    page = Rows(html)
    assert "img" not in page.tags
    assert page.banner == f"DRAINING · wsproxy {HOSTILE} · rendered by the server at 00:00:00 UTC"
    row = page.row("data-listener", HOSTILE)
    no_rate = f"{status_page.DASH} · {status_page.DASH}"
    assert row["cells"] == [HOSTILE, HOSTILE, HOSTILE, "1 / 2", no_rate, no_rate, f"{HOSTILE} 10 d"]
    target = page.row("data-target", HOSTILE)
    assert target["attrs"]["data-state"] == HOSTILE
    assert target["cells"][:3] == [HOSTILE, HOSTILE, HOSTILE]
    assert target["titles"] == [HOSTILE]
    assert escape(f"Target group {HOSTILE} ({HOSTILE}) — failing open") in html


def test_the_template_keeps_its_markers() -> None:
    parts = {"banner": "<!--wsproxy:listeners-->", "listeners": "", "apis": "", "target_groups": ""}
    html = _STATUS_PAGE.render(parts)
    assert html.count("<!--wsproxy:listeners-->") == 1  # a value is never expanded again


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
