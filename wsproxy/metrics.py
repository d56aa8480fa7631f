"""Counters kept as plain integers on the data path, turned into Prometheus metrics at scrape time.

The relay never calls prometheus-client: it bumps attributes of ``ListenerStats``; the collector
here reads them (and the byte counts of live connections) only when ``/metrics`` is scraped.
"""

from __future__ import annotations

import platform
import ssl
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
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


@dataclass(slots=True)
class ListenerStats:
    """What happened on one listener since start; updated in place, read at scrape time."""

    connections: int = 0
    active: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    upgrades: Counter[tuple[str, str]] = field(default_factory=Counter)  # (target_group, result)
    closes: Counter[tuple[str, int]] = field(default_factory=Counter)  # (initiator, code)
    bytes_in: int = 0  # finished connections only; live ones are added at scrape time
    bytes_out: int = 0
    messages_in: int = 0
    messages_out: int = 0
    tls_handshakes: Counter[str] = field(default_factory=Counter)  # result
    client_certs: Counter[str] = field(default_factory=Counter)  # ok | missing | untrusted | ...


class StatsSource(Protocol):
    """What the collector needs from a listener."""

    @property
    def name(self) -> str: ...

    @property
    def stats(self) -> ListenerStats: ...

    def live_byte_counts(self) -> Iterable[tuple[int, int]]: ...


class TargetSource(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def connect_errors(self) -> dict[str, int]: ...

    def target_rows(self) -> Iterable[tuple[str, str, int]]: ...  # (address, state, active)


class ProxyCollector(Collector):
    def __init__(
        self,
        listeners: Callable[[], Iterable[StatsSource]],
        upstreams: Callable[[], Iterable[TargetSource]],
        draining: Callable[[], bool],
        reloads: Callable[[], tuple[dict[str, int], bool, float]] | None = None,
        loop_lag: Histogram | None = None,
    ) -> None:
        self._loop_lag = loop_lag
        self._listeners = listeners
        self._upstreams = upstreams
        self._draining = draining
        self._reloads = reloads

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "wsproxy_build_info",
            "wsproxy build and runtime versions",
            labels=["version", "python", "loop", "openssl"],
        )
        info.add_metric([__version__, platform.python_version(), "uvloop", ssl.OPENSSL_VERSION], 1)
        yield info
        conns = CounterMetricFamily(
            "wsproxy_listener_connections", "Connections accepted", labels=["listener"]
        )
        active = GaugeMetricFamily(
            "wsproxy_listener_connections_active", "Connections open now", labels=["listener"]
        )
        rejected = CounterMetricFamily(
            "wsproxy_listener_connections_rejected",
            "Connections ended by the proxy before reaching a target, by reason",
            labels=["listener", "reason"],
        )
        upgrades = CounterMetricFamily(
            "wsproxy_websocket_upgrades",
            "WebSocket upgrade attempts by result",
            labels=["listener", "target_group", "result"],
        )
        closes = CounterMetricFamily(
            "wsproxy_websocket_closes",
            "WebSocket sessions closed, by who started the close and the code",
            labels=["listener", "initiator", "code"],
        )
        messages = CounterMetricFamily(
            "wsproxy_websocket_messages",
            "WebSocket messages relayed (counted by finished sessions)",
            labels=["listener", "direction"],
        )
        byte_total = CounterMetricFamily(
            "wsproxy_bytes", "Bytes relayed", labels=["listener", "direction"]
        )
        handshakes = CounterMetricFamily(
            "wsproxy_tls_handshakes", "TLS handshakes by result", labels=["listener", "result"]
        )
        client_certs = CounterMetricFamily(
            "wsproxy_client_cert_verifications",
            "Client certificate checks by result",
            labels=["listener", "result"],
        )
        for listener in self._listeners():
            stats = listener.stats
            name = listener.name
            conns.add_metric([name], stats.connections)
            active.add_metric([name], stats.active)
            for reason, count in sorted(stats.rejected.items()):
                rejected.add_metric([name, reason], count)
            for (group, result), count in sorted(stats.upgrades.items()):
                upgrades.add_metric([name, group, result], count)
            for (initiator, code), count in sorted(stats.closes.items()):
                closes.add_metric([name, initiator, str(code)], count)
            for result, count in sorted(stats.tls_handshakes.items()):
                handshakes.add_metric([name, result], count)
            for result, count in sorted(stats.client_certs.items()):
                client_certs.add_metric([name, result], count)
            messages.add_metric([name, "client_to_target"], stats.messages_in)
            messages.add_metric([name, "target_to_client"], stats.messages_out)
            live_in = live_out = 0
            for b_in, b_out in listener.live_byte_counts():
                live_in += b_in
                live_out += b_out
            byte_total.add_metric([name, "client_to_target"], stats.bytes_in + live_in)
            byte_total.add_metric([name, "target_to_client"], stats.bytes_out + live_out)
        yield from (conns, active, rejected, upgrades, closes, messages, byte_total)
        yield from (handshakes, client_certs)

        target_active = GaugeMetricFamily(
            "wsproxy_target_connections_active",
            "Client connections assigned to a target",
            labels=["target_group", "target"],
        )
        target_state = GaugeMetricFamily(
            "wsproxy_target_state",
            "1 for the target's current state",
            labels=["target_group", "target", "state"],
        )
        connect_errors = CounterMetricFamily(
            "wsproxy_target_connect_errors",
            "Failed connects to targets, by reason",
            labels=["target_group", "reason"],
        )
        for upstream in self._upstreams():
            for address, state, count in upstream.target_rows():
                target_active.add_metric([upstream.name, address], count)
                target_state.add_metric([upstream.name, address, state], 1)
            for reason, count in sorted(upstream.connect_errors.items()):
                connect_errors.add_metric([upstream.name, reason], count)
        yield from (target_active, target_state, connect_errors)
        draining = GaugeMetricFamily("wsproxy_draining", "1 while the proxy is shutting down")
        draining.add_metric([], 1 if self._draining() else 0)
        yield draining
        if self._loop_lag is not None:
            lag = HistogramMetricFamily(
                "wsproxy_event_loop_lag_seconds",
                "How late the event loop ran a periodic timer (every session shares the loop)",
                labels=[],
            )
            self._loop_lag.add_to(lag, [])
            yield lag
        if self._reloads is not None:
            counts, ok, when = self._reloads()
            reloads = CounterMetricFamily(
                "wsproxy_config_reloads", "Config reloads by result", labels=["result"]
            )
            for result, count in sorted(counts.items()):
                reloads.add_metric([result], count)
            yield reloads
            yield GaugeMetricFamily(
                "wsproxy_config_last_reload_successful",
                "1 if the last reload succeeded",
                value=1 if ok else 0,
            )
            yield GaugeMetricFamily(
                "wsproxy_config_last_reload_success_timestamp_seconds",
                "When the configuration last loaded successfully",
                value=when,
            )


class Metrics:
    """The proxy's own registry (never the global one, so two proxies fit in one process)."""

    def __init__(self, collector: ProxyCollector) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)
