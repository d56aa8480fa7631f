"""A listener: one bound address, its rules, and the live connections it accepted."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator, Mapping
from typing import Any

from wsproxy.address import Address
from wsproxy.config import ListenerConfig
from wsproxy.flows.base import Flow
from wsproxy.flows.tcp import TcpFlow
from wsproxy.flows.websocket import WebSocketFlow
from wsproxy.logs import log_connection
from wsproxy.metrics import ListenerStats
from wsproxy.relay import Endpoint
from wsproxy.routing import Router, Rule
from wsproxy.upstream import Upstream
from wsproxy.ws_relay import WebSocketRelay

log = logging.getLogger(__name__)

# Reasons that mean the connection ended without being served, counted as rejected.
_NOT_REJECTED = frozenset(("http_forwarded", "client_closed", "shutdown"))


class Listener:
    """Binds ``config.address`` and runs a flow for every connection it accepts."""

    def __init__(
        self, name: str, config: ListenerConfig, upstreams: Mapping[str, Upstream]
    ) -> None:
        self.name = name
        self.config = config
        self.router = Router(
            tuple(
                Rule(rule.target_group, host=rule.host, path_prefix=rule.path_prefix)
                for rule in config.rules
            ),
            config.default_target_group,
        )
        self.stats = ListenerStats()
        self.flows: set[Flow] = set()
        self.address: Address | None = None
        self._upstreams = upstreams
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._all_closed = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.config.address.host, self.config.address.port
        try:
            self._server = await loop.create_server(
                self._accept, host, port, reuse_address=True, backlog=1024
            )
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"listener '{self.name}': cannot bind {self.config.address}: {exc.strerror}",
            ) from None
        bound = self._server.sockets[0].getsockname()
        self.address = Address(str(bound[0]), int(bound[1]))
        log.info("listener '%s' listening on %s", self.name, self.address)

    def _accept(self) -> Endpoint:
        flow: Flow = WebSocketFlow(self) if self.config.websocket else TcpFlow(self)
        return flow.client

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self, grace: float, spread: float) -> None:
        """Close every connection within ``grace`` seconds, starting the closes evenly over the
        first ``spread`` seconds so clients do not all reconnect in the same instant."""
        loop = asyncio.get_running_loop()
        flows = list(self.flows)
        for index, flow in enumerate(flows):
            delay = spread * index / len(flows) if spread > 0 else 0.0
            loop.call_later(delay, flow.drain, max(0.0, grace - delay))
        if self.flows:
            self._all_closed.clear()
            try:
                async with asyncio.timeout(grace):
                    await self._all_closed.wait()
            except TimeoutError:
                log.warning(
                    "listener '%s': %d connection(s) still open after %g s, closing them",
                    self.name,
                    len(self.flows),
                    grace,
                )
        for flow in list(self.flows):
            flow.abort()
        await self.close_tasks()

    async def close_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- services for flows ---------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def upstream(self, name: str) -> Upstream:
        return self._upstreams[name]

    def flow_started(self, flow: Flow) -> None:
        self.flows.add(flow)
        self.stats.connections += 1
        self.stats.active += 1

    def flow_finished(self, flow: Flow, reason: str, bytes_in: int, bytes_out: int) -> None:
        self.flows.discard(flow)
        if not self.flows:
            self._all_closed.set()
        stats = self.stats
        stats.active -= 1
        stats.bytes_in += bytes_in
        stats.bytes_out += bytes_out
        if flow.relay is None and reason not in _NOT_REJECTED:
            stats.rejected[reason] += 1
        log_connection(flow.log)

    def count_upgrade(self, target_group: str, result: str) -> None:
        self.stats.upgrades[(target_group, result)] += 1

    def count_session(self, relay: WebSocketRelay) -> None:
        stats = self.stats
        stats.messages_in += relay.upstream.tracker.messages
        stats.messages_out += relay.downstream.tracker.messages
        code = relay.close_code if relay.close_code is not None else 1006
        stats.closes[(relay.close_initiator or "none", code)] += 1

    def live_byte_counts(self) -> Iterator[tuple[int, int]]:
        for flow in self.flows:
            yield flow.live_bytes
