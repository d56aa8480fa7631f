"""What a flow may use of the listener that accepted it: the narrow seam between the two.

A listener builds one ``FlowContext`` and hands it to every flow it starts. The context holds the
listener's settings, routing, counters and the bookkeeping of its open connections (the set of
live connections, per-address counts, the descriptor budget, the tasks of handshakes); it knows
nothing of sockets or accepting. Flows never see the listener itself, so the arrows point one way:
listener -> flows -> context.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from typing import Any, Protocol

from wsproxy.api.api import Api
from wsproxy.config import ListenerConfig
from wsproxy.descriptors import DescriptorBudget
from wsproxy.errors import NoRoute, Reason
from wsproxy.ops.metrics import ListenerStats, LiveCounts, close_code_label
from wsproxy.relay.ticker import Ticker
from wsproxy.relay.websocket import WebSocketRelay
from wsproxy.routing import Router, Rule, SniRouter
from wsproxy.targets.target_group import TargetGroup
from wsproxy.tls import ClientCertificate, ServerTls

# Reasons that mean the connection ended without being served, but not refused by us.
_NOT_REJECTED = frozenset((Reason.HTTP_FORWARDED, Reason.CLIENT_CLOSED, Reason.SHUTDOWN))


class Connection(Protocol):
    """One live connection (a flow), as its listener handles it: drains, revocations, metrics."""

    @property
    def client_cert(self) -> ClientCertificate | None: ...

    def drain(self, timeout: float) -> None: ...

    def abort(self) -> None: ...

    def revoke(self) -> None: ...

    def live_counts(self) -> LiveCounts: ...


class FlowContext:
    """The listener as its flows see it; see the module docstring."""

    __slots__ = (
        "_all_closed",
        "_per_ip",
        "_reserved",
        "_target_groups",
        "_tasks",
        "api",
        "budget",
        "config",
        "connections",
        "handshakes",
        "name",
        "router",
        "sni_router",
        "stats",
        "ticker",
        "tls",
    )

    def __init__(
        self,
        name: str,
        config: ListenerConfig,
        target_groups: Mapping[str, TargetGroup],
        stats: ListenerStats,
        budget: DescriptorBudget,
        tls: ServerTls | None,
        api: Api | None = None,
    ) -> None:
        self.name = name
        self.api = api  # the WebSocket API an ``api = NAME`` listener serves
        self.config = config
        self.router = Router(
            tuple(
                Rule(rule.target_group, host=rule.host, path_prefix=rule.path_prefix)
                for rule in config.rules
            ),
            config.default_target_group,
        )
        self.sni_router = SniRouter(
            [(rule.sni, rule.target_group) for rule in config.rules if rule.sni is not None],
            config.default_target_group,
        )
        self.stats = stats
        self.budget = budget
        # The current TLS contexts: a CRL or certificate reload swaps them for new handshakes.
        self.tls = tls
        self.ticker = Ticker()  # idle and keepalive checks of every session of this listener
        self.connections: set[Connection] = set()
        # TLS listeners: connections accepted and not yet flows (reading a PROXY header, waiting
        # for a handshake slot, in the handshake); they count toward max_connections.
        self.handshakes = 0
        self._target_groups = target_groups
        self._per_ip: dict[str, int] = {}  # open connections per client address, when limited
        # Of those, counted at accept by a TLS listener and not yet taken over by their flow.
        self._reserved: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._all_closed = asyncio.Event()

    # --- routing --------------------------------------------------------------------------------

    def target_group(self, name: str | None) -> TargetGroup:
        """The target group a rule (or the default) chose; ``NoRoute`` when none did."""
        if name is None:
            raise NoRoute(f"listener '{self.name}': no rule matched and no default_target_group")
        return self._target_groups[name]

    # --- admission ------------------------------------------------------------------------------

    def refusal(self) -> Reason | None:
        """Why a connection accepted now must be closed at once, or None."""
        if self.stats.active + self.handshakes >= self.config.max_connections:
            return Reason.LIMIT
        if self.budget.exhausted:
            return Reason.FD_EXHAUSTED
        return None

    def refusal_detail(self, reason: Reason) -> str:
        if reason is Reason.LIMIT:
            return f"over max_connections ({self.config.max_connections})"
        return f"descriptor budget of the process used up ({self.budget.limit} descriptors)"

    def admit_ip(self, ip: str) -> bool:
        """Count a connection from ``ip`` unless it is at ``max_connections_per_ip``.

        A connection the listener counted at accept (``reserve_ip``, TLS listeners) is already
        counted: its reservation is taken over, whatever the count.
        """
        reserved = self._reserved.get(ip, 0)
        if reserved:
            if reserved == 1:
                del self._reserved[ip]
            else:
                self._reserved[ip] = reserved - 1
            return True
        return self._count_ip(ip)

    def reserve_ip(self, ip: str) -> bool:
        """Count a connection from ``ip`` at accept, before its TLS handshake, unless ``ip``
        is at ``max_connections_per_ip``: the flow takes the count over in ``admit_ip``, or the
        listener gives it back with ``unreserve_ip`` if no flow took it."""
        if not self._count_ip(ip):
            return False
        self._reserved[ip] = self._reserved.get(ip, 0) + 1
        return True

    def _count_ip(self, ip: str) -> bool:
        count = self._per_ip.get(ip, 0)
        if count >= self.config.max_connections_per_ip:
            return False
        self._per_ip[ip] = count + 1
        return True

    def unreserve_ip(self, ip: str) -> None:
        """Give back a reservation no flow took over (the handshake failed, or its flow ended
        before the per-address check)."""
        reserved = self._reserved.get(ip, 0) - 1
        if reserved > 0:
            self._reserved[ip] = reserved
        else:
            self._reserved.pop(ip, None)
        self.release_ip(ip)

    def release_ip(self, ip: str) -> None:
        count = self._per_ip.pop(ip, 0) - 1
        if count > 0:
            self._per_ip[ip] = count

    # --- the life of a connection ---------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task owned by the listener: cancelled and awaited when it stops."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def started(self, connection: Connection) -> None:
        self.budget.open += 1
        self.connections.add(connection)
        self.stats.connections += 1
        self.stats.active += 1

    def finished(
        self,
        connection: Connection,
        reason: Reason,
        bytes_in: int,
        bytes_out: int,
        session_seconds: float | None,
    ) -> None:
        """``connection`` ended; ``session_seconds`` is None when it never reached a target."""
        self.budget.open -= 1  # the client's (the target's went with Flow.drop_target)
        self.connections.discard(connection)
        if not self.connections:
            self._all_closed.set()
        stats = self.stats
        stats.active -= 1
        stats.bytes_in += bytes_in
        stats.bytes_out += bytes_out
        if session_seconds is None:
            if reason not in _NOT_REJECTED:
                stats.rejected[reason] += 1
        else:
            stats.session_seconds.observe(session_seconds)

    def count_upgrade(self, target_group: str, result: str) -> None:
        self.stats.upgrades[(target_group, result)] += 1

    def count_session(self, relay: WebSocketRelay) -> None:
        stats = self.stats
        session = relay.session
        inbound, outbound = session.to_target.tracker, session.to_client.tracker
        stats.messages_in += inbound.messages
        stats.messages_out += outbound.messages
        stats.frames_in += inbound.frames
        stats.frames_out += outbound.frames
        code = session.close_code if session.close_code is not None else 1006
        stats.closes[(session.close_initiator or "none", close_code_label(code))] += 1

    # --- the listener's side --------------------------------------------------------------------

    async def until_all_closed(self) -> None:
        if self.connections:
            self._all_closed.clear()
            await self._all_closed.wait()

    async def close_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
