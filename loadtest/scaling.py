"""``python -m loadtest scaling``: wsproxy with 1 worker beside wsproxy with N workers.

Both proxies run at once (websocket mode, one echo target behind them); rounds alternate between
them so drift of the machine hits both alike. Nothing is pinned: more workers only help when
they get cores, and on a machine with as many cores as workers the load generator (``--processes``
processes) and the echo target compete for the same cores. So the report gives, besides the
rates, the CPU the proxy's process tree spent per operation (supervisor and workers together),
which says whether the split costs anything, and the rate ratio, which says what it buys here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest.compare import Bench, mint_certificates, start_echo
from loadtest.ports import WSPROXY, announced_ports
from loadtest.runner import run_scenario
from loadtest.scenarios import Result, raise_fd_limit


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("scaling", help="wsproxy with 1 worker vs N workers")
    parser.add_argument("--workers", type=int, default=2, help="workers of the second proxy")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--sessions", type=int, default=200, help="echo sessions")
    parser.add_argument("--processes", type=int, default=2, help="load processes")
    parser.add_argument("--out", default="loadtest/results", help="where scaling.md goes")


def start_proxy(bench: Bench, name: str, workers: int, echo: int) -> tuple[str, int]:
    # The listener and the admin bind port 0; the supervisor says which ports (loadtest.ports).
    config = bench.workdir / f"{name}.toml"
    config.write_text(
        f"""
[proxy]
workers = {workers}
[admin]
address = "127.0.0.1:0"
[listeners.ws]
address = "127.0.0.1:0"
websocket = true
default_target_group = "echo"
max_connections = 100000
[target_groups.echo]
targets = [{{ address = "127.0.0.1:{echo}" }}]
"""
    )
    command = [*WSPROXY, "--log-level", "warning", "--log-format", "json", "run", "-c", str(config)]
    process = bench.start(command, stderr=subprocess.PIPE)
    ports = announced_ports(process, ("ws",), f"wsproxy ({workers} workers)")
    time.sleep(0.5 * workers)  # every worker up, not just the first to accept
    return f"ws://127.0.0.1:{ports['ws']}/", process.pid


def scenario_args(kind: str, url: str, pid: int, args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(
        url=url,
        cacert=None,
        cert=None,
        key=None,
        insecure=False,
        server_name=None,
        pid=pid,
        processes=args.processes,
        seconds=args.seconds,
        sessions=args.sessions,
        size=128,
        workers=16 * args.processes,  # connect: concurrent open/close loops
    )


def figures(kind: str, result: Result) -> tuple[float, float | None]:
    """(rate, proxy CPU per operation in microseconds)."""
    cpu = result.get("proxy_cpu_seconds")
    if kind == "echo":
        ops, rate = result["messages"], float(result["messages_per_second"])
    else:
        ops, rate = result["handshakes"], float(result["handshakes_per_second"])
    return rate, (1e6 * cpu / ops if cpu is not None and ops else None)


def run_scaling(args: argparse.Namespace) -> int:
    raise_fd_limit()
    args.rounds = max(1, min(args.rounds, 20))
    args.seconds = min(max(args.seconds, 0.2), 120.0)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wsproxy-scaling-") as name:
        bench = Bench(Path(name))
        try:
            _, cert, key = mint_certificates(bench.workdir)
            echo, _ = start_echo(bench, cert, key)
            systems = {
                "1 worker": start_proxy(bench, "one", 1, echo),
                f"{args.workers} workers": start_proxy(bench, "many", args.workers, echo),
            }
            for kind in ("echo", "connect"):
                for round_no in range(args.rounds):
                    ordered = list(systems.items())
                    for label, (url, pid) in ordered if round_no % 2 == 0 else ordered[::-1]:
                        result = run_scenario(kind, scenario_args(kind, url, pid, args))
                        rate, cost = figures(kind, result)
                        runs.append(
                            {"scenario": kind, "system": label, "round": round_no,
                             "rate": rate, "cpu_us_per_op": cost,
                             "errors": result.get("errors", {})}
                        )  # fmt: skip
                        print(f"[{time.strftime('%H:%M:%S')}] {kind:<8} {label:<10} "
                              f"round {round_no + 1}: {rate:,.0f}/s, {cost or 0:.1f} us CPU/op",
                              file=sys.stderr)  # fmt: skip
        finally:
            bench.stop_all()
    summary = summarize(runs, list(systems))
    report = table(summary, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.md").write_text(report + "\n")
    document = {"settings": vars(args), "summary": summary, "runs": runs}
    (out / "scaling.json").write_text(json.dumps(document, indent=1))
    print(json.dumps({"summary": summary}, separators=(",", ":")))
    print(report)
    return 0


def summarize(runs: list[dict[str, Any]], systems: list[str]) -> dict[str, dict[str, Any]]:
    """Medians per scenario and system, and each system's rate relative to the first."""
    summary: dict[str, dict[str, Any]] = {}
    for kind in ("echo", "connect"):
        base = None
        for label in systems:
            mine = [run for run in runs if run["scenario"] == kind and run["system"] == label]
            if not mine:
                continue
            rate = statistics.median(run["rate"] for run in mine)
            costs = [run["cpu_us_per_op"] for run in mine if run["cpu_us_per_op"] is not None]
            base = base or rate
            summary.setdefault(kind, {})[label] = {
                "rate": rate,
                "cpu_us_per_op": statistics.median(costs) if costs else None,
                "rate_vs_first": round(rate / base, 3) if base else None,
                "errors": sum(sum(run["errors"].values()) for run in mine),
            }
    return summary


def table(summary: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"wsproxy scaling: {args.sessions} echo sessions x 128 B and connect+upgrade+close "
        f"({16 * args.processes} loops), {args.processes} load processes, medians of "
        f"{args.rounds} rounds x {args.seconds:g} s",
        "",
        "| scenario | system | rate (/s) | proxy CPU per op (us) | rate vs 1 worker | errors |",
        "|---|---|---|---|---|---|",
    ]
    for kind, systems in summary.items():
        for label, entry in systems.items():
            cost = entry["cpu_us_per_op"]
            lines.append(
                f"| {kind} | {label} | {entry['rate']:,.0f} | "
                f"{'n/a' if cost is None else f'{cost:.1f}'} | {entry['rate_vs_first']:.2f} | "
                f"{entry['errors']} |"
            )
    return "\n".join(lines)
