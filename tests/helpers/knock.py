"""A client that keeps connecting during a change and counts refused connections."""

from __future__ import annotations

import asyncio

from wsproxy.address import Address


class Knocker:
    def __init__(self, address: Address, pause: float = 0.005) -> None:
        self.address = address
        self.pause = pause
        self.refused = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> int:
        """Stop knocking; return how many connections were refused."""
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.refused

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                _, writer = await asyncio.open_connection(self.address.host, self.address.port)
                writer.close()
            except ConnectionRefusedError:
                self.refused += 1
            await asyncio.sleep(self.pause)
