"""One health checker per target group: probes each target on a jittered interval."""

from __future__ import annotations

import asyncio
import logging
import random

from wsproxy.config import HealthCheckConfig
from wsproxy.targets.health import CheckResult, record_check
from wsproxy.targets.probe import run_probe
from wsproxy.targets.target import Target, TargetState
from wsproxy.targets.target_group import TargetGroup, log_target_state

log = logging.getLogger(__name__)

# ±10 %: targets are not all probed in the same instant (and neither are proxies).
JITTER = 0.1


class HealthChecker:
    """Runs the active checks of one target group; ``stop`` cancels and awaits every task."""

    def __init__(self, group: TargetGroup, check: HealthCheckConfig, rng: random.Random) -> None:
        self.group = group
        self.check = check
        self._rng = rng
        # Keyed by the target itself: a target that left and a new one at the same memory
        # address are two keys (an ``id()`` key mistook one for the other). A task removes its
        # own entry when its target leaves the group.
        self._tasks: dict[Target, asyncio.Task[None]] = {}

    def start(self) -> None:
        """Probe every target of the group (again: targets added since are picked up)."""
        for target in self.group.targets:
            self.watch(target)

    def watch(self, target: Target) -> None:
        if target not in self._tasks:
            task = asyncio.get_running_loop().create_task(self._loop(target))
            self._tasks[target] = task
            task.add_done_callback(lambda _: self._forget(target, task))

    def _forget(self, target: Target, task: asyncio.Task[None]) -> None:
        if self._tasks.get(target) is task:
            del self._tasks[target]

    @property
    def watched(self) -> frozenset[Target]:
        """The targets probed now."""
        return frozenset(self._tasks)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self, target: Target) -> None:
        check = self.check
        group = self.group
        tls_config = group.config.tls
        loop = asyncio.get_running_loop()
        while target.state is not TargetState.UNUSED and target in group.targets:
            ok, detail, timed_out = await run_probe(
                check,
                target.address,
                tls=group.ssl_context,
                server_name=tls_config.server_name if tls_config else None,
                proxy_v2=group.config.proxy_protocol_v2,
            )
            if target not in group.targets:
                return  # it left while the probe ran: its record is gone, keep it so
            address = target.label
            stats = group.stats
            stats.health_checks[
                (address, "ok" if ok else "timeout" if timed_out else "failed")
            ] += 1
            record = group.health_record(target)
            before = target.state
            if record_check(
                target,
                record,
                CheckResult(loop.time(), ok, detail),
                healthy_threshold=check.healthy_threshold,
                unhealthy_threshold=check.unhealthy_threshold,
                timed_out=timed_out,
            ):
                if TargetState.UNHEALTHY in (before, target.state):
                    stats.transitions[address] += 1
                log_target_state(group.name, target, before, detail)
            jitter = 1 + self._rng.uniform(-JITTER, JITTER)
            await asyncio.sleep(check.interval_seconds * jitter)
