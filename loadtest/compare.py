"""``python -m loadtest compare``: wsproxy beside a direct connection, HAProxy and nginx at once.

The proxies under test are pinned to core 0 (``taskset``); this process (the load generator) and
the echo target run on core 1, so the proxies' CPU time is theirs alone. For every scenario the
systems take turns, round after round (at least three), so drift of the machine hits all alike.
Medians, spread, CPU per operation and the ratios to direct and to HAProxy go to a Markdown table,
a JSON file and PNG charts under ``--out``. Every process started is stopped by PID; every load
loop is bounded by ``--seconds``; traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from loadtest import scenarios
from loadtest.client import Endpoint
from loadtest.ports import WSPROXY, announced_ports, held_sockets, port_of, wait_serving
from loadtest.procstat import process_tree
from loadtest.scenarios import Result

PROXY_CORE = "0"
LOAD_CORE = 1
DEFAULT_SCENARIOS = (
    "echo-100",
    "echo-1",
    "throughput",
    "connect-ws",
    "connect-wss",
    "echo-tls",
    "throughput-tls",
    "hold",
)
# The reference each wsproxy mode is held against (issue 6's table).
HAPROXY_PEER = {
    "wsproxy-stream": "haproxy-tcp",
    "wsproxy-ws": "haproxy-tcp",
    "wsproxy-tls": "haproxy-tls",
    "wsproxy-passthrough": "haproxy-passthrough",
}


@dataclass
class System:
    """One system under test: where its endpoints are and which process to measure."""

    name: str
    url: str
    pid: int | None  # None: the direct connection (no proxy process)
    tls: bool = False


@dataclass
class Run:
    scenario: str
    system: str
    round: int
    result: Result


# How a proxy process is known to be up: waits until it serves, returns system name -> URL.
Ready = Callable[[subprocess.Popen[bytes]], dict[str, str]]


@dataclass
class Bench:
    workdir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    systems: dict[str, System] = field(default_factory=dict)
    ca_file: str = ""
    commands: dict[int, tuple[list[str], dict[str, Any]]] = field(default_factory=dict)
    readiness: dict[int, Ready] = field(default_factory=dict)
    # Listening sockets handed to HAProxy and nginx: ours until the end, so their ports are too.
    held: list[socket.socket] = field(default_factory=list)

    def start(self, command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(command, **kwargs)  # our own binaries and args
        self.processes.append(process)
        self.commands[process.pid] = (command, kwargs)
        return process

    def launch(
        self, command: list[str], ready: Ready, tls: set[str], **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        """Start a proxy, wait until ``ready`` says it serves, and add the systems it names
        (those in ``tls`` speak TLS to clients)."""
        process = self.start(command, **kwargs)
        self.readiness[process.pid] = ready
        for name, url in ready(process).items():
            self.systems[name] = System(name, url, process.pid, name in tls)
        return process

    def hold_sockets(self, names: list[str]) -> dict[str, socket.socket]:
        sockets = held_sockets(names)
        self.held.extend(sockets.values())
        return sockets

    def restart(self, pid: int) -> None:
        """Stop the proxy process ``pid`` and start it again, same command; every system it
        served gets the new pid and URL (HAProxy and nginx get the same sockets again, wsproxy
        binds new ports). ``hold`` measures each system in a fresh process: memory that an
        earlier scenario freed but the allocator kept would otherwise make the later systems look
        cheaper per session than they are."""
        old = next(p for p in self.processes if p.pid == pid)
        # The whole tree (nginx's workers hold the sockets too), at once: a drain would wait
        # out the previous scenario's idle sessions.
        for member in reversed(process_tree(pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGKILL)
        old.wait(timeout=10)
        command, kwargs = self.commands.pop(pid)
        fresh = self.start(command, **kwargs)
        ready = self.readiness[fresh.pid] = self.readiness.pop(pid)
        for name, url in ready(fresh).items():
            self.systems[name].url = url
            self.systems[name].pid = fresh.pid

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for sock in self.held:
            sock.close()


def pinned(command: list[str]) -> list[str]:
    return ["taskset", "-c", PROXY_CORE, *command] if shutil.which("taskset") else command


# --- setup ---------------------------------------------------------------------------------------


def setup() -> int:
    """Install HAProxy and nginx from Debian where missing (needs root)."""
    missing = [tool for tool in ("haproxy", "nginx") if shutil.which(tool) is None]
    if not missing:
        print("haproxy and nginx are installed")
        return 0
    packages = ["haproxy" if tool == "haproxy" else "nginx-light" for tool in missing]
    if os.geteuid() != 0:
        print(f"run as root, or: sudo apt-get install {' '.join(packages)}", file=sys.stderr)
        return 1
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
        check=True,
        env=env,
    )
    # Debian may start the packaged services; the benchmark starts its own instances.
    for service in ("haproxy", "nginx"):
        subprocess.run(["service", service, "stop"], check=False, capture_output=True)
    return 0


# --- the systems ---------------------------------------------------------------------------------


def mint_certificates(workdir: Path) -> tuple[str, str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1, minted by wsproxy's CA module."""
    from wsproxy.ca.authority import CertificateAuthority

    ca = CertificateAuthority(str(workdir / "ca"))
    ca.init("loadtest CA")
    issued = ca.issue_server("bench", ["bench.internal", "localhost"], ["127.0.0.1"])
    return str(ca.store.ca_cert), issued.cert_path, issued.key_path


def start_echo(bench: Bench, cert: str, key: str) -> tuple[int, int]:
    process = bench.start(
        [sys.executable, "-m", "loadtest.echo_target", "--tls-cert", cert, "--tls-key", key],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    ws_port, tls_port = (int(p) for p in process.stdout.readline().split())
    return ws_port, tls_port


def start_wsproxy(
    bench: Bench,
    echo: int,
    echo_tls: int,
    cert: str,
    key: str,
    name: str = "wsproxy",
    wrapper: list[str] | None = None,
    **popen: Any,
) -> subprocess.Popen[bytes]:
    """wsproxy with four listeners, as the systems ``{name}-stream``, ``-ws``, ``-tls`` and
    ``-passthrough``; ``popen`` (``env``, ``cwd``) chooses which wsproxy runs, ``wrapper`` (such
    as valgrind) runs it instead of pinning it to the proxies' core (``loadtest ab``)."""
    # Every listener binds port 0 and says in its log which port it got (loadtest.ports).
    config = bench.workdir / f"{name}.toml"
    config.write_text(
        f"""
[admin]
enabled = false
[listeners.stream]
address = "127.0.0.1:0"
default_target_group = "echo"
max_connections = 100000
[listeners.ws]
address = "127.0.0.1:0"
websocket = true
default_target_group = "echo"
max_connections = 100000
[listeners.tls]
address = "127.0.0.1:0"
protocol = "tls"
websocket = true
default_target_group = "echo"
max_connections = 100000
[listeners.tls.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
[listeners.passthrough]
address = "127.0.0.1:0"
protocol = "tls_passthrough"
default_target_group = "echo-tls"
max_connections = 100000
[target_groups.echo]
targets = [{{ address = "127.0.0.1:{echo}" }}]
[target_groups.echo-tls]
targets = [{{ address = "127.0.0.1:{echo_tls}" }}]
"""
    )
    # No line per connection (as HAProxy and nginx here log nothing either); JSON, for the ports.
    command = [*WSPROXY, "--log-level", "warning", "--log-format", "json", "run", "-c", str(config)]

    def ready(process: subprocess.Popen[bytes]) -> dict[str, str]:
        # Under valgrind, Python takes a minute to import what it took a second for.
        timeout = 300 if wrapper else 20
        ports = announced_ports(process, ("stream", "ws", "tls", "passthrough"), name, timeout)
        return {
            f"{name}-stream": f"ws://127.0.0.1:{ports['stream']}/",
            f"{name}-ws": f"ws://127.0.0.1:{ports['ws']}/",
            f"{name}-tls": f"wss://127.0.0.1:{ports['tls']}/",
            f"{name}-passthrough": f"wss://127.0.0.1:{ports['passthrough']}/",
        }

    tls = {f"{name}-tls", f"{name}-passthrough"}
    command = [*wrapper, *command] if wrapper else pinned(command)
    return bench.launch(command, ready, tls, stderr=subprocess.PIPE, **popen)


def start_haproxy(bench: Bench, echo: int, echo_tls: int, cert: str, key: str) -> None:
    # HAProxy listens on sockets we bound and keep (``bind fd@N``): no port can change hands.
    held = bench.hold_sockets(["tcp", "http", "tls", "passthrough"])
    fds = {name: sock.fileno() for name, sock in held.items()}
    bundle = bench.workdir / "haproxy.pem"
    bundle.write_text(Path(cert).read_text() + Path(key).read_text())
    config = bench.workdir / "haproxy.cfg"
    config.write_text(
        f"""
global
    nbthread 1
    # Two descriptors per session: 9,900 sessions fit under this machine's hard limit (20,000).
    maxconn 9900
    tune.ssl.default-dh-param 2048
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    timeout connect 5s
    timeout client 350s
    timeout server 350s
    timeout tunnel 350s
frontend tcp_in
    mode tcp
    bind fd@{fds["tcp"]}
    default_backend echo_tcp
frontend http_in
    mode http
    bind fd@{fds["http"]}
    default_backend echo_http
frontend tls_in
    mode http
    bind fd@{fds["tls"]} ssl crt {bundle} alpn http/1.1
    default_backend echo_http
frontend passthrough_in
    mode tcp
    bind fd@{fds["passthrough"]}
    default_backend echo_tls
backend echo_tcp
    mode tcp
    server echo 127.0.0.1:{echo}
backend echo_http
    mode http
    server echo 127.0.0.1:{echo}
backend echo_tls
    mode tcp
    server echo 127.0.0.1:{echo_tls}
"""
    )
    urls = {
        "haproxy-tcp": f"ws://127.0.0.1:{port_of(held['tcp'])}/",
        "haproxy-http": f"ws://127.0.0.1:{port_of(held['http'])}/",
        "haproxy-tls": f"wss://127.0.0.1:{port_of(held['tls'])}/",
        "haproxy-passthrough": f"wss://127.0.0.1:{port_of(held['passthrough'])}/",
    }

    def ready(process: subprocess.Popen[bytes]) -> dict[str, str]:
        wait_serving(urls.values(), process, "haproxy", bench.ca_file)
        return urls

    command = pinned(["haproxy", "-db", "-f", str(config)])
    tls = {"haproxy-tls", "haproxy-passthrough"}
    bench.launch(command, ready, tls, pass_fds=tuple(fds.values()))


def start_nginx(bench: Bench, echo: int, echo_tls: int, cert: str, key: str) -> None:
    # nginx listens on sockets we bound and keep: it inherits them through $NGINX (as across
    # a binary upgrade) and uses each for the ``listen`` whose address matches it.
    held = bench.hold_sockets(["http", "tls"])
    ports = {name: port_of(sock) for name, sock in held.items()}
    fds = tuple(sock.fileno() for sock in held.values())
    prefix = bench.workdir / "nginx"
    (prefix / "logs").mkdir(parents=True)
    config = prefix / "nginx.conf"
    user = "user root;" if os.geteuid() == 0 else ""
    config.write_text(
        f"""
{user}
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 19800; }}
http {{
    access_log off;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    upstream echo {{ server 127.0.0.1:{echo}; }}
    server {{
        listen 127.0.0.1:{ports["http"]};
        listen 127.0.0.1:{ports["tls"]} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 350s;
        }}
    }}
}}
"""
    )
    urls = {
        "nginx-http": f"ws://127.0.0.1:{ports['http']}/",
        "nginx-tls": f"wss://127.0.0.1:{ports['tls']}/",
    }

    def ready(process: subprocess.Popen[bytes]) -> dict[str, str]:
        wait_serving(urls.values(), process, "nginx", bench.ca_file)
        return urls

    command = pinned(["nginx", "-p", str(prefix), "-c", str(config)])
    env = {**os.environ, "NGINX": "".join(f"{fd};" for fd in fds)}
    bench.launch(command, ready, {"nginx-tls"}, pass_fds=fds, env=env)


# --- scenarios x systems -------------------------------------------------------------------------


def plan(names: list[str], available: set[str]) -> list[tuple[str, list[str]]]:
    """Which systems each scenario runs against (those that were started)."""
    plain = ["direct", "wsproxy-stream", "wsproxy-ws", "haproxy-tcp", "haproxy-http", "nginx-http"]
    tls = ["direct-tls", "wsproxy-tls", "wsproxy-passthrough", "haproxy-tls",
           "haproxy-passthrough", "nginx-tls"]  # fmt: skip
    hold = ["wsproxy-stream", "wsproxy-ws", "wsproxy-tls", "haproxy-tcp", "haproxy-tls",
            "nginx-tls"]  # fmt: skip
    table = {
        "echo-100": plain,
        "echo-1": plain,
        "throughput": plain,
        "connect-ws": plain,
        "connect-wss": tls,
        "echo-tls": tls,
        "throughput-tls": tls,
        "hold": hold,
    }
    return [(name, [s for s in table[name] if s in available]) for name in names]


async def run_one(scenario: str, system: System, args: argparse.Namespace, ca_file: str) -> Result:
    endpoint = Endpoint.from_url(system.url, cacert=ca_file, server_hostname="bench.internal")
    seconds = args.seconds
    if scenario == "echo-100":
        return await scenarios.echo(
            endpoint, sessions=args.sessions, size=128, seconds=seconds, pid=system.pid
        )
    if scenario == "echo-1":
        return await scenarios.echo(endpoint, sessions=1, size=128, seconds=seconds, pid=system.pid)
    if scenario == "echo-tls":
        return await scenarios.echo(
            endpoint, sessions=args.sessions, size=128, seconds=seconds, pid=system.pid
        )
    if scenario in ("throughput", "throughput-tls"):
        return await scenarios.throughput(
            endpoint, sessions=4, size=args.throughput_size, seconds=seconds, pid=system.pid
        )
    if scenario in ("connect-ws", "connect-wss"):
        return await scenarios.connect(endpoint, workers=16, seconds=seconds, pid=system.pid)
    if scenario == "hold":
        steps = sorted({max(1, args.hold // 9), max(1, args.hold // 3), args.hold})
        return await scenarios.hold(endpoint, steps=steps, pid=system.pid, settle_seconds=1.0)
    raise ValueError(scenario)


def cost_per_op(result: Result) -> tuple[str, float | None]:
    """(unit, proxy CPU per operation) of one run."""
    cpu = result.get("proxy_cpu_seconds")
    kind = result["scenario"]
    if kind == "echo":
        ops = result["messages"]
        return "us/msg", (1e6 * cpu / ops) if cpu is not None and ops else None
    if kind == "throughput":
        gib = 2 * result["bytes_each_way"] / 2**30
        return "s/GiB", (cpu / gib) if cpu is not None and gib else None
    if kind == "connect":
        ops = result["handshakes"]
        return "ms/handshake", (1e3 * cpu / ops) if cpu is not None and ops else None
    return "", None


def rate_of(result: Result) -> tuple[str, float]:
    kind = result["scenario"]
    if kind == "echo":
        return "msg/s", float(result["messages_per_second"])
    if kind == "throughput":
        return "MiB/s", float(result["mib_per_second"])
    if kind == "connect":
        return "handshakes/s", float(result["handshakes_per_second"])
    return "", 0.0


async def measure(bench: Bench, args: argparse.Namespace) -> list[Run]:
    runs: list[Run] = []
    for scenario, systems in plan(args.scenarios, set(bench.systems)):
        rounds = 1 if scenario == "hold" else args.rounds
        for round_no in range(rounds):
            # Alternate the order so drift of the machine hits every system alike.
            ordered = systems if round_no % 2 == 0 else systems[::-1]
            for name in ordered:
                pid = bench.systems[name].pid
                if scenario == "hold" and pid is not None:
                    bench.restart(pid)
                result = await run_one(scenario, bench.systems[name], args, bench.ca_file)
                result.pop("latency_sample", None) if scenario != "echo-1" else None
                runs.append(Run(scenario, name, round_no, result))
                unit, rate = rate_of(result)
                errors = f" errors {result['errors']}" if result.get("errors") else ""
                print(f"[{time.strftime('%H:%M:%S')}] {scenario:<15} {name:<20} round "
                      f"{round_no + 1}: {rate:,.1f} {unit}{errors}", file=sys.stderr)  # fmt: skip
    return runs


# --- report --------------------------------------------------------------------------------------


def summarize(runs: list[Run]) -> dict[str, dict[str, dict[str, Any]]]:
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for scenario in dict.fromkeys(run.scenario for run in runs):
        table[scenario] = {}
        for system in dict.fromkeys(r.system for r in runs if r.scenario == scenario):
            rows = [r.result for r in runs if r.scenario == scenario and r.system == system]
            if scenario == "hold":
                last = rows[0]["steps"][-1]
                table[scenario][system] = {
                    "sessions": last["sessions"],
                    "bytes_per_session": rows[0]["marginal_bytes_per_session"],
                    "alive": rows[0]["alive_at_end"],
                    "errors": rows[0]["errors"],
                    "steps": rows[0]["steps"],
                }
                continue
            unit, _ = rate_of(rows[0])
            rates = [rate_of(row)[1] for row in rows]
            costs = [c for c in (cost_per_op(row)[1] for row in rows) if c is not None]
            median_rate = statistics.median(rates)
            entry: dict[str, Any] = {
                "rate": round(median_rate, 1),
                "rate_unit": unit,
                "spread": round((max(rates) - min(rates)) / median_rate, 3) if median_rate else 0,
                "cpu_per_op": round(statistics.median(costs), 3) if costs else None,
                "cpu_unit": cost_per_op(rows[0])[0],
                "errors": sum(sum(row["errors"].values()) for row in rows),
            }
            if "latency_ms" in rows[0] and rows[0]["latency_ms"]:
                entry["p50_ms"] = round(statistics.median(r["latency_ms"]["p50"] for r in rows), 3)
                entry["p99_ms"] = round(statistics.median(r["latency_ms"]["p99"] for r in rows), 3)
            table[scenario][system] = entry
        for system, entry in table[scenario].items():
            peer = table[scenario].get(HAPROXY_PEER.get(system, ""))
            direct = table[scenario].get("direct") or table[scenario].get("direct-tls")
            if scenario == "hold":
                if peer and peer.get("bytes_per_session") and entry.get("bytes_per_session"):
                    entry["memory_vs_haproxy"] = round(
                        entry["bytes_per_session"] / peer["bytes_per_session"], 2
                    )
                continue
            if direct and direct["rate"]:
                entry["rate_vs_direct"] = round(entry["rate"] / direct["rate"], 2)
            if peer and peer["rate"]:
                entry["rate_vs_haproxy"] = round(entry["rate"] / peer["rate"], 2)
            if peer and peer.get("cpu_per_op") and entry.get("cpu_per_op"):
                # HAProxy's CPU per op / ours: 1.0 = as frugal as HAProxy, higher is better.
                entry["efficiency"] = round(peer["cpu_per_op"] / entry["cpu_per_op"], 2)
            if peer and "p50_ms" in peer and "p50_ms" in entry and peer["p50_ms"]:
                entry["p50_vs_haproxy"] = round(entry["p50_ms"] / peer["p50_ms"], 2)
    return table


def markdown(table: dict[str, dict[str, dict[str, Any]]], args: argparse.Namespace) -> str:
    lines = [
        f"Medians of {args.rounds} rounds x {args.seconds:g} s; proxies pinned to core "
        f"{PROXY_CORE}, load generator and echo target on core {LOAD_CORE}. Efficiency = HAProxy's "
        "CPU per operation / wsproxy's (HAProxy `mode tcp` for stream and websocket, "
        "HAProxy TLS for TLS termination, HAProxy `mode tcp` on the TLS port for passthrough).",
        "",
    ]
    for scenario, systems in table.items():
        lines.append(f"### {scenario}")
        lines.append("")
        if scenario == "hold":
            lines.append("| system | sessions | alive | bytes/session (marginal) | vs HAProxy |")
            lines.append("|---|---|---|---|---|")
            for system, e in systems.items():
                lines.append(
                    f"| {system} | {e['sessions']} | {e['alive']} | {e.get('bytes_per_session')}"
                    f" | {e.get('memory_vs_haproxy', '')} |"
                )
            lines.append("")
            continue
        first = next(iter(systems.values()))
        lines.append(
            f"| system | {first['rate_unit']} | spread | vs direct | vs HAProxy | p50 ms | "
            f"p99 ms | CPU {first['cpu_unit']} | efficiency | errors |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for system, e in systems.items():
            lines.append(
                f"| {system} | {e['rate']:,} | {e['spread']:.0%} | {e.get('rate_vs_direct', '')} "
                f"| {e.get('rate_vs_haproxy', '')} | {e.get('p50_ms', '')} | {e.get('p99_ms', '')}"
                f" | {e['cpu_per_op'] if e['cpu_per_op'] is not None else ''} "
                f"| {e.get('efficiency', '')} | {e['errors']} |"
            )
        lines.append("")
    return "\n".join(lines)


def charts(table: dict[str, dict[str, dict[str, Any]]], runs: list[Run], out: Path) -> list[str]:
    """Bars of CPU per operation per scenario, latency CDFs (1 session), RSS per session."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no charts (pip install -e '.[loadtest]')", file=sys.stderr)
        return []
    written = []
    measured = [s for s in table if s != "hold"]
    if measured:
        figure, axes = plt.subplots(len(measured), 1, figsize=(9, 2.6 * len(measured)))
        for axis, scenario in zip(list(getattr(axes, "flat", [axes])), measured, strict=True):
            systems = [s for s, e in table[scenario].items() if e.get("cpu_per_op") is not None]
            values = [table[scenario][s]["cpu_per_op"] for s in systems]
            colors = ["#1f6feb" if s.startswith("wsproxy") else "#8b949e" for s in systems]
            axis.barh(systems, values, color=colors)
            unit = next(iter(table[scenario].values()))["cpu_unit"]
            axis.set_title(f"{scenario}: proxy CPU per operation ({unit}, lower is better)")
        figure.tight_layout()
        path = out / "cpu_per_operation.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(str(path))
    samples = [(r.system, r.result.get("latency_sample")) for r in runs if r.scenario == "echo-1"]
    if samples:
        figure, axis = plt.subplots(figsize=(9, 4))
        for system in dict.fromkeys(name for name, _ in samples):
            pooled = sorted(v * 1000 for name, s in samples if name == system for v in s or [])
            if pooled:
                axis.plot(pooled, [i / len(pooled) for i in range(len(pooled))], label=system)
        axis.set_xscale("log")
        axis.set_xlabel("round-trip latency, ms (1 session, 128 B)")
        axis.set_ylabel("fraction of messages")
        axis.legend()
        figure.tight_layout()
        path = out / "latency_cdf.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(str(path))
    if "hold" in table:
        figure, axis = plt.subplots(figsize=(9, 4))
        for system, entry in table["hold"].items():
            points = [
                (s["sessions"], s["rss_bytes"] / 2**20) for s in entry["steps"] if "rss_bytes" in s
            ]
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=system)
        axis.set_xlabel("idle sessions")
        axis.set_ylabel("proxy RSS, MiB")
        axis.legend()
        figure.tight_layout()
        path = out / "rss_vs_sessions.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(str(path))
    return written


# --- entry point ---------------------------------------------------------------------------------


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("compare", help="wsproxy vs direct vs HAProxy (vs nginx)")
    parser.add_argument("--rounds", type=int, default=3, help="at least 1, at most 20")
    parser.add_argument("--seconds", type=float, default=4.0, help="per system, scenario, round")
    parser.add_argument("--sessions", type=int, default=100, help="sessions of echo-100/echo-tls")
    parser.add_argument("--throughput-size", type=int, default=64 * 1024)
    parser.add_argument("--hold", type=int, default=9000, help="idle sessions in the hold test")
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS))
    parser.add_argument(
        "--systems",
        default="direct,wsproxy,haproxy,nginx",
        help="any of direct, wsproxy, haproxy, nginx (missing programs are skipped)",
    )
    parser.add_argument("--out", default="loadtest/results", help="where reports are written")


def run_compare(args: argparse.Namespace) -> int:
    args.rounds = max(1, min(args.rounds, 20))
    args.seconds = min(max(args.seconds, 0.2), 120.0)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(args.scenarios) - set(DEFAULT_SCENARIOS)
    if unknown:
        print(f"unknown scenarios: {sorted(unknown)}", file=sys.stderr)
        return 2
    wanted = set(args.systems.split(","))
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {LOAD_CORE})  # the load generator and the echo target
    scenarios.raise_fd_limit()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="wsproxy-compare-") as name:
        bench = Bench(Path(name))
        try:
            bench.ca_file, cert, key = mint_certificates(bench.workdir)
            echo, echo_tls = start_echo(bench, cert, key)
            if "direct" in wanted:
                bench.systems["direct"] = System("direct", f"ws://127.0.0.1:{echo}/", None)
                bench.systems["direct-tls"] = System(
                    "direct-tls", f"wss://127.0.0.1:{echo_tls}/", None, True
                )
            if "wsproxy" in wanted:
                start_wsproxy(bench, echo, echo_tls, cert, key)
            for tool, starter in (("haproxy", start_haproxy), ("nginx", start_nginx)):
                if tool not in wanted:
                    continue
                if shutil.which(tool) is None:
                    print(
                        f"{tool} not installed: skipped (python -m loadtest setup)", file=sys.stderr
                    )
                    continue
                starter(bench, echo, echo_tls, cert, key)
            runs = uvloop.run(measure(bench, args))
        finally:
            bench.stop_all()
    table = summarize(runs)
    report = markdown(table, args)
    written = charts(table, runs, out)
    (out / "results.md").write_text(report + "\n")
    document = {
        "settings": vars(args),
        "machine": machine(),
        "summary": table,
        "runs": [
            {
                "scenario": run.scenario,
                "system": run.system,
                "round": run.round,
                "result": {k: v for k, v in run.result.items() if k != "latency_sample"},
            }
            for run in runs
        ],
    }
    (out / "results.json").write_text(json.dumps(document, indent=1))
    print(json.dumps({"summary": table, "seconds": round(time.monotonic() - started, 1)}))
    print(report)
    print(f"written: {out / 'results.md'}, {out / 'results.json'}, {', '.join(written)}")
    return 0


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    for tool in ("haproxy", "nginx"):
        if shutil.which(tool):
            result = subprocess.run([tool, "-v"], capture_output=True, text=True, check=False)
            text = result.stdout or result.stderr
            info[tool] = text.splitlines()[0] if text else "?"
    return info
