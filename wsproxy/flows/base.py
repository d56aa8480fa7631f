"""The part every flow shares: its client socket, its log record, its end."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from wsproxy.errors import (
    ClientCertRejected,
    ClientClosed,
    HttpError,
    Reason,
    WireError,
    WsproxyError,
)
from wsproxy.flows.context import FlowContext
from wsproxy.ops.logs import connection_logging, log_connection
from wsproxy.ops.metrics import LiveCounts
from wsproxy.ops.termination import Phase, termination
from wsproxy.relay.relay import Endpoint, Relay
from wsproxy.targets.target import Target
from wsproxy.targets.target_group import Session, TargetGroup
from wsproxy.tls import ClientCertificate
from wsproxy.wire.proxyproto import PP2_TYPE_AUTHORITY, ProxyHeader, ProxyHeaderReader, encode_v2

log = logging.getLogger(__name__)
T = TypeVar("T")


class Flow:
    """One accepted client connection, from accept to the connection log line.

    A flow runs its handshake as a task owned by its listener; once the relay runs there is no task
    left, only callbacks. ``finish`` runs exactly once and releases everything.
    """

    __slots__ = (
        "client",
        "client_cert",
        "client_cert_subject",
        "client_ip",
        "client_port",
        "context",
        "drain_deadline",
        "draining",
        "finished",
        "group",
        "handshake_bytes_in",
        "handshake_bytes_out",
        "ip_admitted",
        "loop",
        "phase",
        "proxied",
        "relay",
        "sni",
        "started",
        "target",
        "target_endpoint",
        "target_label",
        "target_next",
        "target_prev",
        "task",
        "tls_version",
    )

    # Log fields only HTTP flows fill in (``WebSocketFlow`` gives them slots); a stream flow's
    # line shows them empty without carrying them.
    host: str | None = None
    path: str | None = None
    status: int | None = None
    close_code: int | None = None

    def __init__(self, context: FlowContext) -> None:
        self.context = context
        self.loop = asyncio.get_running_loop()
        self.client = Endpoint()
        self.client.on_made = self._accepted
        self.target_endpoint: Endpoint | None = None
        self.target: Target | None = None
        # Links in the target group's list of this target's sessions (TargetGroup.attach).
        self.target_prev: Session | None = None
        self.target_next: Session | None = None
        self.relay: Relay | None = None
        self.started = self.loop.time()
        self.task: asyncio.Task[None] | None = None
        self.draining = False
        self.drain_deadline = 0.0
        self.finished = False
        self.client_ip = ""
        self.client_port = 0
        # The connection log line's fields, as slots: a dict per idle session cost ~250 bytes.
        self.sni: str | None = None
        self.tls_version: str | None = None
        self.client_cert_subject: str | None = None
        self.group: TargetGroup | None = None  # the routed target group
        self.target_label: str | None = None  # the target's address, kept after its release
        self.handshake_bytes_in = 0
        self.handshake_bytes_out = 0
        self.client_cert: ClientCertificate | None = None
        self.ip_admitted: str | None = None  # counted toward max_connections_per_ip
        self.proxied: ProxyHeader | None = None
        self.phase = Phase.REQUEST  # how far the connection got, for its termination code

    # --- lifecycle ------------------------------------------------------------------------------

    def _accepted(self) -> None:
        ip, self.client_port = self.client.peer_address
        # One string per address, shared: behind another load balancer a few addresses carry
        # every connection.
        self.client_ip = sys.intern(ip)
        # TLS listeners check the limits before the handshake; plain ones here, before any byte.
        refusal = self.context.refusal() if self.context.tls is None else None
        self.context.started(self)
        if refusal is not None:
            self._refuse(refusal, self.context.refusal_detail(refusal))
            return
        self.client.callbacks.on_lost = self._client_lost_early
        if self.proxied is not None:  # read before the TLS handshake by the listener
            self._use_proxy_header(self.proxied)
        if self.context.tls is not None and not self._check_tls():
            return
        if self.context.config.accept_proxy_protocol and self.proxied is None:
            self._read_proxy_header()
            return
        self._admit()

    def _admit(self) -> None:
        """The per-address limit, once the client's address is known (PROXY header read)."""
        limit = self.context.config.max_connections_per_ip
        if limit:
            if not self.context.admit_ip(self.client_ip):
                self._refuse(Reason.PER_IP_LIMIT, f"over max_connections_per_ip ({limit})")
                return
            self.ip_admitted = self.client_ip
        self.begin()

    def _refuse(self, reason: Reason, detail: str) -> None:
        """Closed at accept by a limit, before any byte was read or sent."""
        log.info("listener '%s': %s: %s", self.context.name, self.client_ip, detail)
        self.phase = Phase.ACCEPT
        self.client.abort()
        self.finish(reason)

    def _use_proxy_header(self, header: ProxyHeader) -> None:
        self.proxied = header
        if header.command == "PROXY" and header.source is not None:
            self.client_ip, self.client_port = header.source

    def _read_proxy_header(self) -> None:
        """Plain listeners behind another load balancer: the PROXY header comes first."""
        reader = ProxyHeaderReader()
        client = self.client
        self.phase = Phase.PROXY_HEADER
        timeout = self.context.config.proxy_protocol_timeout_seconds

        def expire() -> None:
            self._proxy_failed(
                Reason.PROXY_PROTOCOL_TIMEOUT, f"no PROXY header within {timeout:g} s"
            )

        deadline = self.loop.call_later(timeout, expire)

        def on_data(data: bytes) -> None:
            self.handshake_bytes_in += len(data)
            try:
                result = reader.feed(data)
            except WireError as exc:
                deadline.cancel()
                self._proxy_failed(exc.reason, str(exc))
                return
            if result is None:
                return
            deadline.cancel()
            header, rest = result
            self.phase = Phase.REQUEST
            self._use_proxy_header(header)
            self.handshake_bytes_in -= len(rest)
            client.on_data = client.hold
            client.held = rest + client.held
            self._admit()

        client.on_data = on_data
        held = client.take_held()
        if held:
            on_data(held)

    def _proxy_failed(self, reason: Reason, detail: str) -> None:
        log.info("listener '%s': %s: %s", self.context.name, self.client_ip, detail)
        self.client.abort()
        self.finish(reason)

    def _check_tls(self) -> bool:
        """Record the TLS facts of this connection; refuse a client certificate OpenSSL let by."""
        tls = self.context.tls
        transport = self.client.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        if tls is None or ssl_object is None:
            return True
        self.sni = tls.server_name(ssl_object)
        self.tls_version = ssl_object.version()
        if not tls.verifies_clients:
            return True
        try:
            self.client_cert = tls.client_certificate(ssl_object)
        except ClientCertRejected as exc:
            self.context.stats.client_certs[exc.result] += 1
            log.info("listener '%s': %s: %s", self.context.name, self.client_ip, exc)
            self.phase = Phase.TLS  # a check of the handshake, made just after it
            self.client.abort()
            self.finish(exc.reason)
            return False
        self.context.stats.client_certs["ok" if self.client_cert else "none"] += 1
        if self.client_cert is not None:
            self.client_cert_subject = self.client_cert.subject
        return True

    def begin(self) -> None:
        """Start the flow (runs inside ``connection_made``)."""
        raise NotImplementedError

    def read_prelude(self, feed: Callable[[bytes], T | None], what: str) -> asyncio.Future[T]:
        """Feed client bytes to a sans-I/O reader until it returns a value (request head,
        ClientHello): the future gets it, or the reader's ``WireError``, or ``ClientClosed``.
        Reading pauses once it is done; bytes that still arrive are held, in order."""
        done: asyncio.Future[T] = self.loop.create_future()
        client = self.client

        def on_data(data: bytes) -> None:
            self.handshake_bytes_in += len(data)
            if done.done():
                client.hold(data)  # arrived before the pause took effect: keep it, in order
                return
            try:
                result = feed(data)
            except WireError as exc:
                client.pause_reading()
                done.set_exception(exc)
                return
            if result is not None:
                client.pause_reading()
                done.set_result(result)

        def on_eof() -> bool:
            if not done.done():
                done.set_exception(ClientClosed(f"client closed before its {what} ended"))
            return True

        client.on_data = on_data
        client.callbacks.on_eof = on_eof
        held = client.take_held()
        if held:
            on_data(held)
        return done

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.task = self.context.spawn(coro)

    def _client_lost_early(self, exc: Exception | None) -> None:
        """The client left during the handshake: stop the handshake task."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        elif self.relay is None:
            self.finish(Reason.CLIENT_CLOSED)

    async def guarded(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a handshake coroutine; turn every way it can end into a reason and a finish."""
        answered = False
        try:
            await coro
            self.task = None  # handshake over: a session keeps no finished Task alive
            return
        except asyncio.CancelledError:
            reason = Reason.CLIENT_CLOSED if self.client.lost else Reason.SHUTDOWN
        except HttpError as exc:
            reason = exc.reason
            answered = self.fail(exc)
        except ClientClosed as exc:
            reason = exc.reason
        except WsproxyError as exc:
            reason = exc.reason
            log.info("listener '%s': %s", self.context.name, exc)
        except Exception:  # connection boundary: log once, close this connection, keep serving
            log.exception("listener '%s': unexpected error in a connection", self.context.name)
            reason = Reason.INTERNAL_ERROR
        if self.relay is None:
            if self.target_endpoint is not None:
                self.target_endpoint.abort()
            if answered:
                self.client.lingering_close()
            else:
                self.client.close()
            self.finish(reason)

    def fail(self, exc: HttpError) -> bool:
        """Tell the client why its connection ends; True if a response was written.

        Flows without HTTP (stream mode) just close.
        """
        log.debug("listener '%s': %s", self.context.name, exc)
        return False

    def relay_done(self, relay: Relay) -> None:
        self.finish(relay.reason or Reason.CLOSED)

    def finish(self, reason: Reason) -> None:
        if self.finished:
            return
        self.finished = True
        self.drop_target()
        if self.ip_admitted is not None:
            self.context.release_ip(self.ip_admitted)
        relay = self.relay
        bytes_in = self.handshake_bytes_in + (relay.bytes_in if relay else 0)
        bytes_out = self.handshake_bytes_out + (relay.bytes_out if relay else 0)
        session = self.loop.time() - self.started if relay is not None else None
        self.context.finished(self, reason, bytes_in, bytes_out, session)
        if connection_logging():
            log_connection(self.log_record(bytes_in, bytes_out, reason))

    def log_record(self, bytes_in: int, bytes_out: int, reason: Reason) -> dict[str, Any]:
        """The connection log line, in ``CONNECTION_FIELDS`` order."""
        return {
            "client": f"{self.client_ip}:{self.client_port}",
            "listener": self.context.name,
            "sni": self.sni,
            "host": self.host,
            "path": self.path,
            "target_group": self.target_group,
            "target": self.target_label,
            "tls_version": self.tls_version,
            "client_cert_subject": self.client_cert_subject,
            "status": self.status,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "duration_seconds": round(self.loop.time() - self.started, 6),
            "close_code": self.close_code,
            "reason": reason,
            "termination": termination(reason, self.phase),
        }

    @property
    def target_group(self) -> str | None:
        """The routed target group's name (the log line's and the metrics' label)."""
        return self.group.name if self.group is not None else None

    def take_target(self, target: Target) -> None:
        """This flow now holds a connection to ``target`` of its group: counted for the
        balancers and indexed for draining (``TargetGroup.attach``), in the descriptor budget and
        in the log record."""
        if self.group is None:
            raise RuntimeError("take_target before the flow was routed to a target group")
        self.group.attach(target, self)
        self.target = target
        self.context.budget.open += 1
        self.target_label = target.label

    def drop_target(self) -> None:
        """Give the target connection back (a retry elsewhere, or the end of the flow)."""
        target = self.target
        if target is not None and self.group is not None:
            self.group.detach(target, self)
            self.target = None
            self.context.budget.open -= 1

    def proxy_header_for(self, group: TargetGroup, sni: str | None = None) -> bytes:
        """The PROXY v2 header ``group`` wants before the first byte, or nothing."""
        return self.proxy_header(sni) if group.config.proxy_protocol_v2 else b""

    def proxy_header(self, sni: str | None = None) -> bytes:
        """A PROXY v2 header for this connection (used when the target group asks for one)."""
        transport = self.client.transport
        local = transport.get_extra_info("sockname") if transport else None
        destination = (str(local[0]), int(local[1])) if isinstance(local, tuple) else None
        tlvs = [(PP2_TYPE_AUTHORITY, sni.encode("ascii", "replace"))] if sni else []
        source = (self.client_ip, self.client_port) if self.client_ip else None
        return encode_v2(source, destination, tlvs=tlvs)

    # --- operations -----------------------------------------------------------------------------

    def live_counts(self) -> LiveCounts:
        relay = self.relay
        if relay is None:
            return LiveCounts(None, self.handshake_bytes_in, self.handshake_bytes_out)
        return LiveCounts(
            self.target_group,
            self.handshake_bytes_in + relay.bytes_in,
            self.handshake_bytes_out + relay.bytes_out,
        )

    def drain(self, timeout: float) -> None:
        """Close this connection as cleanly as its flow allows within ``timeout`` seconds.

        A flow still in its handshake finishes it and drains as soon as its relay starts.
        """
        if self.draining:
            return
        self.draining = True
        self.drain_deadline = self.loop.time() + timeout
        self.drain_relay(timeout)

    def drain_remaining(self) -> float:
        return max(0.0, self.drain_deadline - self.loop.time())

    def drain_relay(self, timeout: float) -> None:
        """Stream mode: opaque bytes have no clean cut, so wait out the grace period, then close."""
        relay = self.relay
        if relay is not None:
            self.loop.call_later(timeout, relay.close, Reason.DRAINING)

    def revoke(self) -> None:
        """The client's certificate was just revoked: end this connection now."""
        name = self.context.name
        log.info("listener '%s': closing %s: client certificate revoked", name, self.client_ip)
        if self.relay is not None:
            self.relay.close(Reason.SESSION_REVOKED)
        else:
            self.abort()

    def abort(self) -> None:
        if self.relay is not None:
            self.relay.abort(Reason.SHUTDOWN)
        else:
            self.client.abort()
            if self.target_endpoint is not None:
                self.target_endpoint.abort()
