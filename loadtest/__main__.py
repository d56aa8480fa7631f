"""wsproxy's load generator: ``python -m loadtest SCENARIO --url ws://HOST:PORT/PATH ...``.

Scenarios: echo, throughput, connect, hold, sweep (against any WebSocket endpoint), compare
(wsproxy vs direct vs HAProxy vs nginx, see compare.py), ab (two versions of wsproxy, alternating
rounds, see ab.py), scaling (wsproxy with 1 worker vs N, see scaling.py), session-memory (where
an idle session's bytes go, see session_memory.py), handshake-fairness (a canary's TLS handshake
beside one address's idle sockets, see handshake_fairness.py), api-messages, api-push and
api-fanout (the WebSocket API mode, see api_bench.py) and setup (installs HAProxy and nginx).
Each scenario prints one JSON line on stdout, then a human summary; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import uvloop

from loadtest import scenarios
from loadtest.runner import endpoint_of, run_scenario
from loadtest.scenarios import Result

MAX_SECONDS = 600.0


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def summary(result: Result) -> str:
    kind = result["scenario"]
    cpu = result.get("proxy_cpu_seconds")
    lines = [f"scenario {kind}"]
    if kind == "echo":
        lines.append(
            f"  {result['sessions']} sessions x {result['size']} B: "
            f"{result['messages_per_second']:,.0f} messages/s, latency {result['latency_ms']}"
        )
        if cpu is not None and result["messages"]:
            lines.append(f"  proxy CPU {1e6 * cpu / result['messages']:.1f} us per message")
    elif kind == "throughput":
        lines.append(
            f"  {result['sessions']} sessions x {result['size']} B: "
            f"{result['mib_per_second']} MiB/s each way"
        )
        if cpu is not None and result["bytes_each_way"]:
            per_gib = cpu / (2 * result["bytes_each_way"] / 2**30)
            lines.append(f"  proxy CPU {per_gib:.2f} s per GiB relayed")
    elif kind == "connect":
        lines.append(
            f"  {result['workers']} workers: {result['handshakes_per_second']:,.0f} "
            f"handshakes/s, latency {result['latency_ms']}"
        )
        if cpu is not None and result["handshakes"]:
            lines.append(f"  proxy CPU {1e3 * cpu / result['handshakes']:.2f} ms per handshake")
    elif kind == "hold":
        for step in result["steps"]:
            lines.append(f"  {step}")
        lines.append(f"  alive at the end: {result['alive_at_end']}")
    elif kind == "sweep":
        for point in result["points"]:
            lines.append(
                f"  {point['sessions']} sessions x {point['size']} B: "
                f"{point['messages_per_second']:,.0f} msg/s {point['latency_ms']}"
            )
    if result.get("errors"):
        lines.append(f"  errors: {result['errors']}")
    return "\n".join(lines)


def emit(result: Result) -> None:
    public = {key: value for key, value in result.items() if key != "latency_sample"}
    print(json.dumps(public, separators=(",", ":")))
    print(summary(result))


def add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="ws://HOST:PORT/PATH or wss://...")
    parser.add_argument("--cacert", help="CA bundle for wss://")
    parser.add_argument("--cert", help="client certificate (mTLS)")
    parser.add_argument("--key", help="client key (mTLS)")
    parser.add_argument("--insecure", action="store_true", help="do not verify the server")
    parser.add_argument("--server-name", help="SNI and name to verify (default: URL host)")
    parser.add_argument("--pid", type=int, help="the proxy's PID: report its CPU and memory")
    parser.add_argument("--processes", type=int, default=1, help="load processes (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    echo = commands.add_parser("echo", help="C sessions ping-pong S-byte messages")
    throughput = commands.add_parser("throughput", help="sessions stream big messages both ways")
    connect = commands.add_parser("connect", help="open/handshake/close as fast as possible")
    hold = commands.add_parser("hold", help="open idle sessions in steps; sample proxy memory")
    sweep = commands.add_parser("sweep", help="echo over a range of concurrency or size")
    for sub in (echo, throughput, connect, hold, sweep):
        add_target_options(sub)
    for sub in (echo, throughput, connect, sweep):
        sub.add_argument("--seconds", type=float, default=10.0)
    echo.add_argument("--sessions", type=int, default=100)
    echo.add_argument("--size", type=int, default=128)
    throughput.add_argument("--sessions", type=int, default=4)
    throughput.add_argument("--size", type=int, default=64 * 1024)
    connect.add_argument("--workers", type=int, default=16)
    hold.add_argument("--steps", default="1000,2000,5000,10000,20000")
    sweep.add_argument("--sessions", default="1,10,100,1000", help="comma list, or one value")
    sweep.add_argument("--size", default="128", help="comma list, or one value")

    from loadtest import compare

    compare.add_parser(commands)
    from loadtest import ab

    ab.add_parser(commands)
    from loadtest import scaling

    scaling.add_parser(commands)
    from loadtest import session_memory

    session_memory.add_parser(commands)
    from loadtest import handshake_fairness

    handshake_fairness.add_parser(commands)
    from loadtest import api_bench

    api_bench.add_parser(commands)
    commands.add_parser("setup", help="install HAProxy and nginx (Debian) where missing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "seconds"):
        args.seconds = min(max(args.seconds, 0.1), MAX_SECONDS)
    if args.command == "setup":
        from loadtest.compare import setup

        return setup()
    if args.command == "compare":
        from loadtest.compare import run_compare

        return run_compare(args)
    if args.command == "ab":
        from loadtest.ab import run_ab

        return run_ab(args)
    if args.command == "scaling":
        from loadtest.scaling import run_scaling

        return run_scaling(args)
    if args.command == "handshake-fairness":
        from loadtest.handshake_fairness import run_handshake_fairness

        return run_handshake_fairness(args)
    if args.command in ("api-messages", "api-push", "api-fanout"):
        from loadtest.api_bench import run_api

        return run_api(args)
    if args.command == "session-memory":
        from loadtest.session_memory import run_session_memory

        return run_session_memory(args)
    if args.command in ("echo", "throughput", "connect"):
        emit(run_scenario(args.command, args))
    elif args.command == "hold":
        steps = [int(step) for step in args.steps.split(",")]
        emit(uvloop.run(scenarios.hold(endpoint_of(args), steps=steps, pid=args.pid,
                                       progress=progress)))  # fmt: skip
    elif args.command == "sweep":
        emit(uvloop.run(_sweep(args)))
    return 0


async def _sweep(args: argparse.Namespace) -> Result:
    sessions = [int(v) for v in str(args.sessions).split(",")]
    sizes = [int(v) for v in str(args.size).split(",")]
    endpoint = endpoint_of(args)
    if len(sessions) > 1 and len(sizes) > 1:
        raise SystemExit("sweep one parameter at a time: a list of --sessions or of --size")
    values, vary_sessions = (sessions, True) if len(sessions) > 1 else (sizes, False)

    async def one(value: int) -> Result:
        return await scenarios.echo(
            endpoint,
            sessions=value if vary_sessions else sessions[0],
            size=sizes[0] if vary_sessions else value,
            seconds=args.seconds,
            pid=args.pid,
        )

    result: dict[str, Any] = await scenarios.sweep(one, values, progress)
    return result


if __name__ == "__main__":
    sys.exit(main())
