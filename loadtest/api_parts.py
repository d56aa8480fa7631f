"""The processes of the API benchmarks (``loadtest/api_bench.py``), each run as
``python -m loadtest.api_parts PART ...``, each printing JSON lines on stdout:

- ``integration``: a keep-alive HTTP echo integration (aiohttp server). ``POST /echo`` answers
  the body with its Content-Type; ``POST /connect`` ($connect) records the connection id of
  the call and answers 200; ``GET /ids`` lists the ids recorded. Prints its port; serves until
  stdin closes.
- ``clients URL COUNT``: opens COUNT WebSocket sessions (at most 200 handshakes at a time),
  prints ``{"opened", "errors"}``, then counts every data message they receive. On each line
  ``report`` read from stdin it prints ``{"received", "last_at", "min", "max"}``: the messages
  received, the ``time.monotonic()`` of the last one (CLOCK_MONOTONIC is one clock for every
  process of the machine, so the driver compares it with its own), and the fewest and most
  one session got. Closes its sessions when stdin closes.
- ``reference URL CALLERS MESSAGES SIZE``: the integration called directly by a pooled aiohttp
  ClientSession, CALLERS calls at once, each caller making MESSAGES calls one after another with
  the body and headers the proxy would send; prints its own CPU seconds over the calls.
- ``push BASE IDS_FILE SECONDS COUNT CONCURRENCY SIZE``: POSTs ``/@connections/{id}`` to the
  ids in IDS_FILE (a JSON list) in turn, CONCURRENCY at once over a pooled keep-alive aiohttp
  client, for SECONDS or COUNT requests; prints the statuses and its window.

Bounded everywhere: counts and deadlines; the loopback only.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import secrets
import sys
import time
from collections import Counter
from typing import Any, cast

import aiohttp
import uvloop
from aiohttp import web

from loadtest.client import Endpoint
from loadtest.scenarios import error_kind, raise_fd_limit
from loadtest.wsproto import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameReader,
    accept_key,
    encode,
    upgrade_request,
)

OPEN_PARALLEL = 200
OPEN_TIMEOUT = 30.0
MAX_IDS = 100_000


def emit(value: dict[str, Any]) -> None:
    print(json.dumps(value, separators=(",", ":")), flush=True)


def message(size: int, action: str = "bench") -> bytes:
    """A JSON text message of ``size`` bytes (at least its frame): ``{"action":..,"data":"xx"}``;
    an action no route has goes to ``$default``."""
    head = f'{{"action":"{action}","data":"'.encode()
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


def call_headers(api: str = "bench") -> dict[str, str]:
    """What the proxy's integration call carries (CloudEvents binary mode, wire/cloudevents.py),
    fresh id and time per call, so the reference client's requests are the same size."""
    cid = base64.urlsafe_b64encode(secrets.token_bytes(18)).decode()
    return {
        "ce-specversion": "1.0",
        "ce-id": secrets.token_urlsafe(12),
        "ce-type": "wsproxy.message",
        "ce-source": f"/apis/{api}/connections/{cid}",
        "ce-time": dt.datetime.now(dt.UTC).isoformat(),
        "ce-connectionid": cid,
        "ce-routekey": "$default",
        "ce-api": api,
        "ce-sourceip": "127.0.0.1",
        "Content-Type": "application/json",
    }


# --- integration -----------------------------------------------------------------------------


async def integration() -> None:
    ids: list[str] = []

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=body, headers={"Content-Type": request.content_type})

    async def connect(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        if len(ids) < MAX_IDS:
            ids.append(body["connectionId"])
        return web.Response(status=200)

    async def list_ids(_request: web.Request) -> web.Response:
        return web.json_response(ids)

    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_post("/connect", connect)
    app.router.add_get("/ids", list_ids)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


# --- clients ---------------------------------------------------------------------------------


class Tally:
    """What every session of this process received."""

    __slots__ = ("last_at", "received")

    def __init__(self) -> None:
        self.received = 0
        self.last_at = 0.0


class Counting(asyncio.Protocol):
    """A WebSocket session that only counts the data messages it receives (pings answered)."""

    __slots__ = ("_head", "_key", "_reader", "count", "opened", "tally", "transport")

    def __init__(self, key: bytes, tally: Tally) -> None:
        self._key = key
        self._head = b""
        self._reader: FrameReader | None = None
        self.tally = tally
        self.count = 0
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._reader is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self._head[:end], self._head[end + 4 :]
            self._head = b""
            if not head.startswith(b"HTTP/1.1 101") or accept_key(self._key) not in head:
                if not self.opened.done():
                    line = head.split(b"\r\n", 1)[0].decode(errors="replace")
                    self.opened.set_exception(ConnectionError(f"no 101: {line}"))
                if self.transport is not None:
                    self.transport.abort()
                return
            self._reader = FrameReader()
            self.opened.set_result(None)
        counted = 0
        for opcode, payload in self._reader.feed(data):
            if opcode == OP_PING:
                self._write(encode(OP_PONG, payload, masked=True))
            elif opcode == OP_CLOSE:
                self._write(encode(OP_CLOSE, payload[:2], masked=True))
            elif opcode != OP_PONG:
                counted += 1
        if counted:
            self.count += counted
            self.tally.received += counted
            self.tally.last_at = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionResetError("closed before the 101"))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


async def open_counting(endpoint: Endpoint, tally: Tally) -> Counting:
    loop = asyncio.get_running_loop()
    key = base64.b64encode(os.urandom(16))
    session = Counting(key, tally)
    async with asyncio.timeout(OPEN_TIMEOUT):
        await loop.create_connection(lambda: session, endpoint.host, endpoint.port)
        session._write(upgrade_request(endpoint.authority, endpoint.path, key))
        await session.opened
    return session


async def clients(url: str, count: int) -> None:
    raise_fd_limit()
    endpoint = Endpoint.from_url(url)
    tally = Tally()
    sessions: list[Counting] = []
    errors: Counter[str] = Counter()
    gate = asyncio.Semaphore(OPEN_PARALLEL)

    async def one() -> None:
        async with gate:
            try:
                sessions.append(await open_counting(endpoint, tally))
            except Exception as exc:  # noqa: BLE001  # counted by kind, reported
                errors[error_kind(exc)] += 1

    await asyncio.gather(*(one() for _ in range(count)))
    emit({"opened": len(sessions), "errors": dict(errors)})
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        counts = [session.count for session in sessions] or [0]
        emit(
            {
                "received": tally.received,
                "last_at": tally.last_at,
                "min": min(counts),
                "max": max(counts),
            }
        )
    for session in sessions:
        if session.transport is not None:
            session.transport.close()


# --- the reference: the integration called directly ------------------------------------------


async def reference(url: str, callers: int, messages: int, size: int) -> None:
    payload = message(size)
    errors: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=callers)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call() -> int:
            try:
                async with session.post(url, data=payload, headers=call_headers()) as response:
                    body = await response.read()
            except (aiohttp.ClientError, OSError) as exc:
                errors[error_kind(exc)] += 1
                return 0
            if response.status != 200 or body != payload:
                errors[f"status_{response.status}" if response.status != 200 else "mismatch"] += 1
                return 0
            return 1

        # One call per caller at once first, so the pool holds a connection per caller and
        # the window below measures calls, not connects (as the proxy's pool, warm).
        await asyncio.gather(*(call() for _ in range(callers)))

        async def caller() -> int:
            return sum([await call() for _ in range(messages)])

        cpu, started = time.process_time(), time.perf_counter()
        done = await asyncio.gather(*(caller() for _ in range(callers)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    emit({"calls": sum(done), "seconds": elapsed, "cpu_seconds": cpu, "errors": dict(errors)})


# --- the management driver -------------------------------------------------------------------


async def push(
    base: str, ids: list[str], seconds: float, count: int, concurrency: int, size: int
) -> None:
    payload = message(size, "pushed")
    statuses: Counter[str] = Counter()
    headers = {"Content-Type": "application/json"}
    sent = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        cpu, started = time.process_time(), time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            nonlocal sent
            while sent < count and time.perf_counter() < deadline:
                cid = ids[sent % len(ids)]
                sent += 1
                try:
                    async with session.post(
                        f"{base}/@connections/{cid}", data=payload, headers=headers
                    ) as response:
                        await response.read()
                    statuses[str(response.status)] += 1
                except (aiohttp.ClientError, OSError) as exc:
                    statuses[error_kind(exc)] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    emit({"statuses": dict(statuses), "seconds": elapsed, "cpu_seconds": cpu})


def main(argv: list[str]) -> None:
    part, rest = argv[0], argv[1:]
    if part == "integration":
        uvloop.run(integration())
    elif part == "clients":
        uvloop.run(clients(rest[0], int(rest[1])))
    elif part == "reference":
        uvloop.run(reference(rest[0], int(rest[1]), int(rest[2]), int(rest[3])))
    elif part == "push":
        with open(rest[1]) as file:
            ids: list[str] = json.load(file)
        uvloop.run(push(rest[0], ids, float(rest[2]), int(rest[3]), int(rest[4]), int(rest[5])))
    else:
        raise SystemExit(f"unknown part {part!r}: integration, clients, reference or push")


if __name__ == "__main__":
    main(sys.argv[1:])
