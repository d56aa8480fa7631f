"""The admin listener (aiohttp): health, readiness, metrics and a read-only view of targets."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp import web

from wsproxy.address import Address

if TYPE_CHECKING:
    from wsproxy.proxy import Proxy

log = logging.getLogger(__name__)


class AdminServer:
    def __init__(self, proxy: Proxy, address: Address) -> None:
        self._proxy = proxy
        self._requested = address
        self.address: Address | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/target-groups", self._target_groups)
        app.router.add_get("/v1/target-groups/{name}", self._target_group)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._requested.host, self._requested.port)
        await site.start()
        bound = self._runner.addresses[0]
        self.address = Address(str(bound[0]), int(bound[1]))
        log.info("admin listening on http://%s/", self.address)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._proxy.draining:
            return web.Response(status=503, text="draining\n")
        return web.Response(text="ready\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self._proxy.metrics.render()
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})

    def _describe(self, name: str) -> dict[str, object]:
        upstream = self._proxy.upstreams[name]
        targets = []
        for target in upstream.group.targets:
            record = upstream.records.get(id(target))
            history = list(record.history) if record else []
            targets.append(
                {
                    "address": str(target.address),
                    "weight": target.weight,
                    "state": target.state.value,
                    "reason": target.reason,
                    "active_connections": target.active,
                    "health_checks": [
                        {"ok": result.ok, "detail": result.detail} for result in history
                    ],
                }
            )
        return {
            "name": name,
            "algorithm": upstream.config.algorithm.value,
            "failing_open": upstream.failing_open,
            "targets": targets,
        }

    async def _target_groups(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"target_groups": [self._describe(name) for name in sorted(self._proxy.upstreams)]}
        )

    async def _target_group(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._proxy.upstreams:
            return web.json_response({"error": f"no target group {name!r}"}, status=404)
        return web.json_response(self._describe(name))
