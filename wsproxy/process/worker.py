"""One worker process of a supervisor (``[proxy] workers`` > 1): traffic only.

The worker accepts on the listening sockets its supervisor bound (SCM_RIGHTS over the control
channel), takes target states from it instead of probing, reports passive failures to it, and
answers its requests: init, reload, drain, report. It exits when told (SIGTERM) or when the
supervisor is gone (the channel closes), draining first.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from typing import Any

from wsproxy.api.connection_id import ConnectionIds
from wsproxy.api.management import Call as ManagementCall
from wsproxy.config import parse_file_text
from wsproxy.listener import Listener
from wsproxy.ops.admin import api_rows, listener_rows
from wsproxy.process.control import Channel, Message
from wsproxy.process.target_sync import apply_snapshot
from wsproxy.proxy import Proxy, Role
from wsproxy.targets.target import Target

log = logging.getLogger(__name__)

CONTROL_FD_ENV = "WSPROXY_CONTROL_FD"


class InheritedSockets:
    """Listener sockets handed over by the supervisor, by listener name, for one (re)load."""

    def __init__(self) -> None:
        self._sockets: dict[str, socket.socket] = {}

    def give(self, names: list[str], socks: list[socket.socket]) -> None:
        self.close_unused()
        self._sockets = dict(zip(names, socks, strict=True))

    async def start(self, listener: Listener) -> None:
        listening = self._sockets.pop(listener.name, None)
        if listening is None:
            raise OSError(errno.EBADF, f"listener '{listener.name}': no socket from the supervisor")
        await listener.start(listening)

    def stop(self, listener: Listener) -> None:
        listener.stop_accepting()

    def close_unused(self) -> None:
        """Sockets of listeners that kept running: they have their own descriptor already."""
        for listening in self._sockets.values():
            listening.close()
        self._sockets.clear()


def _metric_families(proxy: Proxy) -> list[dict[str, Any]]:
    """This worker's wsproxy families as plain data (process_* stay the supervisor's own)."""
    families = []
    for family in proxy.metrics.registry.collect():
        if family.name.startswith("process_"):
            continue
        samples = [[s.name, s.labels, s.value] for s in family.samples]
        families.append({"name": family.name, "type": family.type, "samples": samples})
    return families


class Worker:
    def __init__(self) -> None:
        self.proxy: Proxy | None = None
        self.channel: Channel | None = None
        self.sockets = InheritedSockets()

    async def handle(self, message: Message, socks: list[socket.socket]) -> Message | None:
        op = message.get("op")
        if op == "init":
            return await self._init(message, socks)
        proxy = self.proxy
        if proxy is None:
            for sock in socks:
                sock.close()
            return {"error": f"'{op}' before init"}
        loop = asyncio.get_running_loop()
        if op == "targets":
            apply_snapshot(proxy, message["targets"], loop.time())
            return None
        if op == "reload":
            return await self._reload(proxy, message, socks)
        if op == "drain":
            await proxy.drain(float(message["grace"]))
            return {}
        if op == "report":
            return self._report(proxy)
        if op == "management":
            return proxy.management.local(ManagementCall.from_message(message)).as_message()
        return {"error": f"unknown operation {op!r}"}

    async def _init(self, message: Message, socks: list[socket.socket]) -> Message:
        path, text = str(message["path"]), str(message["config"])
        self.sockets.give(list(message["listeners"]), socks)
        config = parse_file_text(text, path)
        # Ids name this worker's slot and the supervisor's instance, so the supervisor routes
        # a management call to the worker that holds the connection.
        ids = ConnectionIds(int(message["slot"]), bytes.fromhex(str(message["instance"])))
        proxy = Proxy(
            config,
            path=path,
            config_text=text,
            role=Role.WORKER,
            binding=self.sockets,
            connection_ids=ids,
        )
        apply_snapshot(proxy, message["targets"], asyncio.get_running_loop().time())
        self._report_passive_failures(proxy)
        await proxy.start()
        self.sockets.close_unused()
        self.proxy = proxy
        log.debug("worker %s ready (pid %d)", message.get("slot"), os.getpid())
        return {"pid": os.getpid()}

    async def _reload(self, proxy: Proxy, message: Message, socks: list[socket.socket]) -> Message:
        self.sockets.give(list(message["listeners"]), socks)
        try:
            errors = await proxy.reload(str(message["path"]), str(message["config"]))
        finally:
            self.sockets.close_unused()
        self._report_passive_failures(proxy)
        return {"errors": errors}

    def _report_passive_failures(self, proxy: Proxy) -> None:
        for name, group in proxy.target_groups.items():

            def report(target: Target, detail: str, group: str = name) -> None:
                if self.channel is not None and not self.channel.closed.is_set():
                    self.channel.send(
                        {
                            "op": "passive_unhealthy",
                            "target_group": group,
                            "target": str(target.address),
                            "detail": detail,
                        }
                    )

            group.on_passive_unhealthy = report

    def _report(self, proxy: Proxy) -> Message:
        return {
            "metrics": _metric_families(proxy),
            "listeners": listener_rows(proxy),
            "apis": api_rows(proxy),
            "targets": {
                name: {str(t.address): t.active for t in group.targets}
                for name, group in proxy.target_groups.items()
            },
            "connections": sum(len(listener.flows) for listener in proxy.metric_listeners()),
            "reloads": proxy.reloads,
        }


async def run_worker(stop: asyncio.Event) -> int:
    """The worker's main: serve until SIGTERM or until the supervisor goes away."""
    fd = int(os.environ.pop(CONTROL_FD_ENV))
    worker = Worker()
    channel = Channel(socket.socket(fileno=fd), worker.handle)
    worker.channel = channel
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(channel.closed.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in waits:
        wait.cancel()
    if channel.closed.is_set() and not stop.is_set():
        log.warning("supervisor gone: draining and exiting")
    if worker.proxy is not None:
        await worker.proxy.shutdown()
    channel.close()
    return 0
