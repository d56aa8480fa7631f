"""WebSocket mode: read and validate the Upgrade, route it, and tunnel only after a real 101.

Order of work for one connection (DESIGN.md, "WebSocket"):
1. read the request head within ``max_request_head_bytes`` and ``request_head_timeout_seconds``;
2. validate it (RFC 6455 §4.2.1) or, for a plain request, answer 426 / forward it alone;
3. route on Host and path, dial a target (retrying another on refusal, timeout, or a close before
   any response byte), send the head with X-Forwarded-* set by us;
4. read the target's response head: a valid 101 opens the frame-tracking tunnel; anything else is
   forwarded with ``Connection: close`` and the connection ends, so no second request ever reaches
   the target through a connection it did not upgrade (the WebSocket-smuggling class of CVEs).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from http import HTTPStatus
from typing import Any

from wsproxy.errors import (
    BadRequest,
    BadRequestBody,
    BadTargetResponse,
    HeadTooLarge,
    HttpError,
    MalformedBody,
    MalformedHead,
    Reason,
    RequestTimeout,
    TargetClosed,
    TargetError,
    TargetHandshakeTimeout,
    UpgradeRequired,
    WireError,
)
from wsproxy.flows.base import Flow
from wsproxy.flows.context import FlowContext
from wsproxy.ops.metrics import LiveCounts
from wsproxy.ops.termination import Phase
from wsproxy.relay.relay import Endpoint, Relay
from wsproxy.relay.websocket import WebSocketRelay
from wsproxy.targets.target import Target
from wsproxy.targets.target_group import RetryElsewhere, TargetGroup
from wsproxy.wire.forwarding import fold, forwarded_fields
from wsproxy.wire.http1 import (
    BodyKind,
    BodyTracker,
    HeadBuffer,
    RequestHead,
    ResponseHead,
    parse_request_head,
    parse_response_head,
    replace_headers,
    request_body,
    response_body,
    serialize_request,
    serialize_response_head,
)
from wsproxy.wire.request_target import (
    RequestTarget,
    check_version,
    in_origin_form,
    parse_request_target,
)
from wsproxy.wire.upgrade import (
    WEBSOCKET_VERSION,
    check_host,
    is_valid_upgrade_response,
    validate_upgrade_request,
    wants_upgrade,
)
from wsproxy.wire.wsframe import CLOSE_GOING_AWAY, CLOSE_POLICY_VIOLATION
from wsproxy.wire.wssession import Boundary

log = logging.getLogger(__name__)

# A target's response head is bounded like the client's request head.
MAX_RESPONSE_HEAD_BYTES = 16 * 1024
# Interim (1xx) answers forwarded before the final one; real targets send one or two.
MAX_INTERIM_RESPONSES = 16
_FORWARDED = {
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-host",
    # Only the proxy may vouch for a client certificate: client copies are always removed.
    "x-client-cert-subject",
    "x-client-cert-serial",
    "x-client-cert-fingerprint-sha256",
    "x-client-cert-not-after",
}
# Every client field in these families is dropped, not only the names the proxy sets today: an
# application may trust X-Forwarded-Ssl or X-Client-Cert-Verify (Rack, nginx conventions) as
# coming from the proxy.
_RESERVED_PREFIXES = ("x-forwarded-", "x-client-cert-")
# RFC 7239 Forwarded carries the same claims, and frameworks (Spring) read it before the
# X-Forwarded-* fields: a client's copy is dropped; the proxy adds none.
_RESERVED = frozenset(fold(name) for name in (*_FORWARDED, "forwarded"))
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection"}
# RFC 9110 §9.2.1: the methods that are safe to send again to another target after one read
# the request and closed. PUT and DELETE are idempotent (§9.2.2) but change state, and
# applications often do not make them idempotent in fact, so they are not retried.
_SAFE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def error_response(exc: HttpError) -> bytes:
    """A short plain-text response that closes the connection.

    4xx say what was wrong with the request; 5xx say nothing of the targets (their addresses and
    failures are for the log, not for clients)."""
    text = HTTPStatus(exc.status).phrase  # the status comes from the reason registry
    detail = f": {exc.detail}" if exc.status < 500 else ""
    body = f"{exc.status} {text}{detail}\n".encode()
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    if exc.status == 405:
        headers.append(("Allow", "GET"))
    if exc.status == 426:
        # RFC 9110 §15.5.22 and RFC 6455 §4.4: say what to upgrade to and which version we speak.
        headers += [("Upgrade", "websocket"), ("Sec-WebSocket-Version", WEBSOCKET_VERSION)]
    head = ResponseHead("HTTP/1.1", exc.status, text, tuple(headers))
    return serialize_response_head(head) + body


class _Exchange:
    """Reads one HTTP response head from a target, then streams its body to the client.

    Callback side of the handshake task: the target endpoint feeds it, the task awaits ``head`` and
    then ``finished``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._loop = loop
        self.head: asyncio.Future[tuple[bytes, bytes]] = loop.create_future()
        self.finished: asyncio.Future[Reason] = loop.create_future()
        self.received = 0
        self._ended_why: str | None = None
        self._buffer = HeadBuffer(MAX_RESPONSE_HEAD_BYTES)
        endpoint.on_data = self._head_data
        endpoint.callbacks.on_eof = self._eof
        endpoint.callbacks.on_lost = self._lost

    def read_next_head(self, rest: bytes) -> None:
        """After an interim (1xx) answer: read the next head into a new ``head`` future, starting
        with ``rest`` (the bytes that followed the interim head) and whatever was held back."""
        self.head = self._loop.create_future()
        self._buffer = HeadBuffer(MAX_RESPONSE_HEAD_BYTES)
        pending = rest + self.endpoint.take_held()
        if pending:
            self._feed_head(pending)
        if self.head.done():
            return
        if self._ended_why is not None:
            self.head.set_exception(TargetClosed(f"{self._ended_why} after an interim answer"))
        else:
            self.endpoint.resume_reading()

    def _head_data(self, data: bytes) -> None:
        self.received += len(data)
        self._feed_head(data)

    def _feed_head(self, data: bytes) -> None:
        if self.head.done():
            self.endpoint.hold(data)
            return
        try:
            result = self._buffer.feed(data)
        except WireError as exc:
            self.head.set_exception(BadTargetResponse(f"target sent an invalid response: {exc}"))
            return
        if result is not None:
            self.endpoint.pause_reading()
            self.head.set_result(result)

    def _eof(self) -> bool:
        self._ended("target closed the connection")
        return False

    def _lost(self, exc: Exception | None) -> None:
        self._ended("target reset the connection" if exc else "target closed the connection")

    def _ended(self, why: str) -> None:
        self._ended_why = why
        if not self.head.done():
            self.head.set_exception(TargetClosed(f"{why} before answering ({self.received} bytes)"))
        if not self.finished.done():
            self.finished.set_result(Reason.TARGET_CLOSED)


class WebSocketFlow(Flow):
    """The WebSocket flow of one client connection (``websocket = true``)."""

    __slots__ = ("close_code", "host", "path", "status")

    def __init__(self, context: FlowContext) -> None:
        super().__init__(context)
        self.host = self.path = None
        self.status = self.close_code = None

    def begin(self) -> None:
        # Hook the head reader up now, inside connection_made, so no byte can arrive unread. The
        # buffer lives in the handshake task only: a session outlives its handshake by hours.
        buffer = HeadBuffer(self.context.config.max_request_head_bytes)
        head = self.read_prelude(buffer.feed, "request head")
        self.spawn(self.guarded(self._run(buffer, head)))

    def fail(self, exc: HttpError) -> bool:
        self.status = exc.status
        if exc.status >= 500 or isinstance(exc, TargetError):
            log.info("listener '%s': %s", self.context.name, exc)
        else:
            log.debug("listener '%s': %s", self.context.name, exc)
        if self.group is not None and isinstance(exc, TargetError):
            self.context.count_upgrade(self.group.name, exc.reason)
        response = error_response(exc)
        self.handshake_bytes_out += len(response)
        self.client.write(response)
        return True

    # --- 1. request head ------------------------------------------------------------------------

    async def _read_request_head(
        self, buffer: HeadBuffer, head: asyncio.Future[tuple[bytes, bytes]]
    ) -> tuple[bytes, bytes]:
        timeout = self.context.config.request_head_timeout_seconds

        def expire() -> None:
            # A timer on the future, not asyncio.timeout: a third of the cost per connection.
            if not head.done():
                head.set_exception(
                    RequestTimeout(
                        f"request head not complete within {timeout:g} s "
                        f"({buffer.size} bytes received)"
                    )
                )

        timer = self.loop.call_later(timeout, expire)
        try:
            return await head
        except MalformedHead as exc:
            raise BadRequest(str(exc)) from None
        except WireError as exc:
            raise HeadTooLarge(str(exc)) from None
        finally:
            timer.cancel()

    # --- 2. validate and route ------------------------------------------------------------------

    def _parse_head(self, raw_head: bytes) -> tuple[RequestHead, RequestTarget, str]:
        """The request head, its checked target and its host; the log's path and host set."""
        try:
            head = parse_request_head(raw_head)
        except MalformedHead as exc:
            raise BadRequest(str(exc)) from None
        check_version(head)
        # Rules see the normalised path, and so does the target (wire/request_target.py).
        target = parse_request_target(head.method, head.target)
        # Interned: every session of a service names the same host and few paths, and the log
        # fields live as long as the session.
        self.path = sys.intern(target.path[:256])
        host = check_host(head)
        if target.authority is not None:
            host = target.authority  # RFC 9112 §3.2.2: an absolute-form URL's authority wins
        self.host = sys.intern(host[:256])
        return head, target, host

    async def _run(
        self, buffer: HeadBuffer, head_read: asyncio.Future[tuple[bytes, bytes]]
    ) -> None:
        raw_head, rest = await self._read_request_head(buffer, head_read)
        del buffer, head_read
        head, target, host = self._parse_head(raw_head)
        upgrade = wants_upgrade(head)
        key = ""
        if upgrade:
            key = validate_upgrade_request(head)
            kind, length = BodyKind.NONE, 0
        elif self.context.config.websocket_only:
            raise UpgradeRequired("this listener only accepts WebSocket upgrades")
        else:
            try:
                kind, length = request_body(head)
            except MalformedHead as exc:
                raise BadRequest(str(exc)) from None
        group = self.group = self.context.target_group(self.context.router.route(host, target.path))
        forwarded = self._forwarded_head(in_origin_form(head, target), host, upgrade)
        await self._exchange(group, head, forwarded, key, rest, kind, length)

    def _forwarded_head(self, head: RequestHead, host: str, upgrade: bool) -> bytes:
        add: tuple[tuple[str, str], ...] = (
            ("X-Forwarded-For", self.client_ip),
            ("X-Forwarded-Proto", "https" if self.context.tls else "http"),
            ("X-Forwarded-Port", str(self.client.local_port)),
            ("X-Forwarded-Host", host),
        )
        if self.client_cert is not None:
            add += self.client_cert.headers()
        # Ours only: the client's Connection and the fields it names there stay on its hop.
        add += (("Connection", "Upgrade" if upgrade else "close"),)
        headers = forwarded_fields(
            head, add, reserved=_RESERVED, reserved_prefixes=_RESERVED_PREFIXES
        )
        return serialize_request(head.method, head.target, head.version, headers)

    # --- 3. dial and exchange -------------------------------------------------------------------

    async def _exchange(
        self,
        group: TargetGroup,
        head: RequestHead,
        forwarded: bytes,
        key: str,
        rest: bytes,
        kind: BodyKind,
        length: int,
    ) -> None:
        config = group.config
        # The exchange of the attempt under way (a retry starts a new one on a new endpoint).
        attempt: list[_Exchange] = []

        def make_endpoint() -> Endpoint:
            endpoint = self.target_endpoint = Endpoint()
            attempt[:] = [_Exchange(self.loop, endpoint)]  # reads from the first byte on
            self.phase = Phase.CONNECT
            return endpoint

        async def send_head(target: Target, endpoint: Endpoint) -> None:
            exchange = attempt[0]
            self.take_target(target)
            self.phase = Phase.UPGRADE
            endpoint.write(forwarded)
            if not key:
                self._stream_request_body(BodyTracker(kind, length, trailers=False), rest, exchange)
            try:
                await self._until_quiet(exchange.head, config.handshake_timeout_seconds)
            except TimeoutError:
                raise TargetHandshakeTimeout(
                    f"target {target.address} did not answer within "
                    f"{config.handshake_timeout_seconds:g} s"
                ) from None
            except TargetClosed as exc:
                # The target may have acted on the request before closing: only a safe method
                # (RFC 9110 §9.2.1; an Upgrade is a GET) without a body, of which nothing
                # reached the client yet, may go to another target. HAProxy's default retries
                # nothing once the request was sent; the dial retries connect failures for all.
                if exchange.received or kind is not BodyKind.NONE or head.method not in _SAFE:
                    raise
                self.drop_target()
                raise RetryElsewhere(exc) from None

        header = self.proxy_header_for(group, self.sni)
        await group.dial(self.client_ip, make_endpoint, header, send_head)
        exchange = attempt[0]
        raw_response, response_rest = exchange.head.result()
        await self._answer(group, head, key, raw_response, response_rest, rest, exchange)

    async def _answer(
        self,
        group: TargetGroup,
        head: RequestHead,
        key: str,
        raw_response: bytes,
        response_rest: bytes,
        client_rest: bytes,
        exchange: _Exchange,
    ) -> None:
        response = self._parse_response(raw_response)
        interim = 0
        while 100 <= response.status < 200 and response.status != 101:
            # RFC 9110 §15.2: a proxy forwards 1xx answers (100 Continue, 103 Early Hints) and
            # goes on to the final one, as HAProxy and nginx do. Bounded: a target sending them
            # forever would otherwise hold the connection past every deadline.
            interim += 1
            if interim > MAX_INTERIM_RESPONSES:
                raise BadTargetResponse(
                    f"target sent more than {MAX_INTERIM_RESPONSES} interim (1xx) answers"
                )
            self._forward_interim(head, response)
            exchange.read_next_head(response_rest)
            try:
                await self._until_quiet(exchange.head, group.config.handshake_timeout_seconds)
            except TimeoutError:
                raise TargetHandshakeTimeout(
                    f"target sent {response.status} but no final answer within "
                    f"{group.config.handshake_timeout_seconds:g} s"
                ) from None
            raw_response, response_rest = exchange.head.result()
            response = self._parse_response(raw_response)
        if key and is_valid_upgrade_response(response, key):
            self.status = response.status
            extensions = bool(response.get("sec-websocket-extensions"))
            self._open_tunnel(raw_response, response_rest, client_rest, extensions)
            return
        if key and response.status == 101:
            raise BadTargetResponse("target answered 101 without a valid Sec-WebSocket-Accept")
        if response.status < 200:
            raise BadTargetResponse(f"target answered {response.status} (1xx) to the request")
        if key:
            self.context.count_upgrade(group.name, Reason.REJECTED_BY_TARGET)
        self.status = response.status
        await self._forward_response(head, response, response_rest, exchange)

    @staticmethod
    def _parse_response(raw_response: bytes) -> ResponseHead:
        try:
            return parse_response_head(raw_response)
        except MalformedHead as exc:
            raise BadTargetResponse(f"target sent an invalid response head: {exc}") from None

    def _forward_interim(self, request: RequestHead, response: ResponseHead) -> None:
        """Send a 1xx answer on to the client, without hop-by-hop fields; an HTTP/1.0 client
        gets none (RFC 9110 §15.2: 1.0 defines no 1xx)."""
        if request.version == "HTTP/1.0":
            return
        headers = replace_headers(response.headers, _HOP_BY_HOP, ())
        interim = serialize_response_head(
            ResponseHead(response.version, response.status, response.reason, headers)
        )
        self.handshake_bytes_out += len(interim)
        self.client.write(interim)

    async def _until_quiet(self, future: asyncio.Future[Any], quiet_seconds: float) -> None:
        """Wait for ``future`` while bytes keep moving; TimeoutError once none moved for
        ``quiet_seconds`` (an upload still streaming is not a silent target). The timer fails
        the future itself: no second future, no extra wake-up per handshake."""
        loop = self.loop
        mark = self.handshake_bytes_in + self.handshake_bytes_out
        timer: asyncio.TimerHandle | None = None

        def check() -> None:
            nonlocal mark, timer
            if future.done():
                return
            moved = self.handshake_bytes_in + self.handshake_bytes_out
            if moved == mark:
                future.set_exception(TimeoutError())
                return
            mark = moved
            timer = loop.call_later(quiet_seconds, check)

        timer = loop.call_later(quiet_seconds, check)
        try:
            await future
        finally:
            timer.cancel()

    def _stream_request_body(self, body: BodyTracker, rest: bytes, exchange: _Exchange) -> None:
        """Send a plain request's body (and nothing after it) to the target."""
        client = self.client
        endpoint = exchange.endpoint

        def on_data(data: bytes) -> None:
            self.handshake_bytes_in += len(data)
            try:
                taken = body.feed(data)
            except MalformedBody as exc:
                log.debug("listener '%s': bad request body: %s", self.context.name, exc)
                client.pause_reading()
                # The client's fault, answered 400 before the target's end (the abort below) can
                # be taken for the target's: a bad body must not count as a target failure.
                if not exchange.head.done():
                    exchange.head.set_exception(BadRequestBody(f"bad request body: {exc}"))
                endpoint.abort()
                return
            if taken:
                endpoint.write(data[:taken] if taken < len(data) else data)
            if body.done:
                client.pause_reading()

        def on_target_drained() -> None:
            if not body.done:
                client.resume_reading()

        client.on_data = on_data
        endpoint.callbacks.on_pause_writing = client.pause_reading
        endpoint.callbacks.on_resume_writing = on_target_drained
        rest += client.take_held()
        if rest:
            self.handshake_bytes_in -= len(rest)  # counted already with the head
            on_data(rest)
        if not body.done:
            client.resume_reading()

    async def _forward_response(
        self, request: RequestHead, response: ResponseHead, rest: bytes, exchange: _Exchange
    ) -> None:
        """Forward a non-101 answer with ``Connection: close``, then end the connection."""
        endpoint = exchange.endpoint
        client = self.client
        client.pause_reading()
        try:
            body = BodyTracker(*response_body(response, request.method))
        except MalformedHead as exc:
            raise BadTargetResponse(f"target response has bad framing: {exc}") from None
        headers = replace_headers(response.headers, _HOP_BY_HOP, (("Connection", "close"),))
        head = serialize_response_head(
            ResponseHead(response.version, response.status, response.reason, headers)
        )
        self.handshake_bytes_out += len(head)
        client.write(head)

        def on_data(data: bytes) -> None:
            try:
                taken = body.feed(data)
            except MalformedBody:
                endpoint.abort()
                return
            if taken:
                self.handshake_bytes_out += taken
                client.write(data[:taken] if taken < len(data) else data)
            if body.done and not exchange.finished.done():
                exchange.finished.set_result(Reason.HTTP_FORWARDED)

        endpoint.on_data = on_data
        client.callbacks.on_pause_writing = endpoint.pause_reading
        client.callbacks.on_resume_writing = endpoint.resume_reading
        rest += endpoint.take_held()
        if rest:
            on_data(rest)
        reason = Reason.HTTP_FORWARDED
        if not exchange.finished.done() and not body.done:
            endpoint.resume_reading()
            try:
                await self._until_quiet(exchange.finished, self.context.config.idle_timeout_seconds)
            except TimeoutError:
                reason = Reason.IDLE_TIMEOUT
        endpoint.close()
        client.close()
        self.finish(reason if body.done or reason is Reason.IDLE_TIMEOUT else Reason.TARGET_CLOSED)

    # --- 4. tunnel ------------------------------------------------------------------------------

    def _open_tunnel(
        self, raw_response: bytes, response_rest: bytes, client_rest: bytes, extensions: bool
    ) -> None:
        config = self.context.config
        if self.target_endpoint is None:
            raise BadTargetResponse("tunnel without a target connection")
        self.context.count_upgrade(str(self.target_group), "ok")
        self.handshake_bytes_out += len(raw_response)
        self.client.write(raw_response)
        relay = WebSocketRelay(
            self.client,
            self.target_endpoint,
            idle_timeout=config.idle_timeout_seconds,
            max_frame_bytes=config.max_frame_bytes,
            max_message_bytes=config.max_message_bytes,
            max_messages_per_second=config.max_messages_per_second,
            messages_burst=config.messages_burst,
            max_frames_per_second=config.max_frames_per_second,
            frames_burst=config.frames_burst,
            max_session_seconds=config.max_session_seconds,
            allow_rsv=extensions,
            owner=self,
            ticker=self.context.ticker,
            ping_interval=config.ping_interval_seconds,
            ping_timeout=config.ping_timeout_seconds,
            target_ping_interval=config.target_ping_interval_seconds,
        )
        self.relay = relay
        self.phase = Phase.DATA
        if client_rest or self.client.held:
            # The relay counts these bytes again.
            self.handshake_bytes_in -= len(client_rest) + len(self.client.held)
        relay.start(to_target=client_rest, to_client=response_rest)
        if self.draining and not relay.done:
            relay.drain(self.drain_remaining())

    def drain_relay(self, timeout: float) -> None:
        if isinstance(self.relay, WebSocketRelay):
            self.relay.drain(timeout)

    def revoke(self) -> None:
        if isinstance(self.relay, WebSocketRelay):
            # 1008 policy violation to the client, as API Gateway does for a revoked identity.
            self.relay.request_close(
                client_code=CLOSE_POLICY_VIOLATION,
                target_code=CLOSE_GOING_AWAY,
                at=Boundary.FRAME,
                reason=Reason.SESSION_REVOKED,
                timeout=2.0,
            )
        else:
            super().revoke()

    def live_counts(self) -> LiveCounts:
        counts = super().live_counts()
        relay = self.relay
        if isinstance(relay, WebSocketRelay):
            session = relay.session
            inbound, outbound = session.to_target.tracker, session.to_client.tracker
            counts.messages_in, counts.messages_out = inbound.messages, outbound.messages
            counts.frames_in, counts.frames_out = inbound.frames, outbound.frames
        return counts

    def relay_done(self, relay: Relay) -> None:
        if isinstance(relay, WebSocketRelay):
            self.close_code = relay.session.close_code
            self.context.count_session(relay)
        super().relay_done(relay)
