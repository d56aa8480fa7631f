"""A WebSocket echo target in its own process: prints its port, serves until stdin closes."""

from __future__ import annotations

import asyncio
import sys

import uvloop

from wsproxy.demo import EchoTarget


async def main() -> None:
    target = EchoTarget("bench-echo", greeting=False)
    address = await target.start()
    print(address.port, flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    await target.stop()


if __name__ == "__main__":
    uvloop.run(main())
