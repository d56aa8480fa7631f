"""Dialing the targets of a target group: pick with the balancer, connect with a deadline, retry.

A refused or timed-out connect is retried on another target (at most ``MAX_ATTEMPTS`` in all,
never the same target twice in a row), which is safe because no byte has reached the client yet.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable

from wsproxy.config import Algorithm, TargetGroupConfig, TargetTls
from wsproxy.errors import (
    NoTargets,
    TargetConnectTimeout,
    TargetError,
    TargetRefused,
    TargetTlsFailed,
)
from wsproxy.ops.metrics import TargetGroupStats
from wsproxy.relay.relay import Endpoint
from wsproxy.targets.balancer import Balancer
from wsproxy.targets.health import HealthRecord, record_connect_failure, update_ramps
from wsproxy.targets.target import Target, TargetGroup, log_target_state
from wsproxy.tls import target_context

log = logging.getLogger(__name__)

# Envoy's default retry budget for connect failures is 1 retry; HAProxy's `retries` defaults to 3.
MAX_ATTEMPTS = 3


class Upstream:
    """One target group at run time: its targets, its balancer, its connect settings."""

    def __init__(
        self,
        config: TargetGroupConfig,
        group: TargetGroup,
        balancer: Balancer,
        *,
        alpn: list[str] | None = None,
    ) -> None:
        self.config = config
        self.group = group
        self.balancer = balancer
        self.stats = TargetGroupStats()
        self.records: dict[int, HealthRecord] = {}
        self.failing_open = False
        # A worker tells its supervisor, which owns target states, about passive failures.
        self.on_passive_unhealthy: Callable[[Target, str], None] | None = None
        self.ssl_context: ssl.SSLContext | None = None
        if config.protocol == "tls":
            self.ssl_context = target_context(group.name, config.tls or TargetTls(), alpn=alpn)

    @property
    def name(self) -> str:
        return self.group.name

    def health_record(self, target: Target) -> HealthRecord:
        record = self.records.get(id(target))
        if record is None:
            record = self.records[id(target)] = HealthRecord()
        return record

    def pick(self, client_ip: str, avoid: Target | None = None) -> Target | None:
        """A target for a new connection, or None when only ``avoid`` is left.

        Raises ``NoTargets`` when the group has no target that may take connections.
        """
        fail_open = self.config.when_all_unhealthy == "fail_open"
        candidates, opened = self.group.candidates(fail_open=fail_open)
        if opened != self.failing_open:
            self.failing_open = opened
            if opened:
                log.warning(
                    "target group '%s': no healthy target; failing open to all %d",
                    self.name,
                    len(candidates),
                )
        if not candidates:
            if self.group.targets and not fail_open:
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
            self._failed(target, "tls")
            raise TargetTlsFailed(
                f"target {address} of '{self.name}': TLS failed ({exc.reason or exc})"
            ) from None
        except TimeoutError:
            self._failed(target, "timeout")
            raise TargetConnectTimeout(
                f"target {address} of '{self.name}' did not accept within "
                f"{self.config.connect_timeout_seconds:g} s"
            ) from None
        except OSError as exc:
            self._failed(target, "refused" if isinstance(exc, ConnectionRefusedError) else "error")
            raise TargetRefused(
                f"target {address} of '{self.name}': {exc.strerror or exc}"
            ) from None
        target.connect_failures = 0
        self.stats.connect_seconds.observe(time.perf_counter() - started)

    def _failed(self, target: Target, reason: str) -> None:
        target.connect_failures += 1
        self.stats.connect_errors[(str(target.address), reason)] += 1
        limit = self.config.unhealthy_after_connect_failures
        before = target.state
        if record_connect_failure(target, self.health_record(target), limit):
            self.stats.transitions[str(target.address)] += 1
            detail = f"{target.connect_failures} failed connects"
            log_target_state(self.name, target, before, detail)
            if self.on_passive_unhealthy is not None:
                self.on_passive_unhealthy(target, detail)

    async def dial(
        self, client_ip: str, make_endpoint: Callable[[], Endpoint], proxy_header: bytes = b""
    ) -> tuple[Target, Endpoint]:
        """Connect to some target, retrying others on failure (the caller takes the target)."""
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
            return target, endpoint
        raise error or NoTargets(f"target group '{self.name}' has no target to try")

    def target_rows(self) -> list[tuple[str, str, int]]:
        """(address, state, active connections) per target, for metrics and the admin API."""
        return [(str(t.address), t.state.value, t.active) for t in self.group.targets]
