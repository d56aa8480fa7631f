"""Autobahn|Testsuite's fuzzing client against an API listener in front of an echo integration
($default, respond = true): every case passes except the ones over the API's size limits
(``run.SIZE_LIMIT_EXCLUSIONS``, each with its reason).

Skipped only when wstest is not installed (``bash tests/autobahn/install.sh``; CI runs it).
Select with ``pytest -m autobahn``. ``WSPROXY_AUTOBAHN_CASES`` widens the run by hand:
``all`` runs every case but the excluded ones (about 7 minutes here), or give wstest patterns
separated by spaces (``"1.* 12.1.*"``).

The server comes from the ``autobahn_url`` fixture; pointing the test at another server means
changing that fixture alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.autobahn import run
from tests.conftest import ProxyFactory, listener_address

pytestmark = pytest.mark.autobahn

# What CI runs: every group, with the permessage-deflate groups (12.*, 13.*, 1000 messages per
# case, over 6 minutes in all) cut to their small and their fragmented sizes. Each of the 12
# compression groups still runs with each of its offers and payload kinds.
CI_CASES: tuple[str, ...] = (
    *(f"{group}.*" for group in range(1, 12)),
    *(f"12.{kind}.{n}" for kind in range(1, 6) for n in (1, 5, 8, 11)),
    *(f"13.{offer}.{n}" for offer in range(1, 8) for n in (1, 5, 8, 11)),
)

# The 1000-message cases take about a second each here; a server that stops answering makes
# wstest wait out each case's own timeout instead, so this bounds the whole run.
RUN_TIMEOUT_SECONDS = 480


def _cases() -> tuple[str, ...]:
    chosen = os.environ.get("WSPROXY_AUTOBAHN_CASES", "").strip()
    if not chosen:
        return CI_CASES
    if chosen == "all":
        return ("*",)
    return tuple(chosen.split())


@pytest.fixture
def wstest() -> Path:
    path = run.find_wstest()
    named = os.environ.get("WSPROXY_WSTEST")
    if path is None and named:
        pytest.fail(f"WSPROXY_WSTEST={named} is not an executable wstest; run {run.INSTALL_SCRIPT}")
    if path is None:
        pytest.skip(f"wstest is not installed: run `bash {run.INSTALL_SCRIPT}`")
    return path


async def _echo(request: web.Request) -> web.Response:
    """The integration: each message comes back as it went (the same Content-Type makes a
    text message text again, octet-stream binary)."""
    return web.Response(body=await request.read(), content_type=request.content_type)


@pytest.fixture
async def autobahn_url(make_proxy: ProxyFactory) -> AsyncIterator[str]:
    """The server under test: an API listener with API Gateway's limits (the defaults) whose
    $default route answers with an echo integration over HTTP."""
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/echo", _echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    proxy = await make_proxy(f"""
[listeners.edge]
address = "127.0.0.1:0"
api = "echo"
# Off: the 12.*/13.* cases send up to 32 fragments per message, 1,000 messages as fast as the
# client can, which passes the default 10,000 frames/s on a fast run (a 1008 by design, tested
# in tests/api); here the protocol is under test, not the flood limit.
max_frames_per_second = 0

[apis.echo]

[[apis.echo.routes]]
key = "$default"
target_group = "echo"
path = "/echo"
respond = true

[target_groups.echo]
protocol = "http"
targets = [{{ address = "{host}:{port}" }}]
""")
    address = listener_address(proxy)
    yield f"ws://{address.host}:{address.port}/"
    await runner.cleanup()


@pytest.mark.timeout(RUN_TIMEOUT_SECONDS + 60)
async def test_fuzzing_client_passes(wstest: Path, autobahn_url: str, tmp_path: Path) -> None:
    results = await run.run_fuzzingclient(
        autobahn_url,
        wstest=wstest,
        workdir=tmp_path,
        cases=_cases(),
        timeout_seconds=RUN_TIMEOUT_SECONDS,
    )
    assert results, "wstest ran no case"
    ran = {result.case for result in results}
    excluded = [
        case for case in ran if any(_matches(case, e.pattern) for e in run.SIZE_LIMIT_EXCLUSIONS)
    ]
    assert not excluded, f"wstest ran excluded cases {excluded}"
    failed = run.failures(results)
    report = tmp_path / "reports" / "servers" / "index.html"
    assert not failed, f"{run.summary(results)}; report: {report}\n" + "\n".join(map(str, failed))


def _matches(case: str, pattern: str) -> bool:
    return case == pattern or (pattern.endswith("*") and case.startswith(pattern[:-1]))


def test_report_classification(tmp_path: Path) -> None:
    """The judge, on a report written here: OK, NON-STRICT and INFORMATIONAL pass, in both
    columns; anything else fails."""
    index = tmp_path / "index.json"
    rows = {
        "1.1.1": ("OK", "OK"),
        "2.10": ("NON-STRICT", "OK"),
        "7.1.6": ("INFORMATIONAL", "INFORMATIONAL"),
        "7.1.5": ("FAILED", "WRONG CODE"),
        "5.1": ("OK", "UNCLEAN"),
        "10.1.1": ("UNIMPLEMENTED", "OK"),
    }
    entries = {
        case: {"behavior": b, "behaviorClose": c, "remoteCloseCode": 1000, "duration": 1}
        for case, (b, c) in rows.items()
    }
    index.write_text(json.dumps({run.AGENT: entries}))
    results = run.parse_report(index)
    assert [r.case for r in results] == ["1.1.1", "2.10", "5.1", "7.1.5", "7.1.6", "10.1.1"]
    assert {r.case for r in run.failures(results)} == {"5.1", "7.1.5", "10.1.1"}
