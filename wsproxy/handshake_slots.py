"""Handshake slots of one TLS listener, shared fairly among client addresses.

A TLS handshake costs CPU and a slot; ``max_handshakes_in_flight`` bounds how many run at
once. Without a share per source, one address holding that many idle sockets (each waiting
out ``tls_handshake_timeout_seconds``) would stall every other client's handshake. So:

- at most ``limit`` handshakes run at once, and at most ``per_source`` of them for one source
  (a client address);
- a connection that finds no slot waits; a freed slot goes to the waiting sources in turn
  (round robin, as in fair queueing), and within one source to its oldest connection;
- waiting is bounded by the caller (the listener: twice the handshake timeout).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque


class HandshakeSlots:
    """``limit`` handshake slots, ``per_source`` at most for one source (see the module)."""

    __slots__ = ("_held", "_waiting", "in_flight", "limit", "per_source")

    def __init__(self, limit: int, per_source: int) -> None:
        self.limit = limit
        self.per_source = min(per_source, limit)
        self.in_flight = 0
        self._held: dict[str, int] = {}  # slots held per source; no entry at zero
        # Sources with waiting connections, in their turn order; a cancelled waiter stays in
        # its queue until its turn comes (then skipped), so a timeout costs O(1).
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    def _free_for(self, source: str) -> bool:
        return self.in_flight < self.limit and self._held.get(source, 0) < self.per_source

    def _take(self, source: str) -> None:
        self.in_flight += 1
        self._held[source] = self._held.get(source, 0) + 1

    def held(self, source: str) -> int:
        """Slots ``source`` holds now."""
        return self._held.get(source, 0)

    def try_acquire(self, source: str) -> bool:
        """Take a slot for ``source`` now if one is free for it; False if it must wait."""
        if not self._free_for(source):
            return False
        self._take(source)
        return True

    async def acquire(self, source: str) -> None:
        """Wait for a slot for ``source`` (cancel to stop waiting); ``release`` it after."""
        if self.try_acquire(source):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiting.get(source)
        if queue is None:
            queue = self._waiting[source] = deque()
        queue.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(source)  # granted in the same instant it was cancelled: give back
            raise

    def release(self, source: str) -> None:
        """Give back a slot of ``source``; a waiting connection may take it."""
        self.in_flight -= 1
        count = self._held[source] - 1
        if count:
            self._held[source] = count
        else:
            del self._held[source]
        self._hand_out()

    def _hand_out(self) -> None:
        """Give free slots to waiting sources in turn, each source's oldest waiter first."""
        while self.in_flight < self.limit and self._waiting:
            for source, queue in self._waiting.items():
                while queue and queue[0].done():
                    queue.popleft()  # cancelled while waiting (its deadline passed)
                if not queue:
                    del self._waiting[source]
                    break  # the dict changed: look again from the start
                if self._held.get(source, 0) < self.per_source:
                    self._take(source)
                    queue.popleft().set_result(None)
                    if queue:
                        self._waiting.move_to_end(source)  # its turn is over
                    else:
                        del self._waiting[source]
                    break
            else:
                return  # every waiting source is at its share
