"""Coarse timers for many sessions on one loop timer.

Every relay checks for idleness a few times per timeout. With one ``TimerHandle`` per relay that
costs several hundred bytes per session and a heap operation per check; here relays due in the
same tick share a set, one loop timer serves them all, and a finished relay leaves its set at
once (nothing keeps it alive).
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol


class Tickable(Protocol):
    def tick(self) -> None: ...


# What ``add`` returns and ``discard`` takes: the member's bucket itself, not its slot number, so a
# scheduled member costs no int object of its own.
TickBucket = set[Tickable]


class Ticker:
    """``add(member, delay)`` calls ``member.tick()`` once, ``delay`` seconds from now (rounded
    up to ``resolution``); ``discard`` takes it back."""

    __slots__ = ("_buckets", "_due", "_handle", "_loop", "resolution")

    def __init__(self, resolution: float = 0.25) -> None:
        self.resolution = resolution
        self._buckets: dict[int, set[Tickable]] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0  # the slot the loop timer is set for
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, member: Tickable, delay: float) -> TickBucket:
        """Schedule ``member``; returns its bucket (for ``discard``)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        slot = math.ceil((loop.time() + delay) / self.resolution)
        bucket = self._buckets.get(slot)
        if bucket is None:
            bucket = self._buckets[slot] = {member}
            if self._handle is None or slot < self._due:
                self._arm(loop, slot)
        else:
            bucket.add(member)
        return bucket

    def discard(self, member: Tickable, bucket: TickBucket) -> None:
        """Take ``member`` back (harmless once its bucket has fired)."""
        bucket.discard(member)

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._buckets.values())

    def _arm(self, loop: asyncio.AbstractEventLoop, slot: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._due = slot
        self._handle = loop.call_at(slot * self.resolution, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = None
        now = math.floor(loop.time() / self.resolution + 1e-9)
        for slot in sorted(s for s in self._buckets if s <= now):
            for member in self._buckets.pop(slot):
                member.tick()  # may add members to later slots; never to a past one
        # Ticks may have armed the timer for a later slot than one already waiting: re-arm.
        if self._buckets:
            self._arm(loop, min(self._buckets))
