"""A smoke run of the WebSocket API benchmarks (``loadtest api-*``) at tiny sizes: each runs end
to end against a wsproxy of its own and reports its figures as one JSON line. No timing is
asserted; the checks are that the traffic really went through and every message arrived."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any


async def loadtest(*args: str, timeout: float = 120) -> dict[str, Any]:
    """``python -m loadtest args``, which must succeed: its first line of output as JSON."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(timeout):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()[-3000:]
    first, _, rest = out.decode().partition("\n")
    result: dict[str, Any] = json.loads(first)
    assert result["scenario"] in rest  # the summary line follows
    return result


async def test_api_messages_against_the_direct_reference(tmp_path: Path) -> None:
    saved = tmp_path / "messages.json"
    result = await loadtest(
        "api-messages", "--clients", "3", "--messages", "5", "--size", "64", "--json", str(saved)
    )
    proxy, reference = result["proxy"], result["reference"]
    assert proxy["clients"] == 3 and proxy["messages"] == 15 and proxy["errors"] == {}
    assert reference["calls"] == 15 and reference["errors"] == {}
    assert proxy["proxy_cpu_seconds"] is not None and result["cpu_ratio"] is not None
    assert result["command"].startswith("python -m loadtest api-messages")
    assert json.loads(saved.read_text())["proxy"] == proxy


async def test_api_push_reaches_every_client() -> None:
    result = await loadtest(
        "api-push", "--clients", "3", "--requests", "30", "--seconds", "10", "--concurrency", "4"
    )
    assert result["statuses"] == {"200": 30}
    assert result["received"] == 30 and result["all_received"] is True
    assert result["proxy_cpu_us_per_post"] >= 0


async def test_api_fanout_reaches_every_member() -> None:
    result = await loadtest(
        "api-fanout", "--clients", "4", "--rounds", "3", "--client-processes", "2"
    )
    assert result["members"] == 4 and result["client_processes"] == 2
    assert result["delivered"] == 12 and result["received"] == 12
    assert result["dropped_slow"] == 0 and result["fewest_per_client"] == 3
