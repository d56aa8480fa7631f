"""Target states shared from the supervisor (which probes each target once) to its workers.

The supervisor sends a whole snapshot whenever something in it changes; a worker reconciles its
target groups with it. Draining is the one state a worker acts on itself: it closes its own
sessions of that target, spread over the group's deregistration delay.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from wsproxy.address import parse_address
from wsproxy.targets.health import REASON_PASSIVE
from wsproxy.targets.target import Target, TargetState
from wsproxy.targets.target_group import log_target_state

if TYPE_CHECKING:
    from wsproxy.proxy import Proxy
    from wsproxy.targets.target_group import TargetGroup

Snapshot = dict[str, list[dict[str, Any]]]
_GONE = (TargetState.DRAINING, TargetState.UNUSED)


def target_snapshot(groups: Mapping[str, TargetGroup], now: float) -> Snapshot:
    """Every target of every group. Slow start travels as an age (clocks are per process)."""
    return {
        name: [
            {
                "address": str(target.address),
                "weight": target.weight,
                "state": target.state.value,
                "reason": target.reason,
                "healthy_for": None if target.healthy_since is None else now - target.healthy_since,
            }
            for target in group.targets
        ]
        for name, group in groups.items()
    }


def snapshot_key(groups: Mapping[str, TargetGroup]) -> tuple[object, ...]:
    """What a worker must hear about when it changes (not the ever-growing ages)."""
    return tuple(
        (name, tuple((t.address, t.weight, t.state, t.reason, t.healthy_since) for t in targets))
        for name, targets in ((name, u.targets) for name, u in groups.items())
    )


def apply_snapshot(proxy: Proxy, snapshot: Snapshot, now: float) -> None:
    """Make a worker's targets match the supervisor's (groups it does not know are skipped: a
    reload that adds them is on its way)."""
    for name, rows in snapshot.items():
        group = proxy.target_groups.get(name)
        if group is None:
            continue
        wanted = {parse_address(row["address"]): row for row in rows}
        for target in list(group.targets):
            if target.state in _GONE:
                wanted.pop(target.address, None)
                continue  # its local drain runs its course
            row = wanted.pop(target.address, None)
            state = TargetState(row["state"]) if row else TargetState.UNUSED
            if state in _GONE:
                proxy.deregister(name, target.address)
                continue
            _take(target, row)
            target.state = state
        for address, row in wanted.items():
            state = TargetState(row["state"])
            if state not in _GONE:
                target = Target(address, int(row["weight"]), state)
                _take(target, row)
                group.targets.append(target)
        _set_ages(group, rows, now)


def _take(target: Target, row: dict[str, Any] | None) -> None:
    if row is None:
        return
    target.weight = int(row["weight"])
    target.reason = str(row["reason"])
    if TargetState(row["state"]) is TargetState.HEALTHY:
        target.connect_failures = 0


def _set_ages(group: TargetGroup, rows: list[dict[str, Any]], now: float) -> None:
    ages = {row["address"]: row["healthy_for"] for row in rows}
    for target in group.targets:
        age = ages.get(str(target.address))
        if target.state is TargetState.HEALTHY:
            target.healthy_since = None if age is None else now - float(age)


def mark_passive_unhealthy(group: TargetGroup, address: str, detail: str) -> bool:
    """A worker saw consecutive failed dials: the supervisor takes the target out for everyone
    until active checks bring it back (the worker counted the transition already)."""
    target = group.find(parse_address(address))
    if target is None or target.state not in (TargetState.INITIAL, TargetState.HEALTHY):
        return False
    before = target.state
    target.state = TargetState.UNHEALTHY
    target.reason = REASON_PASSIVE
    group.health_record(target).successes = 0
    log_target_state(group.name, target, before, f"{detail} (reported by a worker)")
    return True
