"""The composition root: builds listeners, target groups and the admin listener from a config."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import ssl
import time
from collections import Counter
from collections.abc import Coroutine
from enum import StrEnum
from typing import Any, Protocol

from wsproxy import config_diff
from wsproxy.address import Address
from wsproxy.api.api import Api
from wsproxy.api.connection_id import ConnectionIds
from wsproxy.api.integration import Integrations
from wsproxy.api.management import Management
from wsproxy.api.management_listener import ManagementListener
from wsproxy.config import (
    ApiConfig,
    Config,
    ListenerConfig,
    TargetGroupConfig,
    TargetTls,
    parse_file_text,
    read_config,
    read_signing_secret,
)
from wsproxy.descriptors import DescriptorBudget
from wsproxy.errors import ConfigError, WsproxyError
from wsproxy.listener import Listener, ListeningSockets
from wsproxy.ops import logs, systemd
from wsproxy.ops.admin import AdminServer
from wsproxy.ops.logs import log_event
from wsproxy.ops.loop_lag import LoopLagMonitor
from wsproxy.ops.metrics import Histogram, ListenerStats, Metrics, ProxyCollector
from wsproxy.targets.balancer import make_balancer
from wsproxy.targets.checker import HealthChecker
from wsproxy.targets.discovery import DnsDiscovery
from wsproxy.targets.target import Target
from wsproxy.targets.target_group import TargetGroup
from wsproxy.tls import ServerTls, check_files, target_context

log = logging.getLogger(__name__)

CONFIG_POLL_SECONDS = 1.0


def file_digest(path: str) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return hashlib.sha256(file.read()).digest()
    except OSError:
        return None


class Role(StrEnum):
    """What this process does when ``[proxy] workers`` splits the work (see supervisor.py)."""

    SINGLE = "single"  # everything, in one process
    SUPERVISOR = "supervisor"  # listening sockets, admin listener, health checks; no traffic
    WORKER = "worker"  # traffic on the supervisor's sockets; target states from the supervisor


class ListenerBinding(Protocol):
    """How a listener gets its listening socket, and gives it back."""

    async def start(self, listener: Listener) -> None: ...

    def stop(self, listener: Listener) -> None: ...


class OwnSockets:
    """Listeners of this proxy bind their own addresses (one process, no supervisor); a reload's
    new listener may share an address with the one it replaces, never with another process."""

    def __init__(self) -> None:
        self.sockets = ListeningSockets()

    async def start(self, listener: Listener) -> None:
        config = listener.config
        sock = self.sockets.bind(config.address, listener=listener.name, share=config.share_address)
        await listener.start(sock)

    def stop(self, listener: Listener) -> None:
        listener.stop_accepting()


class WorkerControl(Protocol):
    """The supervisor's side of its workers, as the proxy's lifecycle needs it."""

    async def reload(self, path: str, text: str) -> list[str]:
        """Apply ``text`` (the supervisor's new config, read from ``path``) in every worker."""

    async def drain(self, grace: float) -> None: ...

    async def stop(self) -> None: ...

    @property
    def ready(self) -> bool: ...

    async def refresh(self) -> None:
        """Fetch the workers' counters (before an admin answer that shows them)."""

    def listener_rows(self) -> list[dict[str, Any]]: ...

    def api_rows(self) -> list[dict[str, Any]]: ...

    def describe(self) -> list[dict[str, Any]]: ...


class Proxy:
    """Owns everything one config generation needs; ``start``, then ``shutdown``."""

    def __init__(
        self,
        config: Config,
        *,
        rng: random.Random | None = None,
        path: str | None = None,
        config_text: str | None = None,
        role: Role = Role.SINGLE,
        binding: ListenerBinding | None = None,
        connection_ids: ConnectionIds | None = None,
    ) -> None:
        self.config = config
        self._tls_digests = config_diff.read_digests(config)  # what the next reload compares to
        self.path = path  # the file reloads read again
        # The TOML ``config`` was parsed from: what workers run, whatever the file says by now.
        self.config_text = config_text
        self.role = role
        self.binding: ListenerBinding = binding or OwnSockets()
        self.workers: WorkerControl | None = None  # set by the supervisor
        self._rng = rng = rng or random.Random()  # noqa: S311  # balancing, not cryptography
        self.target_groups: dict[str, TargetGroup] = {
            name: self._build_target_group(name, group_config)
            for name, group_config in config.target_groups.items()
        }
        # WebSocket APIs outlive config generations: a reload updates them, connections stay.
        self.integrations = Integrations()
        self.connection_ids = connection_ids or ConnectionIds()
        self.apis: dict[str, Api] = {
            name: self._build_api(name, api_config) for name, api_config in config.apis.items()
        }
        self.management = Management(self.apis, self.connection_ids)
        self.management_listeners: list[ManagementListener] = []
        self.descriptors = DescriptorBudget.from_rlimit()  # shared by every listener
        # Per listener name, so a listener rebound by a reload keeps counting where it was.
        self.listener_stats: dict[str, ListenerStats] = {}
        self.listeners = {
            name: self._build_listener(name, listener_config)
            for name, listener_config in config.listeners.items()
        }
        self.draining = False
        self._loop_lag = LoopLagMonitor()
        self.metrics = Metrics(ProxyCollector(self))
        self.admin: AdminServer | None = None
        if config.admin.enabled and role is not Role.WORKER:
            self.admin = AdminServer(self, self, config.admin.address)
        # Workers take target states from their supervisor: each target is probed once.
        self.health_checkers: dict[str, HealthChecker] = {}
        for group in self.target_groups.values():
            self._add_checker(group)
        # Like health checks, DNS discovery runs where target states are owned (not in workers).
        self.discoveries: dict[str, DnsDiscovery] = {}
        for group in self.target_groups.values():
            self._add_discovery(group)
        self.retired: list[Listener] = []  # replaced by a reload; their sessions still run
        self.reloads: dict[str, int] = {"success": 0, "error": 0}
        self.last_reload_ok = True
        self.last_reload_success_time = time.time()
        self._reload_lock = asyncio.Lock()
        self._started = asyncio.Event()
        self._stopped = asyncio.Event()
        self._drained = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def _build_listener(
        self, name: str, config: ListenerConfig, previous: Listener | None = None
    ) -> Listener:
        stats = self.listener_stats.setdefault(name, ListenerStats())
        tls = previous.tls if previous is not None else None
        api = self.apis[config.api] if config.api is not None else None
        return Listener(name, config, self.target_groups, stats, self.descriptors, tls, api)

    def _build_api(self, name: str, config: ApiConfig) -> Api:
        secret = read_signing_secret(config.signing_secret_file)
        return Api(name, config, self.target_groups, self.integrations, self.connection_ids, secret)

    def _build_target_group(self, name: str, config: TargetGroupConfig) -> TargetGroup:
        return TargetGroup(name, config, make_balancer(config.algorithm, self._rng))

    async def start(self) -> None:
        """Bind every listener (and the admin listener); on failure, nothing stays bound."""
        try:
            for listener in self.listeners.values():
                await self.binding.start(listener)
            if self.admin is not None:
                await self.admin.start()
            if self.role is not Role.WORKER:
                await self._start_management_listeners()
            for checker in self.health_checkers.values():
                checker.start()
            for discovery in self.discoveries.values():
                discovery.start()
            self._loop_lag.start()
            watch = self.config.proxy.watch_config and self.role is not Role.WORKER
            if watch and self.path is not None:
                self._spawn(self._watch_config(self.path))
            self._started.set()
        except BaseException:
            for listener in self.listeners.values():
                self.binding.stop(listener)
            for management in self.management_listeners:
                await management.stop()
            raise

    async def _start_management_listeners(self) -> None:
        """The @connections API on each API's own address, where one is configured (fixed for
        the process's life, like the admin listener)."""
        for name, api in self.config.apis.items():
            if api.management is None:
                continue
            management = ManagementListener(
                name, api.management, self.management, self.config.admin.token_file
            )
            self.management_listeners.append(management)
            await management.start()

    async def drain(self, grace: float | None = None) -> None:
        """Readiness off, stop accepting, close connections within the grace period.

        WebSocket sessions get Close 1001 at a message boundary, the closes spread over the first
        half of the grace period; stream connections are closed when it ends. The admin listener
        keeps answering (``POST /v1/drain`` drains without exiting).
        """
        if self._drained.is_set() or self.draining:
            await self._drained.wait()
            return
        self.draining = True
        grace = self.config.proxy.shutdown_grace_seconds if grace is None else grace
        active = sum(len(listener.flows) for listener in self.listeners.values())
        log_event(log, "drain", "draining %d connection(s) within %g s", active, grace,
                  phase="start", connections=active, grace_seconds=grace)  # fmt: skip
        for listener in self.listeners.values():
            self.binding.stop(listener)
        everyone = [*self.listeners.values(), *self.retired]
        draining = [listener.drain(grace, grace / 2) for listener in everyone]
        if self.workers is not None:
            draining.append(self.workers.drain(grace))
        await asyncio.gather(*draining)
        log_event(log, "drain", "drained", phase="done")
        self._drained.set()

    def start_drain(self) -> None:
        """``POST /v1/drain``: drain in the background; the process keeps running."""
        if not self.draining:
            self._spawn(self.drain())

    async def shutdown(self, grace: float | None = None) -> None:
        """Drain, then stop health checks, background tasks and the admin listener."""
        await self.drain(grace)
        if self._stopped.is_set():
            return
        for discovery in self.discoveries.values():
            await discovery.stop()
        for checker in self.health_checkers.values():
            await checker.stop()
        for group in self.target_groups.values():
            await group.close()
        for api in self.apis.values():
            await api.close(grace=5.0)  # $disconnect calls of the drained connections
        await self.integrations.close()
        if self.workers is not None:
            await self.workers.stop()
        self._loop_lag.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.admin is not None:
            await self.admin.stop()
        for management in self.management_listeners:
            await management.stop()
        self._stopped.set()
        log.info("stopped")

    def status_line(self) -> str:
        """One line for ``systemctl status``."""
        connections = sum(len(listener.flows) for listener in self.metric_listeners())
        return (
            f"{len(self.listeners)} listener(s), {connections} connection(s), "
            f"{len(self.target_groups)} target group(s)"
        )

    # --- what /metrics reads (ProxyView) ---------------------------------------------------------

    def metric_listeners(self) -> list[Listener]:
        """Current listeners, then retired ones that still carry sessions."""
        self.retired = [listener for listener in self.retired if listener.flows]
        return [*self.listeners.values(), *self.retired]

    def metric_target_groups(self) -> list[TargetGroup]:
        return list(self.target_groups.values())

    def metric_apis(self) -> list[Api]:
        return list(self.apis.values())

    @property
    def management_requests(self) -> Counter[tuple[str, int]]:
        return self.management.requests

    def reload_status(self) -> tuple[dict[str, int], bool, float]:
        return self.reloads, self.last_reload_ok, self.last_reload_success_time

    @property
    def loop_lag(self) -> Histogram:
        return self._loop_lag.histogram

    @property
    def log_lines_dropped(self) -> int:
        return logs.lines_dropped()

    # --- reload (SIGHUP, POST /v1/reload) -------------------------------------------------------

    async def reload(self, path: str | None = None, text: str | None = None) -> list[str]:
        """Apply the config file again; ``[]`` on success, else every error (old config kept).

        ``text``: that file's content as the supervisor read it (a worker never reads the file).

        Unchanged listeners keep their sockets and sessions; changed ones are bound anew (before
        the old socket closes) while their sessions keep flowing; removed ones stop accepting and
        drain. Target groups change in place: new targets start ``initial``, removed ones drain.
        TLS files are read again for new handshakes. Runtime registrations survive unless the
        file changes that target group. The admin address is not reloaded (restart for that).
        """
        source = path or self.path
        if source is None:
            return ["this proxy was not started from a file; nothing to reload"]
        await self._started.wait()  # a reload during start waits for it
        async with self._reload_lock:
            if self.draining:
                return ["the proxy is draining; reload refused"]
            systemd.reloading()
            try:
                return await self._reload_from(source, text)
            finally:
                systemd.ready(self.status_line())

    async def _reload_from(self, source: str, text: str | None) -> list[str]:
        try:
            if text is None:
                new, text = read_config(source)
            else:
                new = parse_file_text(text, source)
            new = check_files(new, source)
            await self._apply(new)
        except ConfigError as exc:
            return self._reload_failed([str(issue) for issue in exc.issues])
        except (OSError, WsproxyError) as exc:
            return self._reload_failed([str(exc)])
        tls_digests = config_diff.read_digests(new)
        changes = config_diff.diff(self.config, new, self._tls_digests, tls_digests)
        self.config, self._tls_digests = new, tls_digests
        self.config_text = text
        if self.workers is not None:
            errors = await self.workers.reload(source, text)
            if errors:
                return self._reload_failed(errors)
        self.reloads["success"] += 1
        self.last_reload_ok = True
        self.last_reload_success_time = time.time()
        log_event(log, "reload", "reloaded %s: %s", source, config_diff.summary(changes),
                  result="success", file=str(source),
                  changes=[change.as_dict() for change in changes])  # fmt: skip
        return []

    async def _watch_config(self, path: str) -> None:
        """Reload when the file's content changes (polled: no inotify dependency, and a
        ConfigMap's symlink swap changes no watched inode of the path itself)."""
        last = file_digest(path)
        while True:
            await asyncio.sleep(CONFIG_POLL_SECONDS)
            current = file_digest(path)
            if current is None or current == last:
                continue  # unreadable mid-swap, or unchanged: look again next time
            last = current
            log.info("config file %s changed; reloading", path)
            await self.reload()

    def _reload_failed(self, errors: list[str]) -> list[str]:
        self.reloads["error"] += 1
        self.last_reload_ok = False
        log_event(
            log,
            "reload",
            "reload failed, keeping the running configuration:\n  %s",
            "\n  ".join(errors),
            level=logging.ERROR,
            result="error",
            errors=errors,
        )
        return errors

    async def _apply(self, new: Config) -> None:
        # 1. Prepare everything that can fail, with no effect on traffic yet.
        added_groups = {
            name: self._build_target_group(name, group_config)
            for name, group_config in new.target_groups.items()
            if name not in self.target_groups
        }
        refreshed_tls = {
            name: ServerTls(
                name, listener.config.tls, alpn=listener.tls.alpn, previous=listener.tls
            )
            for name, listener in self.listeners.items()
            if listener.tls is not None
            and listener.config.tls is not None
            and new.listeners.get(name) == listener.config
        }
        fresh_contexts = {
            name: target_context(name, group_config.tls or TargetTls())
            for name, group_config in new.target_groups.items()
            if group_config.protocol == "tls" and name in self.target_groups
        }
        secrets = {
            name: read_signing_secret(api_config.signing_secret_file)
            for name, api_config in new.apis.items()
        }
        self.target_groups.update(added_groups)
        added_apis = {
            name: Api(
                name,
                api_config,
                self.target_groups,
                self.integrations,
                self.connection_ids,
                secrets[name],
            )
            for name, api_config in new.apis.items()
            if name not in self.apis
        }
        self.apis.update(added_apis)
        started: list[Listener] = []
        replaced = {
            name: self._build_listener(name, config, self.listeners.get(name))
            for name, config in new.listeners.items()
            if name not in self.listeners or self.listeners[name].config != config
        }
        try:
            for listener in replaced.values():
                await self.binding.start(listener)
                started.append(listener)
        except BaseException:
            for listener in started:
                self.binding.stop(listener)
            for name in added_groups:
                del self.target_groups[name]
            for name in added_apis:
                del self.apis[name]
            raise
        # 2. Commit: nothing below fails.
        for name, api_config in new.apis.items():
            if name not in added_apis:
                self.apis[name].update(api_config, secrets[name])
        for name, tls in refreshed_tls.items():
            self.listeners[name].tls = tls
        listeners = {}
        for name in new.listeners:
            listeners[name] = replaced.get(name) or self.listeners[name]
        for name, old in self.listeners.items():
            if listeners.get(name) is old:
                continue
            self.binding.stop(old)
            self.retired.append(old)
            if name not in new.listeners:
                grace = new.proxy.shutdown_grace_seconds
                self._spawn(old.drain(grace, grace / 2))
        self.listeners = listeners
        for name, group_config in new.target_groups.items():
            if name not in added_groups:
                self._update_group(self.target_groups[name], group_config, fresh_contexts.get(name))
        for name in [n for n in self.target_groups if n not in new.target_groups]:
            self._stop_discovery(name)  # before draining: it would register them again
            self.target_groups[name].deregister_all()
        for name in added_groups:
            self._add_checker(self.target_groups[name], start=True)
            self._add_discovery(self.target_groups[name], start=True)

    def _update_group(
        self, group: TargetGroup, config: TargetGroupConfig, context: ssl.SSLContext | None
    ) -> None:
        if context is not None:
            group.ssl_context = context  # new TLS material for new dials only
        if config == group.config:
            return
        old = group.config
        group.config = config
        if config.algorithm != old.algorithm:
            group.balancer = make_balancer(config.algorithm, self._rng)
        if config.discovery is None:
            group.reconcile(config)
        # else DNS owns the membership: its next answer replaces the old set (static or not),
        # and a worker keeps what its supervisor's snapshots say.
        if config.discovery != old.discovery:
            self._stop_discovery(group.name)
            self._add_discovery(group, start=True)
        if config.health_check != old.health_check:
            checker = self.health_checkers.pop(group.name, None)
            if checker is not None:
                self._spawn(checker.stop())
            self._add_checker(group, start=True)
        elif group.name in self.health_checkers:
            self.health_checkers[group.name].start()  # probes the new targets

    def _add_checker(self, group: TargetGroup, *, start: bool = False) -> None:
        """The active checks of ``group``, if it has any; workers take states from their
        supervisor instead, so each target is probed once."""
        check = group.config.health_check
        if check is None or self.role is Role.WORKER:
            return
        checker = self.health_checkers[group.name] = HealthChecker(group, check, self._rng)
        if start:
            checker.start()

    def _add_discovery(self, group: TargetGroup, *, start: bool = False) -> None:
        """DNS discovery of ``group``, if it has it; not in workers (their supervisor's
        snapshots carry the membership, so each name is queried once)."""
        config = group.config.discovery
        if config is None or self.role is Role.WORKER:
            return
        discovery = DnsDiscovery(group, config, self._rng, self.register, self.deregister)
        self.discoveries[group.name] = discovery
        if start:
            discovery.start()

    def _stop_discovery(self, name: str) -> None:
        discovery = self.discoveries.pop(name, None)
        if discovery is not None:
            discovery.cancel()
            self._spawn(discovery.stop())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- targets at run time (admin API) --------------------------------------------------------

    def register(self, group_name: str, address: Address, weight: int) -> Target:
        """Add a target (state ``initial``); raises ``KeyError`` / ``TargetExists``."""
        group = self.target_groups[group_name]
        target = group.register(address, weight)
        checker = self.health_checkers.get(group_name)
        if checker is not None:
            checker.watch(target)
        return target

    def deregister(self, group_name: str, address: Address) -> Target:
        """Start draining a target (see ``TargetGroup.deregister``); raises ``KeyError`` /
        ``TargetExists``."""
        return self.target_groups[group_name].deregister(address)
