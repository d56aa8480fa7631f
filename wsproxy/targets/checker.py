"""One health checker per target group: probes each target on a jittered interval."""

from __future__ import annotations

import asyncio
import logging
import random

from wsproxy.config import HealthCheckConfig
from wsproxy.targets.health import CheckResult, record_check
from wsproxy.targets.probe import run_probe
from wsproxy.targets.target import Target, TargetState, log_target_state
from wsproxy.targets.target_group import Upstream

log = logging.getLogger(__name__)

# ±10 %: targets are not all probed in the same instant (and neither are proxies).
JITTER = 0.1


class HealthChecker:
    """Runs the active checks of one target group; ``stop`` cancels and awaits every task."""

    def __init__(self, upstream: Upstream, check: HealthCheckConfig, rng: random.Random) -> None:
        self.upstream = upstream
        self.check = check
        self._rng = rng
        self._tasks: dict[int, asyncio.Task[None]] = {}

    def start(self) -> None:
        for target in self.upstream.group.targets:
            self.watch(target)

    def watch(self, target: Target) -> None:
        if id(target) not in self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks[id(target)] = loop.create_task(self._loop(target))

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self, target: Target) -> None:
        check = self.check
        upstream = self.upstream
        tls_config = upstream.config.tls
        loop = asyncio.get_running_loop()
        while target.state is not TargetState.UNUSED:
            ok, detail, timed_out = await run_probe(
                check,
                target.address,
                tls=upstream.ssl_context,
                server_name=tls_config.server_name if tls_config else None,
                proxy_v2=upstream.config.proxy_protocol_v2,
            )
            address = str(target.address)
            stats = upstream.stats
            stats.health_checks[
                (address, "ok" if ok else "timeout" if timed_out else "failed")
            ] += 1
            record = upstream.health_record(target)
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
                log_target_state(upstream.name, target, before, detail)
            jitter = 1 + self._rng.uniform(-JITTER, JITTER)
            await asyncio.sleep(check.interval_seconds * jitter)
