"""The admin listener (aiohttp): health, readiness, metrics and a read-only view of targets."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from wsproxy import __version__
from wsproxy.address import Address, parse_address
from wsproxy.api.api import Api
from wsproxy.api.management import Management
from wsproxy.config import Config
from wsproxy.errors import TargetExists
from wsproxy.listener import Listener
from wsproxy.ops import status_page
from wsproxy.ops.cross_site import cross_site_refusal
from wsproxy.ops.logs import log_event
from wsproxy.ops.metrics import Metrics, snapshot_listeners
from wsproxy.targets.target import Target
from wsproxy.targets.target_group import TargetGroup


class WorkersView(Protocol):
    """The supervisor's workers, as the admin listener reads them (``workers`` > 1)."""

    @property
    def ready(self) -> bool: ...

    async def refresh(self) -> None:
        """Fetch the workers' counters (before an answer that shows them)."""

    def listener_rows(self) -> list[dict[str, Any]]: ...

    def api_rows(self) -> list[dict[str, Any]]: ...

    def describe(self) -> list[dict[str, Any]]: ...


class ProxyState(Protocol):
    """What the admin listener reads of the proxy: a read-only view (``Proxy`` is one)."""

    @property
    def config(self) -> Config: ...

    @property
    def draining(self) -> bool: ...

    @property
    def listeners(self) -> Mapping[str, Listener]: ...

    @property
    def target_groups(self) -> Mapping[str, TargetGroup]: ...

    @property
    def workers(self) -> WorkersView | None: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def management(self) -> Management: ...

    def metric_listeners(self) -> Sequence[Listener]: ...

    def metric_apis(self) -> Sequence[Api]: ...


class ProxyCommands(Protocol):
    """The few things the admin API may ask of the proxy (``Proxy`` does them)."""

    def register(self, group_name: str, address: Address, weight: int) -> Target: ...

    def deregister(self, group_name: str, address: Address) -> Target: ...

    async def reload(self, path: str | None = None) -> list[str]: ...

    def start_drain(self) -> None: ...


log = logging.getLogger(__name__)
# aiohttp's request handlers log here (instead of aiohttp.server), through _client_faults_quietly.
_http_log = logging.getLogger(f"{__name__}.http")


def _client_faults_quietly(record: logging.LogRecord) -> bool:
    """aiohttp logs a request it cannot parse (bytes not allowed in a header, a broken request
    line; answered 400) at error level with its traceback. The client is at fault, and any
    client can send it: one line at info instead, without the client's bytes."""
    exc = record.exc_info[1] if record.exc_info else None
    if not isinstance(exc, HttpProcessingError) or not 400 <= exc.code < 500:
        return True
    level = min(record.levelno, logging.INFO)  # aiohttp logs some at debug already
    if not _http_log.isEnabledFor(level):
        return False
    lines = exc.message.strip().splitlines() if isinstance(exc.message, str) else []
    remote = record.args[0] if isinstance(record.args, tuple) and record.args else "unknown"
    record.levelno, record.levelname = level, logging.getLevelName(level)
    record.msg = "admin: answered %s to %s: not valid HTTP (%s)"
    record.args = (exc.code, remote, lines[0].rstrip(":") if lines else "unparsable request")
    record.exc_info = record.exc_text = None
    return True


_http_log.addFilter(_client_faults_quietly)

# The status page is one self-contained file: no external assets, so it works offline.
_STATUS_PAGE = status_page.StatusTemplate(
    resources.files("wsproxy.ops").joinpath("status.html").read_text(encoding="utf-8")
)
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


_REGISTER_HINT = 'send {"address": "host:port", "weight": 1}'


def _json_kind(value: object) -> str:
    """What a JSON value is, for an error message (never the value: it may be huge or deep)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


async def _json_body(request: web.Request) -> object:
    """The request's body as JSON; ``web.HTTPException`` (answered as JSON) when it is not.

    Over ``client_max_size`` is 413 (aiohttp). The body must be UTF-8 (RFC 8259 §8.1: JSON
    exchanged between systems is UTF-8), whatever charset ``Content-Type`` names. Too deep a
    nesting is 400: CPython's parser recurses per level and raises ``RecursionError``.
    """
    raw = await request.read()
    if not raw.strip():
        raise web.HTTPBadRequest(text=f"the body is empty; {_REGISTER_HINT}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise web.HTTPBadRequest(
            text=f"the body is not UTF-8 (byte {exc.start}); JSON is UTF-8 (RFC 8259 §8.1)"
        ) from None
    try:
        return json.loads(text)
    except RecursionError:
        raise web.HTTPBadRequest(
            text=f"the body's JSON nests too deeply; {_REGISTER_HINT}"
        ) from None
    except json.JSONDecodeError as exc:
        raise web.HTTPBadRequest(
            text=f"the body is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            f"{_REGISTER_HINT}"
        ) from None
    except ValueError as exc:  # e.g. an integer over Python's 4,300-digit conversion limit
        raise web.HTTPBadRequest(
            text=f"the body is not usable JSON ({str(exc).partition(':')[0]}); {_REGISTER_HINT}"
        ) from None


# RFC 2585 §4.2 registers application/pkix-crl for a DER CRL, which is what an HTTP CRL
# Distribution Point must serve (RFC 5280 §4.2.1.13); the PEM form is for people and tools.
CRL_DER_TYPE = "application/pkix-crl"
CRL_PEM_TYPE = "application/x-pem-file"


def crl_files(proxy: ProxyState) -> dict[str, str]:
    """Listener name -> the CRL file it checks client certificates against (``tls.crl``)."""
    return {
        name: listener.tls.crl
        for name, listener in sorted(proxy.config.listeners.items())
        if listener.tls is not None and listener.tls.crl
    }


def api_rows(proxy: ProxyState) -> list[dict[str, Any]]:
    """``/v1/apis`` of one process (a supervisor sums its workers' rows)."""
    rows = []
    listeners = proxy.config.listeners
    for api in proxy.metric_apis():
        stats = api.stats
        routes = []
        for route in api.config.routes:
            errors = {
                reason: count
                for (key, reason), count in sorted(stats.errors.items())
                if key == route.key
            }
            routes.append(
                {
                    "key": route.key,
                    "target_group": route.target_group,
                    "path": route.path,
                    "messages_in": stats.messages[(route.key, "in")],
                    "messages_out": stats.messages[(route.key, "out")],
                    "errors": errors,
                }
            )
        rows.append(
            {
                "name": api.name,
                "listeners": sorted(n for n, c in listeners.items() if c.api == api.name),
                "connections": stats.connections,
                "group_members": api.group_members,
                "routes": routes,
            }
        )
    return rows


def sum_api_rows(reports: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Workers' ``/v1/apis`` rows as one: counts added, route by route."""
    merged: dict[str, dict[str, Any]] = {}
    for rows in reports:
        for row in rows:
            into = merged.get(row["name"])
            if into is None:
                merged[row["name"]] = json.loads(json.dumps(row))  # a deep copy
                continue
            into["connections"] += row["connections"]
            into["group_members"] += row["group_members"]
            routes = {route["key"]: route for route in into["routes"]}
            for route in row["routes"]:
                mine = routes.get(route["key"])
                if mine is None:
                    into["routes"].append(route)
                    continue
                mine["messages_in"] += route["messages_in"]
                mine["messages_out"] += route["messages_out"]
                for reason, count in route["errors"].items():
                    mine["errors"][reason] = mine["errors"].get(reason, 0) + count
    return [merged[name] for name in sorted(merged)]


def listener_rows(proxy: ProxyState) -> list[dict[str, Any]]:
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


def _public(path: str) -> bool:
    """Paths open whatever ``[admin] unauthenticated`` says: ``/`` only redirects to the status
    page, and CRLs are signed public data that CRL clients fetch without any token."""
    if path in ("/", "/v1/crl", "/v1/crl.pem"):
        return True
    return path.startswith("/v1/listeners/") and path.endswith(("/crl", "/crl.pem"))


class AdminServer:
    """The admin listener: reads the proxy through ``ProxyState``, acts through
    ``ProxyCommands`` (both are the ``Proxy`` in production; it never imports it)."""

    def __init__(self, proxy: ProxyState, commands: ProxyCommands, address: Address) -> None:
        self._proxy = proxy
        self._commands = commands
        self._requested = address
        self.address: Address | None = None
        self._runner: web.AppRunner | None = None
        token_file = proxy.config.admin.token_file
        self._token = Path(token_file).read_text(encoding="utf-8").strip() if token_file else None
        self._expected = f"Bearer {self._token}".encode() if self._token is not None else None
        # Like the address and the token, fixed for the process's life (not reloaded).
        self._open_paths = proxy.config.admin.open_paths()

    async def start(self) -> None:
        app = web.Application(middlewares=[self._json_errors, self._auth])
        app.router.add_get("/", self._root)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/status", self._status_page)
        app.router.add_get("/v1/listeners", self._listeners)
        app.router.add_get("/v1/crl", self._crl)
        app.router.add_get("/v1/crl.pem", self._crl)
        app.router.add_get("/v1/listeners/{name}/crl", self._crl)
        app.router.add_get("/v1/listeners/{name}/crl.pem", self._crl)
        app.router.add_get("/v1/workers", self._workers)
        app.router.add_get("/v1/apis", self._apis)
        app.router.add_get("/v1/target-groups", self._target_groups)
        app.router.add_get("/v1/target-groups/{name}", self._target_group)
        app.router.add_post("/v1/target-groups/{name}/targets", self._register)
        app.router.add_delete("/v1/target-groups/{name}/targets/{address}", self._deregister)
        app.router.add_post("/v1/drain", self._drain)
        app.router.add_post("/v1/reload", self._reload)
        self._proxy.management.add_routes(app.router)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, logger=_http_log)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._requested.host, self._requested.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(
                exc.errno,
                f"admin listener: cannot bind {self._requested}: {exc.strerror or exc}; "
                "stop what listens there or choose another [admin] address",
            ) from None
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
        refusal = cross_site_refusal(request, tokenless=self._token is None)
        if refusal is not None:
            return _error(403, f"refused {refusal}; use curl or another non-browser client")
        path = request.path
        if self._open_paths is None or path in self._open_paths or _public(path):
            return await handler(request)
        if self._token is None:
            return _error(
                403,
                f"{request.path} needs a bearer token and this proxy has none: set [admin] "
                "token_file ([admin] unauthenticated lists the endpoints open without one)",
            )
        if not self._has_token(request):
            return _error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        return await handler(request)

    @web.middleware
    async def _json_errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error as JSON ``{"error": ...}``: aiohttp's own 404, 405 (with ``Allow``), 413
        and the like, and an unexpected exception (logged with its traceback, answered 500)."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise  # redirects
            headers = {key: exc.headers[key] for key in ("Allow",) if key in exc.headers}
            if exc.status == 404:
                message = (
                    f"no {request.method} {request.path} here; the admin API is listed in "
                    "docs/operations.md (GET /status for the status page)"
                )
            elif exc.status == 405:
                allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ())))
                message = f"{request.method} is not allowed on {request.path}; use {allowed}"
            else:
                default = f"{exc.status}: {exc.reason}"
                message = exc.text if exc.text and exc.text != default else exc.reason
            return _error(exc.status, message, headers)
        except Exception:  # the request's boundary: answer it, keep the listener serving
            log.exception("admin %s %s failed", request.method, request.path)
            return _error(500, "internal error; the proxy's log has the traceback")

    async def _root(self, request: web.Request) -> web.StreamResponse:
        # Relative, so the page is found behind a reverse proxy that mounts the admin listener
        # under a path prefix (the page's own fetches are relative too).
        raise web.HTTPFound("status")

    async def _crl(self, request: web.Request) -> web.Response:
        """The current CRL of ``tls.crl``, DER (``/crl``) or PEM (``/crl.pem``), read from the
        file at every request, so a revocation shows up as soon as ``wsproxy ca revoke`` wrote
        it. ``/v1/crl`` when every listener checks the same file; per listener otherwise."""
        files = crl_files(self._proxy)
        name = request.match_info.get("name")
        if name is not None:
            if name not in self._proxy.config.listeners:
                return _error(404, f"no listener {name!r}")
            if name not in files:
                return _error(404, f"listener {name!r} checks no CRL (its tls.crl is not set)")
            path = files[name]
        else:
            distinct = sorted(set(files.values()))
            if not distinct:
                return _error(
                    404,
                    "no listener checks a CRL; set crl (e.g. the CA's ca/crl.pem) in the "
                    "[listeners.NAME.tls] of an mTLS listener to publish it here",
                )
            if len(distinct) > 1:
                using = ", ".join(f"{n}: {f}" for n, f in files.items())
                return _error(
                    409,
                    f"listeners check different CRLs ({using}); fetch "
                    "/v1/listeners/NAME/crl for one of them",
                )
            path = distinct[0]
        try:
            crl = x509.load_pem_x509_crl(await asyncio.to_thread(Path(path).read_bytes))
        except OSError as exc:
            return _error(503, f"cannot read the CRL {path}: {exc.strerror}")
        except ValueError:
            return _error(
                503, f"{path} is not a PEM CRL; publish it again with `wsproxy ca crl --dir DIR`"
            )
        pem = request.path.endswith(".pem")
        encoding = serialization.Encoding.PEM if pem else serialization.Encoding.DER
        return web.Response(
            body=crl.public_bytes(encoding),
            content_type=CRL_PEM_TYPE if pem else CRL_DER_TYPE,
            # Revocations must show at once: clients may keep a copy but must ask again.
            headers={"Cache-Control": "no-cache"},
        )

    async def _register(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._proxy.target_groups:
            return _error(404, f"no target group {name!r}")
        body = await _json_body(request)
        if not isinstance(body, dict):
            return _error(422, f"expected a JSON object, got {_json_kind(body)}; {_REGISTER_HINT}")
        unknown = sorted(set(body) - {"address", "weight"})
        if unknown:
            names = ", ".join(repr(key[:40]) for key in unknown[:3])
            return _error(422, f"unknown key(s) {names}: only 'address' and 'weight' are known")
        given = body.get("address")
        if not isinstance(given, str):
            kind = _json_kind(given) if "address" in body else "nothing (no such key)"
            return _error(422, f"address: must be a string 'host:port', got {kind}")
        try:
            address = parse_address(given)
        except ValueError as exc:
            return _error(422, f"address: {exc}")
        weight = body.get("weight", 1)
        if not isinstance(weight, int) or isinstance(weight, bool):
            return _error(422, f"weight: must be an integer 1-1000, got {_json_kind(weight)}")
        if not 1 <= weight <= 1000:
            shown = str(weight) if abs(weight) < 10**9 else "a larger number"
            return _error(422, f"weight: must be an integer 1-1000, got {shown}")
        try:
            target = self._commands.register(name, address, weight)
        except TargetExists as exc:
            return _error(409, str(exc))
        return web.json_response(
            {"address": str(target.address), "weight": target.weight, "state": target.state.value},
            status=201,
        )

    async def _deregister(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._proxy.target_groups:
            return _error(404, f"no target group {name!r}")
        try:
            address = parse_address(request.match_info["address"])
        except ValueError as exc:
            return _error(422, f"address: {exc}")
        try:
            target = self._commands.deregister(name, address)
        except KeyError:
            return _error(404, f"no target {address} in target group {name!r}")
        except TargetExists as exc:
            return _error(409, str(exc))
        delay = self._proxy.target_groups[name].config.deregistration_delay_seconds
        return web.json_response(
            {"address": str(address), "state": target.state.value, "delay_seconds": delay},
            status=202,
        )

    async def _reload(self, request: web.Request) -> web.Response:
        errors = await self._commands.reload()
        if errors:
            return web.json_response({"reloaded": False, "errors": errors}, status=422)
        return web.json_response({"reloaded": True})

    async def _drain(self, request: web.Request) -> web.Response:
        self._commands.start_drain()
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

    def _has_token(self, request: web.Request) -> bool:
        """Whether the request may see data: no token configured, or the right one sent."""
        if self._expected is None:
            return True
        # aiohttp decodes header bytes as UTF-8 with surrogateescape, so a byte that is not
        # UTF-8 (0xff) comes back here as the bytes the client sent, instead of raising.
        sent = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        return hmac.compare_digest(sent, self._expected)

    async def _status_page(self, request: web.Request) -> web.Response:
        # The first view is rendered here, so curl and clients without scripts see the states;
        # the page itself stays open without the token (_auth), so its data needs the token.
        if self._has_token(request):
            if self._proxy.workers is not None:
                await self._proxy.workers.refresh()
            page = status_page.render(
                _STATUS_PAGE,
                version=__version__,
                draining=self._proxy.draining,
                listeners=self._listener_rows(),
                target_groups=[self._describe(name) for name in sorted(self._proxy.target_groups)],
                now=time.time(),
                apis=self._api_rows(),
            )
        else:
            page = status_page.render_locked(_STATUS_PAGE)
        return web.Response(
            text=page,
            content_type="text/html",
            headers={"Cache-Control": "no-store", "Content-Security-Policy": _STATUS_CSP},
        )

    def _listener_rows(self) -> list[dict[str, Any]]:
        """The rows of ``/v1/listeners`` (refresh the workers' counters first)."""
        workers = self._proxy.workers
        return workers.listener_rows() if workers is not None else listener_rows(self._proxy)

    async def _listeners(self, request: web.Request) -> web.Response:
        proxy = self._proxy
        if proxy.workers is not None:
            await proxy.workers.refresh()
        return web.json_response(
            {"version": __version__, "draining": proxy.draining, "listeners": self._listener_rows()}
        )

    def _api_rows(self) -> list[dict[str, Any]]:
        workers = self._proxy.workers
        return workers.api_rows() if workers is not None else api_rows(self._proxy)

    async def _apis(self, request: web.Request) -> web.Response:
        """The WebSocket APIs: routes with their counts, connections (summed over workers)."""
        if self._proxy.workers is not None:
            await self._proxy.workers.refresh()
        return web.json_response({"apis": self._api_rows()})

    async def _workers(self, request: web.Request) -> web.Response:
        workers = self._proxy.workers
        if workers is None:
            return web.json_response({"workers": []})
        await workers.refresh()
        return web.json_response({"workers": workers.describe()})

    def _describe(self, name: str) -> dict[str, object]:
        group = self._proxy.target_groups[name]
        targets = []
        for target in group.targets:
            record = group.records.get(target)
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
            "algorithm": group.config.algorithm.value,
            "failing_open": group.failing_open,
            "targets": targets,
        }

    async def _target_groups(self, request: web.Request) -> web.Response:
        if self._proxy.workers is not None:
            await self._proxy.workers.refresh()  # active connections live in the workers
        return web.json_response(
            {"target_groups": [self._describe(name) for name in sorted(self._proxy.target_groups)]}
        )

    async def _target_group(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._proxy.target_groups:
            return _error(404, f"no target group {name!r}")
        if self._proxy.workers is not None:
            await self._proxy.workers.refresh()
        return web.json_response(self._describe(name))
