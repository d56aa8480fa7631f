"""A target group at run time: its targets, balancer, dialing, health records and drains.

What TOML, metrics, logs and the admin API call a target group is this one object:
- membership: targets are registered (``initial``), deregistered (``draining``, then ``unused``
  and gone) and reconciled with a reloaded config;
- dialing: pick with the balancer, connect with a deadline, and on a refused or timed-out connect
  retry another target (at most ``MAX_ATTEMPTS`` in all, never the same target twice in a row),
  which is safe because no byte has reached the client yet;
- health: each target's record of checks (active and passive), keyed by the ``Target`` itself;
- draining: an index from each target to the sessions it carries, so deregistering one target
  touches only its own sessions.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from wsproxy.address import Address
from wsproxy.config import Algorithm, TargetGroupConfig, TargetTls
from wsproxy.errors import (
    NoTargets,
    TargetConnectTimeout,
    TargetError,
    TargetExists,
    TargetRefused,
    TargetTlsFailed,
)
from wsproxy.ops.logs import log_event
from wsproxy.ops.metrics import TargetGroupStats
from wsproxy.relay.relay import Endpoint
from wsproxy.targets.balancer import Balancer
from wsproxy.targets.health import HealthRecord, record_connect_failure, update_ramps
from wsproxy.targets.target import LEAVING_STATES, ROUTABLE_STATES, Target, TargetState
from wsproxy.tls import target_context

log = logging.getLogger(__name__)

# Envoy's default retry budget for connect failures is 1 retry; HAProxy's `retries` defaults to 3.
MAX_ATTEMPTS = 3

E = TypeVar("E", bound=Endpoint)


class Session(Protocol):
    """A client connection carried by a target, as draining needs it (a flow).

    ``target_prev`` and ``target_next`` are the session's links in its target's list, kept by the
    target group: an intrusive list costs a session two pointers (16 bytes), where a set of
    sessions per target cost 27-110 bytes each (the set's table, grown 4x at a time).
    """

    target_prev: Session | None
    target_next: Session | None

    def drain(self, timeout: float) -> None: ...

    def abort(self) -> None: ...


class RetryElsewhere(Exception):  # control flow inside dial(), never an error users see
    """Raised by a dial's ``exchange`` step: this target failed before anything reached the
    client, so another target may take the connection; ``error`` says what happened."""

    def __init__(self, error: TargetError) -> None:
        super().__init__(str(error))
        self.error = error


def log_target_state(group: str, target: Target, before: TargetState, detail: str) -> None:
    """The lifecycle event of a target changing state (health checks, passive checks, API)."""
    log_event(
        log,
        "target_state",
        "target group '%s': target %s %s -> %s (%s)",
        group,
        target.address,
        before.value,
        target.state.value,
        f"{target.reason}: {detail}" if target.reason else detail,
        level=logging.WARNING if target.state is TargetState.UNHEALTHY else logging.INFO,
        target_group=group,
        target=str(target.address),
        previous_state=before.value,
        state=target.state.value,
        state_reason=target.reason,
        detail=detail,
    )


class TargetGroup:
    """One ``[target_groups.NAME]`` at run time."""

    def __init__(
        self,
        name: str,
        config: TargetGroupConfig,
        balancer: Balancer,
        *,
        alpn: list[str] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.balancer = balancer
        self.targets: list[Target] = [Target(t.address, t.weight) for t in config.targets]
        self.stats = TargetGroupStats()
        self.records: dict[Target, HealthRecord] = {}
        self.failing_open = False
        # A worker tells its supervisor, which owns target states, about passive failures.
        self.on_passive_unhealthy: Callable[[Target, str], None] | None = None
        self.ssl_context: ssl.SSLContext | None = None
        if config.protocol == "tls":
            self.ssl_context = target_context(name, config.tls or TargetTls(), alpn=alpn)
        elif config.protocol == "https":
            # Integration calls speak HTTP/1.1 only (wsproxy/api/integration.py); saying so in
            # ALPN keeps a backend that also serves h2 from choosing it.
            self.ssl_context = target_context(name, config.tls or TargetTls(), alpn=["http/1.1"])
        self._sessions: dict[Target, Session] = {}  # the first session of each target's list
        self._drains: set[asyncio.Task[None]] = set()

    # --- membership -----------------------------------------------------------------------------

    def find(self, address: Address) -> Target | None:
        for target in self.targets:
            if target.address == address:
                return target
        return None

    def register(self, address: Address, weight: int) -> Target:
        """Add a target (state ``initial``); ``TargetExists`` if the address is already in."""
        if self.find(address) is not None:
            raise TargetExists(f"target {address} is already in target group '{self.name}'")
        target = Target(address, weight)
        self.targets.append(target)
        log.info("target group '%s': registered %s (weight %d)", self.name, address, weight)
        return target

    def deregister(self, address: Address) -> Target:
        """Start draining a target: no new connections; its sessions are closed spread over the
        group's ``deregistration_delay_seconds``; then it becomes ``unused`` and leaves the group.

        ``KeyError`` if the address is not in the group, ``TargetExists`` if it is leaving already.
        """
        target = self.find(address)
        if target is None:
            raise KeyError(address)
        if target.state in LEAVING_STATES:
            raise TargetExists(f"target {address} is already {target.state.value}")
        before = target.state
        target.state = TargetState.DRAINING
        target.reason = "Target.DeregistrationInProgress"
        log_target_state(self.name, target, before, "deregistered")
        task = asyncio.get_running_loop().create_task(self._drain(target))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)
        return target

    def reconcile(self, config: TargetGroupConfig) -> list[Target]:
        """Make the targets match a reloaded config: weights updated, missing ones deregistered,
        new ones added (``initial``); returns the new targets."""
        wanted = {t.address: t.weight for t in config.targets}
        for target in list(self.targets):
            if target.address in wanted:
                target.weight = wanted.pop(target.address)
            elif target.state not in LEAVING_STATES:
                self.deregister(target.address)
        added = [Target(address, weight) for address, weight in wanted.items()]
        self.targets.extend(added)
        return added

    def deregister_all(self) -> None:
        """The group left the config: drain every target."""
        for target in list(self.targets):
            if target.state not in LEAVING_STATES:
                self.deregister(target.address)

    def remove(self, target: Target) -> None:
        """Forget a target that left: its health record and session index go with it."""
        if target in self.targets:
            self.targets.remove(target)
        self.records.pop(target, None)
        self._sessions.pop(target, None)

    async def _drain(self, target: Target) -> None:
        delay = self.config.deregistration_delay_seconds
        loop = asyncio.get_running_loop()
        sessions = self.sessions_of(target)
        log.info(
            "target group '%s': draining %s: %d session(s) over %g s",
            self.name,
            target.address,
            len(sessions),
            delay,
        )
        # Spread the closes so the clients reconnect gradually, not in one storm.
        for index, session in enumerate(sessions):
            at = delay * index / len(sessions)
            loop.call_later(at, session.drain, max(0.0, delay - at))
        await asyncio.sleep(delay)
        for session in self.sessions_of(target):
            session.abort()
        target.state = TargetState.UNUSED
        target.reason = "Target.NotRegistered"
        self.remove(target)
        log_target_state(self.name, target, TargetState.DRAINING, "deregistration done")

    async def close(self) -> None:
        """Stop the drains still waiting (the proxy is stopping; its listeners close the rest)."""
        for task in list(self._drains):
            task.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)

    # --- sessions -------------------------------------------------------------------------------

    def attach(self, target: Target, session: Session) -> None:
        """``session`` now holds a connection to ``target``: counted for the balancers and
        linked into the target's list for draining."""
        target.active += 1
        first = self._sessions.get(target)
        session.target_prev = None
        session.target_next = first
        if first is not None:
            first.target_prev = session
        self._sessions[target] = session

    def detach(self, target: Target, session: Session) -> None:
        target.active -= 1
        before, after = session.target_prev, session.target_next
        if after is not None:
            after.target_prev = before
        if before is not None:
            before.target_next = after
        elif self._sessions.get(target) is session:
            if after is None:
                del self._sessions[target]
            else:
                self._sessions[target] = after
        session.target_prev = session.target_next = None

    def sessions_of(self, target: Target) -> list[Session]:
        """The sessions ``target`` carries now (a copy: draining may detach them)."""
        found = []
        session = self._sessions.get(target)
        while session is not None:
            found.append(session)
            session = session.target_next
        return found

    # --- health ---------------------------------------------------------------------------------

    def health_record(self, target: Target) -> HealthRecord:
        record = self.records.get(target)
        if record is None:
            record = self.records[target] = HealthRecord()
        return record

    def target_rows(self) -> list[tuple[str, str, int]]:
        """(address, state, active connections) per target, for metrics and the admin API."""
        return [(t.label, t.state.value, t.active) for t in self.targets]

    # --- picking and dialing --------------------------------------------------------------------

    def candidates(self) -> tuple[list[Target], bool]:
        """Targets that may take a new connection, and whether the group is failing open.

        Healthy and initial targets first; when none is, the group fails open to every unhealthy
        target, as an AWS NLB does, so a health-check outage is not an outage (unless
        ``when_all_unhealthy = "reject"``: then there is no candidate).
        """
        routable = [t for t in self.targets if t.state in ROUTABLE_STATES]
        if routable or self.config.when_all_unhealthy != "fail_open":
            return routable, False
        unhealthy = [t for t in self.targets if t.state is TargetState.UNHEALTHY]
        return unhealthy, bool(unhealthy)

    def pick(self, client_ip: str, avoid: Target | None = None) -> Target | None:
        """A target for a new connection, or None when only ``avoid`` is left.

        Raises ``NoTargets`` when the group has no target that may take connections.
        """
        candidates, opened = self.candidates()
        if opened != self.failing_open:
            self.failing_open = opened
            if opened:
                log.warning(
                    "target group '%s': no healthy target; failing open to all %d",
                    self.name,
                    len(candidates),
                )
        if not candidates:
            if self.targets and self.config.when_all_unhealthy != "fail_open":
                raise NoTargets(f"target group '{self.name}' has no healthy target")
            raise NoTargets(f"target group '{self.name}' has no registered targets")
        if avoid is not None:
            candidates = [t for t in candidates if t is not avoid]
            if not candidates:
                return None
        slow_start = self.config.slow_start_seconds
        if slow_start > 0 and self.config.algorithm in (Algorithm.ROUND_ROBIN,
                                                        Algorithm.LEAST_CONNECTIONS):  # fmt: skip
            update_ramps(candidates, asyncio.get_running_loop().time(), slow_start)
        return self.balancer.pick(candidates, client_ip)

    async def dial(
        self,
        client_ip: str,
        make_endpoint: Callable[[], E],
        proxy_header: bytes = b"",
        exchange: Callable[[Target, E], Awaitable[None]] | None = None,
    ) -> tuple[Target, E]:
        """Connect to some target, retrying others on failure; the caller takes the target.

        ``exchange``, when given, runs on each connected target before the dial counts as done
        (the WebSocket flow sends the upgrade and reads the answer there); it raises
        ``RetryElsewhere`` when that target failed before anything reached the client.
        """
        last: Target | None = None
        error: TargetError | None = None
        for _attempt in range(MAX_ATTEMPTS):
            target = self.pick(client_ip, avoid=last)
            if target is None:
                break
            endpoint = make_endpoint()
            try:
                await self.connect(target, endpoint, proxy_header)
            except TargetError as exc:
                log.debug("connect failed: %s", exc)
                error, last = exc, target
                continue
            if exchange is not None:
                try:
                    await exchange(target, endpoint)
                except RetryElsewhere as retry:
                    log.debug("target failed before answering: %s", retry.error)
                    error, last = retry.error, target
                    continue
            return target, endpoint
        raise error or NoTargets(f"target group '{self.name}' has no target to try")

    async def connect(self, target: Target, endpoint: Endpoint, proxy_header: bytes = b"") -> None:
        """Connect ``endpoint`` to ``target`` within ``connect_timeout_seconds``.

        ``proxy_header`` (PROXY v2) is written first when the group asks for it; with TLS it goes
        before the handshake, on the bare TCP connection, as the spec requires.
        """
        loop = asyncio.get_running_loop()
        address = target.address
        tls = self.ssl_context
        server_name = None
        if tls is not None:
            server_name = (self.config.tls and self.config.tls.server_name) or address.host
        header = proxy_header if self.config.proxy_protocol_v2 else b""
        started = time.perf_counter()  # loop.time() ticks in whole ms under uvloop
        try:
            async with asyncio.timeout(self.config.connect_timeout_seconds):
                if not header:
                    await loop.create_connection(
                        lambda: endpoint,
                        address.host,
                        address.port,
                        ssl=tls,
                        server_hostname=server_name,
                    )
                else:
                    transport, _ = await loop.create_connection(
                        lambda: endpoint, address.host, address.port
                    )
                    transport.write(header)
                    if tls is not None:
                        secure = await loop.start_tls(
                            transport, endpoint, tls, server_hostname=server_name
                        )
                        if secure is None:
                            raise ConnectionResetError("target closed during the TLS handshake")
                        endpoint.transport = secure  # the endpoint now writes through TLS
                        endpoint.tls = True
        except ssl.SSLError as exc:
            # Never a fallback to plaintext: a target that fails TLS is a failed dial.
            self.connect_failed(target, "tls")
            raise TargetTlsFailed(
                f"target {address} of '{self.name}': TLS failed ({exc.reason or exc})"
            ) from None
        except TimeoutError:
            self.connect_failed(target, "timeout")
            raise TargetConnectTimeout(
                f"target {address} of '{self.name}' did not accept within "
                f"{self.config.connect_timeout_seconds:g} s"
            ) from None
        except OSError as exc:
            self.connect_failed(
                target, "refused" if isinstance(exc, ConnectionRefusedError) else "error"
            )
            raise TargetRefused(
                f"target {address} of '{self.name}': {exc.strerror or exc}"
            ) from None
        target.connect_failures = 0
        self.stats.connect_seconds.observe(time.perf_counter() - started)

    def connect_failed(self, target: Target, reason: str) -> None:
        """Count a failed connect to ``target`` (``reason``: tls, timeout, refused or error):
        ``unhealthy_after_connect_failures`` in a row mark it unhealthy at once (a passive
        check). Dials and integration calls (wsproxy/api/integration.py) both report here."""
        target.connect_failures += 1
        self.stats.connect_errors[(target.label, reason)] += 1
        limit = self.config.unhealthy_after_connect_failures
        before = target.state
        if record_connect_failure(target, self.health_record(target), limit):
            self.stats.transitions[target.label] += 1
            detail = f"{target.connect_failures} failed connects"
            log_target_state(self.name, target, before, detail)
            if self.on_passive_unhealthy is not None:
                self.on_passive_unhealthy(target, detail)
