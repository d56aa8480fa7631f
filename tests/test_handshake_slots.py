"""wsproxy/handshake_slots.py: a share per source, freed slots handed out in turn."""

from __future__ import annotations

import asyncio

import pytest

from wsproxy.handshake_slots import HandshakeSlots


async def test_a_source_gets_no_more_than_its_share() -> None:
    slots = HandshakeSlots(limit=4, per_source=2)
    assert slots.try_acquire("a") and slots.try_acquire("a")
    assert not slots.try_acquire("a")  # its share is used, though slots are free
    assert slots.try_acquire("b")
    assert (slots.in_flight, slots.held("a"), slots.held("b")) == (3, 2, 1)


async def test_freed_slots_go_to_waiting_sources_in_turn() -> None:
    slots = HandshakeSlots(limit=2, per_source=2)
    assert slots.try_acquire("a") and slots.try_acquire("a")
    order: list[str] = []

    async def wait(source: str, name: str) -> None:
        await slots.acquire(source)
        order.append(name)

    # "a" queued three before "b" and "c" arrived: they still get the next slots in turn.
    waiters = [
        asyncio.create_task(wait(source, name))
        for source, name in (("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("c", "c1"))
    ]
    await asyncio.sleep(0)
    for _ in range(5):
        source = "a" if slots.held("a") else ("b" if slots.held("b") else "c")
        slots.release(source)
        await asyncio.sleep(0)
    await asyncio.gather(*waiters)
    assert order == ["a1", "b1", "c1", "a2", "a3"]


async def test_a_waiter_that_gives_up_leaves_no_trace() -> None:
    slots = HandshakeSlots(limit=1, per_source=1)
    assert slots.try_acquire("a")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await slots.acquire("b")
    later = asyncio.create_task(slots.acquire("c"))
    await asyncio.sleep(0)
    slots.release("a")  # skips the gone waiter of "b"
    await later
    assert (slots.in_flight, slots.held("b"), slots.held("c")) == (1, 0, 1)
    slots.release("c")
    assert slots.in_flight == 0 and not slots._waiting and not slots._held


def test_the_share_is_never_above_the_limit() -> None:
    assert HandshakeSlots(limit=2, per_source=32).per_source == 2
