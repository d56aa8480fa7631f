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
from typing import Any, cast

from wsproxy.address import Address
from wsproxy.api.api import Api
from wsproxy.config import ListenerConfig
from wsproxy.descriptors import DescriptorBudget
from wsproxy.errors import Reason, TlsConfigError, WireError
from wsproxy.flows.api import ApiFlow
from wsproxy.flows.base import Flow
from wsproxy.flows.context import FlowContext
from wsproxy.flows.passthrough import PassthroughFlow
from wsproxy.flows.tcp import TcpFlow
from wsproxy.flows.websocket import WebSocketFlow
from wsproxy.handshake_slots import HandshakeSlots
from wsproxy.openssl import alerts_to
from wsproxy.ops.logs import CONNECTION_FIELDS, log_connection, log_event
from wsproxy.ops.metrics import ListenerStats, LiveCounts
from wsproxy.ops.termination import Phase, PhaseCode, termination
from wsproxy.relay.relay import Endpoint
from wsproxy.targets.target_group import TargetGroup
from wsproxy.tls import ServerTls, classify_handshake_failure
from wsproxy.wire.proxyproto import ProxyHeader, ProxyHeaderReader

log = logging.getLogger(__name__)

CRL_POLL_SECONDS = 1.0

# A TLS connection waits for a handshake slot at most this many tls_handshake_timeout_seconds.
SLOT_WAIT_TIMEOUTS = 2


BACKLOG = 1024


_WILDCARDS = frozenset(("", "0.0.0.0", "::"))  # noqa: S104  # compared with, never bound


class ListeningSockets:
    """Binds listening sockets with SO_REUSEPORT and remembers which addresses they hold.

    SO_REUSEPORT lets a reload bind a changed listener before the old socket closes (no
    connection refused in between) and lets a supervisor bind one socket per worker slot, the
    kernel spreading connections among them. It would also let a second wsproxy, or anything
    else of the same user that sets it, join the address and take part of its connections. So
    unless one of the sockets bound here already holds the address, or the listener's
    ``share_address`` asks for sharing, the address must be free: EADDRINUSE otherwise. One
    instance per proxy (its binding owns it), so only the sockets of that proxy count as its own.
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        # Weakly: a socket that is collected leaves; a closed one reads fileno -1.
        self._held: weakref.WeakKeyDictionary[socket.socket, Address] = weakref.WeakKeyDictionary()

    def bind(self, address: Address, *, listener: str, share: bool) -> socket.socket:
        """A listening socket for ``address``, listener ``listener``'s (see the class); an
        ``OSError`` names the listener, the address and what to do."""
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        try:
            if not share and address.port != 0 and not self.holds(address):
                _check_free(address, family, listener)
            listening = socket.create_server(
                (address.host, address.port), family=family, backlog=BACKLOG, reuse_port=True
            )
        except OSError as exc:
            why = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE and share:
                why += (
                    ": share_address works only with a process that also listens with "
                    "SO_REUSEPORT (as wsproxy does) under the same user"
                )
            raise OSError(
                exc.errno, f"listener '{listener}': cannot bind {address}: {why}"
            ) from None
        self._held[listening] = Address(address.host, int(listening.getsockname()[1]))
        return listening

    def holds(self, address: Address) -> bool:
        """Whether a live socket bound here holds ``address``'s port on an overlapping host."""
        for sock, held in list(self._held.items()):
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


class Listener:
    """Binds ``config.address`` and runs a flow for every connection it accepts."""

    def __init__(
        self,
        name: str,
        config: ListenerConfig,
        target_groups: Mapping[str, TargetGroup],
        stats: ListenerStats | None = None,
        budget: DescriptorBudget | None = None,
        previous_tls: ServerTls | None = None,
        api: Api | None = None,
    ) -> None:
        """``previous_tls``: the TLS contexts of the listener of this name that this one
        replaces (a reload), so an older CRL is refused (``ServerTls``'s ``previous``).
        ``api``: the API an ``api = NAME`` listener serves."""
        self.name = name
        self.config = config
        self.address: Address | None = None
        self._server: asyncio.Server | None = None
        self._socket: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self.handshake_slots = HandshakeSlots(
            config.max_handshakes_in_flight, config.max_handshakes_in_flight_per_ip
        )
        tls = None
        if config.tls is not None:
            # ALPN http/1.1 in websocket mode: the only protocol the flow speaks.
            alpn = ["http/1.1"] if config.websocket or config.api else None
            tls = ServerTls(name, config.tls, alpn=alpn, previous=previous_tls)
        # What the flows see of this listener (they never see the listener itself).
        self.context = FlowContext(
            name,
            config,
            target_groups,
            stats if stats is not None else ListenerStats(),
            budget if budget is not None else DescriptorBudget.from_rlimit(),
            tls,
            api,
        )
        self.stats = self.context.stats
        self.budget = self.context.budget
        self.ticker = self.context.ticker

    @property
    def tls(self) -> ServerTls | None:
        """The current TLS contexts (new handshakes use them; a reload or new CRL swaps them)."""
        return self.context.tls

    @tls.setter
    def tls(self, tls: ServerTls | None) -> None:
        self.context.tls = tls

    @property
    def flows(self) -> set[Flow]:
        """The connections open now (from accept until their log line)."""
        # Only flows this listener made join its context's set (in Flow._accepted).
        return cast(set[Flow], self.context.connections)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return self.context.spawn(coro)

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self, listening: socket.socket | None = None) -> None:
        """Bind the configured address, or accept on ``listening`` (a worker's socket, bound by
        its supervisor; this listener owns it from now on)."""
        if listening is None:
            listening = ListeningSockets().bind(
                self.config.address, listener=self.name, share=self.config.share_address
            )
        try:
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
        (a server created with ssl= would only log it) and counted.

        Accepting goes on while handshake slots are taken: a connection that finds none waits
        in ``handshake_slots`` (fairly among client addresses) rather than in the kernel's
        backlog, where it would queue behind every connection of whoever filled it.
        """
        loop = asyncio.get_running_loop()
        limit_per_ip = self.config.max_connections_per_ip
        while True:
            try:
                connection, peer = await loop.sock_accept(listening)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self.stats.accept_pauses[Reason.FD_EXHAUSTED] += 1
                log.warning("listener '%s': accept failed: %s; pausing 0.1 s", self.name, exc)
                await asyncio.sleep(0.1)  # the condition lasts: never a busy loop
                continue
            refusal = self.context.refusal()
            if refusal is not None:
                self._refuse(connection, refusal)
                continue
            tls = self.tls  # the current contexts: a new CRL swaps them
            if tls is None:
                connection.close()
                continue
            ip: str | None = None
            if limit_per_ip and not self.config.accept_proxy_protocol:
                # Counted now, before the handshake: an address at its limit gets no handshake
                # slot and holds no descriptor (behind PROXY, once the header names the client).
                ip = str(peer[0])
                if not self.context.reserve_ip(ip):
                    self._refuse(connection, Reason.PER_IP_LIMIT)
                    continue
            # Counted now, not when the task starts: the next accept must see it.
            self.context.handshakes += 1
            self.budget.open += 1
            self.spawn(self._handshake(connection, tls, ip))

    def _refuse(self, connection: socket.socket, reason: Reason) -> None:
        try:
            peer = connection.getpeername()
        except OSError:
            peer = ("", 0)
        connection.close()
        self._ended_unserved(reason, self._refusal_detail(reason), peer, 0.0, Phase.ACCEPT)

    def _refusal_detail(self, reason: Reason) -> str:
        if reason is Reason.PER_IP_LIMIT:
            return f"over max_connections_per_ip ({self.config.max_connections_per_ip})"
        return self.context.refusal_detail(reason)

    async def _handshake(self, connection: socket.socket, tls: ServerTls, ip: str | None) -> None:
        """One counted connection (the accept loop counted it) until it is a flow or gone;
        ``ip``: the address the accept loop counted toward max_connections_per_ip, if any."""
        flow = self._new_flow()
        reserved = [ip] if ip is not None else []
        try:
            await self._run_handshake(connection, tls, flow, reserved)
        finally:
            self.context.handshakes -= 1
            self.budget.open -= 1
            if reserved and flow.ip_admitted is None:
                # No flow took the address's count over (see FlowContext.reserve_ip).
                self.context.unreserve_ip(reserved[0])

    async def _run_handshake(
        self, connection: socket.socket, tls: ServerTls, flow: Flow, reserved: list[str]
    ) -> None:
        """PROXY header (where asked), a handshake slot, the handshake. ``reserved``: the
        address counted toward max_connections_per_ip, if any (appended to when the PROXY
        header names it)."""
        started = time.perf_counter()  # loop.time() ticks in whole ms under uvloop
        try:
            peer = connection.getpeername()
        except OSError:
            peer = ("", 0)
        if self.config.accept_proxy_protocol:
            # Exact reads on the bare socket: not one byte of the ClientHello may be consumed.
            try:
                flow.proxied = await self._read_proxy_header(connection)
            except asyncio.CancelledError:
                connection.close()
                raise
            except (WireError, TimeoutError, OSError) as exc:
                connection.close()
                reason = exc.reason if isinstance(exc, WireError) else Reason.PROXY_PROTOCOL_TIMEOUT
                if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
                    reason = Reason.CLIENT_CLOSED
                elapsed = time.perf_counter() - started
                detail = str(exc) or reason
                self._ended_unserved(reason, detail, peer, elapsed, Phase.PROXY_HEADER)
                return
            if flow.proxied.command == "PROXY" and flow.proxied.source is not None:
                peer = flow.proxied.source  # the address the flow will know the client by
            if self.config.max_connections_per_ip:
                if not self.context.reserve_ip(str(peer[0])):
                    connection.close()
                    reason = Reason.PER_IP_LIMIT
                    self._ended_unserved(reason, self._refusal_detail(reason), peer,
                                         time.perf_counter() - started, Phase.ACCEPT)  # fmt: skip
                    return
                reserved.append(str(peer[0]))
        source = str(peer[0])
        slots = self.handshake_slots
        timeout = self.config.tls_handshake_timeout_seconds
        if not slots.try_acquire(source):
            # Bounded, so an idle socket cannot hold a descriptor for long by queueing: every
            # slot taken now frees within one handshake timeout, the second one leaves room for
            # the turn order. Not taken from the handshake's own time: a client that waited
            # still gets a whole handshake.
            self.stats.accept_pauses["handshakes"] += 1
            try:
                async with asyncio.timeout(SLOT_WAIT_TIMEOUTS * timeout):
                    await slots.acquire(source)
            except asyncio.CancelledError:  # the listener stops: no transport owns the socket
                connection.close()
                raise
            except TimeoutError:
                connection.close()
                reason = Reason.TLS_HANDSHAKE_TIMEOUT
                waited = SLOT_WAIT_TIMEOUTS * timeout
                detail = f"no handshake slot within {waited:g} s (max_handshakes_in_flight)"
                self._handshake_failed(reason, detail, peer, time.perf_counter() - started)
                return
        try:
            await self._tls_handshake(connection, tls, flow, peer, started, timeout)
        finally:
            slots.release(source)

    async def _tls_handshake(
        self,
        connection: socket.socket,
        tls: ServerTls,
        flow: Flow,
        peer: tuple[str, int],
        started: float,
        seconds: float,
    ) -> None:
        """The handshake itself, within ``seconds``; counted and logged if it fails."""
        loop = asyncio.get_running_loop()
        try:
            with alerts_to(connection):  # a refused client gets OpenSSL's alert, not just EOF
                await loop.connect_accepted_socket(
                    lambda: flow.client,
                    connection,
                    ssl=tls.context,
                    ssl_handshake_timeout=seconds,
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
                fresh = ServerTls(self.name, self.tls.config, alpn=self.tls.alpn, previous=self.tls)
                revoked = fresh.revoked_serials()
            except (TlsConfigError, OSError, ValueError) as exc:
                log.error(
                    "listener '%s': new CRL not used, keeping the old one: %s", self.name, exc
                )
                continue
            self.tls = fresh
            stale = fresh.crl_staleness()
            if stale is not None:
                log.warning("listener '%s': %s", self.name, stale)
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
        self, reason: Reason, detail: str, peer: tuple[str, int], duration: float
    ) -> None:
        stats = self.stats
        stats.tls_handshakes[reason] += 1
        result = reason.client_cert_result
        if result is not None:
            stats.client_certs[result] += 1
        self._ended_unserved(reason, detail, peer, duration, Phase.TLS)

    def _ended_unserved(
        self, reason: Reason, detail: str, peer: tuple[str, int], duration: float, phase: PhaseCode
    ) -> None:
        """A connection that ended before it became a flow: counted, and its log line."""
        stats = self.stats
        stats.connections += 1
        if reason is not Reason.CLIENT_CLOSED:
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
            return PassthroughFlow(self.context)
        if self.context.api is not None:
            return ApiFlow(self.context)
        return WebSocketFlow(self.context) if self.config.websocket else TcpFlow(self.context)

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
            try:
                async with asyncio.timeout(grace):
                    await self.context.until_all_closed()
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
        await self.context.close_tasks()

    # --- metrics (read at scrape time) ----------------------------------------------------------

    def live_counts(self) -> Iterator[LiveCounts]:
        for flow in self.flows:
            yield flow.live_counts()

    @property
    def connection_limit(self) -> int:
        return self.config.max_connections

    def tls_expiries(self) -> dict[str, float]:
        return self.tls.expiries if self.tls is not None else {}

    def crl_updates(self) -> tuple[float, float] | None:
        """The CRL in use: (thisUpdate, nextUpdate) in Unix seconds; None without a CRL or a
        nextUpdate."""
        crl = self.tls.crl if self.tls is not None else None
        if crl is None or crl.next_update is None:
            return None
        return crl.last_update, crl.next_update
