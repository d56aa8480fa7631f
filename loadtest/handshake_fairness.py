"""``python -m loadtest handshake-fairness``: a canary's TLS handshake beside one address's idle
sockets.

An attacker at 127.0.0.2 opens ``--idle`` TCP connections to a TLS listener and never sends a
ClientHello; a canary at 127.0.0.1 (both loopback) then makes ``--samples`` TLS handshakes one
after another. Each canary handshake (TCP connect + TLS 1.3 handshake) is timed. With a
handshake share per address (``max_handshakes_in_flight_per_ip``) the canary gets a slot at
once; with one global pool the attacker's sockets hold every slot until their
``tls_handshake_timeout_seconds`` (10 s) runs out. wsproxy runs in its own process; certificates
come from wsproxy's CA module.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from loadtest.ports import WSPROXY, announced_ports
from loadtest.scenarios import raise_fd_limit

MAX_IDLE = 5000


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "handshake-fairness", help="a canary's TLS handshake latency beside one IP's idle sockets"
    )
    parser.add_argument("--idle", type=int, default=1000, help=f"at most {MAX_IDLE}")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument(
        "--per-ip", type=int, default=0, help="max_handshakes_in_flight_per_ip (0: the default)"
    )


def _config(cert: str, key: str, per_ip: int) -> str:
    share = f"max_handshakes_in_flight_per_ip = {per_ip}\n" if per_ip else ""
    return f"""
[admin]
enabled = false
[listeners.edge]
address = "127.0.0.1:0"
protocol = "tls"
websocket = true
default_target_group = "nowhere"
tls_handshake_timeout_seconds = 10
max_handshakes_in_flight = 256
{share}
[listeners.edge.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
[target_groups.nowhere]
targets = [{{ address = "127.0.0.1:9" }}]
"""


async def _measure(port: int, cacert: str, idle: int, samples: int) -> dict[str, Any]:
    held: list[asyncio.StreamWriter] = []
    for _ in range(idle):
        _, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
        held.append(writer)
    await asyncio.sleep(1.0)  # let the proxy accept them all (or fill its slots)
    context = ssl.create_default_context(cafile=cacert)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    latencies: list[float] = []
    errors = 0
    for _ in range(samples):
        started = time.perf_counter()
        try:
            async with asyncio.timeout(30):
                _, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=context, server_hostname="bench.internal"
                )
            latencies.append(time.perf_counter() - started)
            writer.close()
        except (OSError, TimeoutError):
            errors += 1
    for writer in held:
        writer.close()
    ms = sorted(round(1000 * value, 1) for value in latencies)
    return {
        "scenario": "handshake-fairness",
        "idle_sockets": idle,
        "samples": samples,
        "errors": errors,
        "handshake_ms": {
            "p50": round(statistics.median(ms), 1) if ms else None,
            "max": ms[-1] if ms else None,
            "all": ms,
        },
    }


def run_handshake_fairness(args: argparse.Namespace) -> int:
    from wsproxy.ca.authority import CertificateAuthority

    idle = min(max(args.idle, 1), MAX_IDLE)
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="wsproxy-fairness-") as workdir:
        ca = CertificateAuthority(str(Path(workdir) / "certs"))
        ca.init("Fairness CA")
        issued = ca.issue_server("bench", ["bench.internal"], ["127.0.0.1"])
        config = Path(workdir) / "fairness.toml"
        config.write_text(_config(issued.cert_path, issued.key_path, args.per_ip))
        command = [*WSPROXY, "--log-level", "warning", "--log-format", "json", "run", "-c"]
        process = subprocess.Popen([*command, str(config)], stderr=subprocess.PIPE)
        try:
            port = announced_ports(process, ["edge"], "wsproxy")["edge"]
            started = time.monotonic()
            result = uvloop.run(_measure(port, str(ca.store.ca_cert), idle, args.samples))
            result["seconds"] = round(time.monotonic() - started, 1)
        finally:
            process.terminate()
            process.wait(timeout=30)
    print(json.dumps(result))
    latency = result["handshake_ms"]
    print(
        f"canary: {args.samples} TLS handshakes beside {idle} idle sockets from 127.0.0.2: "
        f"p50 {latency['p50']} ms, max {latency['max']} ms, {result['errors']} failed"
    )
    return 0
