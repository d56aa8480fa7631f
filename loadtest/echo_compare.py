"""Messages per second through wsproxy vs a direct connection, measured side by side.

    python -m loadtest.echo_compare --sessions 50 --size 64 --seconds 5 --rounds 3

Starts an echo target (own process) and wsproxy (own process, websocket and stream listeners),
then for each round runs the same ping-pong load against every system in turn: C sessions, each
sending an S-byte message and awaiting its echo, for D seconds. Reports medians over rounds of
messages/s, latency p50/p99 and the proxy's CPU seconds per 10k messages (utime+stime from /proc),
plus ratios to the direct connection. Every loop is bounded by --seconds and --rounds; traffic
stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import uvloop

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    system: str
    round: int
    messages: int
    seconds: float
    p50_ms: float
    p99_ms: float
    proxy_cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


async def session_load(url: str, size: int, deadline: float, latencies: list[float]) -> int:
    payload = os.urandom(size)
    count = 0
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await ws.send_bytes(payload)
            message = await ws.receive(timeout=10)
            if message.data != payload:
                raise RuntimeError(f"{url}: echo mismatch")
            latencies.append(time.perf_counter() - started)
            count += 1
    return count


async def run_load(
    system: str, url: str, args: argparse.Namespace, round_no: int, proxy_pid: int | None
) -> Result:
    latencies: list[float] = []
    cpu_before = cpu_seconds(proxy_pid) if proxy_pid else 0.0
    started = time.perf_counter()
    deadline = started + args.seconds
    counts = await asyncio.gather(
        *(session_load(url, args.size, deadline, latencies) for _ in range(args.sessions))
    )
    elapsed = time.perf_counter() - started
    cpu = (cpu_seconds(proxy_pid) - cpu_before) if proxy_pid else 0.0
    latencies.sort()
    return Result(
        system=system,
        round=round_no,
        messages=sum(counts),
        seconds=elapsed,
        p50_ms=1000 * latencies[len(latencies) // 2],
        p99_ms=1000 * latencies[int(len(latencies) * 0.99)],
        proxy_cpu_seconds=cpu,
    )


async def start_echo() -> tuple[asyncio.subprocess.Process, int]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.echo_server",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    port = int((await asyncio.wait_for(process.stdout.readline(), 15)).decode())
    return process, port


async def start_proxy(echo_port: int, workdir: Path) -> tuple[asyncio.subprocess.Process, int, int]:
    config = workdir / "bench.toml"
    config.write_text(
        f"""
[admin]
enabled = false
[listeners.ws]
address = "127.0.0.1:0"
websocket = true
default_target_group = "echo"
[listeners.stream]
address = "127.0.0.1:0"
default_target_group = "echo"
[target_groups.echo]
targets = [{{ address = "127.0.0.1:{echo_port}" }}]
"""
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wsproxy", "--log-level", "warning", "run", "-c", str(config),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    # Ports are read back from the proxy's own log at info level; warning hides them, so ask
    # the kernel instead: the two listening sockets of this process, in /proc/net/tcp.
    ports: list[int] = []
    for _ in range(150):  # up to 15 s for the proxy to bind both listeners
        await asyncio.sleep(0.1)
        if len(ports := listening_ports(process.pid)) >= 2:
            break
    return process, ports[0], ports[1]


def listening_ports(pid: int) -> list[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if found := re.fullmatch(r"socket:\[(\d+)\]", target):
            inodes.add(found.group(1))
    ports = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[3] == "0A" and parts[9] in inodes:  # 0A: LISTEN
            ports.append((int(parts[9]), int(parts[1].split(":")[1], 16)))
    # Listeners bind in config order, so their inodes ascend in the same order.
    return [port for _, port in sorted(ports)]


def report(results: list[Result], args: argparse.Namespace) -> None:
    systems = list(dict.fromkeys(r.system for r in results))
    medians = {}
    for system in systems:
        rows = [r for r in results if r.system == system]
        rate = statistics.median(r.rate for r in rows)
        cpu = statistics.median(
            10_000 * r.proxy_cpu_seconds / r.messages if r.messages else 0.0 for r in rows
        )
        medians[system] = {
            "messages_per_second": round(rate),
            "spread": round((max(r.rate for r in rows) - min(r.rate for r in rows)) / rate, 3),
            "p50_ms": round(statistics.median(r.p50_ms for r in rows), 3),
            "p99_ms": round(statistics.median(r.p99_ms for r in rows), 3),
            "proxy_cpu_seconds_per_10k_messages": round(cpu, 4),
        }
    direct = medians["direct"]["messages_per_second"]
    print(
        json.dumps(
            {"settings": vars(args), "medians": medians, "rounds": [asdict(r) for r in results]}
        )
    )
    print()
    shape = f"{args.sessions} sessions, {args.size}-byte messages"
    print(f"{shape}, {args.seconds:g} s x {args.rounds} rounds")
    print(
        f"{'system':<16}{'msg/s':>10}{'vs direct':>11}{'p50 ms':>9}{'p99 ms':>9}{'CPU s/10k':>11}"
    )
    for system, row in medians.items():
        ratio = row["messages_per_second"] / direct if direct else 0.0
        print(
            f"{system:<16}{row['messages_per_second']:>10}{ratio:>11.2f}{row['p50_ms']:>9}"
            f"{row['p99_ms']:>9}{row['proxy_cpu_seconds_per_10k_messages']:>11}"
        )


async def main(args: argparse.Namespace) -> None:
    echo, echo_port = await start_echo()
    with tempfile.TemporaryDirectory() as workdir:
        proxy, ws_port, stream_port = await start_proxy(echo_port, Path(workdir))
        try:
            systems = [
                ("direct", f"ws://127.0.0.1:{echo_port}/", None),
                ("wsproxy-ws", f"ws://127.0.0.1:{ws_port}/", proxy.pid),
                ("wsproxy-stream", f"ws://127.0.0.1:{stream_port}/", proxy.pid),
            ]
            results = []
            for round_no in range(args.rounds):
                # Alternate the order so drift of the machine hits every system alike.
                ordered = systems if round_no % 2 == 0 else systems[::-1]
                for system, url, pid in ordered:
                    results.append(await run_load(system, url, args, round_no, pid))
            report(results, args)
        finally:
            proxy.terminate()
            await proxy.wait()
            assert echo.stdin is not None
            echo.stdin.close()
            await echo.wait()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=int, default=64, help="message size in bytes")
    parser.add_argument("--seconds", type=float, default=5.0, help="per system and round (max 120)")
    parser.add_argument("--rounds", type=int, default=3, help="max 20")
    args = parser.parse_args(argv)
    args.seconds = min(args.seconds, 120.0)
    args.rounds = max(1, min(args.rounds, 20))
    return args


if __name__ == "__main__":
    uvloop.run(main(parse_args()))
