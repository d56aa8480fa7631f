"""The TOML config file, validated into frozen objects before anything starts.

Validation goes through pydantic v2: ``extra="forbid"`` makes unknown keys errors, and each error's
location becomes the key path a user sees (``target_groups.chat.targets[1].address``). References
between sections are checked in a second pass over the raw document so that one run reports every
problem at once.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import pwd
import re
import stat
import tomllib
import types
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    StringConstraints,
    ValidationError,
    model_validator,
)

from wsproxy.address import Address, parse_address
from wsproxy.errors import BadRequestTarget, ConfigError, ConfigIssue
from wsproxy.wire.request_target import normalize_path
from wsproxy.wire.route_selection import (
    CONNECT_ROUTE,
    DISCONNECT_ROUTE,
    BadSelectionExpression,
    parse_expression,
)

MiB = 1024 * 1024

Name = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$"),
]
ListenAddress = Annotated[
    Address,
    PlainValidator(
        lambda v: v if isinstance(v, Address) else parse_address(v, allow_port_zero=True)
    ),
    PlainSerializer(str),
]
TargetAddress = Annotated[
    Address,
    PlainValidator(lambda v: v if isinstance(v, Address) else parse_address(v)),
    PlainSerializer(str),
]


class Algorithm(StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_CONNECTIONS = "least_connections"
    RANDOM_TWO = "random_two"
    SOURCE_IP = "source_ip"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


MAX_WORKERS = 64


def _workers(value: object) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS:
        return value
    raise ValueError(f'must be an integer 1-{MAX_WORKERS} or "auto", got {value!r}')


Workers = Annotated[int | str, PlainValidator(_workers)]


class ProxySection(_Section):
    shutdown_grace_seconds: float = Field(30.0, ge=0, le=3600)
    # Poll the config file once a second and reload when its content changes. Follows symlinks,
    # so a Kubernetes ConfigMap update (an atomic swap of the ..data symlink) is picked up.
    watch_config: bool = False
    # Worker processes sharing the listeners (SO_REUSEPORT, one socket per worker slot, owned by a
    # supervisor that also runs the admin listener and the health checks). "auto": one per core.
    workers: Workers = 1

    def worker_count(self) -> int:
        if self.workers == "auto":
            return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
        return int(self.workers)


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, ``localhost``)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


# What [admin] unauthenticated opens: the endpoints that answer without the bearer token.
# "probes": what orchestrators probe (they cannot send a secret), and the status page's HTML,
# which holds no data and asks for the token itself.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/status"})
READ_ONLY_PATHS = PROBE_PATHS | {"/metrics"}


class AdminSection(_Section):
    enabled: bool = True
    address: ListenAddress = Address("127.0.0.1", 9900)
    # A file holding a bearer token; endpoints outside `unauthenticated` need it.
    token_file: str | None = None
    # Which endpoints answer without the token: "probes", "read_only" (probes + /metrics) or
    # "all" (every one, management included). Unset: "probes" with a token_file, "all" on a
    # loopback address without one, and a config error on any other address without one.
    unauthenticated: Literal["probes", "read_only", "all"] | None = None

    @model_validator(mode="after")
    def _not_open_to_the_network(self) -> AdminSection:
        if not self.enabled:
            return self
        if self.token_file is not None and self.unauthenticated == "all":
            raise ValueError(
                'unauthenticated = "all" lets every request in, so token_file would never be '
                "asked for; remove one of them"
            )
        if (
            self.token_file is None
            and self.unauthenticated is None
            and not is_loopback(self.address.host)
        ):
            raise ValueError(
                f"address {self.address} is reachable from the network and there is no "
                "token_file, so anyone who can connect could drain the proxy, deregister "
                "targets or reload it; set token_file (a file holding a bearer token), or "
                'unauthenticated = "read_only" to serve only /metrics and the probes, or '
                'unauthenticated = "all" to accept management requests from anyone '
                "(docs/security.md)"
            )
        return self

    def open_paths(self) -> frozenset[str] | None:
        """The paths that answer without the token; ``None``: every path does."""
        mode = self.unauthenticated
        if mode is None:
            mode = "probes" if self.token_file is not None else "all"
        if mode == "all":
            return None
        return READ_ONLY_PATHS if mode == "read_only" else PROBE_PATHS


class TargetConfig(_Section):
    address: TargetAddress
    weight: int = Field(1, ge=1, le=1000)


class TargetTls(_Section):
    """``tls = {...}`` on a ``protocol = "tls"`` target group: how the proxy checks the target and
    proves itself to it."""

    ca: str | None = None  # None: the system's trust store
    server_name: str | None = None  # None: the target's host
    client_cert: str | None = None
    client_key: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> TargetTls:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        return self


def _parse_matcher(text: str) -> str:
    """``"200"``, ``"200,204"``, ``"200-399"`` (AWS's Matcher.HttpCode syntax)."""
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        codes = [low, high] if high else [low]
        if not all(code.isdigit() and 100 <= int(code) <= 599 for code in codes):
            raise ValueError(f"matcher must look like '200', '200,204' or '200-399', got {text!r}")
        if high and int(high) < int(low):
            raise ValueError(f"matcher range {part.strip()!r} runs backwards")
    return text


class HealthCheckConfig(_Section):
    """``[target_groups.NAME.health_check]``: active probes and their thresholds."""

    protocol: Literal["tcp", "http", "https", "websocket"] = "tcp"
    path: Annotated[str, StringConstraints(pattern=r"^/[\x21-\x7e]*$")] = "/"
    matcher: Annotated[str, AfterValidator(_parse_matcher)] = "200-399"
    send: str | None = None  # websocket: a text message to send after the upgrade
    expect: str | None = None  # websocket: the reply it must get
    # 0.5 s minimum: sub-second intervals are for fast failover and tests (AWS allows 5 s).
    interval_seconds: float = Field(10.0, ge=0.5, le=300)
    timeout_seconds: float = Field(5.0, ge=0.1, le=120)
    healthy_threshold: int = Field(3, ge=1, le=10)
    unhealthy_threshold: int = Field(2, ge=1, le=10)

    @model_validator(mode="after")
    def _consistent(self) -> HealthCheckConfig:
        if self.timeout_seconds >= self.interval_seconds:
            raise ValueError(
                f"timeout_seconds ({self.timeout_seconds:g}) must be < interval_seconds "
                f"({self.interval_seconds:g})"
            )
        if (self.send is None) != (self.expect is None):
            raise ValueError("send and expect go together")
        if self.send is not None and self.protocol != "websocket":
            raise ValueError("send/expect are for protocol = 'websocket'")
        return self


def _nameserver(value: object) -> Address:
    """``"10.0.0.10"`` (port 53), ``"127.0.0.1:5353"`` or ``"[::1]:5353"``: an IP address,
    because the resolver must not need a resolver to find its server."""
    if isinstance(value, Address):
        return value
    if not isinstance(value, str):
        raise ValueError(
            f"a nameserver is a string like '10.0.0.10' or '127.0.0.1:5353', got {value!r}"
        )
    try:
        return Address(str(ipaddress.ip_address(value)), 53)
    except ValueError:
        pass
    if ":" not in value:
        raise ValueError(f"nameserver {value!r} must be an IP address, not a host name")
    address = parse_address(value)
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        raise ValueError(
            f"nameserver {value!r} must be an IP address (with an optional port), not a host name"
        ) from None
    return address


Nameserver = Annotated[Address, PlainValidator(_nameserver), PlainSerializer(str)]


def _dns_name(value: str) -> str:
    if ":" in value or value.startswith("["):
        raise ValueError(f"must be a DNS name like 'chat.default.svc.cluster.local', got {value!r}")
    parse_address(f"{value}:53")  # the host-name rules targets follow (labels, 253 characters)
    return value


DnsName = Annotated[str, AfterValidator(_dns_name)]


class DnsDiscoveryConfig(_Section):
    """``discovery = { dns = ... }``: the group's targets are what a DNS name answers (HAProxy's
    ``server-template`` with resolvers, Envoy's ``STRICT_DNS``)."""

    dns: DnsName
    # None: the name is queried as SRV and each answer gives its target's port.
    port: int | None = Field(None, ge=1, le=65535)
    # 0.5 s minimum, as for health checks; 5 s: a pod that left is noticed about as fast as
    # Kubernetes' own endpoint propagation.
    refresh_seconds: float = Field(5.0, ge=0.5, le=3600)
    # None: the system's resolver (/etc/resolv.conf).
    nameservers: tuple[Nameserver, ...] | None = None

    @model_validator(mode="after")
    def _some_nameserver(self) -> DnsDiscoveryConfig:
        if self.nameservers == ():
            raise ValueError("nameservers is empty; list one or leave it out (system resolver)")
        return self


class TargetGroupConfig(_Section):
    # tcp/tls: tunnels dial it. http/https: an API's routes call it (pooled HTTP/1.1 keep-alive).
    protocol: Literal["tcp", "tls", "http", "https"] = "tcp"
    health_check: HealthCheckConfig | None = None
    # Passive check: this many consecutive failed dials mark a target unhealthy at once.
    unhealthy_after_connect_failures: int = Field(3, ge=1, le=100)
    # A target that becomes healthy gets a linearly growing share of new connections over this
    # window (round_robin and least_connections; AWS's slow_start.duration_seconds). 0: off.
    slow_start_seconds: float = Field(0.0, ge=0, le=900)
    # Deregistered targets: their sessions are closed spread over this window (AWS: 300 s).
    deregistration_delay_seconds: float = Field(30.0, ge=0, le=3600)
    # No healthy target: balance over all (as NLB does) or refuse (503 / close).
    when_all_unhealthy: Literal["fail_open", "reject"] = "fail_open"
    tls: TargetTls | None = None
    algorithm: Algorithm = Algorithm.LEAST_CONNECTIONS
    connect_timeout_seconds: float = Field(5.0, gt=0, le=300)
    # Write a PROXY v2 header (client and listener addresses) before any other byte.
    proxy_protocol_v2: bool = False
    # How long a target may take to answer the WebSocket upgrade once the request is sent.
    handshake_timeout_seconds: float = Field(10.0, gt=0, le=300)
    targets: tuple[TargetConfig, ...] = ()
    discovery: DnsDiscoveryConfig | None = None

    @model_validator(mode="after")
    def _unique_targets(self) -> TargetGroupConfig:
        if self.discovery is not None and self.targets:
            raise ValueError(
                "discovery and targets exclude each other: the DNS answers are the targets; "
                "remove the targets list or the discovery table"
            )
        if self.tls is not None and self.protocol not in ("tls", "https"):
            raise ValueError("a tls table needs protocol = 'tls' or 'https'")
        seen: set[Address] = set()
        for target in self.targets:
            if target.address in seen:
                raise ValueError(f"target {target.address} is listed twice")
            seen.add(target.address)
        return self


class RuleConfig(_Section):
    host: Annotated[str, StringConstraints(min_length=1, max_length=253)] | None = None
    path_prefix: Annotated[str, StringConstraints(pattern=r"^/")] | None = None
    sni: Annotated[str, StringConstraints(pattern=r"^(\*\.)?[A-Za-z0-9_.-]{1,253}$")] | None = None
    target_group: Name

    @model_validator(mode="after")
    def _has_condition(self) -> RuleConfig:
        if self.sni is not None and (self.host is not None or self.path_prefix is not None):
            raise ValueError("'sni' rules (tls_passthrough) cannot also match host or path")
        if self.sni is None and self.host is None and self.path_prefix is None:
            raise ValueError("a rule needs 'host' and/or 'path_prefix' (or 'sni' on passthrough)")
        return self

    @model_validator(mode="after")
    def _path_prefix_is_normal(self) -> RuleConfig:
        # Requests are matched on their normalised path (wire/request_target.py): a prefix that
        # is not in normal form could never match, and one with %2F or %5C names refused paths.
        prefix = self.path_prefix
        if prefix is None:
            return self
        try:
            normal = normalize_path(prefix)
        except BadRequestTarget as exc:
            raise ValueError(
                f"path_prefix {prefix!r} can never match: request paths like it are refused "
                f"with 400 ({exc})"
            ) from None
        if normal != prefix:
            raise ValueError(
                f"path_prefix {prefix!r} is matched against normalised request paths and would "
                f"never match; write {normal!r}"
            )
        return self


class CertificateFiles(_Section):
    cert: Annotated[str, StringConstraints(min_length=1)]
    key: Annotated[str, StringConstraints(min_length=1)]


class ListenerTls(_Section):
    """``[listeners.NAME.tls]``: certificates chosen by SNI, policy, client certificates."""

    certificates: Annotated[tuple[CertificateFiles, ...], Field(min_length=1)]
    policy: Literal["intermediate", "modern"] = "intermediate"
    client_auth: Literal["none", "optional", "required"] = "none"
    client_ca: str | None = None
    crl: str | None = None

    @model_validator(mode="after")
    def _client_ca_needed(self) -> ListenerTls:
        if self.client_auth != "none" and not self.client_ca:
            raise ValueError(f"client_auth = {self.client_auth!r} needs client_ca")
        if self.crl and self.client_auth == "none":
            raise ValueError("crl is only used to check client certificates (client_auth)")
        return self


class ListenerConfig(_Section):
    address: ListenAddress
    # Let another process listen on this address too (both SO_REUSEPORT; the kernel spreads new
    # connections over all of them), e.g. the new wsproxy of a blue/green handover. Off: an
    # address another process listens on is refused at bind. Envoy's enable_reuse_port and
    # HAProxy's noreuseport switch SO_REUSEPORT itself; wsproxy always needs it (reloads,
    # worker slots), so the key only says whether another process may join.
    share_address: bool = False
    protocol: Literal["tcp", "tls", "tls_passthrough"] = "tcp"
    tls: ListenerTls | None = None
    tls_handshake_timeout_seconds: float = Field(10.0, gt=0, le=120)
    # Behind another load balancer: read a PROXY v1/v2 header first and use its source address.
    accept_proxy_protocol: bool = False
    proxy_protocol_timeout_seconds: float = Field(5.0, gt=0, le=120)
    # Passthrough: the ClientHello must arrive within these bounds (Envoy's tls_inspector: 64 KiB).
    client_hello_timeout_seconds: float = Field(5.0, gt=0, le=120)
    max_client_hello_bytes: int = Field(64 * 1024, ge=1024, le=1 * MiB)
    websocket: bool = False
    websocket_only: bool = False
    # End WebSockets here and serve the API of this name ([apis.NAME]) instead of tunnelling.
    api: Name | None = None
    default_target_group: Name | None = None
    # Connections open at once (TLS handshakes in progress included); more are closed at
    # accept and counted as rejected with reason "limit" (HAProxy's maxconn, Envoy's
    # max_connections). The proxy's descriptor limit must be above the sum over listeners.
    max_connections: int = Field(10_000, ge=1, le=1_000_000)
    # Connections open at once from one client address (0: no limit); more are closed at
    # accept, counted with reason "per_ip_limit". Behind PROXY protocol: the address it carries.
    max_connections_per_ip: int = Field(0, ge=0, le=1_000_000)
    # TLS listeners: handshakes in progress at once. At the limit the listener stops accepting
    # (connections wait in the kernel's backlog) until one finishes, which bounds the CPU a
    # connection flood can make the proxy spend on TLS.
    max_handshakes_in_flight: int = Field(256, ge=1, le=100_000)
    # Of those, at most this many for one client address (the PROXY header's source behind
    # PROXY protocol): an address holding idle sockets cannot take every slot. Connections
    # beyond it wait, and freed slots go to waiting addresses in turn (fair queueing).
    max_handshakes_in_flight_per_ip: int = Field(32, ge=1, le=100_000)
    idle_timeout_seconds: float = Field(350.0, gt=0, le=7 * 24 * 3600)
    # Websocket mode: ping a client silent this long (0: never); no pong in time ends the session.
    ping_interval_seconds: float = Field(30.0, ge=0, le=3600)
    ping_timeout_seconds: float = Field(30.0, gt=0, le=3600)
    # And ping a target silent this long (0: never): a target that vanished without a FIN (a
    # black-holed host, a dead NAT entry) is found, and its clients told, instead of waiting on it.
    target_ping_interval_seconds: float = Field(30.0, ge=0, le=3600)
    max_frame_bytes: int = Field(16 * MiB, ge=125, le=2**40)
    # Websocket mode, per session. A message's fragments together (Close 1009 when passed).
    max_message_bytes: int = Field(64 * MiB, ge=125, le=2**40)
    # Client messages per second (0: no limit), with a burst allowance of messages_burst
    # (0: one second's worth); Close 1008 when exceeded.
    max_messages_per_second: float = Field(0.0, ge=0, le=1_000_000)
    messages_burst: int = Field(0, ge=0, le=10_000_000)
    # Client frames per second of any kind (control and continuation frames included; 0: no
    # limit), with a burst allowance of frames_burst (0: one second's worth); Close 1008 when
    # exceeded. On by default: an empty-frame flood costs the proxy per frame, not per byte.
    # 10,000: 100 times what a browser app sends (one frame per message), 40 MB/s in the 4 KiB
    # fragments of gorilla/websocket's default write buffer.
    max_frames_per_second: float = Field(10_000.0, ge=0, le=10_000_000)
    frames_burst: int = Field(0, ge=0, le=100_000_000)
    # A session's longest life (0: none); then Close 1001 at a message boundary, as API
    # Gateway ends WebSocket connections after 2 hours.
    max_session_seconds: float = Field(0.0, ge=0, le=30 * 24 * 3600)
    max_request_head_bytes: int = Field(16 * 1024, ge=1024, le=1 * MiB)
    request_head_timeout_seconds: float = Field(10.0, gt=0, le=600)
    rules: tuple[RuleConfig, ...] = ()

    @model_validator(mode="after")
    def _websocket_options(self) -> ListenerConfig:
        if self.protocol == "tls" and self.tls is None:
            raise ValueError("protocol = 'tls' needs a [listeners.NAME.tls] section")
        if self.protocol != "tls" and self.tls is not None:
            raise ValueError("a tls section needs protocol = 'tls'")
        if self.api is not None:
            return self._api_options()
        if self.protocol == "tls_passthrough":
            if self.websocket:
                raise ValueError("tls_passthrough never decrypts, so it cannot be websocket = true")
            if any(rule.sni is None for rule in self.rules):
                raise ValueError("tls_passthrough rules match 'sni' only")
            return self
        if self.default_target_group is None:
            raise ValueError("default_target_group is required (except on tls_passthrough)")
        if any(rule.sni is not None for rule in self.rules):
            raise ValueError("'sni' rules are for tls_passthrough listeners")
        if not self.websocket and self.websocket_only:
            raise ValueError("websocket_only = true needs websocket = true")
        if not self.websocket and self.rules:
            raise ValueError(
                "rules match on Host and path, which only websocket = true listeners read"
            )
        return self

    def _api_options(self) -> ListenerConfig:
        if self.protocol == "tls_passthrough":
            raise ValueError(
                "tls_passthrough never decrypts, so it cannot serve an API; use protocol = 'tls'"
            )
        tunnel = [
            key
            for key, value in (
                ("websocket", self.websocket),
                ("websocket_only", self.websocket_only),
                ("rules", self.rules),
                ("default_target_group", self.default_target_group),
            )
            if value
        ]
        if tunnel:
            raise ValueError(
                f"api = {self.api!r} ends WebSockets here, so the tunnel's "
                f"{', '.join(tunnel)} cannot be set too; routes are in [apis.{self.api}]"
            )
        return self


RouteKey = Annotated[str, StringConstraints(min_length=1, max_length=128)]
RoutePath = Annotated[str, StringConstraints(pattern=r"^/[\x21-\x7e]*$", max_length=1024)]


class RouteConfig(_Section):
    """``[[apis.NAME.routes]]``: messages (or the connect/disconnect events) with this key go
    to ``POST {path}`` on a target of ``target_group``."""

    key: RouteKey
    target_group: Name
    path: RoutePath = "/"
    # A 2xx answer's body goes back to the client as one message (API Gateway's route response).
    respond: bool = False

    @model_validator(mode="after")
    def _respond_on_messages(self) -> RouteConfig:
        if self.respond and self.key in (CONNECT_ROUTE, DISCONNECT_ROUTE):
            raise ValueError(f"respond = true is for message routes, not {self.key}")
        return self


class ApiManagementConfig(_Section):
    """``[apis.NAME.management]``: the @connections API on a listener of its own."""

    address: ListenAddress
    # TLS, and with client_auth = "required" certificates from our CA instead of the admin token.
    tls: ListenerTls | None = None


def _selection_expression(value: str) -> str:
    try:
        parse_expression(value)
    except BadSelectionExpression as exc:
        raise ValueError(str(exc)) from None
    return value


class ApiConfig(_Section):
    """``[apis.NAME]``: a WebSocket API (routes, integration calls, limits per connection).
    Defaults are API Gateway's quotas."""

    route_selection_expression: Annotated[str, AfterValidator(_selection_expression)] = (
        "$request.body.action"
    )
    integration_timeout_seconds: float = Field(29.0, gt=0, le=3600)
    # Over either: Close 1009. A message's fragments together count toward max_message_bytes,
    # and so does a compressed message once inflated.
    max_frame_bytes: int = Field(32 * 1024, ge=125, le=64 * MiB)
    max_message_bytes: int = Field(128 * 1024, ge=125, le=64 * MiB)
    idle_timeout_seconds: float = Field(600.0, gt=0, le=7 * 24 * 3600)
    # Then Close 1001 at a message boundary (API Gateway: 2 hours). 0: no limit.
    max_session_seconds: float = Field(7200.0, ge=0, le=30 * 24 * 3600)
    # Integration calls of one connection at once; 1 keeps its messages in order. At the limit
    # the proxy stops reading that client's socket.
    max_in_flight_per_connection: int = Field(1, ge=1, le=1000)
    # Bytes queued toward one client beyond which management sends get 429 (a slow reader never
    # makes the proxy buffer without bound).
    max_send_buffer_bytes: int = Field(1 * MiB, ge=64 * 1024, le=1024 * MiB)
    # An HMAC-SHA256 key (the file's bytes, trailing newline stripped): ce-signature on every call.
    signing_secret_file: str | None = None
    routes: tuple[RouteConfig, ...] = ()
    management: ApiManagementConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ApiConfig:
        if self.max_frame_bytes > self.max_message_bytes:
            raise ValueError(
                f"max_frame_bytes ({self.max_frame_bytes}) is over max_message_bytes "
                f"({self.max_message_bytes}); a frame is at most a whole message"
            )
        seen: set[str] = set()
        for route in self.routes:
            if route.key in seen:
                raise ValueError(f"route key {route.key!r} is listed twice")
            seen.add(route.key)
        return self

    def route(self, key: str) -> RouteConfig | None:
        for route in self.routes:
            if route.key == key:
                return route
        return None


class Config(_Section):
    proxy: ProxySection = ProxySection()
    admin: AdminSection = AdminSection()
    listeners: Annotated[dict[Name, ListenerConfig], Field(min_length=1)]
    target_groups: dict[Name, TargetGroupConfig] = Field(default_factory=dict)
    apis: dict[Name, ApiConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _management_is_authenticated(self) -> Config:
        for name, api in self.apis.items():
            management = api.management
            if management is None:
                continue
            by_certificate = management.tls is not None and management.tls.client_auth == "required"
            if by_certificate or self.admin.token_file is not None:
                continue
            if not is_loopback(management.address.host):
                raise ValueError(
                    f"apis.{name}.management: address {management.address} is reachable from "
                    "the network and nothing authenticates callers; set [admin] token_file "
                    '(calls then need that token) or tls with client_auth = "required" '
                    "(backends present a certificate from client_ca)"
                )
        return self


def _format_loc(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "[key]":
            continue
        else:
            path += f".{part}" if path else str(part)
    return path


def _section_model(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """The section model a field holds: ``("table", M)`` for ``M`` or ``M | None``,
    ``("names", M)`` for ``dict[Name, M]``, ``("array", M)`` for ``tuple[M, ...]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table", annotation
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType, Annotated):
        for arg in args:
            found = _section_model(arg)
            if found is not None:
                return found
    if origin in (dict, tuple) and args:
        inner = _section_model(args[1] if origin is dict else args[0])
        if inner is not None and inner[0] == "table":
            return ("names" if origin is dict else "array"), inner[1]
    return None


def _section_at(loc: tuple[int | str, ...]) -> tuple[str, type[BaseModel]] | None:
    """The heading (``[listeners.NAME.tls]``, ``[[listeners.NAME.rules]]``) and model of the
    section at an error location, or None when the location leaves the schema."""
    model: type[BaseModel] = Config
    path: list[str] = []
    array = False
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        field = model.model_fields.get(part) if isinstance(part, str) else None
        found = _section_model(field.annotation) if field is not None else None
        if found is None:
            return None
        kind, model = found
        path.append(str(part))
        array = kind == "array"
        if kind != "table":  # the next part is the listener/group name or the array index
            if not parts:
                return None
            parts.pop(0)
            if kind == "names":
                path.append("NAME")
    if not path:
        return "the top level", model
    heading = ".".join(path)
    return (f"[[{heading}]]" if array else f"[{heading}]"), model


def _unknown_key(loc: tuple[int | str, ...]) -> str:
    """``unknown key; did you mean KEY?`` with the closest key of that section (difflib)."""
    found = _section_at(loc[:-1])
    if found is None:
        return "unknown key; see docs/config.md for the keys this section takes"
    heading, model = found
    keys = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
    if close:
        return f"unknown key; did you mean {close[0]}?"
    if len(keys) <= 8:
        return f"unknown key; {heading} takes {', '.join(keys)}"
    return f"unknown key; docs/config.md lists the keys {heading} takes"


def _describe(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind == "extra_forbidden":
        return _unknown_key(tuple(error["loc"]))
    if kind == "missing":
        return "required key is missing"
    if kind == "string_pattern_mismatch" and error["loc"] and error["loc"][-1] == "[key]":
        return f"name {value!r} must be lower-case letters, digits, '-' or '_' (max 63)"
    if kind == "string_pattern_mismatch" and "path_prefix" in error["loc"]:
        return f"must start with '/', got {value!r}"
    if kind == "string_pattern_mismatch":
        return f"must be lower-case letters, digits, '-' or '_' (max 63), got {value!r}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<"}
    bounds["less_than_equal"] = "<="
    if kind in bounds:
        limit = next(iter(ctx.values()))
        shown = f"{limit:g}" if isinstance(limit, float) else str(limit)
        return f"must be {bounds[kind]} {shown}, got {value!r}"
    message = str(error["msg"])
    message = message.removeprefix("Value error, ")
    if kind in ("value_error", "assertion_error"):
        return message
    return f"{message[:1].lower()}{message[1:]}, got {value!r}"


def _reference_issues(raw: Mapping[str, Any]) -> list[ConfigIssue]:
    groups = raw.get("target_groups")
    group_names = set(groups) if isinstance(groups, Mapping) else set()
    defined = ", ".join(sorted(group_names)) or "none"
    issues: list[ConfigIssue] = []

    def check(path: str, name: object) -> None:
        if isinstance(name, str) and name not in group_names:
            issues.append(
                ConfigIssue(
                    path,
                    f"unknown target group {name!r}; defined: {defined} "
                    "(add a [target_groups.NAME] section or fix the name)",
                )
            )

    apis = raw.get("apis")
    api_names = set(apis) if isinstance(apis, Mapping) else set()
    if isinstance(apis, Mapping):
        issues += _route_issues(apis, groups if isinstance(groups, Mapping) else {}, check)
    listeners = raw.get("listeners")
    if not isinstance(listeners, Mapping):
        return issues
    for listener_name, listener in listeners.items():
        if not isinstance(listener, Mapping):
            continue
        base = f"listeners.{listener_name}"
        api = listener.get("api")
        if isinstance(api, str) and api not in api_names:
            issues.append(
                ConfigIssue(
                    f"{base}.api",
                    f"unknown API {api!r}; defined: {', '.join(sorted(api_names)) or 'none'} "
                    "(add an [apis.NAME] section or fix the name)",
                )
            )
        check(f"{base}.default_target_group", listener.get("default_target_group"))
        rules = listener.get("rules")
        if isinstance(rules, list):
            for index, rule in enumerate(rules):
                if isinstance(rule, Mapping):
                    check(f"{base}.rules[{index}].target_group", rule.get("target_group"))
    return issues


def _route_issues(
    apis: Mapping[str, Any],
    groups: Mapping[str, Any],
    check: Any,
) -> list[ConfigIssue]:
    """Every route names a defined target group, and one that speaks HTTP."""
    issues: list[ConfigIssue] = []
    for api_name, api in apis.items():
        routes = api.get("routes") if isinstance(api, Mapping) else None
        if not isinstance(routes, list):
            continue
        for index, route in enumerate(routes):
            if not isinstance(route, Mapping):
                continue
            where = f"apis.{api_name}.routes[{index}].target_group"
            name = route.get("target_group")
            check(where, name)
            group = groups.get(name) if isinstance(name, str) else None
            if isinstance(group, Mapping) and group.get("protocol", "tcp") not in (
                "http",
                "https",
            ):
                issues.append(
                    ConfigIssue(
                        where,
                        f"target group {name!r} has protocol = "
                        f"{group.get('protocol', 'tcp')!r}; routes call HTTP integrations, "
                        'so it needs protocol = "http" or "https"',
                    )
                )
    return issues


def _address_issues(config: Config) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    seen: dict[Address, str] = {}
    listeners = [
        (f"listeners.{name}.address", lst.address) for name, lst in config.listeners.items()
    ]
    if config.admin.enabled:
        listeners.append(("admin.address", config.admin.address))
    for name, api in config.apis.items():
        if api.management is not None:
            listeners.append((f"apis.{name}.management.address", api.management.address))
    for path, address in listeners:
        if address.port == 0:
            continue
        if address in seen:
            issues.append(
                ConfigIssue(path, f"address {address} is already used by {seen[address]}")
            )
        seen[address] = path
    return issues


# ${NAME} in a file path: an environment variable, e.g. ${CREDENTIALS_DIRECTORY} (systemd).
_REFERENCE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)\}|)")


def expand_variables(value: str, environ: Mapping[str, str]) -> str:
    """Replace ``${NAME}`` with the environment variable NAME and ``$$`` with ``$``.

    Raises ``ValueError`` for a variable that is unset or empty (an empty one would turn
    ``${DIR}/edge.key`` into ``/edge.key``) and for any other ``$``, so a typo never becomes a
    path silently.
    """

    def substitute(match: re.Match[str]) -> str:
        if match.group(1):
            return "$"
        name = match.group(2)
        if name is None:
            raise ValueError(f"'$' must start ${{NAME}} (write $$ for a '$'), in {value!r}")
        found = environ.get(name)
        if found is None:
            hint = (
                "systemd sets it for a unit with LoadCredential=; outside such a unit, "
                if name == "CREDENTIALS_DIRECTORY"
                else ""
            )
            raise ValueError(
                f"${{{name}}} is not set in the environment; {hint}export {name} before "
                "starting wsproxy, or write the path out"
            )
        if not found:
            raise ValueError(f"${{{name}}} is set but empty; give it a directory or write the path")
        return found

    return _REFERENCE.sub(substitute, value)


def _resolve_files(
    config: Config, base_dir: Path, environ: Mapping[str, str]
) -> tuple[Config, list[ConfigIssue]]:
    """Expand ``${NAME}`` in file paths, then make them absolute, relative to ``base_dir``."""
    issues: list[ConfigIssue] = []

    def resolve(path: str | None, key: str) -> str | None:
        if path is None:
            return None
        try:
            path = expand_variables(path, environ)
        except ValueError as exc:
            issues.append(ConfigIssue(key, str(exc)))
        return str(base_dir / Path(path).expanduser())

    def resolve_tls(tls: ListenerTls, where: str) -> ListenerTls:
        return tls.model_copy(
            update={
                "certificates": tuple(
                    CertificateFiles(
                        cert=str(resolve(c.cert, f"{where}.certificates[{index}].cert")),
                        key=str(resolve(c.key, f"{where}.certificates[{index}].key")),
                    )
                    for index, c in enumerate(tls.certificates)
                ),
                "client_ca": resolve(tls.client_ca, f"{where}.client_ca"),
                "crl": resolve(tls.crl, f"{where}.crl"),
            }
        )

    listeners = {}
    for name, listener in config.listeners.items():
        if listener.tls is not None:
            tls = resolve_tls(listener.tls, f"listeners.{name}.tls")
            listener = listener.model_copy(update={"tls": tls})
        listeners[name] = listener
    apis = {}
    for name, api in config.apis.items():
        update: dict[str, Any] = {
            "signing_secret_file": resolve(
                api.signing_secret_file, f"apis.{name}.signing_secret_file"
            )
        }
        management = api.management
        if management is not None and management.tls is not None:
            tls = resolve_tls(management.tls, f"apis.{name}.management.tls")
            update["management"] = management.model_copy(update={"tls": tls})
        apis[name] = api.model_copy(update=update)
    groups = {}
    for name, group in config.target_groups.items():
        if group.tls is not None:
            target_tls = group.tls
            where = f"target_groups.{name}.tls"
            group = group.model_copy(
                update={
                    "tls": target_tls.model_copy(
                        update={
                            "ca": resolve(target_tls.ca, f"{where}.ca"),
                            "client_cert": resolve(target_tls.client_cert, f"{where}.client_cert"),
                            "client_key": resolve(target_tls.client_key, f"{where}.client_key"),
                        }
                    )
                }
            )
        groups[name] = group
    admin = config.admin
    if admin.token_file is not None:
        admin = admin.model_copy(
            update={"token_file": resolve(admin.token_file, "admin.token_file")}
        )
    resolved = config.model_copy(
        update={"listeners": listeners, "target_groups": groups, "admin": admin, "apis": apis}
    )
    return resolved, issues


def describe_unreadable(path: str, exc: OSError) -> str:
    """Why ``path`` cannot be read, as whom, and what to do; for messages that name the file.

    A permission problem names the uid wsproxy runs as, the file's owner and mode, and the
    usual fixes (chown/chmod, Kubernetes ``fsGroup``, systemd ``LoadCredential=``).
    """
    if not isinstance(exc, PermissionError):
        return exc.strerror or str(exc)
    uid, gid = os.geteuid(), os.getegid()
    try:
        user = f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        user = f"uid {uid}"
    try:
        info = os.stat(path)
    except OSError:
        found = "a directory on its path cannot be searched by that user"
    else:
        found = (
            f"the file is owned by uid {info.st_uid} gid {info.st_gid} "
            f"with mode {stat.S_IMODE(info.st_mode):04o}"
        )
    return (
        f"permission denied for {user}, gid {gid}, the user wsproxy runs as; {found}. "
        "Make it readable by that user: chown or chgrp it and chmod 0440; in Kubernetes set "
        "the pod's securityContext.fsGroup to a group that may read it; under systemd with "
        "DynamicUser=, pass it with LoadCredential= and write ${CREDENTIALS_DIRECTORY}/NAME "
        "in the config"
    )


def admin_file_issues(config: Config) -> list[ConfigIssue]:
    """The admin token file must be readable and hold a token."""
    token_file = config.admin.token_file
    if token_file is None or not config.admin.enabled:
        return []
    try:
        if not Path(token_file).read_text(encoding="utf-8").strip():
            return [ConfigIssue("admin.token_file", f"{token_file} is empty; put a token in it")]
    except UnicodeDecodeError:
        return [ConfigIssue("admin.token_file", f"{token_file} is not UTF-8 text")]
    except OSError as exc:
        problem = describe_unreadable(token_file, exc)
        return [ConfigIssue("admin.token_file", f"cannot read {token_file}: {problem}")]
    return []


def read_signing_secret(path: str | None) -> bytes | None:
    """An API's HMAC key: the file's bytes without surrounding whitespace; ``ConfigError``
    when it cannot be read or is empty."""
    if path is None:
        return None
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        problem = describe_unreadable(path, exc)
        raise ConfigError(
            path, [ConfigIssue("signing_secret_file", f"cannot read {path}: {problem}")]
        ) from None
    if not secret:
        raise ConfigError(
            path,
            [
                ConfigIssue(
                    "signing_secret_file",
                    f"{path} is empty; put a key in it (openssl rand -hex 32)",
                )
            ],
        )
    return secret


def api_file_issues(config: Config) -> list[ConfigIssue]:
    """Every API's signing secret file must be readable and hold a key, and a management
    listener that asks for the admin token needs a token in that file, admin on or off."""
    issues: list[ConfigIssue] = []
    token_users = [
        name
        for name, api in config.apis.items()
        if api.management is not None
        and not (api.management.tls is not None and api.management.tls.client_auth == "required")
    ]
    if token_users and config.admin.token_file is not None and not config.admin.enabled:
        issues += admin_file_issues(
            config.model_copy(update={"admin": config.admin.model_copy(update={"enabled": True})})
        )
    for name, api in config.apis.items():
        try:
            read_signing_secret(api.signing_secret_file)
        except ConfigError as exc:
            issues += [
                ConfigIssue(f"apis.{name}.{issue.path}", issue.message) for issue in exc.issues
            ]
    return issues


def parse_config(
    text: str,
    source: str = "<config>",
    base_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Validate TOML text; raises ``ConfigError`` listing every problem found.

    ``${NAME}`` in file paths is taken from ``environ`` (the process environment by default);
    relative paths are taken from ``base_dir`` (the config file's directory when loaded with
    ``load_config``; the working directory otherwise). No file is read here: the files a
    config names are checked by ``wsproxy.tls.check_files``.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [ConfigIssue("", f"invalid TOML: {exc}")]) from None
    issues = _reference_issues(raw)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        issues = [
            ConfigIssue(_format_loc(tuple(err["loc"])), _describe(err)) for err in exc.errors()
        ] + issues
        raise ConfigError(source, issues) from None
    issues += _address_issues(config)
    config, path_issues = _resolve_files(
        config, base_dir or Path.cwd(), os.environ if environ is None else environ
    )
    issues += path_issues
    if issues:
        raise ConfigError(source, issues)
    return config


def read_config(path: str | Path) -> tuple[Config, str]:
    """Read and validate a config file: the config and the exact text it was parsed from (a
    supervisor hands its workers that text, never the path: the file may change meanwhile).
    Raises ``ConfigError``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problem = describe_unreadable(str(path), exc)
        raise ConfigError(str(path), [ConfigIssue("", f"cannot read file: {problem}")]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), [ConfigIssue("", "file is not UTF-8 text")]) from None
    return parse_file_text(text, path), text


def parse_file_text(text: str, path: str | Path) -> Config:
    """``text`` as if read from the file ``path`` (relative paths taken from its directory)."""
    path = Path(path)
    return parse_config(text, str(path), path.parent.resolve())


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raises ``ConfigError``."""
    return read_config(path)[0]
