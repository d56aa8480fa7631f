"""Running a scenario in this process or split over several load processes (spawned; the
functions they run live here, not in ``__main__``, so a child process can import them)."""

from __future__ import annotations

import argparse
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import uvloop

from loadtest import scenarios
from loadtest.client import Endpoint
from loadtest.procstat import cpu_seconds
from loadtest.scenarios import Result, percentiles_ms


def endpoint_of(args: argparse.Namespace) -> Endpoint:
    return Endpoint.from_url(
        args.url,
        cacert=args.cacert,
        cert=args.cert,
        key=args.key,
        insecure=args.insecure,
        server_hostname=args.server_name,
    )


def child(kind: str, args: argparse.Namespace, share: int) -> Result:
    """One load process's part (spawned): the same scenario with its share of sessions."""
    return uvloop.run(scenario(kind, args, share, pid=None))


async def scenario(kind: str, args: argparse.Namespace, share: int, pid: int | None) -> Result:
    endpoint = endpoint_of(args)
    if kind == "echo":
        return await scenarios.echo(
            endpoint, sessions=share, size=args.size, seconds=args.seconds, pid=pid
        )
    if kind == "throughput":
        return await scenarios.throughput(
            endpoint, sessions=share, size=args.size, seconds=args.seconds, pid=pid
        )
    if kind == "connect":
        return await scenarios.connect(endpoint, workers=share, seconds=args.seconds, pid=pid)
    raise ValueError(kind)


def merge(kind: str, parts: list[Result]) -> Result:
    """Sum the processes' counts; rates add up; latencies are pooled samples."""
    merged: Result = dict(parts[0])
    errors: Counter[str] = Counter()
    for part in parts:
        errors.update(part["errors"])
    merged["errors"] = dict(errors)
    merged["seconds"] = max(part["seconds"] for part in parts)
    for key in ("sessions", "workers", "messages", "handshakes", "bytes_each_way"):
        if key in merged:
            merged[key] = sum(part[key] for part in parts)
    for key in ("messages_per_second", "handshakes_per_second", "mib_per_second"):
        if key in merged:
            merged[key] = round(sum(part[key] for part in parts), 2)
    if "latency_sample" in merged:
        pooled = [value for part in parts for value in part["latency_sample"]]
        merged["latency_sample"] = pooled
        merged["latency_ms"] = percentiles_ms(pooled)
    merged["processes"] = len(parts)
    return merged


def run_scenario(kind: str, args: argparse.Namespace) -> Result:
    """Run in this process, or split over ``--processes`` load processes."""
    total = args.workers if kind == "connect" else args.sessions
    processes = max(1, min(args.processes, total))
    if processes == 1:
        return uvloop.run(scenario(kind, args, total, pid=args.pid))
    shares = [total // processes + (1 if i < total % processes else 0) for i in range(processes)]
    cpu_before = cpu_seconds(args.pid) if args.pid else 0.0
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        parts = list(pool.map(child, [kind] * processes, [args] * processes, shares))
    merged = merge(kind, parts)
    merged["proxy_cpu_seconds"] = cpu_seconds(args.pid) - cpu_before if args.pid else None
    return merged
