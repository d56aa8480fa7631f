"""Target states from the supervisor to a worker: reconciled exactly, drains left to run."""

from __future__ import annotations

import asyncio

from wsproxy.address import Address
from wsproxy.config import parse_config
from wsproxy.process.target_sync import (
    apply_snapshot,
    mark_passive_unhealthy,
    snapshot_key,
    target_snapshot,
)
from wsproxy.proxy import Proxy, Role
from wsproxy.targets.health import REASON_PASSIVE
from wsproxy.targets.target import Target, TargetState

CONFIG = """
[admin]
enabled = false
[listeners.edge]
address = "127.0.0.1:0"
default_target_group = "g"
[target_groups.g]
slow_start_seconds = 10
deregistration_delay_seconds = 0.2
targets = [{ address = "127.0.0.1:7001" }, { address = "127.0.0.1:7002" }]
"""


def states(proxy: Proxy) -> dict[str, tuple[str, int, str]]:
    return {
        str(t.address): (t.state.value, t.weight, t.reason)
        for t in proxy.target_groups["g"].targets
    }


async def test_a_worker_follows_the_supervisor() -> None:
    config = parse_config(CONFIG, "<test>")
    supervisor = Proxy(config, role=Role.SUPERVISOR)
    worker = Proxy(config, role=Role.WORKER)
    assert worker.health_checkers == {} and worker.admin is None
    now = asyncio.get_running_loop().time()
    group = supervisor.target_groups["g"]
    first, second = group.targets
    first.state, first.reason, first.healthy_since = TargetState.HEALTHY, "", now - 4
    second.state, second.reason = TargetState.UNHEALTHY, "Target.Timeout"
    group.targets.append(Target(Address("127.0.0.1", 7003), 5))  # registered at run time
    key = snapshot_key(supervisor.target_groups)

    apply_snapshot(worker, target_snapshot(supervisor.target_groups, now), now)
    assert states(worker) == states(supervisor)
    mirrored = worker.target_groups["g"].targets[0]
    assert mirrored.healthy_since is not None and abs(mirrored.healthy_since - (now - 4)) < 1e-6
    assert snapshot_key(supervisor.target_groups) == key  # nothing changed, nothing to send

    # Deregistered in the supervisor: the worker drains its own sessions, then drops the target.
    supervisor.deregister("g", Address("127.0.0.1", 7002))
    assert snapshot_key(supervisor.target_groups) != key
    apply_snapshot(worker, target_snapshot(supervisor.target_groups, now), now)
    assert states(worker)["127.0.0.1:7002"][0] == "draining"
    await asyncio.sleep(0.4)
    assert "127.0.0.1:7002" not in states(worker)
    # A target the supervisor no longer lists at all is drained too.
    apply_snapshot(worker, {"g": target_snapshot(supervisor.target_groups, now)["g"][:1]}, now)
    assert states(worker)["127.0.0.1:7003"][0] == "draining"
    # Groups the worker does not know yet (a reload is on its way) are skipped.
    apply_snapshot(worker, {"later": []}, now)
    await supervisor.shutdown(0)
    await worker.shutdown(0)


async def test_passive_failures_reported_by_a_worker() -> None:
    supervisor = Proxy(parse_config(CONFIG, "<test>"), role=Role.SUPERVISOR)
    group = supervisor.target_groups["g"]
    target = group.targets[0]
    target.state = TargetState.HEALTHY
    assert mark_passive_unhealthy(group, "127.0.0.1:7001", "3 failed connects")
    assert (target.state, target.reason) == (TargetState.UNHEALTHY, REASON_PASSIVE)
    assert not mark_passive_unhealthy(group, "127.0.0.1:7001", "again")  # already out
    assert not mark_passive_unhealthy(group, "127.0.0.1:9999", "unknown target")
    await supervisor.shutdown(0)
