from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from wsproxy.address import Address
from wsproxy.targets.balancer import LeastConnections, RandomTwo, RoundRobin, SourceIp
from wsproxy.targets.target import Target


def targets(weights: list[int], active: list[int] | None = None) -> list[Target]:
    active = active or [0] * len(weights)
    return [
        Target(Address("10.0.0.1", 1000 + i), weight=w, active=a)
        for i, (w, a) in enumerate(zip(weights, active, strict=True))
    ]


@given(st.lists(st.integers(1, 20), min_size=1, max_size=8), st.integers(1, 3))
def test_round_robin_honours_weights_exactly_per_cycle(weights: list[int], cycles: int) -> None:
    pool = targets(weights)
    balancer = RoundRobin()
    picks = Counter(balancer.pick(pool, "c").address for _ in range(sum(weights) * cycles))
    assert {t.address: picks[t.address] for t in pool} == {
        t.address: t.weight * cycles for t in pool
    }


def test_round_robin_is_smooth() -> None:
    # nginx's example: weights 5, 1, 1 give a a b a c a a (never five a's in a row).
    pool = targets([5, 1, 1])
    balancer = RoundRobin()
    order = [pool.index(balancer.pick(pool, "c")) for _ in range(7)]
    assert order == [0, 0, 1, 0, 2, 0, 0]


@given(
    st.lists(st.tuples(st.integers(1, 5), st.integers(0, 20)), min_size=1, max_size=8),
    st.integers(0, 1000),
)
def test_least_connections_picks_a_minimum_per_weight(
    rows: list[tuple[int, int]], seed: int
) -> None:
    pool = targets([w for w, _ in rows], [a for _, a in rows])
    chosen = LeastConnections(random.Random(seed)).pick(pool, "c")
    assert all(chosen.active * t.weight <= t.active * chosen.weight for t in pool)


def test_least_connections_breaks_ties_at_random() -> None:
    pool = targets([1, 1, 1], [2, 2, 5])
    balancer = LeastConnections(random.Random(1))
    seen = Counter(pool.index(balancer.pick(pool, "c")) for _ in range(200))
    assert set(seen) == {0, 1}
    assert min(seen.values()) > 60


def test_least_connections_spreads_when_counting() -> None:
    pool = targets([1, 2])
    balancer = LeastConnections(random.Random(3))
    for _ in range(300):
        balancer.pick(pool, "c").acquire()
    assert (pool[0].active, pool[1].active) == (100, 200)


@given(st.lists(st.integers(0, 50), min_size=2, max_size=8, unique=True), st.integers(0, 10_000))
def test_random_two_never_picks_the_most_loaded(active: list[int], seed: int) -> None:
    pool = targets([1] * len(active), active)
    chosen = RandomTwo(random.Random(seed)).pick(pool, "c")
    assert chosen.active != max(active)


def test_random_two_spreads_load() -> None:
    pool = targets([1] * 4)
    balancer = RandomTwo(random.Random(5))
    for _ in range(400):
        balancer.pick(pool, "c").acquire()
    assert max(t.active for t in pool) - min(t.active for t in pool) <= 2


def clients(n: int) -> list[str]:
    return [f"192.0.2.{i % 250}:{i}" if i % 2 else f"2001:db8::{i:x}" for i in range(n)]


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 9))
def test_source_ip_moves_about_one_in_n_plus_one(count: int) -> None:
    balancer = SourceIp()
    before = targets([1] * count)
    after = [*before, Target(Address("10.0.0.2", 1), weight=1)]
    population = clients(4000)
    moved = 0
    for client in population:
        old = balancer.pick(before, client)
        new = balancer.pick(after, client)
        if new is not old:
            moved += 1
            assert new is after[-1], "a client may only move to the new target"
    expected = len(population) / (count + 1)
    assert abs(moved - expected) < 0.2 * expected + 40


def test_source_ip_is_sticky_and_weighted() -> None:
    balancer = SourceIp()
    pool = targets([1, 3])
    population = clients(8000)
    first = [balancer.pick(pool, c) for c in population]
    assert first == [balancer.pick(pool, c) for c in population]
    share = sum(1 for t in first if t is pool[1]) / len(population)
    assert 0.70 < share < 0.80


def test_slow_start_grows_a_new_targets_share_linearly() -> None:
    from wsproxy.targets.health import update_ramps
    from wsproxy.targets.target import TargetState

    old, new = targets([1, 1])
    old.state = new.state = TargetState.HEALTHY
    old.healthy_since, new.healthy_since = -1000.0, 0.0
    for now, expected_share in ((2.5, 0.2), (5.0, 1 / 3), (10.0, 0.5), (20.0, 0.5)):
        update_ramps([old, new], now, slow_start=10.0)
        balancer = RoundRobin()
        picks = Counter(balancer.pick([old, new], "c") is new for _ in range(600))
        assert abs(picks[True] / 600 - expected_share) < 0.02, (now, picks)
    # least_connections: a ramping target is filled in proportion to its current share.
    update_ramps([old, new], 2.5, slow_start=10.0)
    old.active = new.active = 0
    least = LeastConnections(random.Random(1))
    for _ in range(500):
        least.pick([old, new], "c").acquire()
    assert abs(new.active / 500 - 0.2) < 0.02
