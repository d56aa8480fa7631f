"""The threshold state machine, exhaustively over short result sequences."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsproxy.address import Address
from wsproxy.targets.health import (
    REASON_FAILED,
    REASON_PASSIVE,
    REASON_TIMEOUT,
    CheckResult,
    HealthRecord,
    record_check,
    record_connect_failure,
    status_matches,
)
from wsproxy.targets.target import Target, TargetState


def run(results: list[bool], healthy: int, unhealthy: int) -> list[TargetState]:
    target = Target(Address("127.0.0.1", 1))
    record = HealthRecord()
    states = []
    for index, ok in enumerate(results):
        record_check(
            target,
            record,
            CheckResult(float(index), ok, ""),
            healthy_threshold=healthy,
            unhealthy_threshold=unhealthy,
        )
        states.append(target.state)
    return states


def reference(results: list[bool], healthy: int, unhealthy: int) -> list[TargetState]:
    """The rules written out plainly, to compare against."""
    state = TargetState.INITIAL
    run_ok = run_bad = 0
    out = []
    for ok in results:
        run_ok, run_bad = (run_ok + 1, 0) if ok else (0, run_bad + 1)
        if state is TargetState.INITIAL:
            state = TargetState.HEALTHY if ok else TargetState.UNHEALTHY
        elif state is TargetState.HEALTHY and run_bad >= unhealthy:
            state = TargetState.UNHEALTHY
        elif state is TargetState.UNHEALTHY and run_ok >= healthy:
            state = TargetState.HEALTHY
        out.append(state)
    return out


@pytest.mark.parametrize("healthy", [1, 2, 3])
@pytest.mark.parametrize("unhealthy", [1, 2, 3])
def test_every_sequence_up_to_eight_results(healthy: int, unhealthy: int) -> None:
    for length in range(1, 9):
        for results in itertools.product([True, False], repeat=length):
            assert run(list(results), healthy, unhealthy) == reference(
                list(results), healthy, unhealthy
            ), results


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 10), st.integers(1, 10))
def test_hysteresis_no_flip_faster_than_the_thresholds(
    results: list[bool], healthy: int, unhealthy: int
) -> None:
    states = run(results, healthy, unhealthy)
    changes = [i for i in range(1, len(states)) if states[i] is not states[i - 1]]
    for before, after in itertools.pairwise(changes):
        assert after - before >= min(healthy, unhealthy)


def test_first_result_decides_and_reasons() -> None:
    target = Target(Address("127.0.0.1", 1))
    record = HealthRecord()
    result = CheckResult(0.0, False, "refused")
    assert record_check(target, record, result, healthy_threshold=3, unhealthy_threshold=2)
    assert (target.state, target.reason) == (TargetState.UNHEALTHY, REASON_FAILED)
    timed = Target(Address("127.0.0.1", 2))
    record_check(
        timed,
        HealthRecord(),
        CheckResult(0.0, False, "timeout"),
        healthy_threshold=3,
        unhealthy_threshold=2,
        timed_out=True,
    )
    assert timed.reason == REASON_TIMEOUT


def test_history_keeps_the_last_ten() -> None:
    record = HealthRecord()
    target = Target(Address("127.0.0.1", 1))
    for index in range(15):
        record_check(
            target,
            record,
            CheckResult(float(index), True, str(index)),
            healthy_threshold=1,
            unhealthy_threshold=1,
        )
    assert [r.detail for r in record.history] == [str(i) for i in range(5, 15)]


def test_passive_check() -> None:
    target = Target(Address("127.0.0.1", 1), state=TargetState.HEALTHY)
    record = HealthRecord()
    target.connect_failures = 2
    assert not record_connect_failure(target, record, 3)
    target.connect_failures = 3
    assert record_connect_failure(target, record, 3)
    assert (target.state, target.reason) == (TargetState.UNHEALTHY, REASON_PASSIVE)
    draining = Target(Address("127.0.0.1", 2), state=TargetState.DRAINING, connect_failures=9)
    assert not record_connect_failure(draining, record, 3)


@pytest.mark.parametrize(
    ("matcher", "status", "expected"),
    [("200", 200, True), ("200", 201, False), ("200,204", 204, True), ("200-399", 302, True),
     ("200-399", 404, False), ("200-204,301", 301, True)],
)  # fmt: skip
def test_status_matcher(matcher: str, status: int, expected: bool) -> None:
    assert status_matches(matcher, status) is expected


def test_health_check_config_bounds() -> None:
    from wsproxy.config import parse_config
    from wsproxy.errors import ConfigError

    base = """
[listeners.edge]
address = "127.0.0.1:0"
default_target_group = "g"
[target_groups.g.health_check]
"""
    parse_config(base + 'protocol = "http"\nmatcher = "200,204"\ninterval_seconds = 0.5\n'
                 "timeout_seconds = 0.2\n")  # fmt: skip
    bad = [
        ("interval_seconds = -1", "health_check.interval_seconds: must be >= 0.5, got -1"),
        ("interval_seconds = 1\ntimeout_seconds = 2", "must be < interval_seconds"),
        ("healthy_threshold = 11", "healthy_threshold: must be <= 10"),
        ('matcher = "2xx"', "matcher must look like"),
        ('protocol = "http"\nsend = "x"\nexpect = "x"', "send/expect are for protocol"),
    ]
    for line, expected in bad:
        with pytest.raises(ConfigError, match=expected):
            parse_config(base + line + "\n")
