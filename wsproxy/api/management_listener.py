"""An API's management listener (``[apis.NAME.management]``): the @connections API on an
address of its own, for backends on other machines.

With ``tls.client_auth = "required"`` a backend authenticates with a client certificate from
``client_ca`` (one that ``wsproxy ca issue client`` minted for it) and sends no token; otherwise
every call needs the admin token, as on the admin listener.
"""

from __future__ import annotations

import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from wsproxy.address import Address
from wsproxy.api.management import Management
from wsproxy.config import ApiManagementConfig
from wsproxy.errors import ClientCertRejected, ConfigError, ConfigIssue
from wsproxy.ops.cross_site import cross_site_refusal
from wsproxy.ops.logs import log_event
from wsproxy.tls import ServerTls

log = logging.getLogger(__name__)
_http_log = logging.getLogger("wsproxy.api.management.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ManagementListener:
    """Serves ``management``'s routes for the API ``api`` on ``config.address``."""

    def __init__(
        self,
        api: str,
        config: ApiManagementConfig,
        management: Management,
        token_file: str | None,
    ) -> None:
        self.api = api
        self.config = config
        token = Path(token_file).read_text(encoding="utf-8").strip() if token_file else None
        if token_file is not None and not token:
            # Never "no token, so no check": the config promised calls need this token.
            raise ConfigError(
                token_file,
                [ConfigIssue("admin.token_file", f"{token_file} is empty; put a token in it")],
            )
        self._expected = f"Bearer {token}".encode() if token else None
        self._management = management.serving(api)
        self.tls = ServerTls(f"{api}-management", config.tls) if config.tls is not None else None
        self._by_certificate = config.tls is not None and config.tls.client_auth == "required"
        self.address: Address | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(middlewares=[self._auth])
        self._management.add_routes(app.router)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, logger=_http_log)
        await self._runner.setup()
        context: ssl.SSLContext | None = self.tls.context if self.tls is not None else None
        requested = self.config.address
        site = web.TCPSite(self._runner, requested.host, requested.port, ssl_context=context)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(
                exc.errno,
                f"apis.{self.api}.management: cannot bind {requested}: {exc.strerror or exc}",
            ) from None
        host, port = self._runner.addresses[0][:2]
        self.address = Address(str(host), int(port))
        scheme = "https" if context is not None else "http"
        where = str(self.address)
        log_event(log, "management_up", "API '%s' management listening on %s://%s/",
                  self.api, scheme, where, api=self.api, address=where)  # fmt: skip

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._by_certificate:
            refusal = self._certificate_refusal(request)
            if refusal is None:
                return await handler(request)
            return web.json_response({"error": refusal}, status=403)
        refusal = cross_site_refusal(request, tokenless=self._expected is None)
        if refusal is not None:
            return web.json_response(
                {"error": f"refused {refusal}; use curl or another non-browser client"},
                status=403,
            )
        if self._expected is None:
            return await handler(request)  # loopback without a token (checked by the config)
        sent = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(sent, self._expected):
            return web.json_response(
                {"error": "missing or wrong bearer token (the admin token)"},
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    def _certificate_refusal(self, request: web.Request) -> str | None:
        tls = self.tls
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if tls is None or ssl_object is None:
            return "a client certificate is required"
        try:
            certificate = tls.client_certificate(ssl_object)
        except ClientCertRejected as exc:
            return str(exc)
        if certificate is None:
            return "a client certificate is required"
        return None
