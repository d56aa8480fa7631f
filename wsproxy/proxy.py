"""The composition root: builds listeners, target groups and the admin listener from a config."""

from __future__ import annotations

import asyncio
import logging
import random

from wsproxy.address import Address
from wsproxy.admin import AdminServer
from wsproxy.balancer import make_balancer
from wsproxy.config import Config
from wsproxy.errors import TargetExists
from wsproxy.health_checker import HealthChecker
from wsproxy.listener import Listener
from wsproxy.metrics import Metrics, ProxyCollector
from wsproxy.target_group import Target, TargetGroup, TargetState
from wsproxy.upstream import Upstream

log = logging.getLogger(__name__)


class Proxy:
    """Owns everything one config generation needs; ``start``, then ``shutdown``."""

    def __init__(self, config: Config, *, rng: random.Random | None = None) -> None:
        self.config = config
        rng = rng or random.Random()  # noqa: S311  # balancing, not cryptography
        self.upstreams: dict[str, Upstream] = {}
        for name, group_config in config.target_groups.items():
            group = TargetGroup(name, [Target(t.address, t.weight) for t in group_config.targets])
            self.upstreams[name] = Upstream(
                group_config, group, make_balancer(group_config.algorithm, rng)
            )
        self.listeners = {
            name: Listener(name, listener_config, self.upstreams)
            for name, listener_config in config.listeners.items()
        }
        self.draining = False
        self.metrics = Metrics(
            ProxyCollector(
                lambda: self.listeners.values(),
                lambda: self.upstreams.values(),
                lambda: self.draining,
            )
        )
        self.admin = AdminServer(self, config.admin.address) if config.admin.enabled else None
        self.health_checkers = [
            HealthChecker(upstream, upstream.config.health_check, rng)
            for upstream in self.upstreams.values()
            if upstream.config.health_check is not None
        ]
        self._stopped = asyncio.Event()
        self._drained = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind every listener (and the admin listener); on failure, nothing stays bound."""
        try:
            for listener in self.listeners.values():
                await listener.start()
            if self.admin is not None:
                await self.admin.start()
            for checker in self.health_checkers:
                checker.start()
        except BaseException:
            for listener in self.listeners.values():
                listener.stop_accepting()
            raise

    async def drain(self, grace: float | None = None) -> None:
        """Readiness off, stop accepting, close connections within the grace period.

        WebSocket sessions get Close 1001 at a message boundary, the closes spread over the first
        half of the grace period; stream connections are closed when it ends. The admin listener
        keeps answering (``POST /v1/drain`` drains without exiting).
        """
        if self._drained.is_set() or self.draining:
            await self._drained.wait()
            return
        self.draining = True
        grace = self.config.proxy.shutdown_grace_seconds if grace is None else grace
        active = sum(len(listener.flows) for listener in self.listeners.values())
        log.info("draining %d connection(s) within %g s", active, grace)
        for listener in self.listeners.values():
            listener.stop_accepting()
        await asyncio.gather(
            *(listener.drain(grace, grace / 2) for listener in self.listeners.values())
        )
        self._drained.set()

    def start_drain(self) -> None:
        """``POST /v1/drain``: drain in the background; the process keeps running."""
        if not self.draining:
            task = asyncio.get_running_loop().create_task(self.drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def shutdown(self, grace: float | None = None) -> None:
        """Drain, then stop health checks, background tasks and the admin listener."""
        await self.drain(grace)
        if self._stopped.is_set():
            return
        for checker in self.health_checkers:
            await checker.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.admin is not None:
            await self.admin.stop()
        self._stopped.set()
        log.info("stopped")

    # --- targets at run time (admin API) --------------------------------------------------------

    def register(self, group_name: str, address: Address, weight: int) -> Target:
        """Add a target (state ``initial``); raises ``KeyError`` / ``TargetExists``."""
        upstream = self.upstreams[group_name]
        if upstream.group.find(address) is not None:
            raise TargetExists(f"target {address} is already in target group '{group_name}'")
        target = Target(address, weight)
        upstream.group.targets.append(target)
        for checker in self.health_checkers:
            if checker.upstream is upstream:
                checker.watch(target)
        log.info("target group '%s': registered %s (weight %d)", group_name, address, weight)
        return target

    def deregister(self, group_name: str, address: Address) -> Target:
        """Start draining a target: no new connections; its sessions are closed spread over the
        group's ``deregistration_delay_seconds``; then it becomes ``unused`` and is removed."""
        upstream = self.upstreams[group_name]
        target = upstream.group.find(address)
        if target is None:
            raise KeyError(address)
        if target.state in (TargetState.DRAINING, TargetState.UNUSED):
            raise TargetExists(f"target {address} is already {target.state.value}")
        target.state = TargetState.DRAINING
        target.reason = "Target.DeregistrationInProgress"
        task = asyncio.get_running_loop().create_task(self._drain_target(upstream, target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return target

    async def _drain_target(self, upstream: Upstream, target: Target) -> None:
        delay = upstream.config.deregistration_delay_seconds
        loop = asyncio.get_running_loop()
        flows = [
            flow
            for listener in self.listeners.values()
            for flow in listener.flows
            if flow.target is target
        ]
        log.info(
            "target group '%s': draining %s: %d session(s) over %g s",
            upstream.name,
            target.address,
            len(flows),
            delay,
        )
        # Spread the closes so the clients reconnect gradually, not in one storm.
        for index, flow in enumerate(flows):
            at = delay * index / len(flows)
            loop.call_later(at, flow.drain, max(0.0, delay - at))
        await asyncio.sleep(delay)
        for flow in [f for listener in self.listeners.values() for f in listener.flows]:
            if flow.target is target:
                flow.abort()
        target.state = TargetState.UNUSED
        target.reason = "Target.NotRegistered"
        if target in upstream.group.targets:
            upstream.group.targets.remove(target)
        log.info("target group '%s': %s deregistered", upstream.name, target.address)
