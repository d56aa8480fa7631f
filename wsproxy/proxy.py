"""The composition root: builds listeners, target groups and the admin listener from a config."""

from __future__ import annotations

import asyncio
import logging
import random

from wsproxy.admin import AdminServer
from wsproxy.balancer import make_balancer
from wsproxy.config import Config
from wsproxy.health_checker import HealthChecker
from wsproxy.listener import Listener
from wsproxy.metrics import Metrics, ProxyCollector
from wsproxy.target_group import Target, TargetGroup
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

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, close connections within the grace period, stop the admin listener.

        WebSocket sessions get Close 1001 at a message boundary, the closes spread over the first
        half of the grace period; stream connections are closed when it ends.
        """
        if self.draining:
            await self._stopped.wait()
            return
        self.draining = True
        grace = self.config.proxy.shutdown_grace_seconds if grace is None else grace
        active = sum(len(listener.flows) for listener in self.listeners.values())
        log.info("shutting down: draining %d connection(s) within %g s", active, grace)
        for listener in self.listeners.values():
            listener.stop_accepting()
        await asyncio.gather(
            *(listener.drain(grace, grace / 2) for listener in self.listeners.values())
        )
        for checker in self.health_checkers:
            await checker.stop()
        if self.admin is not None:
            await self.admin.stop()
        self._stopped.set()
        log.info("stopped")
