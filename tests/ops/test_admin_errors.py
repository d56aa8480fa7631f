"""The admin listener's edges: `/` leads to the status page; every error is JSON."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.conftest import ProxyFactory
from wsproxy.config import parse_config
from wsproxy.demo import EchoTarget
from wsproxy.proxy import Proxy


async def test_root_redirects_to_the_status_page(
    make_proxy: ProxyFactory, echo: EchoTarget
) -> None:
    proxy = await make_proxy(
        f"""
[listeners.edge]
address = "127.0.0.1:0"
default_target_group = "chat"
[target_groups.chat]
targets = [{{ address = "{echo.address}" }}]
"""
    )
    assert proxy.admin is not None
    base = f"http://{proxy.admin.address}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/", allow_redirects=False) as response:
            assert response.status == 302
            assert response.headers["Location"] == "status"  # relative: works under a prefix
        async with session.get(f"{base}/") as response:
            assert response.status == 200 and response.url.path == "/status"
            assert response.content_type == "text/html"


async def test_every_error_is_json(make_proxy: ProxyFactory, echo: EchoTarget) -> None:
    proxy = await make_proxy(
        f"""
[listeners.edge]
address = "127.0.0.1:0"
default_target_group = "chat"
[target_groups.chat]
targets = [{{ address = "{echo.address}" }}]
"""
    )
    assert proxy.admin is not None
    base = f"http://{proxy.admin.address}"
    # method, path, body, status, Allow header (None: absent), words the message must hold
    rows: list[tuple[str, str, bytes | None, int, str | None, str]] = [
        ("GET", "/nope", None, 404, None, "no GET /nope here"),
        ("GET", "/v1/target-groups/chat/targets", None, 405, "POST", "use POST"),
        ("POST", "/status", None, 405, "GET,HEAD", "POST is not allowed on /status"),
        ("PUT", "/v1/reload", None, 405, "POST", "use POST"),
        ("POST", "/metrics", None, 405, "GET,HEAD", "use GET, HEAD"),
        ("GET", "/v1/drain", None, 405, "POST", "GET is not allowed"),
        ("DELETE", "/v1/target-groups/chat", None, 405, "GET,HEAD", "use GET, HEAD"),
        ("POST", "/v1/target-groups/chat/targets", b"[" * (2 * 1024 * 1024), 413, None, "size"),
        ("GET", "/v1/target-groups/nope", None, 404, None, "no target group 'nope'"),
    ]
    async with aiohttp.ClientSession() as session:
        for method, path, body, status, allow, words in rows:
            async with session.request(method, f"{base}{path}", data=body) as response:
                row = (method, path)
                assert response.status == status, row
                assert response.content_type == "application/json", row
                error = (await response.json())["error"]
                assert words in error, (row, error)
                if allow is None:
                    assert "Allow" not in response.headers, row
                else:
                    allowed = {m.strip() for m in response.headers["Allow"].split(",")}
                    assert allowed == set(allow.split(",")), row
        # The checks above changed nothing and the API still answers.
        async with session.get(f"{base}/v1/target-groups/chat") as response:
            assert response.status == 200
            assert len((await response.json())["targets"]) == 1


async def test_root_redirects_without_the_token(echo: EchoTarget, tmp_path: Path) -> None:
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
        url = f"http://{proxy.admin.address}/"
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, allow_redirects=False) as response,
        ):
            assert response.status == 302  # the redirect holds no data
    finally:
        await proxy.shutdown(grace=0)
