"""``python -m loadtest.call_counts``: which Python functions one connection calls, and how often.

    python -m loadtest.call_counts --mode websocket --connects 1000 [--opcodes] > b.json
    python -m loadtest.call_counts --diff a.json b.json

When ``ab --instructions`` says a version spends more per connection, this says where: wsproxy
runs in this process (as in ``session-memory``), an echo target and the client in processes of
their own; after a warm-up, exactly ``--connects`` connections are recorded (open, upgrade in
websocket mode, Close, close: ``ab``'s fixed ``connect`` load), and every function's figures are
divided by that number: with ``cProfile``, calls and own time (times carry the profiler's
overhead: read them as shares); with ``--opcodes``, calls (coroutine resumptions included) and
the bytecodes it executed (``sys.settrace``, opcode events), exact and repeatable, the Python
work a version does per connection. Run it once per version with that version first on
``PYTHONPATH`` and the working directory outside the checkout, then ``--diff`` the two outputs:
functions are matched by name alone, so moves between modules cancel out.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import uvloop

from loadtest.session_memory import ROOT, _config, _short, _stop

MAX_CONNECTS = 20_000
WORKERS = 4


async def _connect(url: str, count: int) -> None:
    """The client (its own process): ``count`` connections over ``WORKERS`` workers."""
    from loadtest.ab import fixed_load
    from loadtest.client import Endpoint

    await fixed_load("connect", Endpoint.from_url(url), WORKERS, max(1, count // WORKERS))


async def _run_client(url: str, count: int) -> None:
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.call_counts", "--client", url, str(count), cwd=ROOT
    )
    try:
        await asyncio.wait_for(client.wait(), timeout=600)
    except TimeoutError:
        client.kill()
        await client.wait()
        raise
    if client.returncode != 0:
        raise RuntimeError(f"the client exited with {client.returncode}")


class OpcodeCounter:
    """Calls and executed bytecodes per code object, in this thread, between start and stop."""

    def __init__(self) -> None:
        self.calls: Counter[CodeType] = Counter()
        self.opcodes: Counter[CodeType] = Counter()

    def _trace(self, frame: FrameType, event: str, arg: object) -> Any:
        if event == "opcode":
            self.opcodes[frame.f_code] += 1
        elif event == "call":
            frame.f_trace_lines = False
            frame.f_trace_opcodes = True
            self.calls[frame.f_code] += 1
        return self._trace

    def enable(self) -> None:
        sys.settrace(self._trace)

    def disable(self) -> None:
        sys.settrace(None)

    def table(self, done: int) -> list[dict[str, Any]]:
        return [
            {
                "function": f"{_short(code.co_filename)}:{code.co_firstlineno}:{code.co_name}",
                "calls": round(calls / done, 3),
                "opcodes": round(self.opcodes[code] / done, 2),
            }
            for code, calls in self.calls.items()
        ]


async def profile(mode: str, connects: int, opcodes: bool) -> dict[str, Any]:
    from wsproxy.config import parse_config
    from wsproxy.proxy import Proxy

    echo = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.echo_target",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    proxy: Proxy | None = None
    profiler: cProfile.Profile | OpcodeCounter = OpcodeCounter() if opcodes else cProfile.Profile()
    try:
        assert echo.stdout is not None
        port = int(await asyncio.wait_for(echo.stdout.readline(), timeout=30))
        proxy = Proxy(parse_config(_config(mode, port), "<call-counts>"), rng=random.Random(1))
        await proxy.start()
        address = proxy.listeners["edge"].address
        assert address is not None
        url = f"ws://127.0.0.1:{address.port}/"
        await _run_client(url, 200)  # warm-up: caches, pools, first-time imports
        await asyncio.sleep(0.5)
        profiler.enable()
        await _run_client(url, connects)
        await asyncio.sleep(0.5)  # the last connections' teardown
        profiler.disable()
    finally:
        if proxy is not None:
            await proxy.shutdown(grace=0.5)
        await _stop(echo)
    done = WORKERS * max(1, connects // WORKERS)
    functions = []
    if isinstance(profiler, OpcodeCounter):
        functions = profiler.table(done)
    else:
        stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]  # the raw table
        for (filename, line, name), (_, calls, own, _cumulative, _) in stats.items():
            functions.append(
                {
                    "function": f"{_short(filename)}:{line}:{name}",
                    "calls": round(calls / done, 3),
                    "own_us": round(1e6 * own / done, 3),
                }
            )
    functions.sort(key=lambda f: -f["calls"])
    figure = "opcodes" if opcodes else "own_us"
    return {
        "mode": mode,
        "connects": done,
        "figure": figure,
        "calls_per_connect": round(sum(f["calls"] for f in functions), 2),
        f"{figure}_per_connect": round(sum(f[figure] for f in functions), 1),
        "functions": functions,
    }


def _by_name(functions: list[dict[str, Any]], figure: str) -> dict[str, tuple[float, float]]:
    """(calls, figure) by function name, summed over modules: stable across moves."""
    table: dict[str, tuple[float, float]] = {}
    for entry in functions:
        name = re.sub(r" at 0x[0-9a-f]+", "", entry["function"].rsplit(":", 1)[1])
        calls, value = table.get(name, (0.0, 0.0))
        table[name] = (calls + entry["calls"], value + entry.get(figure, 0.0))
    return table


def diff(a_path: str, b_path: str, top: int) -> None:
    a, b = (json.loads(Path(p).read_text()) for p in (a_path, b_path))
    figure = a.get("figure", "own_us")
    if b.get("figure", "own_us") != figure:
        raise SystemExit(f"{a_path} counts {figure}, {b_path} does not: run both alike")
    total = f"{figure}_per_connect"
    print(f"per connect: calls A {a['calls_per_connect']}, B {b['calls_per_connect']}; "
          f"{figure} A {a[total]}, B {b[total]}")  # fmt: skip
    ta, tb = _by_name(a["functions"], figure), _by_name(b["functions"], figure)
    rows = []
    for name in ta.keys() | tb.keys():
        (ca, va), (cb, vb) = ta.get(name, (0.0, 0.0)), tb.get(name, (0.0, 0.0))
        if abs(cb - ca) >= 0.01 or abs(vb - va) >= 0.5:
            rows.append((vb - va, cb - ca, name, ca, cb, va, vb))
    rows.sort(key=lambda row: (-abs(row[0]), -abs(row[1])))
    print(f"{'calls A':>8} {'calls B':>8} {figure + ' A':>10} {figure + ' B':>10} {'B-A':>8}  "
          "function")  # fmt: skip
    for delta, _dc, name, ca, cb, va, vb in rows[:top]:
        print(f"{ca:8.2f} {cb:8.2f} {va:10.2f} {vb:10.2f} {delta:+8.2f}  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.call_counts", description=__doc__)
    parser.add_argument("--mode", choices=("stream", "websocket"), default="websocket")
    parser.add_argument("--connects", type=int, default=1000, help=f"at most {MAX_CONNECTS}")
    parser.add_argument(
        "--opcodes", action="store_true", help="count executed bytecodes (slow) instead of time"
    )
    parser.add_argument("--diff", nargs=2, metavar=("A.json", "B.json"))
    parser.add_argument("--top", type=int, default=40, help="--diff: rows to show")
    args = parser.parse_args()
    if args.diff:
        diff(args.diff[0], args.diff[1], args.top)
        return 0
    connects = min(max(args.connects, WORKERS), MAX_CONNECTS)
    print(json.dumps(uvloop.run(profile(args.mode, connects, args.opcodes)), indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--client":
        uvloop.run(_connect(sys.argv[2], int(sys.argv[3])))
    else:
        sys.exit(main())
