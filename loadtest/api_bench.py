"""``python -m loadtest api-messages | api-push | api-fanout``: the benchmarks of the WebSocket
API mode (issue 14), each against a wsproxy of its own.

Every run starts, on the loopback: an HTTP echo integration (aiohttp, ``loadtest.api_parts
integration``); wsproxy in its own process with one API listener (``$default`` to the echo,
``respond = true``; push and fan-out add a ``$connect`` route that records each connection id)
and its admin listener, which serves the @connections API; and the load in processes of their
own. wsproxy is pinned to core 0 (``taskset``), everything else to core 1, as in ``compare``;
the proxy's CPU comes from ``/proc`` (``procstat``). Every process is stopped by its PID.

- ``api-messages``: N clients send M messages each, one at a time, through the proxy to the
  integration and await each answer. Then, in the same run, the reference: the integration
  called directly by a pooled aiohttp ClientSession (same callers, bodies and headers, pinned to
  the proxy's core), whose process CPU per call is what the proxy's CPU per message is held
  against (target: at most 2x).
- ``api-push``: K connected clients; D driver processes POST ``/@connections/{id}`` (pooled
  keep-alive aiohttp, C requests in flight each) for T seconds or N requests; POSTs/s answered
  200 on one worker (target: at least 5,000/s), and whether the clients got every one.
- ``api-fanout``: G clients (over P processes) joined to one group by ``PUT``, then R group
  POSTs; messages delivered per second until every client got all R (target: at least
  100,000/s), and ``dropped_slow``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import aiohttp
import uvloop

from loadtest.client import Endpoint
from loadtest.compare import LOAD_CORE, pinned
from loadtest.ports import WSPROXY, announced_ports
from loadtest.procstat import cpu_seconds
from loadtest.pyspy import Recording, top
from loadtest.scenarios import (
    CpuWindow,
    Reservoir,
    close_all,
    open_many,
    percentiles_ms,
    raise_fd_limit,
)
from loadtest.wsproto import OP_TEXT

PARTS = [sys.executable, "-m", "loadtest.api_parts"]
MAX_CLIENTS = 15_000  # the fd hard limit here is 20,000; the proxy holds one per client
MAX_MESSAGES = 100_000
MAX_SECONDS = 600.0
DELIVERY_TIMEOUT = 120.0  # for the last pushed or fanned-out message to reach its client
ROOT = Path(__file__).resolve().parent.parent


def add_parser(commands: Any) -> None:
    messages = commands.add_parser(
        "api-messages", help="messages/s and proxy CPU per message through an API listener"
    )
    messages.add_argument("--clients", type=int, default=100, help="WebSocket clients at once")
    messages.add_argument("--messages", type=int, default=200, help="messages per client")
    messages.add_argument("--size", type=int, default=128, help="bytes per message (JSON text)")
    push = commands.add_parser("api-push", help="POST /@connections/{id} per second")
    push.add_argument("--clients", type=int, default=100, help="connected clients")
    push.add_argument("--seconds", type=float, default=10.0, help="how long the drivers POST")
    push.add_argument("--requests", type=int, default=100_000, help="at most this many POSTs")
    push.add_argument("--concurrency", type=int, default=64, help="POSTs in flight per driver")
    push.add_argument("--drivers", type=int, default=1, help="driver processes")
    push.add_argument("--size", type=int, default=64, help="bytes per pushed message")
    fanout = commands.add_parser("api-fanout", help="group fan-out to many members")
    fanout.add_argument("--clients", type=int, default=10_000, help="members of the group")
    fanout.add_argument("--rounds", type=int, default=10, help="group POSTs, one after another")
    fanout.add_argument("--size", type=int, default=64, help="bytes per message")
    fanout.add_argument("--concurrency", type=int, default=64, help="PUT joins in flight")
    for parser in (messages, push, fanout):
        parser.add_argument(
            "--client-processes", type=int, default=0, help="0: one per 2,500 clients"
        )
        parser.add_argument("--json", help="also write the result to this file")
        parser.add_argument(
            "--profile",
            help="py-spy the proxy over the measured window into this file (collapsed stacks); "
            "the result then names the top functions",
        )
        parser.add_argument("--py-spy", help="the py-spy program (default: on PATH)")


# --- the processes ---------------------------------------------------------------------------


class Bench:
    """The processes of one run, each stopped by its PID at the end."""

    def __init__(
        self, workdir: Path, profile: str | None = None, py_spy: str | None = None
    ) -> None:
        self.workdir = workdir
        self.processes: list[subprocess.Popen[bytes]] = []
        self.profile = Path(profile) if profile else None
        self.py_spy = py_spy
        self.profiled: dict[str, Any] | None = None

    @contextlib.contextmanager
    def window(self, pid: int) -> Iterator[None]:
        """The measured window: with ``--profile``, py-spy samples ``pid`` while it lasts."""
        if self.profile is None:
            yield
            return
        recording = Recording(pid, self.profile, self.py_spy)
        try:
            yield
        finally:
            recording.stop()
        self.profiled = top(self.profile)

    def start(self, command: list[str], **popen: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(command, cwd=ROOT, **popen)
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        # Clients first (their stdin closes: they close their sessions), the proxy last.
        for process in self.processes:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
        for process in reversed(self.processes):
            try:
                process.wait(timeout=10 if process.stdin is not None else 0.01)
            except subprocess.TimeoutExpired:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def read_json(pipe: IO[bytes] | None, what: str) -> dict[str, Any]:
    assert pipe is not None
    line = pipe.readline()
    if not line:
        raise RuntimeError(f"{what} exited without an answer")
    value: dict[str, Any] = json.loads(line)
    return value


def start_integration(bench: Bench) -> int:
    process = bench.start([*PARTS, "integration"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdout is not None
    return int(process.stdout.readline())


def start_proxy(
    bench: Bench, integration: int, *, connect: bool, clients: int
) -> tuple[int, int, int]:
    """wsproxy with one API listener and its admin listener, pinned to the proxies' core:
    (pid, the listener's port, the admin port)."""
    connect_route = (
        '[[apis.bench.routes]]\nkey = "$connect"\ntarget_group = "echo"\npath = "/connect"\n'
        if connect
        else ""
    )
    config = bench.workdir / "api.toml"
    config.write_text(
        f"""
[admin]
address = "127.0.0.1:0"
[listeners.api]
address = "127.0.0.1:0"
api = "bench"
max_connections = {max(clients + 100, 1000)}
[apis.bench]
[[apis.bench.routes]]
key = "$default"
target_group = "echo"
path = "/echo"
respond = true
{connect_route}
[target_groups.echo]
protocol = "http"
targets = [{{ address = "127.0.0.1:{integration}" }}]
"""
    )
    command = [*WSPROXY, "--log-level", "warning", "--log-format", "json", "run", "-c", str(config)]
    process = bench.start(pinned(command), stderr=subprocess.PIPE)
    ports = announced_ports(process, ["api", "admin"], "wsproxy")
    return process.pid, ports["api"], ports["admin"]


def start_clients(
    bench: Bench, url: str, count: int, processes: int
) -> list[subprocess.Popen[bytes]]:
    """``count`` counting sessions over ``processes`` processes, all open when this returns."""
    processes = max(1, min(processes or -(-count // 2500), count))
    shares = [count // processes + (1 if i < count % processes else 0) for i in range(processes)]
    started = [
        bench.start(
            [*PARTS, "clients", url, str(share)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        for share in shares
    ]
    errors: Counter[str] = Counter()
    opened = 0
    for process in started:
        answer = read_json(process.stdout, "a client process")
        opened += answer["opened"]
        errors.update(answer["errors"])
    if opened != count:
        raise RuntimeError(f"{opened} of {count} sessions opened; errors {dict(errors)}")
    return started


def reports(clients: list[subprocess.Popen[bytes]]) -> list[dict[str, Any]]:
    for process in clients:
        assert process.stdin is not None
        process.stdin.write(b"report\n")
        process.stdin.flush()
    return [read_json(process.stdout, "a client process") for process in clients]


def wait_received(clients: list[subprocess.Popen[bytes]], expected: int) -> list[dict[str, Any]]:
    """Ask the clients what they received until it adds up to ``expected`` (or stops growing
    for ``DELIVERY_TIMEOUT`` s): their last answers."""
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while True:
        answers = reports(clients)
        if sum(a["received"] for a in answers) >= expected or time.monotonic() > deadline:
            return answers
        time.sleep(0.05)


def connection_ids(integration: int, expected: int) -> list[str]:
    """The ids $connect recorded (every client is open, so every $connect call is done)."""
    url = f"http://127.0.0.1:{integration}/ids"  # our own loopback server
    with urllib.request.urlopen(url, timeout=30) as answer:
        ids: list[str] = json.loads(answer.read())
    if len(ids) != expected:
        raise RuntimeError(f"$connect recorded {len(ids)} ids for {expected} sessions")
    return ids


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# --- api-messages ----------------------------------------------------------------------------


async def drive_messages(
    bench: Bench, url: str, clients: int, messages: int, size: int, pid: int
) -> dict[str, Any]:
    from loadtest.api_parts import message

    raise_fd_limit()
    endpoint = Endpoint.from_url(url)
    payload = message(size)
    errors: Counter[str] = Counter()
    latencies = Reservoir()
    sessions = await open_many(endpoint, clients, errors)

    async def one(session: Any, count: int, measure: bool) -> int:
        done = 0
        for _ in range(count):
            started = time.perf_counter()
            session.send(payload, OP_TEXT)
            try:
                async with asyncio.timeout(30):
                    _, data = await session.receive()
            except (OSError, TimeoutError) as exc:
                errors[type(exc).__name__] += 1
                break
            if data != payload:
                errors["answer_mismatch"] += 1
                break
            if measure:
                latencies.add(time.perf_counter() - started)
            done += 1
        return done

    # One message each first: the proxy's pool to the integration holds its connections.
    await asyncio.gather(*(one(session, 1, False) for session in sessions))
    with bench.window(pid):
        window = CpuWindow(pid)
        done = await asyncio.gather(*(one(session, messages, True) for session in sessions))
        elapsed, cpu = window.finish()
    await close_all(sessions)
    total = sum(done)
    return {
        "clients": len(sessions),
        "messages": total,
        "seconds": round(elapsed, 3),
        "messages_per_second": round(total / elapsed, 1),
        "proxy_cpu_seconds": cpu,
        "proxy_cpu_us_per_message": round(1e6 * (cpu or 0) / max(total, 1), 2),
        "latency_ms": percentiles_ms(latencies.values),
        "errors": dict(errors),
    }


def run_messages(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    clients = min(max(args.clients, 1), MAX_CLIENTS)
    messages = min(max(args.messages, 1), MAX_MESSAGES)
    integration = start_integration(bench)
    pid, port, _admin = start_proxy(bench, integration, connect=False, clients=clients)
    proxy = uvloop.run(
        drive_messages(bench, f"ws://127.0.0.1:{port}/", clients, messages, args.size, pid)
    )
    # The reference on the proxy's core, while the proxy idles.
    reference_process = bench.start(
        pinned([*PARTS, "reference", f"http://127.0.0.1:{integration}/echo", str(clients),
                str(messages), str(args.size)]),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    reference = read_json(reference_process.stdout, "the reference client")
    reference_process.wait(timeout=30)
    calls = reference["calls"]
    reference_us = 1e6 * reference["cpu_seconds"] / max(calls, 1)
    reference.update(
        calls_per_second=round(calls / reference["seconds"], 1),
        cpu_us_per_call=round(reference_us, 2),
        seconds=round(reference["seconds"], 3),
    )
    ratio = proxy["proxy_cpu_us_per_message"] / reference_us if reference_us else None
    return {
        "scenario": "api-messages",
        "size": args.size,
        "messages_per_client": messages,
        "proxy": proxy,
        "reference": reference,
        "cpu_ratio": round(ratio, 2) if ratio is not None else None,
        "target": "cpu_ratio <= 2.0",
        "met": ratio is not None and ratio <= 2.0,
    }


# --- api-push --------------------------------------------------------------------------------


def run_push(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    clients = min(max(args.clients, 1), MAX_CLIENTS)
    seconds = min(max(args.seconds, 0.1), MAX_SECONDS)
    requests = max(args.requests, 1)
    drivers = min(max(args.drivers, 1), 8)
    integration = start_integration(bench)
    pid, port, admin = start_proxy(bench, integration, connect=True, clients=clients)
    sessions = start_clients(bench, f"ws://127.0.0.1:{port}/", clients, args.client_processes)
    ids = connection_ids(integration, clients)
    ids_file = bench.workdir / "ids.json"
    ids_file.write_text(json.dumps(ids))
    shares = [requests // drivers + (1 if i < requests % drivers else 0) for i in range(drivers)]
    base = f"http://127.0.0.1:{admin}"
    settings = [str(seconds), str(max(1, args.concurrency)), str(args.size)]
    with bench.window(pid):
        cpu = cpu_seconds(pid)
        started = [
            bench.start(
                [*PARTS, "push", base, str(ids_file), settings[0], str(share), *settings[1:]],
                stdout=subprocess.PIPE,
            )
            for share in shares
        ]
        parts = [read_json(process.stdout, "a push driver") for process in started]
        cpu = cpu_seconds(pid) - cpu
    statuses: Counter[str] = Counter()
    for part in parts:
        statuses.update(part["statuses"])
    accepted = statuses.get("200", 0)
    window = max(part["seconds"] for part in parts)
    received = wait_received(sessions, accepted)
    got = sum(answer["received"] for answer in received)
    driver_cpu = sum(part["cpu_seconds"] for part in parts)
    rate = accepted / window
    return {
        "scenario": "api-push",
        "clients": clients,
        "drivers": drivers,
        "concurrency_per_driver": args.concurrency,
        "size": args.size,
        "posts": sum(statuses.values()),
        "statuses": dict(statuses),
        "seconds": round(window, 3),
        "posts_per_second": round(rate, 1),
        "proxy_cpu_seconds": round(cpu, 3),
        "proxy_cpu_us_per_post": round(1e6 * cpu / max(accepted, 1), 2),
        "proxy_core_busy": round(cpu / window, 2),
        # What the proxy would answer with its core busy all the time: the figure to read when
        # the drivers (sharing the load core) are what saturates.
        "proxy_capacity_per_second": round(accepted / cpu, 1) if cpu else None,
        "driver_cpu_us_per_post": round(1e6 * driver_cpu / max(accepted, 1), 2),
        "received": got,
        "all_received": got == accepted,
        "target": "posts_per_second >= 5000",
        "met": rate >= 5000 and got == accepted,
    }


# --- api-fanout ------------------------------------------------------------------------------


async def join_and_post(
    bench: Bench, admin: int, ids: list[str], rounds: int, size: int, concurrency: int, pid: int
) -> dict[str, Any]:
    from loadtest.api_parts import message

    base = f"http://127.0.0.1:{admin}"
    payload = message(size, "fanout")
    statuses: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        queue = list(ids)

        async def joiner() -> None:
            while queue:
                cid = queue.pop()
                async with session.put(f"{base}/@groups/all/connections/{cid}") as answer:
                    statuses[str(answer.status)] += 1

        await asyncio.gather(*(joiner() for _ in range(concurrency)))
        join_seconds = time.perf_counter() - started
        if statuses != Counter({"204": len(ids)}):
            raise RuntimeError(f"joins answered {dict(statuses)}")
        answers = []
        with bench.window(pid):
            cpu = cpu_seconds(pid)
            posted_at = time.monotonic()
            for _ in range(rounds):
                async with session.post(
                    f"{base}/@groups/all",
                    data=payload,
                    headers={"Content-Type": "application/json"},
                ) as answer:
                    answers.append(await answer.json())
            post_seconds = time.monotonic() - posted_at
            post_cpu = cpu_seconds(pid) - cpu
    return {
        "joins_per_second": round(len(ids) / join_seconds, 1),
        "posted_at": posted_at,
        "post_seconds": post_seconds,
        "proxy_cpu_seconds": post_cpu,
        "delivered": sum(a["delivered"] for a in answers),
        "dropped_slow": sum(a["dropped_slow"] for a in answers),
    }


def run_fanout(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    clients = min(max(args.clients, 1), MAX_CLIENTS)
    rounds = min(max(args.rounds, 1), 1000)
    integration = start_integration(bench)
    pid, port, admin = start_proxy(bench, integration, connect=True, clients=clients)
    sessions = start_clients(bench, f"ws://127.0.0.1:{port}/", clients, args.client_processes)
    ids = connection_ids(integration, clients)
    posted = uvloop.run(
        join_and_post(bench, admin, ids, rounds, args.size, max(1, args.concurrency), pid)
    )
    received = wait_received(sessions, posted["delivered"])
    got = sum(answer["received"] for answer in received)
    seconds = max(answer["last_at"] for answer in received) - posted["posted_at"]
    rate = posted["delivered"] / seconds if seconds > 0 else 0.0
    cpu = posted["proxy_cpu_seconds"]
    return {
        "scenario": "api-fanout",
        "members": clients,
        "client_processes": len(sessions),
        "rounds": rounds,
        "size": args.size,
        "joins_per_second": posted["joins_per_second"],
        "delivered": posted["delivered"],
        "dropped_slow": posted["dropped_slow"],
        "received": got,
        "fewest_per_client": min(answer["min"] for answer in received),
        "seconds_until_all_received": round(seconds, 3),
        "delivered_per_second": round(rate, 1),
        "seconds_of_posts": round(posted["post_seconds"], 3),
        "delivered_per_second_of_posts": round(
            posted["delivered"] / max(posted["post_seconds"], 1e-9), 1
        ),
        "proxy_cpu_seconds_of_posts": round(cpu, 3),
        "proxy_cpu_us_per_delivered": round(1e6 * cpu / max(posted["delivered"], 1), 2),
        "proxy_capacity_per_second": round(posted["delivered"] / cpu, 1) if cpu else None,
        "target": "delivered_per_second >= 100000",
        "met": rate >= 100_000 and got == posted["delivered"],
    }


# --- the command -----------------------------------------------------------------------------


def summary(result: dict[str, Any]) -> str:
    kind = result["scenario"]
    verdict = "met" if result["met"] else "MISSED"
    if kind == "api-messages":
        proxy, reference = result["proxy"], result["reference"]
        return (
            f"api-messages: {proxy['clients']} clients x {result['messages_per_client']} x "
            f"{result['size']} B: {proxy['messages_per_second']:,.0f} messages/s, proxy CPU "
            f"{proxy['proxy_cpu_us_per_message']} us/message; aiohttp client "
            f"{reference['cpu_us_per_call']} us/call ({reference['calls_per_second']:,.0f} "
            f"calls/s); ratio {result['cpu_ratio']} (target <= 2: {verdict}); "
            f"errors {proxy['errors'] or reference['errors'] or 'none'}"
        )
    if kind == "api-push":
        return (
            f"api-push: {result['posts_per_second']:,.0f} POST /@connections/s accepted "
            f"(target >= 5,000: {verdict}), proxy CPU {result['proxy_cpu_us_per_post']} us/POST "
            f"(core {100 * result['proxy_core_busy']:.0f} % busy: at most about "
            f"{result['proxy_capacity_per_second'] or 0:,.0f}/s), statuses {result['statuses']}, "
            f"received {result['received']} (all: {result['all_received']})"
        )
    return (
        f"api-fanout: {result['members']:,} members x {result['rounds']} POSTs: "
        f"{result['delivered_per_second']:,.0f} messages/s delivered until every client had "
        f"all (target >= 100,000: {verdict}); the POSTs alone "
        f"{result['delivered_per_second_of_posts']:,.0f}/s, proxy CPU "
        f"{result['proxy_cpu_us_per_delivered']} us/message; dropped_slow "
        f"{result['dropped_slow']}, received {result['received']}/{result['delivered']}"
    )


def run_api(args: argparse.Namespace) -> int:
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {LOAD_CORE})  # this process and what it starts (not the proxy)
    raise_fd_limit()
    runs = {"api-messages": run_messages, "api-push": run_push, "api-fanout": run_fanout}
    with tempfile.TemporaryDirectory(prefix="wsproxy-api-bench-") as workdir:
        bench = Bench(Path(workdir), args.profile, args.py_spy)
        try:
            result = runs[args.command](args, bench)
        finally:
            bench.stop_all()
    if bench.profiled is not None:
        result["profile"] = {"file": args.profile, **bench.profiled}
    result["command"] = "python -m loadtest " + shlex.join(sys.argv[1:])
    result["machine"] = machine()
    line = json.dumps(result, separators=(",", ":"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(line)
    print(summary(result))
    return 0
