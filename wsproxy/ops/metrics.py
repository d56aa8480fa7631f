"""Counters kept as plain integers on the data path, turned into Prometheus metrics at scrape time.

The relay never calls prometheus-client: it bumps attributes of ``ListenerStats``; the collector
here reads them (and the byte counts of live connections) only when ``/metrics`` is scraped.
The per-frame message and frame counts exist only for metrics and carry a ``# hot-path count``
comment: ``loadtest/metrics_overhead.py`` strips exactly those lines to measure what they cost.
(Byte counts are needed anyway: the connection log line and the idle timeout read them.)
"""

from __future__ import annotations

import platform
import ssl
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from wsproxy import __version__


class Histogram:
    """A histogram in plain integers: ``observe`` is a bisect and two additions, and the
    Prometheus family is built only at scrape time."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (``le`` is inclusive).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs as Prometheus wants them, cumulative, ending with ``+Inf``."""
        rows: list[tuple[str, float]] = []
        running = 0
        labels = [*map(_float_label, self.bounds), "+Inf"]
        for bound, count in zip(labels, self.counts, strict=True):
            running += count
            rows.append((bound, running))
        return rows

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        family.add_metric(labels, self.cumulative(), self.total)


def _float_label(value: float) -> str:
    return repr(float(value))


# Buckets: TLS handshakes and target connects take milliseconds; sessions last seconds to days.
HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SESSION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 86400.0)

# Close codes a client may send are 1000-4999; only the registered ones become label values, the
# application ranges are folded so a client cannot mint new time series (RFC 6455 §7.4).
_REGISTERED_CLOSE_CODES = frozenset((*range(1000, 1004), *range(1005, 1016)))


def close_code_label(code: int) -> str:
    if code in _REGISTERED_CLOSE_CODES:
        return str(code)
    if 3000 <= code <= 3999:
        return "3xxx"
    if 4000 <= code <= 4999:
        return "4xxx"
    return "other"


@dataclass(slots=True)
class ListenerStats:
    """What happened on one listener name since start; updated in place, read at scrape time.

    Kept per name by the proxy, so a listener rebound by a reload continues the same counts.
    Byte, message and frame totals cover finished connections; live ones are added at scrape.
    """

    connections: int = 0
    active: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    accept_pauses: Counter[str] = field(default_factory=Counter)  # handshakes | fd_exhausted
    upgrades: Counter[tuple[str, str]] = field(default_factory=Counter)  # (target_group, result)
    closes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (initiator, code label)
    bytes_in: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    messages_out: int = 0
    frames_in: int = 0
    frames_out: int = 0
    tls_handshakes: Counter[str] = field(default_factory=Counter)  # result
    client_certs: Counter[str] = field(default_factory=Counter)  # ok | missing | untrusted | ...
    handshake_seconds: Histogram = field(default_factory=lambda: Histogram(HANDSHAKE_BUCKETS))
    session_seconds: Histogram = field(default_factory=lambda: Histogram(SESSION_BUCKETS))


@dataclass(slots=True)
class LiveCounts:
    """One open connection's counts so far (``target_group`` is None until it has a session)."""

    target_group: str | None
    bytes_in: int
    bytes_out: int
    messages_in: int = 0
    messages_out: int = 0
    frames_in: int = 0
    frames_out: int = 0


@dataclass(slots=True)
class ListenerSnapshot:
    """One listener name at this instant: its counters, its live connections summed, its
    sessions per target group, and the settings of the listener in force."""

    stats: ListenerStats
    live: LiveCounts
    sessions: Counter[str]
    expiries: dict[str, float]
    limit: int
    crl_updates: tuple[float, float] | None = None  # (thisUpdate, nextUpdate), Unix seconds

    @property
    def bytes_in(self) -> int:
        return self.stats.bytes_in + self.live.bytes_in

    @property
    def bytes_out(self) -> int:
        return self.stats.bytes_out + self.live.bytes_out

    @property
    def messages_in(self) -> int:
        return self.stats.messages_in + self.live.messages_in

    @property
    def messages_out(self) -> int:
        return self.stats.messages_out + self.live.messages_out

    @property
    def frames_in(self) -> int:
        return self.stats.frames_in + self.live.frames_in

    @property
    def frames_out(self) -> int:
        return self.stats.frames_out + self.live.frames_out


def snapshot_listeners(listeners: Iterable[ListenerView]) -> dict[str, ListenerSnapshot]:
    """Per listener name; listeners retired by a reload share their name's counters, and the
    first listener seen for a name (the current one) gives the settings."""
    found: dict[str, ListenerSnapshot] = {}
    for listener in listeners:
        snapshot = found.get(listener.name)
        if snapshot is None:
            snapshot = found[listener.name] = ListenerSnapshot(
                listener.stats,
                LiveCounts(None, 0, 0),
                Counter(),
                listener.tls_expiries(),
                listener.connection_limit,
                listener.crl_updates(),
            )
        live = snapshot.live
        for counts in listener.live_counts():
            live.bytes_in += counts.bytes_in
            live.bytes_out += counts.bytes_out
            live.messages_in += counts.messages_in
            live.messages_out += counts.messages_out
            live.frames_in += counts.frames_in
            live.frames_out += counts.frames_out
            if counts.target_group is not None:
                snapshot.sessions[counts.target_group] += 1
    return found


class ListenerView(Protocol):
    """What the collector reads from a listener (current, or retired by a reload)."""

    @property
    def name(self) -> str: ...

    @property
    def stats(self) -> ListenerStats: ...

    @property
    def connection_limit(self) -> int: ...

    def live_counts(self) -> Iterable[LiveCounts]: ...

    def tls_expiries(self) -> dict[str, float]: ...

    def crl_updates(self) -> tuple[float, float] | None: ...


@dataclass(slots=True)
class TargetGroupStats:
    """Counts of one target group, by target address; kept on its ``TargetGroup``."""

    connect_errors: Counter[tuple[str, str]] = field(default_factory=Counter)  # (target, reason)
    health_checks: Counter[tuple[str, str]] = field(default_factory=Counter)  # (target, result)
    transitions: Counter[str] = field(default_factory=Counter)  # target
    discovery_lookups: Counter[str] = field(default_factory=Counter)  # result: ok, error
    discovery_errors: Counter[str] = field(default_factory=Counter)  # DiscoveryFailure
    connect_seconds: Histogram = field(default_factory=lambda: Histogram(HANDSHAKE_BUCKETS))

    def connect_errors_by_reason(self) -> Counter[str]:
        totals: Counter[str] = Counter()
        for (_target, reason), count in self.connect_errors.items():
            totals[reason] += count
        return totals


class TargetGroupView(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def stats(self) -> TargetGroupStats: ...

    def target_rows(self) -> Iterable[tuple[str, str, int]]: ...  # (address, state, active)


TARGET_STATES = ("initial", "healthy", "unhealthy", "draining", "unused")
# Integration call durations: from a local backend's milliseconds to API Gateway's 29 s.
INTEGRATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ApiStats:
    """Counts of one WebSocket API in this process; kept on its ``Api``. Labels are configured
    route keys (or ``@connections``, ``@groups``, ``@users`` for pushes) and closed enums."""

    __slots__ = ("connections", "durations", "errors", "messages")

    def __init__(self) -> None:
        self.connections = 0  # open now
        self.messages: Counter[tuple[str, str]] = Counter()  # (route, direction: in | out)
        self.errors: Counter[tuple[str, str]] = Counter()  # (route, ApiError)
        self.durations: dict[str, Histogram] = {}  # integration calls, per route

    def observe(self, route: str, seconds: float) -> None:
        histogram = self.durations.get(route)
        if histogram is None:
            histogram = self.durations[route] = Histogram(INTEGRATION_BUCKETS)
        histogram.observe(seconds)


class ApiView(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def stats(self) -> ApiStats: ...

    @property
    def group_members(self) -> int: ...


class ProxyView(Protocol):
    """What the collector reads from the proxy as a whole."""

    @property
    def draining(self) -> bool: ...

    def metric_listeners(self) -> Iterable[ListenerView]: ...

    def metric_target_groups(self) -> Iterable[TargetGroupView]: ...

    def reload_status(self) -> tuple[dict[str, int], bool, float]: ...

    @property
    def loop_lag(self) -> Histogram: ...

    @property
    def log_lines_dropped(self) -> int: ...

    def metric_apis(self) -> Iterable[ApiView]: ...

    @property
    def management_requests(self) -> Mapping[tuple[str, int], int]: ...


def _counter(name: str, doc: str, *labels: str) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


def _gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _histogram(name: str, doc: str, *labels: str) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=list(labels))


class ProxyCollector(Collector):
    """Builds every wsproxy metric family from plain counters when ``/metrics`` is scraped."""

    def __init__(self, proxy: ProxyView) -> None:
        self._proxy = proxy

    def collect(self) -> Iterator[Metric]:
        info = _gauge(
            "wsproxy_build_info",
            "wsproxy build and runtime versions",
            "version",
            "python",
            "loop",
            "openssl",
        )
        info.add_metric([__version__, platform.python_version(), "uvloop", ssl.OPENSSL_VERSION], 1)
        yield info
        yield from self._listener_metrics()
        yield from self._target_metrics()
        yield from self._api_metrics()
        yield from self._process_state()

    def _api_metrics(self) -> Iterator[Metric]:
        connections = _gauge("wsproxy_api_connections", "Open connections of an API", "api")
        members = _gauge(
            "wsproxy_api_group_members", "Group memberships of an API's connections", "api"
        )
        messages = _counter(
            "wsproxy_api_messages",
            "Messages of an API by route and direction (in: from clients; out: to clients)",
            "api",
            "route",
            "direction",
        )
        durations = _histogram(
            "wsproxy_api_integration_duration_seconds",
            "Integration call durations by route",
            "api",
            "route",
        )
        errors = _counter(
            "wsproxy_api_integration_errors",
            "Messages and calls an API could not serve, by route and reason",
            "api",
            "route",
            "reason",
        )
        for api in self._proxy.metric_apis():
            stats = api.stats
            connections.add_metric([api.name], stats.connections)
            members.add_metric([api.name], api.group_members)
            for (route, direction), count in sorted(stats.messages.items()):
                messages.add_metric([api.name, route, direction], count)
            for route, histogram in sorted(stats.durations.items()):
                histogram.add_to(durations, [api.name, route])
            for (route, reason), count in sorted(stats.errors.items()):
                errors.add_metric([api.name, route, reason], count)
        management = _counter(
            "wsproxy_api_management_requests",
            "@connections, @groups and @users requests by operation and status",
            "operation",
            "code",
        )
        for (operation, code), count in sorted(self._proxy.management_requests.items()):
            management.add_metric([operation, str(code)], count)
        yield from (connections, members, messages, durations, errors, management)

    def _listener_metrics(self) -> Iterator[Metric]:
        conns = _counter("wsproxy_listener_connections", "Connections accepted", "listener")
        active = _gauge("wsproxy_listener_connections_active", "Connections open now", "listener")
        limit = _gauge(
            "wsproxy_listener_connections_limit",
            "max_connections of the listener (alert before active reaches it)",
            "listener",
        )
        rejected = _counter(
            "wsproxy_listener_connections_rejected",
            "Connections ended by the proxy before reaching a target, by reason",
            "listener",
            "reason",
        )
        pauses = _counter(
            "wsproxy_listener_accept_pauses",
            "Times a connection or the listener had to wait, by reason (handshakes: a "
            "connection waited for a handshake slot, at max_handshakes_in_flight or its "
            "address's share; fd_exhausted: accept failed for lack of descriptors)",
            "listener",
            "reason",
        )
        handshakes = _counter(
            "wsproxy_tls_handshakes", "TLS handshakes by result", "listener", "result"
        )
        handshake_seconds = _histogram(
            "wsproxy_tls_handshake_duration_seconds",
            "Time from accept to a completed TLS handshake",
            "listener",
        )
        client_certs = _counter(
            "wsproxy_client_cert_verifications",
            "Client certificate checks by result",
            "listener",
            "result",
        )
        upgrades = _counter(
            "wsproxy_websocket_upgrades",
            "WebSocket upgrade attempts by result",
            "listener",
            "target_group",
            "result",
        )
        messages = _counter(
            "wsproxy_websocket_messages", "WebSocket messages relayed", "listener", "direction"
        )
        frames = _counter(
            "wsproxy_websocket_frames", "WebSocket frames relayed", "listener", "direction"
        )
        closes = _counter(
            "wsproxy_websocket_closes",
            "WebSocket sessions closed, by who started the close and the close code",
            "listener",
            "initiator",
            "code",
        )
        sessions = _gauge(
            "wsproxy_sessions_active",
            "Client connections relayed to a target now",
            "listener",
            "target_group",
        )
        session_seconds = _histogram(
            "wsproxy_session_duration_seconds", "How long finished sessions lasted", "listener"
        )
        byte_total = _counter("wsproxy_bytes", "Bytes relayed", "listener", "direction")
        not_after = _gauge(
            "wsproxy_certificate_not_after_timestamp_seconds",
            "When TLS material runs out: server certificates and client CA (earliest not-after),"
            " CRL (next update)",
            "listener",
            "role",
        )
        crl_next = _gauge(
            "wsproxy_crl_next_update_timestamp_seconds",
            "The nextUpdate of the CRL a listener checks client certificates against: past "
            "it, every client certificate is refused",
            "listener",
        )
        crl_this = _gauge(
            "wsproxy_crl_this_update_timestamp_seconds",
            "The thisUpdate of the CRL a listener checks client certificates against",
            "listener",
        )
        for name, snapshot in snapshot_listeners(self._proxy.metric_listeners()).items():
            stats = snapshot.stats
            conns.add_metric([name], stats.connections)
            active.add_metric([name], stats.active)
            limit.add_metric([name], snapshot.limit)
            for reason, count in sorted(stats.rejected.items()):
                rejected.add_metric([name, reason], count)
            for reason, count in sorted(stats.accept_pauses.items()):
                pauses.add_metric([name, reason], count)
            for result, count in sorted(stats.tls_handshakes.items()):
                handshakes.add_metric([name, result], count)
            for result, count in sorted(stats.client_certs.items()):
                client_certs.add_metric([name, result], count)
            for (group, result), count in sorted(stats.upgrades.items()):
                upgrades.add_metric([name, group, result], count)
            for (initiator, code), count in sorted(stats.closes.items()):
                closes.add_metric([name, initiator, code], count)
            for group, count in sorted(snapshot.sessions.items()):
                sessions.add_metric([name, group], count)
            _directions(messages, name, snapshot.messages_in, snapshot.messages_out)
            _directions(frames, name, snapshot.frames_in, snapshot.frames_out)
            _directions(byte_total, name, snapshot.bytes_in, snapshot.bytes_out)
            if stats.tls_handshakes:
                stats.handshake_seconds.add_to(handshake_seconds, [name])
            stats.session_seconds.add_to(session_seconds, [name])
            for role, when in sorted(snapshot.expiries.items()):
                not_after.add_metric([name, role], when)
            if snapshot.crl_updates is not None:
                crl_this.add_metric([name], snapshot.crl_updates[0])
                crl_next.add_metric([name], snapshot.crl_updates[1])
        yield from (conns, active, limit, rejected, pauses, handshakes, handshake_seconds)
        yield client_certs
        yield from (upgrades, messages, frames, closes, sessions, session_seconds, byte_total)
        yield from (not_after, crl_this, crl_next)

    def _target_metrics(self) -> Iterator[Metric]:
        target_active = _gauge(
            "wsproxy_target_connections_active",
            "Client connections assigned to a target",
            "target_group",
            "target",
        )
        target_state = _gauge(
            "wsproxy_target_state",
            "1 for the target's current state, 0 for the others",
            "target_group",
            "target",
            "state",
        )
        healthy = _gauge(
            "wsproxy_target_group_healthy_targets", "Targets in state healthy", "target_group"
        )
        unhealthy = _gauge(
            "wsproxy_target_group_unhealthy_targets",
            "Targets in state unhealthy",
            "target_group",
        )
        connect_errors = _counter(
            "wsproxy_target_connect_errors",
            "Failed connects to targets, by reason",
            "target_group",
            "target",
            "reason",
        )
        connect_seconds = _histogram(
            "wsproxy_target_connect_duration_seconds",
            "Time to connect to a target (TLS handshake included)",
            "target_group",
        )
        checks = _counter(
            "wsproxy_health_checks",
            "Active health checks by result",
            "target_group",
            "target",
            "result",
        )
        transitions = _counter(
            "wsproxy_target_health_transitions",
            "Changes between healthy and unhealthy (active and passive checks)",
            "target_group",
            "target",
        )
        lookups = _counter(
            "wsproxy_target_discovery_lookups",
            "DNS lookups of target groups with discovery, by result (ok, error)",
            "target_group",
            "result",
        )
        discovery_errors = _counter(
            "wsproxy_target_discovery_errors",
            "Failed DNS lookups (the last good set of targets is kept), by reason",
            "target_group",
            "reason",
        )
        for group in self._proxy.metric_target_groups():
            name = group.name
            states: Counter[str] = Counter()
            for address, state, count in group.target_rows():
                states[state] += 1
                target_active.add_metric([name, address], count)
                for candidate in TARGET_STATES:
                    target_state.add_metric([name, address, candidate], int(candidate == state))
            healthy.add_metric([name], states["healthy"])
            unhealthy.add_metric([name], states["unhealthy"])
            stats = group.stats
            for (address, reason), count in sorted(stats.connect_errors.items()):
                connect_errors.add_metric([name, address, reason], count)
            for (address, result), count in sorted(stats.health_checks.items()):
                checks.add_metric([name, address, result], count)
            for address, count in sorted(stats.transitions.items()):
                transitions.add_metric([name, address], count)
            stats.connect_seconds.add_to(connect_seconds, [name])
            for result, count in sorted(stats.discovery_lookups.items()):
                lookups.add_metric([name, result], count)
            for reason, count in sorted(stats.discovery_errors.items()):
                discovery_errors.add_metric([name, reason], count)
        yield from (target_active, target_state, healthy, unhealthy)
        yield from (connect_errors, connect_seconds, checks, transitions)
        yield from (lookups, discovery_errors)

    def _process_state(self) -> Iterator[Metric]:
        proxy = self._proxy
        draining = _gauge("wsproxy_draining", "1 while the proxy drains its connections")
        draining.add_metric([], 1 if proxy.draining else 0)
        yield draining
        counts, ok, when = proxy.reload_status()
        reloads = _counter("wsproxy_config_reloads", "Config reloads by result", "result")
        for result, count in sorted(counts.items()):
            reloads.add_metric([result], count)
        yield reloads
        yield GaugeMetricFamily(
            "wsproxy_config_last_reload_successful",
            "1 if the last reload succeeded (or none was tried)",
            value=1 if ok else 0,
        )
        yield GaugeMetricFamily(
            "wsproxy_config_last_reload_success_timestamp_seconds",
            "When the configuration last loaded successfully",
            value=when,
        )
        lag = _histogram(
            "wsproxy_event_loop_lag_seconds",
            "How late the event loop ran a periodic timer (every session shares the loop)",
        )
        proxy.loop_lag.add_to(lag, [])
        yield lag
        dropped = _counter(
            "wsproxy_log_lines_dropped",
            "Log lines dropped because stderr could not keep up (logging never blocks sessions)",
        )
        dropped.add_metric([], proxy.log_lines_dropped)
        yield dropped


def _directions(family: CounterMetricFamily, listener: str, inbound: int, outbound: int) -> None:
    family.add_metric([listener, "client_to_target"], inbound)
    family.add_metric([listener, "target_to_client"], outbound)


class Metrics:
    """The proxy's own registry (never the global one, so two proxies fit in one process), with
    the standard process metrics beside wsproxy's."""

    def __init__(self, collector: Collector) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        ProcessCollector(registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
