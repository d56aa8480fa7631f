"""The load scenarios: echo, throughput, connect, hold, sweep. Each returns a JSON-ready dict.

Every loop is bounded by a duration and/or a count. With ``pid`` (the proxy under test), the
proxy's CPU time over the measured window is recorded, which gives CPU per operation: the figure
that stays steady when the load generator, not the proxy, is what saturates.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from loadtest.client import Endpoint, Session, open_session
from loadtest.procstat import cpu_seconds, open_fds, rss_bytes

Result = dict[str, Any]
Progress = Callable[[str], None]
LATENCY_SAMPLE = 20_000  # latencies kept per process (reservoir), enough for p99.9


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Reservoir:
    """A uniform sample of at most ``size`` values (Vitter's algorithm R)."""

    def __init__(self, size: int = LATENCY_SAMPLE, seed: int = 1) -> None:
        self.size = size
        self.values: list[float] = []
        self.seen = 0
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
        else:
            slot = self._rng.randrange(self.seen)
            if slot < self.size:
                self.values[slot] = value


def percentiles_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": round(1000 * ordered[-1], 3)}


def error_kind(error: BaseException) -> str:
    return type(error).__name__


async def open_many(
    endpoint: Endpoint, count: int, errors: Counter[str], parallel: int = 200
) -> list[Session]:
    """Open ``count`` sessions, at most ``parallel`` handshakes at a time."""
    sessions: list[Session] = []
    gate = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with gate:
            try:
                sessions.append(await open_session(endpoint))
            except (OSError, TimeoutError, Exception) as exc:  # noqa: BLE001  # counted by kind
                errors[error_kind(exc)] += 1

    await asyncio.gather(*(one() for _ in range(count)))
    return sessions


async def close_all(sessions: list[Session]) -> None:
    await asyncio.gather(*(session.close(timeout=2.0) for session in sessions))


class CpuWindow:
    """The proxy's CPU seconds over a window (None when no pid was given)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.started = time.perf_counter()
        self.cpu = cpu_seconds(pid) if pid else 0.0

    def finish(self) -> tuple[float, float | None]:
        elapsed = time.perf_counter() - self.started
        used = cpu_seconds(self.pid) - self.cpu if self.pid else None
        return elapsed, used


async def drive(
    endpoint: Endpoint,
    sessions: int,
    pid: int | None,
    errors: Counter[str],
    seconds: float,
    run: Callable[[Session, float], Awaitable[int]],
) -> tuple[int, int, float, float | None]:
    """Open ``sessions``, run ``run(session, deadline)`` on each at once (connection errors are
    counted), close them. Returns (sessions opened, sum of what ``run`` returned, seconds, proxy
    CPU seconds over the measured window)."""
    opened = await open_many(endpoint, sessions, errors)
    window = CpuWindow(pid)
    deadline = window.started + seconds

    async def guarded(session: Session) -> int:
        try:
            return await run(session, deadline)
        except (OSError, TimeoutError) as exc:
            errors[error_kind(exc)] += 1
            return 0

    counts = await asyncio.gather(*(guarded(session) for session in opened))
    elapsed, cpu = window.finish()
    await close_all(opened)
    return len(opened), sum(counts), elapsed, cpu


async def echo(
    endpoint: Endpoint, *, sessions: int, size: int, seconds: float, pid: int | None = None
) -> Result:
    """C sessions, each sending an S-byte message and awaiting its echo, for D seconds."""
    errors: Counter[str] = Counter()
    payload = os.urandom(size)
    latencies = Reservoir()

    async def ping_pong(session: Session, deadline: float) -> int:
        count = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            session.send(payload)
            _, data = await session.receive()
            if data != payload:
                errors["echo_mismatch"] += 1
                break
            latencies.add(time.perf_counter() - started)
            count += 1
        return count

    opened, messages, elapsed, cpu = await drive(
        endpoint, sessions, pid, errors, seconds, ping_pong
    )
    return {
        "scenario": "echo",
        "sessions": opened,
        "size": size,
        "messages": messages,
        "seconds": round(elapsed, 3),
        "messages_per_second": round(messages / elapsed, 1),
        "latency_ms": percentiles_ms(latencies.values),
        "latency_sample": latencies.values,
        "errors": dict(errors),
        "proxy_cpu_seconds": cpu,
    }


async def throughput(
    endpoint: Endpoint,
    *,
    sessions: int,
    size: int,
    seconds: float,
    window_messages: int = 4,
    pid: int | None = None,
) -> Result:
    """A few sessions streaming S-byte messages both ways, ``window_messages`` in flight each."""
    errors: Counter[str] = Counter()
    payload = os.urandom(size)

    async def stream(session: Session, deadline: float) -> int:
        echoed = in_flight = 0
        while time.perf_counter() < deadline or in_flight:
            while in_flight < window_messages and time.perf_counter() < deadline:
                session.send(payload)
                in_flight += 1
            _, data = await session.receive()
            in_flight -= 1
            if len(data) != size:
                errors["echo_mismatch"] += 1
                break
            echoed += len(data)
        return echoed

    opened, echoed, elapsed, cpu = await drive(endpoint, sessions, pid, errors, seconds, stream)
    return {
        "scenario": "throughput",
        "sessions": opened,
        "size": size,
        "bytes_each_way": echoed,
        "seconds": round(elapsed, 3),
        "mib_per_second": round(echoed / elapsed / 2**20, 2),
        "errors": dict(errors),
        "proxy_cpu_seconds": cpu,
    }


async def connect(
    endpoint: Endpoint, *, workers: int, seconds: float, pid: int | None = None
) -> Result:
    """Open (TCP, TLS if wss, upgrade) and close sessions as fast as W workers can."""
    errors: Counter[str] = Counter()
    latencies = Reservoir()
    window = CpuWindow(pid)
    deadline = window.started + seconds

    async def worker() -> int:
        done = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                session = await open_session(endpoint)
            except Exception as exc:  # noqa: BLE001  # every failure is counted by kind
                errors[error_kind(exc)] += 1
                await asyncio.sleep(0.01)
                continue
            latencies.add(time.perf_counter() - started)
            await session.close(timeout=2.0)
            done += 1
        return done

    counts = await asyncio.gather(*(worker() for _ in range(workers)))
    elapsed, cpu = window.finish()
    handshakes = sum(counts)
    return {
        "scenario": "connect",
        "workers": workers,
        "tls": endpoint.tls is not None,
        "handshakes": handshakes,
        "seconds": round(elapsed, 3),
        "handshakes_per_second": round(handshakes / elapsed, 1),
        "latency_ms": percentiles_ms(latencies.values),
        "latency_sample": latencies.values,
        "errors": dict(errors),
        "proxy_cpu_seconds": cpu,
    }


async def hold(
    endpoint: Endpoint,
    *,
    steps: list[int],
    pid: int | None,
    settle_seconds: float = 1.0,
    progress: Progress | None = None,
) -> Result:
    """Open idle sessions in steps; sample the proxy's RSS and descriptors at each step."""
    raise_fd_limit()
    errors: Counter[str] = Counter()
    sessions: list[Session] = []
    baseline_rss = rss_bytes(pid) if pid else 0
    baseline_fds = open_fds(pid) if pid else 0
    samples = []
    try:
        for step in sorted(steps):
            sessions += await open_many(endpoint, step - len(sessions), errors)
            await asyncio.sleep(settle_seconds)
            sample: dict[str, Any] = {"sessions": len(sessions)}
            if pid:
                rss, fds = rss_bytes(pid), open_fds(pid)
                sample |= {
                    "rss_bytes": rss,
                    "fds": fds,
                    "bytes_per_session": round((rss - baseline_rss) / max(1, len(sessions))),
                }
            samples.append(sample)
            if progress:
                progress(f"hold: {sample}")
        alive = await count_alive(sessions)
    finally:
        for session in sessions:
            session.abort()
    marginal = None
    if pid and len(samples) >= 2 and samples[-1]["sessions"] > samples[0]["sessions"]:
        # The slope between the first and last step: what one more session costs, free of the
        # allocator warm-up that the first sessions (and earlier traffic) pay for.
        added = samples[-1]["sessions"] - samples[0]["sessions"]
        marginal = round((samples[-1]["rss_bytes"] - samples[0]["rss_bytes"]) / added)
    return {
        "scenario": "hold",
        "marginal_bytes_per_session": marginal,
        "baseline_rss_bytes": baseline_rss,
        "baseline_fds": baseline_fds,
        "steps": samples,
        "alive_at_end": alive,
        "errors": dict(errors),
    }


async def count_alive(sessions: list[Session], timeout: float = 20.0) -> int:
    """Each session echoes one small message (bounded wait): how many are still fully alive."""

    async def check(session: Session) -> bool:
        try:
            session.send(b"alive?")
            async with asyncio.timeout(timeout):
                _, data = await session.receive()
        except (OSError, TimeoutError):
            return False
        return data == b"alive?"

    results = await asyncio.gather(*(check(session) for session in sessions))
    return sum(results)


async def sweep(
    run_one: Callable[[int], Awaitable[Result]], values: list[int], progress: Progress | None
) -> Result:
    """The same scenario over a range of one parameter."""
    points = []
    for value in values:
        result = await run_one(value)
        result.pop("latency_sample", None)
        points.append(result)
        if progress:
            progress(f"sweep {value}: {result.get('messages_per_second')} msg/s")
    return {"scenario": "sweep", "points": points}
