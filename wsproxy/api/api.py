"""One ``[apis.NAME]`` at run time: its routes, its live connections and its integration calls.

An ``Api`` outlives config generations (a reload swaps its ``config``; connections keep their
ids and groups), and is shared by every listener that serves it. Flows call ``call`` for every
integration call; the management API reads ``registry``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
import time
from collections.abc import Coroutine, Mapping
from typing import Any, Protocol

from wsproxy.api.connection_id import ConnectionIds
from wsproxy.api.integration import Answer, Integrations
from wsproxy.api.registry import Registry
from wsproxy.config import ApiConfig, RouteConfig
from wsproxy.errors import ApiError, IntegrationFailed, NoTargets
from wsproxy.ops.metrics import ApiStats
from wsproxy.targets.target_group import TargetGroup
from wsproxy.wire.cloudevents import event_headers, format_time
from wsproxy.wire.route_selection import parse_expression

log = logging.getLogger(__name__)

# $disconnect calls in flight per API: beyond it new ones are dropped (counted), so a mass
# disconnect against a slow backend cannot pile up tasks without bound.
MAX_DISCONNECT_CALLS = 10_000


class Caller(Protocol):
    """The connection an integration call is made for."""

    @property
    def client_ip(self) -> str: ...

    @property
    def ce_headers(self) -> tuple[tuple[str, str], ...]:
        """Its ``ce-*`` fields (``wire.cloudevents.connection_headers``)."""


class Api:
    """See the module docstring."""

    __slots__ = (
        "_disconnects",
        "_time_ms",
        "_time_text",
        "config",
        "fields",
        "ids",
        "integrations",
        "name",
        "registry",
        "route_keys",
        "secret",
        "stats",
        "target_groups",
    )

    def __init__(
        self,
        name: str,
        config: ApiConfig,
        target_groups: Mapping[str, TargetGroup],
        integrations: Integrations,
        ids: ConnectionIds,
        secret: bytes | None,
    ) -> None:
        self.name = name
        self.target_groups = target_groups  # the proxy's live mapping (reloads update it)
        self.integrations = integrations
        self.ids = ids
        self.registry = Registry()
        self.stats = ApiStats()
        self._disconnects: set[asyncio.Task[None]] = set()
        self._time_ms = 0
        self._time_text = ""
        self.config = config
        self.fields = parse_expression(config.route_selection_expression)
        self.route_keys = frozenset(route.key for route in config.routes)
        self.secret = secret

    def update(self, config: ApiConfig, secret: bytes | None) -> None:
        """A reload: new routes and limits for new messages; connections stay."""
        self.config = config
        self.fields = parse_expression(config.route_selection_expression)
        self.route_keys = frozenset(route.key for route in config.routes)
        self.secret = secret

    @staticmethod
    def request_id() -> str:
        """A fresh ``ce-id``, also the ``requestId`` of the error message a client may get."""
        return secrets.token_urlsafe(12)

    @property
    def group_members(self) -> int:
        return self.registry.group_members

    def route(self, key: str) -> RouteConfig | None:
        return self.config.route(key)

    async def call(
        self,
        route: RouteConfig,
        event_type: str,
        caller: Caller,
        request_id: str,
        body: bytes,
        content_type: str,
    ) -> Answer:
        """One integration call of ``route`` for the connection ``caller`` (its ``ce-id`` is
        ``request_id``); any HTTP answer is returned (the caller decides what non-2xx means);
        ``IntegrationFailed`` when there was none, counted by reason."""
        headers = event_headers(
            caller.ce_headers,
            request_id,
            event_type,
            route.key,
            self._now_text(),
            body,
            self.secret,
        )
        headers.append(("Content-Type", content_type))
        config = self.config
        started = time.perf_counter()
        try:
            group = self.target_groups.get(route.target_group)
            if group is None:  # removed by a reload while a message was on its way
                raise NoTargets(f"target group '{route.target_group}' is gone")
            return await self.integrations.call(
                group,
                route.path,
                headers,
                body,
                client_ip=caller.client_ip,
                timeout=config.integration_timeout_seconds,
                max_body=config.max_message_bytes,
            )
        except NoTargets as exc:
            self.stats.errors[(route.key, ApiError.UNAVAILABLE)] += 1
            raise IntegrationFailed(ApiError.UNAVAILABLE, str(exc)) from None
        except IntegrationFailed as exc:
            self.stats.errors[(route.key, exc.error)] += 1
            raise
        finally:
            self.stats.observe(route.key, time.perf_counter() - started)

    def _now_text(self) -> str:
        """``ce-time`` of now, formatted once per millisecond (calls come in bursts)."""
        now = time.time()
        millisecond = int(now * 1000)
        if millisecond != self._time_ms:
            self._time_ms = millisecond
            self._time_text = format_time(dt.datetime.fromtimestamp(now, dt.UTC))
        return self._time_text

    def count_error(self, route: str, error: ApiError) -> None:
        self.stats.errors[(route, error)] += 1

    def spawn_disconnect(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a $disconnect call in the background, owned here (awaited by ``close``)."""
        if len(self._disconnects) >= MAX_DISCONNECT_CALLS:
            coro.close()
            self.count_error("$disconnect", ApiError.THROTTLED)
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._disconnects.add(task)
        task.add_done_callback(self._disconnects.discard)

    async def close(self, grace: float) -> None:
        """Let $disconnect calls in flight finish within ``grace`` s, then cancel the rest."""
        if not self._disconnects:
            return
        _done, pending = await asyncio.wait(set(self._disconnects), timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
