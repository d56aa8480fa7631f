"""Target health: the threshold state machine (pure) and HTTP status matchers.

Rules, as AWS target groups apply them (``TargetHealth``):
- a target in ``initial`` takes the state of its first result;
- a ``healthy`` target becomes ``unhealthy`` after ``unhealthy_threshold`` consecutive failures;
- an ``unhealthy`` target becomes ``healthy`` after ``healthy_threshold`` consecutive successes;
- ``unhealthy_after_connect_failures`` consecutive failed dials (passive check) make it
  ``unhealthy`` at once; only active checks bring it back;
- ``draining`` and ``unused`` targets are left alone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from wsproxy.targets.target import Target, TargetState

HISTORY = 10

REASON_FAILED = "Target.FailedHealthChecks"
REASON_TIMEOUT = "Target.Timeout"
REASON_PASSIVE = "Target.ConnectFailures"
REASON_HEALTHY = ""


@dataclass(slots=True)
class CheckResult:
    at: float  # loop time, seconds
    ok: bool
    detail: str


@dataclass(slots=True)
class HealthRecord:
    """Consecutive counts and the last results of one target."""

    successes: int = 0
    failures: int = 0
    transitions: int = 0
    history: deque[CheckResult] = field(default_factory=lambda: deque(maxlen=HISTORY))


def record_check(
    target: Target,
    record: HealthRecord,
    result: CheckResult,
    *,
    healthy_threshold: int,
    unhealthy_threshold: int,
    timed_out: bool = False,
) -> bool:
    """Apply one active check result; True when the target's state changed."""
    record.history.append(result)
    if result.ok:
        record.successes += 1
        record.failures = 0
    else:
        record.failures += 1
        record.successes = 0
    state = target.state
    new_state = state
    if state is TargetState.INITIAL:
        new_state = TargetState.HEALTHY if result.ok else TargetState.UNHEALTHY
    elif state is TargetState.HEALTHY and record.failures >= unhealthy_threshold:
        new_state = TargetState.UNHEALTHY
    elif state is TargetState.UNHEALTHY and record.successes >= healthy_threshold:
        new_state = TargetState.HEALTHY
    if new_state is state:
        return False
    target.state = new_state
    if new_state is TargetState.HEALTHY:
        target.reason = REASON_HEALTHY
        target.connect_failures = 0
        target.healthy_since = result.at
    else:
        target.reason = REASON_TIMEOUT if timed_out else REASON_FAILED
    record.transitions += 1
    return True


def record_connect_failure(target: Target, record: HealthRecord, limit: int) -> bool:
    """Passive check after a failed dial (``target.connect_failures`` already counted)."""
    if target.state in (TargetState.DRAINING, TargetState.UNUSED, TargetState.UNHEALTHY):
        return False
    if target.connect_failures < limit:
        return False
    target.state = TargetState.UNHEALTHY
    target.reason = REASON_PASSIVE
    record.successes = 0
    record.transitions += 1
    return True


def status_matches(matcher: str, status: int) -> bool:
    """``"200"``, ``"200,204"``, ``"200-399"``: does ``status`` match?"""
    for part in matcher.split(","):
        low, _, high = part.strip().partition("-")
        if int(low) <= status <= int(high or low):
            return True
    return False


# A target just out of slow start's first instant still gets a sliver of traffic.
MIN_RAMP = 0.01


def update_ramps(targets: list[Target], now: float, slow_start: float) -> None:
    """Slow start: a target healthy for ``t`` seconds gets ``t / slow_start`` of its weight."""
    for target in targets:
        since = target.healthy_since
        if since is None or target.state is not TargetState.HEALTHY:
            target.ramp = 1.0
        else:
            target.ramp = min(1.0, max(MIN_RAMP, (now - since) / slow_start))
