"""A listener: one bound address, its rules, and the live connections it accepted."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
import weakref
from collections.abc import Coroutine, Iterator, Mapping
from typing import Any

from wsproxy.address import Address
from wsproxy.config import ListenerConfig
from wsproxy.descriptors import DescriptorBudget
from wsproxy.errors import NoRoute, TlsConfigError, WireError
from wsproxy.flows.base import Flow
from wsproxy.flows.passthrough import PassthroughFlow
from wsproxy.flows.tcp import TcpFlow
from wsproxy.flows.websocket import WebSocketFlow
from wsproxy.ops.logs import CONNECTION_FIELDS, log_connection, log_event
from wsproxy.ops.metrics import ListenerStats, LiveCounts, close_code_label
from wsproxy.ops.termination import PHASE_ACCEPT, PHASE_PROXY_HEADER, PHASE_TLS, termination
from wsproxy.relay.relay import Endpoint
from wsproxy.relay.ticker import Ticker
from wsproxy.relay.websocket import WebSocketRelay
from wsproxy.routing import Router, Rule, SniRouter
from wsproxy.targets.target_group import Upstream
from wsproxy.tls import ServerTls, classify_handshake_failure
from wsproxy.wire.proxyproto import ProxyHeader, ProxyHeaderReader

log = logging.getLogger(__name__)

CRL_POLL_SECONDS = 1.0


BACKLOG = 1024


# The listening sockets this process bound, with the address each holds. SO_REUSEPORT admits
# any socket of the same user to an address, so only the process knows which of an address's
# sockets are its own. Process-wide on purpose, as the ports are: whichever proxy generation or
# worker slot bound a socket, another socket of this process on its address shares with itself.
# Keyed by the socket object (weakly: a collected socket leaves); a closed one reads fileno -1.
_BOUND_HERE: weakref.WeakKeyDictionary[socket.socket, Address] = weakref.WeakKeyDictionary()
_WILDCARDS = frozenset(("", "0.0.0.0", "::"))  # noqa: S104  # compared with, never bound


def bind_listening_socket(address: Address, *, listener: str, share: bool) -> socket.socket:
    """A listening socket for ``address`` (listener ``listener``'s), with SO_REUSEPORT.

    SO_REUSEPORT lets a reload bind a changed listener before the old socket closes (no
    connection refused in between) and lets a supervisor bind one socket per worker slot, the
    kernel spreading connections among them. It would also let a second wsproxy, or anything
    else of the same user that sets it, join the address and take part of its connections.
    So unless this process already listens there, or ``share`` (the listener's
    ``share_address``) asks for it, the address must be free: EADDRINUSE otherwise."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    if not share and address.port != 0 and not _listening_here(address):
        _check_free(address, family, listener)
    try:
        listening = socket.create_server(
            (address.host, address.port), family=family, backlog=BACKLOG, reuse_port=True
        )
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE or not share:
            raise
        raise OSError(
            exc.errno,
            f"{exc.strerror}: share_address works only with a process that also listens with "
            "SO_REUSEPORT (as wsproxy does) under the same user",
        ) from None
    _BOUND_HERE[listening] = Address(address.host, int(listening.getsockname()[1]))
    return listening


def _listening_here(address: Address) -> bool:
    """Whether a live socket of this process holds ``address``'s port on an overlapping host."""
    for sock, held in list(_BOUND_HERE.items()):
        if held.port != address.port or sock.fileno() == -1:
            continue
        if held.host == address.host or {held.host, address.host} & _WILDCARDS:
            return True
    return False


def _check_free(address: Address, family: socket.AddressFamily, listener: str) -> None:
    """Bind (not listen) a socket without SO_REUSEPORT: the kernel refuses it while any other
    socket listens on the address, SO_REUSEPORT or not. SO_REUSEADDR, as the real socket sets
    it, so connections left in TIME_WAIT or still draining in a stopped process do not count.
    A check, not a lock: two processes binding in the same few microseconds both pass."""
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as create_server
        probe.bind((address.host, address.port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise OSError(
            errno.EADDRINUSE,
            "address in use: another process (a second wsproxy?) listens there; stop it, or "
            f"set listeners.{listener}.share_address = true if both should serve it on purpose "
            "(e.g. a blue/green handover)",
        ) from None
    finally:
        probe.close()


def _file_stamp(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


# Reasons that mean the connection ended without being served, counted as rejected.
_NOT_REJECTED = frozenset(("http_forwarded", "client_closed", "shutdown"))


class Listener:
    """Binds ``config.address`` and runs a flow for every connection it accepts."""

    def __init__(
        self,
        name: str,
        config: ListenerConfig,
        upstreams: Mapping[str, Upstream],
        stats: ListenerStats | None = None,
        budget: DescriptorBudget | None = None,
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
        self.sni_router = SniRouter(
            [(rule.sni, rule.target_group) for rule in config.rules if rule.sni is not None],
            config.default_target_group,
        )
        self.stats = stats if stats is not None else ListenerStats()
        self.ticker = Ticker()  # idle checks of every session of this listener
        self.flows: set[Flow] = set()
        self.address: Address | None = None
        self._upstreams = upstreams
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._all_closed = asyncio.Event()
        self._socket: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._handshakes = 0  # TLS handshakes in progress (they count toward max_connections)
        self._per_ip: dict[str, int] = {}  # open connections per client address, when limited
        self._handshake_room = asyncio.Event()  # set when a handshake slot frees up
        self.budget = budget if budget is not None else DescriptorBudget.from_rlimit()
        self.tls: ServerTls | None = None
        if config.tls is not None:
            # ALPN http/1.1 in websocket mode: the only protocol the flow speaks.
            alpn = ["http/1.1"] if config.websocket else None
            self.tls = ServerTls(name, config.tls, alpn=alpn)

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self, listening: socket.socket | None = None) -> None:
        """Bind the configured address, or accept on ``listening`` (a worker's socket, bound by
        its supervisor; this listener owns it from now on)."""
        try:
            if listening is None:
                listening = bind_listening_socket(
                    self.config.address, listener=self.name, share=self.config.share_address
                )
            listening.setblocking(False)
            bound = listening.getsockname()
            if self.tls is None:
                loop = asyncio.get_running_loop()
                self._server = await loop.create_server(
                    self._accept, sock=listening, backlog=BACKLOG
                )
            else:
                self._socket = listening
                self._accept_task = self.spawn(self._accept_tls(self._socket))
                if self.tls.config.crl:
                    self.spawn(self._watch_crl(self.tls.config.crl))
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"listener '{self.name}': cannot bind {self.config.address}: {exc.strerror}",
            ) from None
        self.address = Address(str(bound[0]), int(bound[1]))
        log_event(log, "listener_up", "listener '%s' listening on %s", self.name, self.address,
                  listener=self.name, address=str(self.address))  # fmt: skip

    async def _accept_tls(self, listening: socket.socket) -> None:
        """Accept, then run each TLS handshake in its own task so its failure can be classified
        (a server created with ssl= would only log it) and counted."""
        loop = asyncio.get_running_loop()
        while True:
            if self._handshakes >= self.config.max_handshakes_in_flight:
                # Leave further connections in the kernel's backlog until a handshake ends.
                self.stats.accept_pauses["handshakes"] += 1
                self._handshake_room.clear()
                await self._handshake_room.wait()
                continue
            try:
                connection, _ = await loop.sock_accept(listening)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self.stats.accept_pauses["fd_exhausted"] += 1
                log.warning("listener '%s': accept failed: %s; pausing 0.1 s", self.name, exc)
                await asyncio.sleep(0.1)  # the condition lasts: never a busy loop
                continue
            refusal = self.refusal()
            if refusal is not None:
                self._refuse(connection, refusal)
            elif self.tls is not None:  # the current contexts: a new CRL swaps them
                # Counted now, not when the task starts: the next accept must see it.
                self._handshakes += 1
                self.budget.open += 1
                self.spawn(self._handshake(connection, self.tls))

    def admit_ip(self, ip: str) -> bool:
        """Count a connection from ``ip`` unless it is at ``max_connections_per_ip``."""
        count = self._per_ip.get(ip, 0)
        if count >= self.config.max_connections_per_ip:
            return False
        self._per_ip[ip] = count + 1
        return True

    def release_ip(self, ip: str) -> None:
        count = self._per_ip.pop(ip, 0) - 1
        if count > 0:
            self._per_ip[ip] = count

    def refusal(self) -> str | None:
        """Why a connection accepted now must be closed at once, or None."""
        if self.stats.active + self._handshakes >= self.config.max_connections:
            return "limit"
        if self.budget.exhausted:
            return "fd_exhausted"
        return None

    def refusal_detail(self, reason: str) -> str:
        if reason == "limit":
            return f"over max_connections ({self.config.max_connections})"
        return f"descriptor budget of the process used up ({self.budget.limit} descriptors)"

    def _refuse(self, connection: socket.socket, reason: str) -> None:
        try:
            peer = connection.getpeername()
        except OSError:
            peer = ("", 0)
        connection.close()
        self._ended_unserved(reason, self.refusal_detail(reason), peer, 0.0, PHASE_ACCEPT)

    async def _handshake(self, connection: socket.socket, tls: ServerTls) -> None:
        """One counted handshake (the accept loop counted it); the slot frees when it ends."""
        try:
            await self._run_handshake(connection, tls)
        finally:
            self._handshakes -= 1
            self.budget.open -= 1
            self._handshake_room.set()

    async def _run_handshake(self, connection: socket.socket, tls: ServerTls) -> None:
        loop = asyncio.get_running_loop()
        flow = self._new_flow()
        started = time.perf_counter()  # loop.time() ticks in whole ms under uvloop
        try:
            peer = connection.getpeername()
        except OSError:
            peer = ("", 0)
        if self.config.accept_proxy_protocol:
            # Exact reads on the bare socket: not one byte of the ClientHello may be consumed.
            try:
                flow.proxied = await self._read_proxy_header(connection)
            except (WireError, TimeoutError, OSError) as exc:
                connection.close()
                reason = exc.reason if isinstance(exc, WireError) else "proxy_protocol_timeout"
                if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
                    reason = "client_closed"
                elapsed = time.perf_counter() - started
                detail = str(exc) or reason
                self._ended_unserved(reason, detail, peer, elapsed, PHASE_PROXY_HEADER)
                return
            if flow.proxied.source is not None:
                peer = flow.proxied.source
        try:
            await loop.connect_accepted_socket(
                lambda: flow.client,
                connection,
                ssl=tls.context,
                ssl_handshake_timeout=self.config.tls_handshake_timeout_seconds,
            )
        except asyncio.CancelledError:
            connection.close()
            raise
        except Exception as exc:  # noqa: BLE001  # connection boundary: every failed handshake is classified, counted and logged once
            connection.close()
            reason, detail = classify_handshake_failure(exc)
            self._handshake_failed(reason, detail, peer, time.perf_counter() - started)
            return
        self.stats.tls_handshakes["ok"] += 1
        self.stats.handshake_seconds.observe(time.perf_counter() - started)

    async def _read_proxy_header(self, connection: socket.socket) -> ProxyHeader:
        loop = asyncio.get_running_loop()
        reader = ProxyHeaderReader()
        async with asyncio.timeout(self.config.proxy_protocol_timeout_seconds):
            while True:
                data = await loop.sock_recv(connection, reader.needed())
                if not data:
                    raise ConnectionResetError("closed before the PROXY header ended")
                result = reader.feed(data)
                if result is not None:
                    return result[0]

    async def _watch_crl(self, path: str) -> None:
        """Reload the CRL when its file changes; close live sessions whose certificate it revokes.

        Polled once a second (no inotify dependency), so a revocation takes effect within about
        a second: fresh SSL contexts for new handshakes, and existing sessions closed (Close 1008
        in websocket mode). No mainstream proxy ends live sessions on revocation; wsproxy does.
        """
        last = _file_stamp(path)
        while True:
            await asyncio.sleep(CRL_POLL_SECONDS)
            stamp = _file_stamp(path)
            if stamp == last or self.tls is None:
                continue
            last = stamp
            try:
                fresh = ServerTls(self.name, self.tls.config, alpn=self.tls.alpn)
                revoked = fresh.revoked_serials()
            except (TlsConfigError, OSError, ValueError) as exc:
                log.error(
                    "listener '%s': new CRL not used, keeping the old one: %s", self.name, exc
                )
                continue
            self.tls = fresh
            closed = 0
            for flow in list(self.flows):
                if flow.client_cert is not None and flow.client_cert.serial in revoked:
                    flow.revoke()
                    closed += 1
            log.info(
                "listener '%s': CRL reloaded (%d revoked); closed %d live session(s)",
                self.name,
                len(revoked),
                closed,
            )

    def _handshake_failed(
        self, reason: str, detail: str, peer: tuple[str, int], duration: float
    ) -> None:
        stats = self.stats
        stats.tls_handshakes[reason] += 1
        if reason.startswith("client_cert_"):
            stats.client_certs[reason.removeprefix("client_cert_")] += 1
        self._ended_unserved(reason, detail, peer, duration, PHASE_TLS)

    def _ended_unserved(
        self, reason: str, detail: str, peer: tuple[str, int], duration: float, phase: str
    ) -> None:
        """A connection that ended before it became a flow: counted, and its log line."""
        stats = self.stats
        stats.connections += 1
        if reason != "client_closed":
            stats.rejected[reason] += 1
        log.info("listener '%s': %s:%s %s", self.name, peer[0], peer[1], detail)
        entry = dict.fromkeys(CONNECTION_FIELDS)
        entry.update(
            client=f"{peer[0]}:{peer[1]}",
            listener=self.name,
            bytes_in=0,
            bytes_out=0,
            duration_seconds=round(duration, 6),
            reason=reason,
            termination=termination(reason, phase),
        )
        log_connection(entry)

    def _new_flow(self) -> Flow:
        if self.config.protocol == "tls_passthrough":
            return PassthroughFlow(self)
        return WebSocketFlow(self) if self.config.websocket else TcpFlow(self)

    def _accept(self) -> Endpoint:
        return self._new_flow().client

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._accept_task is not None:
            self._accept_task.cancel()
        if self._socket is not None:
            self._socket.close()

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

    def upstream(self, name: str | None) -> Upstream:
        if name is None:
            raise NoRoute(f"listener '{self.name}': no rule matched and no default_target_group")
        return self._upstreams[name]

    def flow_started(self, flow: Flow) -> None:
        self.budget.open += 1
        self.flows.add(flow)
        self.stats.connections += 1
        self.stats.active += 1

    def flow_finished(self, flow: Flow, reason: str, bytes_in: int, bytes_out: int) -> None:
        self.budget.open -= 1  # the client's (the target's went with Flow.drop_target)
        self.flows.discard(flow)
        if not self.flows:
            self._all_closed.set()
        stats = self.stats
        stats.active -= 1
        stats.bytes_in += bytes_in
        stats.bytes_out += bytes_out
        if flow.relay is None:
            if reason not in _NOT_REJECTED:
                stats.rejected[reason] += 1
        else:
            stats.session_seconds.observe(flow.loop.time() - flow.started)

    def count_upgrade(self, target_group: str, result: str) -> None:
        self.stats.upgrades[(target_group, result)] += 1

    def count_session(self, relay: WebSocketRelay) -> None:
        stats = self.stats
        inbound, outbound = relay.upstream.tracker, relay.downstream.tracker
        stats.messages_in += inbound.messages
        stats.messages_out += outbound.messages
        stats.frames_in += inbound.frames
        stats.frames_out += outbound.frames
        code = relay.close_code if relay.close_code is not None else 1006
        stats.closes[(relay.close_initiator or "none", close_code_label(code))] += 1

    # --- metrics (read at scrape time) ----------------------------------------------------------

    def live_counts(self) -> Iterator[LiveCounts]:
        for flow in self.flows:
            yield flow.live_counts()

    @property
    def connection_limit(self) -> int:
        return self.config.max_connections

    def tls_expiries(self) -> dict[str, float]:
        return self.tls.expiries if self.tls is not None else {}
