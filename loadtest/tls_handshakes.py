"""TLS handshakes per second through a terminating wsproxy listener vs direct TLS to a target.

    python -m loadtest.tls_handshakes --workers 8 --seconds 5 --rounds 3

Mints a throwaway CA and server certificate with wsproxy's CA module, starts an echo target
process (a TLS port and a plain port) and wsproxy (a TLS listener relaying to the plain port),
then alternates: W workers each connect, complete a TLS handshake (no resumption), echo one
byte and close, for D seconds. Reports median handshakes/s, the ratio to direct, and the proxy's
CPU milliseconds per handshake. Bounded by --seconds (<= 60) and --rounds (<= 10); loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from loadtest.echo_compare import cpu_seconds, listening_ports
from wsproxy.ca.authority import CertificateAuthority


async def worker(port: int, context: ssl.SSLContext, deadline: float) -> tuple[int, int]:
    done = errors = 0
    while time.perf_counter() < deadline:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="bench.internal"
            )
            writer.write(b"x")
            await reader.readexactly(1)
            writer.close()
            done += 1
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            errors += 1
    return done, errors


async def measure(
    port: int, context: ssl.SSLContext, args: argparse.Namespace, pid: int | None
) -> dict[str, float]:
    cpu = cpu_seconds(pid) if pid else 0.0
    started = time.perf_counter()
    results = await asyncio.gather(
        *(worker(port, context, started + args.seconds) for _ in range(args.workers))
    )
    elapsed = time.perf_counter() - started
    done = sum(r[0] for r in results)
    return {
        "handshakes_per_second": done / elapsed,
        "errors": sum(r[1] for r in results),
        "proxy_cpu_ms_per_handshake": 1000 * (cpu_seconds(pid) - cpu) / done if pid and done else 0,
    }


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        ca = CertificateAuthority(f"{workdir}/ca")
        ca.init("bench CA")
        issued = ca.issue_server("bench", ["bench.internal"])
        target = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtest.tls_echo_server", issued.cert_path, issued.key_path,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert target.stdout is not None and target.stdin is not None
        tls_port, plain_port = map(int, (await target.stdout.readline()).split())
        config = Path(workdir) / "bench.toml"
        config.write_text(
            f"""
[admin]
enabled = false
[listeners.tls]
address = "127.0.0.1:0"
protocol = "tls"
default_target_group = "echo"
[listeners.tls.tls]
certificates = [{{ cert = "{issued.cert_path}", key = "{issued.key_path}" }}]
[target_groups.echo]
targets = [{{ address = "127.0.0.1:{plain_port}" }}]
"""
        )
        proxy = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wsproxy", "--log-level", "warning", "run", "-c", str(config),
        )  # fmt: skip
        try:
            ports: list[int] = []
            for _ in range(150):  # up to 15 s for the proxy to bind
                if ports := listening_ports(proxy.pid):
                    break
                await asyncio.sleep(0.1)
            context = ssl.create_default_context(cafile=str(ca.store.ca_cert))
            rows: dict[str, list[dict[str, float]]] = {"direct": [], "wsproxy": []}
            systems = [("direct", tls_port, None), ("wsproxy", ports[0], proxy.pid)]
            for round_no in range(args.rounds):
                for name, port, pid in systems if round_no % 2 == 0 else systems[::-1]:
                    rows[name].append(await measure(port, context, args, pid))
        finally:
            proxy.terminate()
            await proxy.wait()
            target.stdin.close()
            await target.wait()
    medians = {
        name: {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}
        for name, runs in rows.items()
    }
    print(json.dumps({"settings": vars(args), "medians": medians, "rounds": rows}))
    direct = medians["direct"]["handshakes_per_second"]
    print(f"\n{args.workers} workers, {args.seconds:g} s x {args.rounds} rounds (no resumption)")
    print(
        f"{'system':<10}{'handshakes/s':>14}{'vs direct':>11}{'errors':>8}{'proxy CPU ms/hs':>17}"
    )
    for name, row in medians.items():
        print(
            f"{name:<10}{row['handshakes_per_second']:>14.0f}"
            f"{row['handshakes_per_second'] / direct:>11.2f}{row['errors']:>8.0f}"
            f"{row['proxy_cpu_ms_per_handshake']:>17.3f}"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    args.seconds = min(args.seconds, 60.0)
    args.rounds = max(1, min(args.rounds, 10))
    return args


if __name__ == "__main__":
    uvloop.run(main(parse_args()))
