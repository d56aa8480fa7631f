"""The admin listener is never open to the network by accident (issue 12, 1.9).

A non-loopback admin address without ``token_file`` is a config error unless ``[admin]
unauthenticated`` says what may be reached without a token; what it opens is checked over HTTP.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ProxyFactory
from wsproxy.config import PROBE_PATHS, READ_ONLY_PATHS, parse_config
from wsproxy.demo import EchoTarget
from wsproxy.errors import ConfigError

LISTENER = """
[listeners.edge]
address = "127.0.0.1:0"
default_target_group = "g"
[target_groups.g]
"""

REFUSED = "is reachable from the network and there is no token_file"


OPEN = 'address = "0.0.0.0:9900"\n'
WITH_FILE = 'token_file = "t"\n'


@pytest.mark.parametrize(
    ("admin", "error", "open_paths"),
    [
        ('address = "127.0.0.1:9900"', None, None),
        ('address = "127.0.0.2:9900"', None, None),
        ('address = "[::1]:9900"', None, None),
        ('address = "localhost:9900"', None, None),
        ('address = "0.0.0.0:9900"', REFUSED, None),
        ('address = "[::]:9900"', REFUSED, None),
        ('address = "10.1.2.3:9900"', REFUSED, None),
        ('address = "proxy.internal:9900"', REFUSED, None),  # a name may resolve to anything
        (OPEN + "enabled = false", None, None),
        (OPEN + WITH_FILE, None, PROBE_PATHS),
        (OPEN + WITH_FILE + 'unauthenticated = "probes"', None, PROBE_PATHS),
        (OPEN + 'unauthenticated = "probes"', None, PROBE_PATHS),
        (OPEN + 'unauthenticated = "read_only"', None, READ_ONLY_PATHS),
        (OPEN + WITH_FILE + 'unauthenticated = "read_only"', None, READ_ONLY_PATHS),
        (OPEN + 'unauthenticated = "all"', None, None),
        ('address = "127.0.0.1:9900"\nunauthenticated = "probes"', None, PROBE_PATHS),
        (OPEN + WITH_FILE + 'unauthenticated = "all"', "token_file would never be asked for", None),
        (OPEN + 'unauthenticated = "none"', "input should be", None),
    ],
)
def test_admin_exposure_rules(admin: str, error: str | None, open_paths: object) -> None:
    text = f"[admin]\n{admin}\n{LISTENER}"
    if error is None:
        assert parse_config(text).admin.open_paths() == open_paths
        return
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    (issue,) = caught.value.issues
    assert issue.path.startswith("admin"), issue
    assert error in issue.message.lower() or error in issue.message, issue


def test_check_config_refuses_an_open_admin_address_with_78(tmp_path: Path) -> None:
    config = tmp_path / "wsproxy.toml"
    config.write_text(f'[admin]\naddress = "0.0.0.0:9900"\n{LISTENER}')
    result = subprocess.run(
        [sys.executable, "-m", "wsproxy", "check-config", str(config)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 78, result.stderr
    assert f"admin: address 0.0.0.0:9900 {REFUSED}" in result.stderr
    assert "token_file" in result.stderr and 'unauthenticated = "all"' in result.stderr
    run = subprocess.run(
        [sys.executable, "-m", "wsproxy", "run", "-c", str(config)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert run.returncode == 78 and REFUSED in run.stderr, run.stderr


async def status_of(
    session: aiohttp.ClientSession, method: str, url: str, token: str | None = None
) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.request(method, url, headers=headers) as response:
        if response.status in (401, 403):
            assert "error" in await response.json()  # JSON like every other admin error
        return response.status


# (method, path, status without a token) per [admin] setting; with the right token each is 2xx.
ENDPOINTS = [("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/status"), ("GET", "/metrics")]
ENDPOINTS += [("GET", "/v1/listeners"), ("GET", "/v1/target-groups"), ("POST", "/v1/reload")]


@pytest.mark.parametrize(
    ("setting", "token", "anonymous"),
    [
        # token_file alone: the probes and the page shell are open, the rest needs the token.
        ("", True, [200, 200, 200, 401, 401, 401, 401]),
        # read_only with a token: /metrics is open too (a scraper without the secret).
        ('unauthenticated = "read_only"', True, [200, 200, 200, 200, 401, 401, 401]),
        # read_only without a token: /metrics and probes only; nothing else can be reached.
        ('unauthenticated = "read_only"', False, [200, 200, 200, 200, 403, 403, 403]),
        ('unauthenticated = "probes"', False, [200, 200, 200, 403, 403, 403, 403]),
        # The explicit opt-out (and a loopback address without a token): everything is open.
        ('unauthenticated = "all"', False, [200, 200, 200, 200, 200, 200, 422]),
        ("", False, [200, 200, 200, 200, 200, 200, 422]),
    ],
)
async def test_what_answers_without_the_token_over_http(
    make_proxy: ProxyFactory,
    echo: EchoTarget,
    tmp_path: Path,
    setting: str,
    token: bool,
    anonymous: list[int],
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    admin = f'token_file = "{token_file}"\n' if token else ""
    # make_proxy puts [admin] address = 127.0.0.1:0 first; these keys join that table.
    target = f'targets = [{{ address = "{echo.address}" }}]'
    proxy = await make_proxy(f"{admin}{setting}\n{LISTENER}{target}\n")
    assert proxy.admin is not None
    base = f"http://{proxy.admin.address}"
    async with aiohttp.ClientSession() as session:
        got = [await status_of(session, method, base + path) for method, path in ENDPOINTS]
        assert got == anonymous
        if token:
            for method, path in ENDPOINTS:
                # 422: the proxy was not started from a file, so a reload has nothing to read.
                expected = 422 if path == "/v1/reload" else 200
                assert await status_of(session, method, base + path, "s3cret") == expected
                if path not in ("/healthz", "/readyz", "/status", "/metrics"):
                    assert await status_of(session, method, base + path, "wrong") == 401
