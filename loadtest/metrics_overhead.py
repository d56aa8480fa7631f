"""What metrics cost on the data path: wsproxy as shipped vs a build with the counting stripped.

    python -m loadtest.metrics_overhead --sessions 50 --size 128 --seconds 4 --rounds 7
    python -m loadtest.metrics_overhead --instructions --messages 200 --sessions-instr 2

Everything metric-related happens at scrape time except the per-frame message and frame counts
of websocket mode, each marked ``# hot-path count`` (byte counts are not metrics-only: the
connection log line and the idle timeout need them). This benchmark copies the package to a
temp directory with exactly those lines turned into ``pass`` and runs both builds against the same
echo target (``loadtest.echo_target``), websocket mode and stream mode (which has no such lines:
a control), in one of two ways:

- timing: the ``echo`` scenario, rounds alternating so machine drift hits both alike; medians of
  messages/s and of the proxy's CPU per 10k messages (about +-5 % run to run on this machine);
- ``--instructions``: each build under valgrind's callgrind serving a fixed number of round trips,
  twice (N and 3N per session); the difference is the instruction count per round trip, with
  start-up and shutdown cancelled out. Repeatable to a fraction of a percent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import uvloop

from loadtest import scenarios
from loadtest.client import Endpoint, open_session
from loadtest.compare import LOAD_CORE, pinned
from loadtest.ports import WSPROXY, announced_ports
from loadtest.scenarios import Result

PACKAGE = Path(__file__).resolve().parent.parent / "wsproxy"
MARKER = "# hot-path count"


def stripped_copy(destination: Path) -> int:
    """Copy the package into ``destination`` with every marked line made a no-op."""
    shutil.copytree(PACKAGE, destination / "wsproxy", ignore=shutil.ignore_patterns("__pycache__"))
    stripped = 0
    for path in (destination / "wsproxy").rglob("*.py"):
        lines = path.read_text().splitlines(keepends=True)
        for index, line in enumerate(lines):
            if line.rstrip().endswith(MARKER) and not line.lstrip().startswith("#"):
                indent = re.match(r"\s*", line).group(0)  # type: ignore[union-attr]
                lines[index] = f"{indent}pass  # counting compiled out\n"
                stripped += 1
        path.write_text("".join(lines))
    return stripped


def start_echo() -> tuple[subprocess.Popen[bytes], int]:
    echo = subprocess.Popen(
        [sys.executable, "-m", "loadtest.echo_target"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert echo.stdout is not None
    return echo, int(echo.stdout.readline().split()[0])


def start_build(
    echo_port: int, workdir: Path, pythonpath: Path | None, wrapper: list[str] | None = None
) -> tuple[subprocess.Popen[bytes], int, int]:
    """wsproxy (shipped, or the stripped copy on PYTHONPATH) with a websocket and a stream
    listener in front of the echo target."""
    config = workdir / f"bench-{'stripped' if pythonpath else 'shipped'}.toml"
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
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    # Both listeners bind port 0 and say in the log which port they got (loadtest.ports).
    command = [*WSPROXY, "--log-level", "warning", "--log-format", "json", "run", "-c", str(config)]
    env["PYTHONHASHSEED"] = "0"  # the same dict layouts in both builds
    command = [*wrapper, *command] if wrapper else pinned(command)
    process = subprocess.Popen(command, env=env, cwd=str(workdir), stderr=subprocess.PIPE)
    ports = announced_ports(process, ("ws", "stream"), "wsproxy", timeout=120 if wrapper else 20)
    return process, ports["ws"], ports["stream"]


def cpu_per_10k(rows: list[Result]) -> float:
    return float(
        statistics.median(
            10_000 * r["proxy_cpu_seconds"] / r["messages"] for r in rows if r["messages"]
        )
    )


def rate(row: Result) -> float:
    return float(row["messages_per_second"])


System = tuple[str, int, int]  # (name, port, proxy pid)


async def measure(systems: list[System], args: argparse.Namespace) -> dict[str, list[Result]]:
    results: dict[str, list[Result]] = {name: [] for name, _, _ in systems}
    for round_no in range(args.rounds):
        ordered = systems if round_no % 2 == 0 else systems[::-1]
        for name, port, pid in ordered:
            endpoint = Endpoint.from_url(f"ws://127.0.0.1:{port}/")
            results[name].append(
                await scenarios.echo(
                    endpoint, sessions=args.sessions, size=args.size, seconds=args.seconds, pid=pid
                )
            )
    return results


def main(args: argparse.Namespace) -> None:
    # As in compare: both proxies on core 0, the load generator and the echo target on core 1.
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {LOAD_CORE})
    with tempfile.TemporaryDirectory() as workdir_name:
        workdir = Path(workdir_name)
        stripped = stripped_copy(workdir / "stripped")
        echo, echo_port = start_echo()
        processes = [echo]
        try:
            shipped, shipped_ws, shipped_stream = start_build(echo_port, workdir, None)
            processes.append(shipped)
            bare, bare_ws, bare_stream = start_build(echo_port, workdir, workdir / "stripped")
            processes.append(bare)
            systems = [
                ("shipped-ws", shipped_ws, shipped.pid),
                ("stripped-ws", bare_ws, bare.pid),
                ("shipped-stream", shipped_stream, shipped.pid),
                ("stripped-stream", bare_stream, bare.pid),
            ]
            results = uvloop.run(measure(systems, args))
        finally:
            for process in processes:
                process.terminate()
                process.wait()
    report(results, args, stripped)


def report(results: dict[str, list[Result]], args: argparse.Namespace, stripped: int) -> None:
    summary: dict[str, dict[str, float]] = {}
    for mode in ("ws", "stream"):
        shipped = results[f"shipped-{mode}"]
        bare = results[f"stripped-{mode}"]
        summary[mode] = {
            "shipped_messages_per_second": round(statistics.median(map(rate, shipped))),
            "stripped_messages_per_second": round(statistics.median(map(rate, bare))),
            "shipped_cpu_seconds_per_10k": round(cpu_per_10k(shipped), 4),
            "stripped_cpu_seconds_per_10k": round(cpu_per_10k(bare), 4),
        }
        row = summary[mode]
        row["rate_ratio"] = round(
            row["shipped_messages_per_second"] / row["stripped_messages_per_second"], 3
        )
        row["cpu_ratio"] = round(
            row["shipped_cpu_seconds_per_10k"] / row["stripped_cpu_seconds_per_10k"], 3
        )
    print(json.dumps({"settings": vars(args), "lines_stripped": stripped, "summary": summary}))
    print()
    print(f"{args.sessions} sessions, {args.size}-byte messages, {args.seconds:g} s x "
          f"{args.rounds} rounds; {stripped} counting lines stripped")  # fmt: skip
    print(f"{'mode':<8}{'msg/s shipped':>15}{'stripped':>10}{'ratio':>7}"
          f"{'CPU s/10k shipped':>19}{'stripped':>10}{'ratio':>7}")  # fmt: skip
    for mode, row in summary.items():
        print(
            f"{mode:<8}{row['shipped_messages_per_second']:>15}"
            f"{row['stripped_messages_per_second']:>10}{row['rate_ratio']:>7}"
            f"{row['shipped_cpu_seconds_per_10k']:>19}{row['stripped_cpu_seconds_per_10k']:>10}"
            f"{row['cpu_ratio']:>7}"
        )


async def fixed_load(port: int, sessions: int, messages: int, size: int) -> None:
    """Exactly ``messages`` round trips per session: the same work for both builds."""
    endpoint = Endpoint.from_url(f"ws://127.0.0.1:{port}/")
    payload = os.urandom(size)

    async def one() -> None:
        session = await open_session(endpoint, timeout=120)
        for _ in range(messages):
            session.send(payload)
            await session.receive()
        await session.close(timeout=30)

    await asyncio.gather(*(one() for _ in range(sessions)))


def instructions(
    echo_port: int,
    workdir: Path,
    build: Path | None,
    mode: str,
    messages: int,
    args: argparse.Namespace,
) -> int:
    """Instructions the proxy process executed, start to exit, serving ``messages`` round trips
    per session (valgrind's callgrind: repeatable to the instruction)."""
    out = workdir / f"callgrind-{'stripped' if build else 'shipped'}-{mode}-{messages}.out"
    wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--quiet"]
    process, ws_port, stream_port = start_build(echo_port, workdir, build, wrapper)
    try:
        port = ws_port if mode == "ws" else stream_port
        uvloop.run(fixed_load(port, args.sessions_instr, messages, args.size))
    finally:
        process.terminate()
        process.wait(timeout=300)
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {out}")


def main_instructions(args: argparse.Namespace) -> None:
    """Per-message instructions of each build: the difference between two runs that differ only
    in the number of messages, so start-up and shutdown cancel out."""
    small, large = args.messages, 3 * args.messages
    with tempfile.TemporaryDirectory() as workdir_name:
        workdir = Path(workdir_name)
        stripped = stripped_copy(workdir / "stripped")
        echo, echo_port = start_echo()
        try:
            per_message: dict[str, float] = {}
            for mode in ("ws", "stream"):
                for name, build in (("shipped", None), ("stripped", workdir / "stripped")):
                    counts = [
                        instructions(echo_port, workdir, build, mode, count, args)
                        for count in (small, large)
                    ]
                    total = args.sessions_instr * (large - small)
                    per_message[f"{name}-{mode}"] = (counts[1] - counts[0]) / total
        finally:
            echo.terminate()
            echo.wait()
    summary = {
        mode: {
            "shipped_instructions_per_message": round(per_message[f"shipped-{mode}"]),
            "stripped_instructions_per_message": round(per_message[f"stripped-{mode}"]),
            "ratio": round(per_message[f"shipped-{mode}"] / per_message[f"stripped-{mode}"], 4),
        }
        for mode in ("ws", "stream")
    }
    print(json.dumps({"lines_stripped": stripped, "instructions": summary}))
    for mode, row in summary.items():
        print(f"{mode:<8} instructions per round trip: shipped "
              f"{row['shipped_instructions_per_message']:,}, stripped "
              f"{row['stripped_instructions_per_message']:,}, ratio {row['ratio']}")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=int, default=128, help="message size in bytes")
    parser.add_argument("--seconds", type=float, default=5.0, help="per system and round (max 120)")
    parser.add_argument("--rounds", type=int, default=5, help="max 20")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions under valgrind (callgrind) instead of timing",
    )
    parser.add_argument("--messages", type=int, default=1000, help="--instructions: per session")
    parser.add_argument("--sessions-instr", type=int, default=4, help="--instructions: sessions")
    args = parser.parse_args(argv)
    args.seconds = min(args.seconds, 120.0)
    args.rounds = max(1, min(args.rounds, 20))
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.instructions:
        main_instructions(arguments)
    else:
        main(arguments)
