"""``python -m loadtest session-memory``: where the bytes of one idle session go, line by line.

``hold`` measures what a session costs (RSS slope, against HAProxy); this says why. wsproxy runs
in this process under ``tracemalloc``; an echo target and the load client (which opens the idle
sessions) run in processes of their own, so neither counts. Two snapshots, before and after the
sessions open, are compared by the line that allocated each block still alive, and divided by
the number of sessions: what uvloop allocates shows up under the asyncio line that ran its C
code (``runners.py``) or the ``create_connection`` call, wsproxy's own objects under their lines.
``--mode tls`` (websocket over TLS termination, certificates from wsproxy's CA module) counts
what Python allocates per TLS session (uvloop's SSL protocol, the ``SSLObject`` and its BIOs),
not OpenSSL's own buffers, which it allocates outside Python's allocator.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import linecache
import random
import re
import subprocess
import sys
import tempfile
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent
MAX_SESSIONS = 9000  # the fd hard limit here is 20,000; each session holds two proxy descriptors


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "session-memory", help="per-session memory of wsproxy, by allocating line (tracemalloc)"
    )
    parser.add_argument("--mode", choices=("stream", "websocket", "tls"), default="websocket")
    parser.add_argument("--sessions", type=int, default=2000, help=f"at most {MAX_SESSIONS}")
    parser.add_argument("--top", type=int, default=20, help="lines to show")


async def _client(url: str, count: int, cacert: str | None) -> None:
    """The load side (its own process): open ``count`` idle sessions, report, hold them."""
    from loadtest.client import Endpoint
    from loadtest.scenarios import open_many, raise_fd_limit

    raise_fd_limit()
    errors: Counter[str] = Counter()
    endpoint = Endpoint.from_url(url, cacert=cacert, server_hostname="bench.internal")
    sessions = await open_many(endpoint, count, errors)
    print(json.dumps({"opened": len(sessions), "errors": dict(errors)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def _config(mode: str, port: int, cert: str = "", key: str = "") -> str:
    tls = f"""protocol = "tls"
[listeners.edge.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
"""
    return f"""
[admin]
enabled = false
[target_groups.echo]
targets = [{{ address = "127.0.0.1:{port}" }}]
[listeners.edge]
address = "127.0.0.1:0"
websocket = {"false" if mode == "stream" else "true"}
default_target_group = "echo"
max_connections = 100000
{tls if mode == "tls" else ""}"""


async def _open_sessions(
    url: str, count: int, cacert: str | None = None
) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtest.session_memory",
        "--client",
        url,
        str(count),
        *([cacert] if cacert else []),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    assert client.stdout is not None
    line = await asyncio.wait_for(client.stdout.readline(), timeout=120)
    report: dict[str, Any] = json.loads(line or b"{}")
    return client, report


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.stdin is not None:
        process.stdin.close()
    try:
        await asyncio.wait_for(process.wait(), timeout=10)
    except TimeoutError:
        process.kill()
        await process.wait()


async def profile(mode: str, sessions: int, top: int, workdir: Path) -> dict[str, Any]:
    """Per-session allocations of wsproxy in this process (``workdir``: its certificates)."""
    from wsproxy.config import parse_config
    from wsproxy.proxy import Proxy

    cacert, cert, key = None, "", ""
    if mode == "tls":
        from loadtest.compare import mint_certificates

        cacert, cert, key = mint_certificates(workdir)

    echo = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtest.echo_target",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    proxy: Proxy | None = None
    try:
        assert echo.stdout is not None
        port = int(await asyncio.wait_for(echo.stdout.readline(), timeout=30))
        config = parse_config(_config(mode, port, cert, key), "<session-memory>")
        proxy = Proxy(config, rng=random.Random(1))
        await proxy.start()
        address = proxy.listeners["edge"].address
        assert address is not None
        url = f"{'wss' if mode == 'tls' else 'ws'}://127.0.0.1:{address.port}/"
        # A few sessions first, so objects made once per process (caches, pools) are not counted.
        warm, _ = await _open_sessions(url, 50, cacert)
        await _stop(warm)
        await asyncio.sleep(0.5)
        gc.collect()
        before = tracemalloc.take_snapshot()
        client, opened = await _open_sessions(url, sessions, cacert)
        await asyncio.sleep(1.0)  # handshakes settle
        gc.collect()
        after = tracemalloc.take_snapshot()
        await _stop(client)
    finally:
        if proxy is not None:
            await proxy.shutdown(grace=0.5)
        await _stop(echo)
    count = max(1, int(opened.get("opened", 0)))
    stats = after.compare_to(before, "lineno")
    lines = []
    for stat in stats[:top]:
        frame = stat.traceback[0]
        lines.append(
            {
                "bytes": round(stat.size_diff / count),
                "objects": round(stat.count_diff / count, 2),
                "where": f"{_short(frame.filename)}:{frame.lineno}",
                "code": linecache.getline(frame.filename, frame.lineno).strip()[:80],
            }
        )
    return {
        "scenario": "session-memory",
        "mode": mode,
        "sessions": count,
        "errors": opened.get("errors", {}),
        "bytes_per_session": round(sum(s.size_diff for s in stats) / count),
        "lines": lines,
    }


def _short(filename: str) -> str:
    if "/site-packages/" in filename:
        return filename.split("/site-packages/", 1)[1]
    stdlib = re.match(r".*/lib/python3\.\d+/(.*)", filename)
    if stdlib:
        return stdlib.group(1)
    try:
        return str(Path(filename).resolve().relative_to(ROOT))
    except ValueError:
        return filename


def run_session_memory(args: argparse.Namespace) -> int:
    sessions = min(max(args.sessions, 10), MAX_SESSIONS)
    tracemalloc.start(1)
    with tempfile.TemporaryDirectory(prefix="wsproxy-session-memory-") as workdir:
        result = uvloop.run(profile(args.mode, sessions, args.top, Path(workdir)))
    tracemalloc.stop()
    print(json.dumps(result, separators=(",", ":")))
    print(f"{result['mode']}: {result['bytes_per_session']:,} bytes per idle session "
          f"({result['sessions']} sessions, tracemalloc)")  # fmt: skip
    for line in result["lines"]:
        print(f"  {line['bytes']:6,} B {line['objects']:5} obj  {line['where']}  {line['code']}")
    return 0 if not result["errors"] else 1


if __name__ == "__main__" and len(sys.argv) in (4, 5) and sys.argv[1] == "--client":
    uvloop.run(_client(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) == 5 else None))
