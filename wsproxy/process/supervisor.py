"""The supervisor of ``[proxy] workers = N``: sockets, workers, health checks, one admin API.

Why this shape (nginx's and HAProxy's master-worker, with the reload semantics of issue 4):
- The supervisor binds every listener once per worker slot with SO_REUSEPORT and keeps the
  sockets. A crashed worker's slot keeps its socket and backlog, so while the new worker starts
  the kernel queues connections instead of refusing them.
- Reloads happen *inside* the workers (no old generation left running for hours, no session cut):
  the supervisor validates the file, binds new addresses, then hands each worker its slot's
  sockets and asks it to reload. A listener whose address did not change keeps the same sockets.
- Health checks run here, once per target; workers receive target states as snapshots and report
  passive failures back. Admin requests and ``/metrics`` read the workers' counters on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wsproxy.address import Address
from wsproxy.api.management import Call as ManagementCall
from wsproxy.api.management import Reply
from wsproxy.config import Config
from wsproxy.errors import MalformedControlMessage, WorkerUnavailable
from wsproxy.listener import Listener, ListeningSockets
from wsproxy.ops.admin import sum_api_rows
from wsproxy.ops.logs import log_event
from wsproxy.ops.metrics import Metrics, ProxyCollector
from wsproxy.process.control import Channel, Message, make_pair
from wsproxy.process.target_sync import mark_passive_unhealthy, snapshot_key, target_snapshot
from wsproxy.process.worker import CONTROL_FD_ENV
from wsproxy.proxy import Proxy, Role

log = logging.getLogger(__name__)

SYNC_SECONDS = 0.1  # how soon a health transition reaches the workers
START_TIMEOUT = 30.0
REPORT_TIMEOUT = 2.0
# A management call a worker has not answered in this time gets 503 (a worker answers from its
# memory, in microseconds, unless its event loop is stuck).
MANAGEMENT_TIMEOUT = 5.0
# Reports are also fetched this often without a scrape, so a worker killed outright loses at most
# this much of its counts (the rest are kept as the slot's retired counts).
REPORT_SECONDS = 5.0
STOP_TIMEOUT = 10.0
MAX_BACKOFF = 5.0


class SupervisorSockets:
    """The supervisor's ``ListenerBinding``: one SO_REUSEPORT socket per worker slot."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._sockets = ListeningSockets()  # the addresses this supervisor holds may be shared
        self._bound: dict[tuple[str, Address], list[socket.socket]] = {}
        # The listener objects using each socket set (a reload's replacement and the one it
        # replaces overlap); keyed by the object, never its recycled id().
        self._users: dict[tuple[str, Address], set[Listener]] = {}

    async def start(self, listener: Listener) -> None:
        key = (listener.name, listener.config.address)
        sockets = self._bound.get(key)
        if sockets is None:
            sockets = self._bind(listener)
            self._bound[key] = sockets
        self._users.setdefault(key, set()).add(listener)
        host, port = sockets[0].getsockname()[:2]
        listener.address = Address(str(host), int(port))
        log_event(log, "listener_up", "listener '%s' listening on %s", listener.name,
                  listener.address, listener=listener.name, address=str(listener.address),
                  workers=self.slots)  # fmt: skip

    def _bind(self, listener: Listener) -> list[socket.socket]:
        address = listener.config.address
        sockets: list[socket.socket] = []
        try:
            for _ in range(self.slots):
                # The first slot's socket claims the address (refused if another process holds
                # it); the others share it with the first, a socket of this same process.
                share = listener.config.share_address
                sockets.append(self._sockets.bind(address, listener=listener.name, share=share))
                # Port 0: every slot must share the port the first one got.
                address = Address(address.host, int(sockets[0].getsockname()[1]))
        except OSError:  # it names the listener and the address
            for sock in sockets:
                sock.close()
            raise
        return sockets

    def stop(self, listener: Listener) -> None:
        key = (listener.name, listener.config.address)
        users = self._users.get(key)
        if users is None:
            return
        users.discard(listener)
        if not users:
            for sock in self._bound.pop(key):
                sock.close()
            del self._users[key]

    def for_slot(self, proxy: Proxy, slot: int) -> tuple[list[str], list[socket.socket]]:
        names, sockets = [], []
        for name, listener in proxy.listeners.items():
            bound = self._bound.get((name, listener.config.address))
            if bound is not None:
                names.append(name)
                sockets.append(bound[slot])
        return names, sockets

    def close(self) -> None:
        for sockets in self._bound.values():
            for sock in sockets:
                sock.close()
        self._bound.clear()
        self._users.clear()


class WorkerSlot:
    """One worker slot: the process in it now, and what the supervisor knows of it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None
        self.ready = False
        self.started = 0.0
        self.restarts = 0
        self.report: Message = {}

    def describe(self) -> dict[str, Any]:
        return {
            "slot": self.index,
            "pid": self.process.pid if self.process else None,
            "ready": self.ready,
            "started": self.started,
            "restarts": self.restarts,
            "connections": self.report.get("connections"),
            "reloads": self.report.get("reloads"),
        }


class WorkerPool:
    """Starts, watches, replaces and stops the workers; the proxy's ``WorkerControl``."""

    def __init__(
        self, proxy: Proxy, sockets: SupervisorSockets, *, log_level: str, log_format: str
    ) -> None:
        self._proxy = proxy
        self._sockets = sockets
        self._log_args = ["--log-level", log_level, "--log-format", log_format]
        self.slots = [WorkerSlot(index) for index in range(sockets.slots)]
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._synced: tuple[object, ...] | None = None
        self._generation = 0  # reloads so far: a worker started before the last one catches up
        # Counters of workers that exited, so sums stay monotonic across a restart.
        self.retired_counts: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}

    @property
    def ready(self) -> bool:
        return all(slot.ready for slot in self.slots)

    @property
    def slot_count(self) -> int:
        return len(self.slots)

    async def management(self, worker: int, call: ManagementCall) -> Reply:
        """A management call run by the worker that holds its connections (api/management.py)."""
        slot = self.slots[worker]
        channel = slot.channel
        if not slot.ready or channel is None:
            return Reply(503, {"error": f"worker {worker} is not serving (restarting?); retry"})
        try:
            reply = await channel.request(call.as_message(), MANAGEMENT_TIMEOUT)
        except WorkerUnavailable as exc:
            return Reply(503, {"error": f"worker {worker}: {exc}"})
        except MalformedControlMessage:
            # The control channel carries up to 16 MiB: a larger message cannot reach a worker.
            return Reply(413, {"error": "the message is too large to reach a worker (16 MiB)"})
        if "error" in reply and "status" not in reply:
            return Reply(503, {"error": f"worker {worker}: {reply['error']}"})
        return Reply.from_message(reply)

    async def start(self) -> None:
        await asyncio.gather(*(self._start_slot(slot) for slot in self.slots))
        for slot in self.slots:
            self._spawn(self._watch(slot))
        self._spawn(self._sync_targets())
        self._spawn(self._refresh_periodically())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_slot(self, slot: WorkerSlot) -> None:
        mine, theirs = make_pair()
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # only the supervisor talks to systemd
        env[CONTROL_FD_ENV] = str(theirs.fileno())
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "wsproxy", *self._log_args, "worker",
                pass_fds=[theirs.fileno()], env=env,
            )  # fmt: skip
        finally:
            theirs.close()
        slot.process = process
        slot.started = time.time()
        slot.channel = channel = Channel(mine, self._handler(slot))
        proxy = self._proxy
        # The sockets and the config text are taken together, with no await in between, and the
        # worker parses that text, never the file: both are the supervisor's current generation.
        generation = self._generation
        names, sockets = self._sockets.for_slot(proxy, slot.index)
        init = {
            "op": "init",
            "slot": slot.index,
            "path": proxy.path,
            "config": proxy.config_text,
            "listeners": names,
            "targets": target_snapshot(proxy.target_groups, asyncio.get_running_loop().time()),
            "instance": proxy.connection_ids.owner.instance.hex(),
        }
        try:
            reply = await channel.request(init, START_TIMEOUT, sockets)
        except WorkerUnavailable as exc:
            raise WorkerUnavailable(f"worker {slot.index} did not start: {exc}") from None
        if "error" in reply:
            raise WorkerUnavailable(f"worker {slot.index} did not start: {reply['error']}")
        # A reload while this worker started passed it by (it asks ready workers only): the
        # worker would accept on sockets the supervisor has closed, and nobody on the new ones.
        while generation != self._generation:
            generation = self._generation
            errors = await self._ask(slot, channel, self._reload_message(), START_TIMEOUT, True)
            if errors:
                raise WorkerUnavailable(f"worker {slot.index} did not start: {'; '.join(errors)}")
        slot.ready = True
        log.info("worker %d started (pid %d)", slot.index, process.pid)

    async def _watch(self, slot: WorkerSlot) -> None:
        """Replace a worker that exits while the supervisor is not stopping."""
        backoff = 0.0
        while True:
            process = slot.process
            if process is None:
                return
            code = await process.wait()
            slot.ready = False
            self._retire_counts(slot)
            if slot.channel is not None:
                slot.channel.close()
            if self._stopping:
                return
            lived = time.time() - slot.started
            backoff = 0.0 if lived > 10 else min(MAX_BACKOFF, max(0.1, backoff * 2))
            slot.restarts += 1
            log_event(
                log, "worker_exit", "worker %d (pid %d) exited with %s; starting a new one in %g s",
                slot.index, process.pid, _exit_text(code), backoff, level=logging.ERROR,
                worker=slot.index, pid=process.pid, exit_code=code,
            )  # fmt: skip
            while not self._stopping:
                await asyncio.sleep(backoff)
                try:
                    await self._start_slot(slot)
                    break
                except (OSError, WorkerUnavailable) as exc:
                    log.error("%s", exc)
                    if slot.process is not None and slot.process.returncode is None:
                        slot.process.kill()
                        await slot.process.wait()
                    backoff = min(MAX_BACKOFF, max(0.1, backoff * 2))

    def _retire_counts(self, slot: WorkerSlot) -> None:
        for family in slot.report.get("metrics", []):
            if family["type"] not in ("counter", "histogram"):
                continue
            for name, labels, value in family["samples"]:
                if name.endswith(("_total", "_bucket", "_count", "_sum")):
                    key = (family["name"], name, tuple(sorted(labels.items())))
                    self.retired_counts[key] = self.retired_counts.get(key, 0.0) + value
        slot.report = {}

    def _handler(self, slot: WorkerSlot) -> Any:
        async def handle(message: Message, socks: list[socket.socket]) -> Message | None:
            for sock in socks:
                sock.close()  # workers never send sockets
            if message.get("op") == "passive_unhealthy":
                group = self._proxy.target_groups.get(str(message.get("target_group")))
                if group is not None:
                    detail = f"worker {slot.index}: {message.get('detail')}"
                    mark_passive_unhealthy(group, str(message.get("target")), detail)
                return None
            return {"error": f"unknown operation {message.get('op')!r}"}

        return handle

    async def _sync_targets(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            key = snapshot_key(self._proxy.target_groups)
            if key != self._synced:
                snapshot = target_snapshot(self._proxy.target_groups, loop.time())
                for _, channel in self._live():
                    with contextlib.suppress(WorkerUnavailable):
                        channel.send({"op": "targets", "targets": snapshot})
                self._synced = key
            await asyncio.sleep(SYNC_SECONDS)

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(REPORT_SECONDS)
            await self.refresh()

    def _live(self) -> list[tuple[WorkerSlot, Channel]]:
        return [(s, s.channel) for s in self.slots if s.ready and s.channel is not None]

    async def _ask_all(
        self, message: Message, wait_seconds: float, *, with_sockets: bool = False
    ) -> list[str]:
        """Send ``message`` to every ready worker; the errors, one line each."""
        asked = [
            self._ask(slot, channel, message, wait_seconds, with_sockets)
            for slot, channel in self._live()
        ]
        return [error for errors in await asyncio.gather(*asked) for error in errors]

    async def _ask(
        self,
        slot: WorkerSlot,
        channel: Channel,
        message: Message,
        wait_seconds: float,
        with_sockets: bool,
    ) -> list[str]:
        sockets: list[socket.socket] = []
        request = dict(message)
        if with_sockets:
            names, sockets = self._sockets.for_slot(self._proxy, slot.index)
            request["listeners"] = names
        try:
            reply = await channel.request(request, wait_seconds, sockets)
        except WorkerUnavailable as exc:
            return [f"worker {slot.index}: {exc}"]
        errors = [f"worker {slot.index}: {reply['error']}"] if "error" in reply else []
        errors.extend(f"worker {slot.index}: {error}" for error in reply.get("errors", []))
        return errors

    def _reload_message(self) -> Message:
        return {"op": "reload", "path": self._proxy.path, "config": self._proxy.config_text}

    # --- WorkerControl --------------------------------------------------------------------------

    async def reload(self, path: str, text: str) -> list[str]:
        self._generation += 1  # workers starting now catch up once they are ready
        message = {"op": "reload", "path": path, "config": text}
        errors = await self._ask_all(message, START_TIMEOUT, with_sockets=True)
        self._synced = None  # groups a reload added get their targets' states now
        return errors

    async def drain(self, grace: float) -> None:
        for error in await self._ask_all({"op": "drain", "grace": grace}, grace + STOP_TIMEOUT):
            log.warning("drain: %s", error)

    async def stop(self) -> None:
        self._stopping = True
        processes = [s.process for s in self.slots if s.process and s.process.returncode is None]
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await asyncio.gather(*(process.wait() for process in processes))
        except TimeoutError:
            for process in processes:
                if process.returncode is None:
                    log.warning("worker pid %d did not stop; killing it", process.pid)
                    process.kill()
                    await process.wait()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for slot in self.slots:
            if slot.channel is not None:
                slot.channel.close()
        self._sockets.close()

    async def refresh(self) -> None:
        async def fetch(slot: WorkerSlot, channel: Channel) -> None:
            with contextlib.suppress(WorkerUnavailable):
                slot.report = await channel.request({"op": "report"}, REPORT_TIMEOUT)

        await asyncio.gather(*(fetch(slot, channel) for slot, channel in self._live()))
        # The supervisor's targets carry no connections of their own: show the workers' sum.
        for name, group in self._proxy.target_groups.items():
            for target in group.targets:
                key = str(target.address)
                target.active = sum(
                    int(slot.report.get("targets", {}).get(name, {}).get(key, 0))
                    for slot in self.slots
                )

    def listener_rows(self) -> list[dict[str, Any]]:
        return sum_listener_rows([slot.report.get("listeners", []) for slot in self.slots])

    def api_rows(self) -> list[dict[str, Any]]:
        return sum_api_rows([slot.report.get("apis", []) for slot in self.slots])

    def describe(self) -> list[dict[str, Any]]:
        return [slot.describe() for slot in self.slots]

    def worker_families(self) -> Iterator[tuple[str, str, dict[str, str], float]]:
        """(family, sample name, labels, value) of every live report, and the counters of
        workers that exited."""
        for slot in self.slots:
            for family in slot.report.get("metrics", []):
                for name, labels, value in family["samples"]:
                    yield family["name"], name, labels, value
        for (family_name, name, labels), value in self.retired_counts.items():
            yield family_name, name, dict(labels), value


def sum_listener_rows(reports: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``/v1/listeners`` rows of several workers, numbers summed (session counts per group too)."""
    merged: dict[str, dict[str, Any]] = {}
    for rows in reports:
        for row in rows:
            into = merged.get(row["name"])
            if into is None:
                merged[row["name"]] = {**row, "sessions": dict(row["sessions"])}
                continue
            for key, value in row.items():
                if key == "sessions":
                    for group, count in value.items():
                        into["sessions"][group] = into["sessions"].get(group, 0) + count
                elif isinstance(value, int) and not isinstance(value, bool):
                    into[key] = into.get(key, 0) + value
    return [merged[name] for name in sorted(merged)]


# Families the supervisor itself knows best (targets are probed there; certificates, config and
# draining are the same everywhere); the others are summed over the workers.
FROM_SUPERVISOR = frozenset(
    {
        "wsproxy_build_info",
        "wsproxy_certificate_not_after_timestamp_seconds",
        "wsproxy_target_connections_active",  # the workers' sum, written by refresh()
        "wsproxy_target_state",
        "wsproxy_target_group_healthy_targets",
        "wsproxy_target_group_unhealthy_targets",
        "wsproxy_health_checks",
        "wsproxy_target_discovery_lookups",  # DNS discovery runs here only
        "wsproxy_target_discovery_errors",
        "wsproxy_draining",
        "wsproxy_config_reloads",
        "wsproxy_config_last_reload_successful",
        "wsproxy_config_last_reload_success_timestamp_seconds",
    }
)
# Summed over the workers *and* the supervisor (it has a loop and logs of its own, and counts
# the transitions of its active checks).
WITH_SUPERVISOR = frozenset(
    {
        "wsproxy_event_loop_lag_seconds",
        "wsproxy_log_lines_dropped",
        "wsproxy_target_health_transitions",
    }
)


class WorkerMetricsCollector(Collector):
    """The supervisor's ``/metrics``: its own families merged with its workers' reports."""

    def __init__(self, own: Collector, pool: WorkerPool) -> None:
        self._own = own
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        from_workers: dict[str, list[tuple[str, dict[str, str], float]]] = {}
        for family_name, name, labels, value in self._pool.worker_families():
            from_workers.setdefault(family_name, []).append((name, labels, value))
        for family in self._own.collect():
            if family.name in FROM_SUPERVISOR:
                yield family
                continue
            merged = Metric(family.name, family.documentation, family.type)
            sums: dict[tuple[str, tuple[tuple[str, str], ...]], _Sum] = {}
            if family.name in WITH_SUPERVISOR:
                for sample in family.samples:
                    _add(sums, sample.name, sample.labels, sample.value)
            for name, labels, value in from_workers.get(family.name, []):
                _add(sums, name, labels, value)
            for total in sums.values():
                merged.add_sample(total.name, total.labels, total.value)
            yield merged
        pool = self._pool
        workers = GaugeMetricFamily("wsproxy_workers", "Worker processes serving traffic now")
        workers.add_metric([], sum(1 for slot in pool.slots if slot.ready))
        yield workers
        restarts = CounterMetricFamily(
            "wsproxy_worker_restarts", "Workers that exited unexpectedly and were replaced"
        )
        restarts.add_metric([], sum(slot.restarts for slot in pool.slots))
        yield restarts


class _Sum:
    __slots__ = ("labels", "name", "value")

    def __init__(self, name: str, labels: dict[str, str]) -> None:
        self.name = name
        self.labels = labels
        self.value = 0.0


def _add(
    sums: dict[tuple[str, tuple[tuple[str, str], ...]], _Sum],
    name: str,
    labels: dict[str, str],
    value: float,
) -> None:
    key = (name, tuple(sorted(labels.items())))
    total = sums.get(key)
    if total is None:
        total = sums[key] = _Sum(name, labels)
    total.value += value


def _exit_text(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def supervised_proxy(
    config: Config, path: str, text: str, *, log_level: str, log_format: str
) -> tuple[Proxy, WorkerPool]:
    """The supervisor's proxy (sockets, admin, health checks) and its pool of workers;
    ``text`` is the file's content ``config`` was parsed from, what the workers will parse."""
    sockets = SupervisorSockets(config.proxy.worker_count())
    proxy = Proxy(config, path=path, config_text=text, role=Role.SUPERVISOR, binding=sockets)
    pool = WorkerPool(proxy, sockets, log_level=log_level, log_format=log_format)
    proxy.workers = pool
    proxy.management.workers = pool
    proxy.metrics = Metrics(WorkerMetricsCollector(ProxyCollector(proxy), pool))
    return proxy, pool
