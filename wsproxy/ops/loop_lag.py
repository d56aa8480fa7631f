"""How late the event loop runs timers: the one number that says whether anything blocks it.

Every session, health check and admin request shares one loop, so a slow callback delays all of
them. A timer is scheduled every ``interval`` seconds and the lateness of each firing is recorded;
that costs one callback per interval, nothing on the data path.
"""

from __future__ import annotations

import asyncio

from wsproxy.ops.metrics import Histogram

# From "nothing to see" (1 ms, timer granularity) to "sessions are visibly stalled" (seconds).
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LoopLagMonitor:
    """Records the lateness of a periodic timer into ``histogram``; ``start`` and ``stop``."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.histogram = Histogram(LAG_BUCKETS)
        self.worst = 0.0  # since start, for logs and tests
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._schedule(loop, loop.time())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        due = now + self.interval
        self._handle = loop.call_at(due, self._fire, loop, due)

    def _fire(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        now = loop.time()
        lag = max(0.0, now - due)
        self.histogram.observe(lag)
        self.worst = max(self.worst, lag)
        self._schedule(loop, now)
