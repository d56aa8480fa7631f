"""The shared ticker behind idle checks: due order, re-arming, discard, no retention."""

from __future__ import annotations

import asyncio
import gc
import weakref

from wsproxy.relay.ticker import Ticker


class Member:
    def __init__(self, name: str, log: list[tuple[str, float]], ticker: Ticker) -> None:
        self.name = name
        self.log = log
        self.ticker = ticker
        self.again: float | None = None

    def tick(self) -> None:
        self.log.append((self.name, asyncio.get_running_loop().time()))
        if self.again is not None:
            delay, self.again = self.again, None
            self.ticker.add(self, delay)


async def test_members_tick_once_in_due_order_and_can_reschedule() -> None:
    ticker = Ticker(resolution=0.05)
    log: list[tuple[str, float]] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    late, early, again = (Member(n, log, ticker) for n in ("late", "early", "again"))
    again.again = 0.3  # re-added from inside a tick, after 'late' is already waiting
    ticker.add(late, 0.25)
    ticker.add(again, 0.05)
    ticker.add(early, 0.1)
    await asyncio.sleep(0.6)
    assert [name for name, _ in log] == ["again", "early", "late", "again"]
    when = {name: at - start for name, at in log[:3]}
    assert 0.05 <= when["again"] < 0.2 and 0.1 <= when["early"] < 0.25
    assert 0.25 <= when["late"] < 0.45  # not held back by the later re-add
    assert len(ticker) == 0


async def test_discarded_members_do_not_tick_and_are_not_kept_alive() -> None:
    ticker = Ticker(resolution=0.05)
    log: list[tuple[str, float]] = []
    member = Member("gone", log, ticker)
    bucket = ticker.add(member, 0.1)
    ticker.discard(member, bucket)
    reference = weakref.ref(member)
    del member
    gc.collect()
    assert reference() is None
    await asyncio.sleep(0.2)
    assert log == []
