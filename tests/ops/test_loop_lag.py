"""The plain-integer histogram and the loop-lag monitor that feeds it."""

from __future__ import annotations

import asyncio
import time

from prometheus_client.core import HistogramMetricFamily

from wsproxy.ops.loop_lag import LoopLagMonitor
from wsproxy.ops.metrics import Histogram


def test_histogram_buckets_are_cumulative_and_le_is_inclusive() -> None:
    histogram = Histogram([0.1, 1.0, 0.5])
    for value in (0.05, 0.1, 0.3, 0.5, 2.0, 7.0):
        histogram.observe(value)
    assert histogram.cumulative() == [("0.1", 2), ("0.5", 4), ("1.0", 4), ("+Inf", 6)]
    family = HistogramMetricFamily("x_seconds", "x", labels=["l"])
    histogram.add_to(family, ["a"])
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples[("x_seconds_count", None)] == 6
    assert abs(samples[("x_seconds_sum", None)] - 9.95) < 1e-9


async def test_a_blocked_loop_shows_up_as_lag() -> None:
    monitor = LoopLagMonitor(interval=0.02)
    monitor.start()
    try:
        await asyncio.sleep(0.1)
        time.sleep(0.3)  # noqa: ASYNC251  # the blocking call this monitor exists to catch
        await asyncio.sleep(0.1)
    finally:
        monitor.stop()
    counts = dict(monitor.histogram.cumulative())
    assert counts["+Inf"] >= 5
    assert counts["+Inf"] - counts["0.25"] >= 1  # the stall was recorded
    assert monitor.worst >= 0.25
    assert counts["0.05"] >= counts["+Inf"] - 1  # every other firing was on time
