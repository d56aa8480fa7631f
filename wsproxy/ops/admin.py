"""The admin listener (aiohttp): health, readiness, metrics and a read-only view of targets."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from wsproxy import __version__
from wsproxy.address import Address, parse_address
from wsproxy.errors import TargetExists
from wsproxy.ops.logs import log_event
from wsproxy.ops.metrics import snapshot_listeners

if TYPE_CHECKING:
    from wsproxy.proxy import Proxy

log = logging.getLogger(__name__)

# The status page is one self-contained file: no external assets, so it works offline.
_STATUS_PAGE = resources.files("wsproxy.ops").joinpath("status.html").read_text(encoding="utf-8")
# Its inline script and style only, and fetches to this origin only.
_STATUS_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _mode(protocol: str, websocket: bool) -> str:
    if protocol == "tls_passthrough":
        return "tls passthrough"
    return f"{'tls' if protocol == 'tls' else 'plain'} {'websocket' if websocket else 'stream'}"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def listener_rows(proxy: Proxy) -> list[dict[str, Any]]:
    """``/v1/listeners`` of one process (a supervisor sums its workers' rows)."""
    snapshots = snapshot_listeners(proxy.metric_listeners())
    rows = []
    for name, listener in sorted(proxy.listeners.items()):
        snapshot = snapshots[name]
        config = listener.config
        rows.append(
            {
                "name": name,
                "address": str(listener.address) if listener.address else None,
                "mode": _mode(config.protocol, config.websocket),
                "connections_active": snapshot.stats.active,
                "connections_total": snapshot.stats.connections,
                "max_connections": snapshot.limit,
                "sessions": dict(snapshot.sessions),
                "messages_in": snapshot.messages_in,
                "messages_out": snapshot.messages_out,
                "bytes_in": snapshot.bytes_in,
                "bytes_out": snapshot.bytes_out,
                "certificate_not_after": snapshot.expiries,
            }
        )
    return rows


class AdminServer:
    def __init__(self, proxy: Proxy, address: Address) -> None:
        self._proxy = proxy
        self._requested = address
        self.address: Address | None = None
        self._runner: web.AppRunner | None = None
        token_file = proxy.config.admin.token_file
        self._token = Path(token_file).read_text(encoding="utf-8").strip() if token_file else None
        # Like the address and the token, fixed for the process's life (not reloaded).
        self._open_paths = proxy.config.admin.open_paths()

    async def start(self) -> None:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/status", self._status_page)
        app.router.add_get("/v1/listeners", self._listeners)
        app.router.add_get("/v1/workers", self._workers)
        app.router.add_get("/v1/target-groups", self._target_groups)
        app.router.add_get("/v1/target-groups/{name}", self._target_group)
        app.router.add_post("/v1/target-groups/{name}/targets", self._register)
        app.router.add_delete("/v1/target-groups/{name}/targets/{address}", self._deregister)
        app.router.add_post("/v1/drain", self._drain)
        app.router.add_post("/v1/reload", self._reload)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._requested.host, self._requested.port)
        await site.start()
        bound = self._runner.addresses[0]
        self.address = Address(str(bound[0]), int(bound[1]))
        log_event(log, "admin_up", "admin listening on http://%s/", self.address,
                  address=str(self.address))  # fmt: skip

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # [admin] unauthenticated names what answers without the token (config.AdminSection):
        # at least the probes, which orchestrators send without secrets, and the status page's
        # static HTML (it holds no data and asks for the token). Everything else needs it.
        if self._open_paths is None or request.path in self._open_paths:
            return await handler(request)
        if self._token is None:
            return _error(
                403,
                f"{request.path} needs a bearer token and this proxy has none: set [admin] "
                "token_file ([admin] unauthenticated lists the endpoints open without one)",
            )
        header = request.headers.get("Authorization", "")
        expected = f"Bearer {self._token}"
        if not hmac.compare_digest(header.encode(), expected.encode()):
            return _error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        return await handler(request)

    async def _register(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._proxy.upstreams:
            return _error(404, f"no target group {name!r}")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, 'body is not JSON; send {"address": "host:port", "weight": 1}')
        if not isinstance(body, dict) or set(body) - {"address", "weight"}:
            return _error(422, "expected an object with 'address' and optional 'weight'")
        try:
            address = parse_address(str(body.get("address", "")))
        except ValueError as exc:
            return _error(422, f"address: {exc}")
        weight = body.get("weight", 1)
        if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 1000:
            return _error(422, f"weight: must be an integer 1-1000, got {weight!r}")
        try:
            target = self._proxy.register(name, address, weight)
        except TargetExists as exc:
            return _error(409, str(exc))
        return web.json_response(
            {"address": str(target.address), "weight": target.weight, "state": target.state.value},
            status=201,
        )

    async def _deregister(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._proxy.upstreams:
            return _error(404, f"no target group {name!r}")
        try:
            address = parse_address(request.match_info["address"])
        except ValueError as exc:
            return _error(422, f"address: {exc}")
        try:
            target = self._proxy.deregister(name, address)
        except KeyError:
            return _error(404, f"no target {address} in target group {name!r}")
        except TargetExists as exc:
            return _error(409, str(exc))
        delay = self._proxy.upstreams[name].config.deregistration_delay_seconds
        return web.json_response(
            {"address": str(address), "state": target.state.value, "delay_seconds": delay},
            status=202,
        )

    async def _reload(self, request: web.Request) -> web.Response:
        errors = await self._proxy.reload()
        if errors:
            return web.json_response({"reloaded": False, "errors": errors}, status=422)
        return web.json_response({"reloaded": True})

    async def _drain(self, request: web.Request) -> web.Response:
        self._proxy.start_drain()
        return web.json_response({"draining": True}, status=202)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._proxy.draining:
            return web.Response(status=503, text="draining\n")
        workers = self._proxy.workers
        if workers is not None and not workers.ready:
            return web.Response(status=503, text="workers starting\n")
        return web.Response(text="ready\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        if self._proxy.workers is not None:
            await self._proxy.workers.refresh()
        body = self._proxy.metrics.render()
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})

    async def _status_page(self, request: web.Request) -> web.Response:
        return web.Response(
            text=_STATUS_PAGE,
            content_type="text/html",
            headers={"Cache-Control": "no-store", "Content-Security-Policy": _STATUS_CSP},
        )

    async def _listeners(self, request: web.Request) -> web.Response:
        proxy = self._proxy
        if proxy.workers is not None:
            await proxy.workers.refresh()
            listeners = proxy.workers.listener_rows()
        else:
            listeners = listener_rows(proxy)
        return web.json_response(
            {"version": __version__, "draining": proxy.draining, "listeners": listeners}
        )

    async def _workers(self, request: web.Request) -> web.Response:
        workers = self._proxy.workers
        if workers is None:
            return web.json_response({"workers": []})
        await workers.refresh()
        return web.json_response({"workers": workers.describe()})

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
        if self._proxy.workers is not None:
            await self._proxy.workers.refresh()  # active connections live in the workers
        return web.json_response(
            {"target_groups": [self._describe(name) for name in sorted(self._proxy.upstreams)]}
        )

    async def _target_group(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._proxy.upstreams:
            return _error(404, f"no target group {name!r}")
        if self._proxy.workers is not None:
            await self._proxy.workers.refresh()
        return web.json_response(self._describe(name))
