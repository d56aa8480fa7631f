"""API mode (``api = "NAME"``): the proxy ends the client's WebSocket and serves a WebSocket API.

Order of work for one connection (DESIGN.md, "The WebSocket API mode"):
1. read and validate the Upgrade as the tunnel does (head limits, RFC 6455 §4.2.1);
2. call the ``$connect`` integration, if the API has one, before any answer: a non-2xx status
   goes to the client instead of a 101, a 2xx may pick the subprotocol and name the user and
   groups of the connection;
3. answer 101 through the ``websockets`` sans-I/O protocol (permessage-deflate negotiated,
   bounded inflation), register the connection, and from then on feed it every byte;
4. each whole message is routed by its JSON field to an integration; at most
   ``max_in_flight_per_connection`` calls at once, reading paused at the limit;
5. the end, whatever its cause, unregisters the connection and calls ``$disconnect`` in the
   background.

The WebSocket protocol is ``websockets``' ``ServerProtocol`` rather than our frame code: it is
the well-kept, Autobahn-clean implementation (UTF-8 of Close reasons, permessage-deflate with a
bound on inflated size, the close handshake), and an API connection's CPU goes to its integration
calls, not to framing. The tunnel's hot path does not use it.
"""

from __future__ import annotations

import asyncio
import codecs
import datetime as dt
import json
import logging
import time
from collections import Counter, deque
from http import HTTPStatus
from typing import Any

from websockets.exceptions import PayloadTooBig
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from wsproxy.api.api import Api
from wsproxy.api.integration import Answer
from wsproxy.api.registry import (
    MAX_GROUPS_PER_CONNECTION,
    Delivery,
    Prepared,
    is_text,
    valid_name,
    valid_text,
)
from wsproxy.errors import (
    ApiError,
    BadRequest,
    BadTargetResponse,
    HttpError,
    IntegrationFailed,
    NoTargets,
    Reason,
    TargetHandshakeTimeout,
    UpgradeRequired,
)
from wsproxy.flows.context import FlowContext
from wsproxy.flows.websocket import WebSocketFlow
from wsproxy.ops.logs import connection_logging, log_connection
from wsproxy.ops.metrics import LiveCounts
from wsproxy.ops.termination import Phase
from wsproxy.wire.cloudevents import (
    CONNECT,
    DISCONNECT,
    MESSAGE,
    connection_headers,
    format_time,
)
from wsproxy.wire.http1 import HeadBuffer, ResponseHead, serialize_response_head
from wsproxy.wire.route_selection import (
    CONNECT_ROUTE,
    DISCONNECT_ROUTE,
    select_route,
)
from wsproxy.wire.upgrade import validate_upgrade_request, wants_upgrade
from wsproxy.wire.websocket_server import ApiServerProtocol
from wsproxy.wire.wssession import FrameBudget, TokenBucket, frame_limit

log = logging.getLogger(__name__)
_QUIET = logging.getLogger("wsproxy.api.websockets")  # websockets' own per-frame debug lines
_QUIET.setLevel(logging.WARNING)

# Request headers $connect sees (lower case); others may carry what the integration must not see.
CONNECT_HEADERS = ("origin", "user-agent", "authorization", "cookie", "sec-websocket-protocol")
# The largest part of a refusing $connect answer the client gets.
MAX_REFUSAL_BODY = 4096
# A connection with permessage-deflate is parsed this many wire bytes at a time, so the messages
# one slice can inflate into (deflate expands ~1000x at most) bound what waits for a slot.
INFLATED_SLICE_BYTES = 1024
# Time for the client to answer our Close before its socket is cut (RFC 6455 §7.1.1).
CLOSE_TIMEOUT_SECONDS = 5.0
MAX_USER_LENGTH = 128
_CLOSE_REASONS = {
    1002: Reason.WS_PROTOCOL_ERROR,
    1007: Reason.WS_INVALID_UTF8,
    1009: Reason.WS_MESSAGE_TOO_LARGE,
}


_ERROR_TEXT = {
    ApiError.NO_ROUTE: "no route for the message",
    ApiError.INTEGRATION_ERROR: "integration error",
    ApiError.INTEGRATION_TIMEOUT: "integration timed out",
    ApiError.UNAVAILABLE: "integration unavailable",
    ApiError.THROTTLED: "too many requests",
}


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _iso(timestamp: float) -> str:
    """A Unix time as RFC 3339 UTC with milliseconds, as ``ce-time`` is written."""
    return format_time(dt.datetime.fromtimestamp(timestamp, dt.UTC))


class ConnectRefused(HttpError):
    """$connect answered non-2xx: the client gets that status and (part of) that body."""

    reason = Reason.CONNECT_REJECTED

    def __init__(self, answer: Answer) -> None:
        super().__init__(f"$connect answered {answer.status}")
        self.answer = answer

    @property
    def status(self) -> int:
        return self.answer.status


def message_content_type(payload: bytes, text: bool) -> str:
    """The Content-Type of a message's integration call."""
    if not text:
        return "application/octet-stream"
    stripped = payload.lstrip()[:1]
    return "application/json" if stripped in (b"{", b"[") else "text/plain; charset=utf-8"


class ApiFlow(WebSocketFlow):
    """One client connection of a WebSocket API (``api = "NAME"``)."""

    __slots__ = (
        "_close_timer",
        "_decoder",
        "_end",
        "_fragments",
        "_fragments_text",
        "_frame_budget",
        "_frames",
        "_heard",
        "_held",
        "_in_flight",
        "_messages",
        "_pending",
        "_pending_bytes",
        "_ping_deadline",
        "_session_timer",
        "_throttle",
        "_tick",
        "api",
        "ce_headers",
        "connected_at",
        "connection_id",
        "groups",
        "last_active",
        "protocol",
        "route_counts",
        "user",
        "wall_connected_at",
    )

    def __init__(self, context: FlowContext) -> None:
        super().__init__(context)
        api = context.api
        if api is None:
            raise RuntimeError(f"listener '{context.name}' has no API")
        self.api: Api = api
        self.connection_id = ""
        self.ce_headers: tuple[tuple[str, str], ...] = ()
        self.user: str | None = None
        self.groups: set[str] = set()
        self.protocol: ServerProtocol | None = None
        self.connected_at = 0.0
        self.wall_connected_at = 0.0
        self.last_active = 0.0
        self.route_counts: Counter[str] = Counter()
        self._pending: deque[tuple[str, bytes, bool]] = deque()
        self._pending_bytes = 0
        # Client bytes read but not yet given to the protocol: while messages wait for an
        # integration slot, parsing (and inflating) more would hold them without bound.
        self._held = b""
        self._heard = 0.0  # when the client last sent anything (keepalive)
        self._in_flight = 0
        self._fragments: list[bytes] = []
        self._fragments_text = False
        self._decoder: codecs.IncrementalDecoder | None = None
        self._end: Reason | None = None  # why we ended it, when we did
        self._tick: asyncio.TimerHandle | None = None
        self._session_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._ping_deadline = 0.0
        # The listener's rate limits: messages over max_messages_per_second get a `throttled`
        # error (the connection stays, as API Gateway's throttling); frames over
        # max_frames_per_second end it with 1008, as on tunnel listeners.
        config = context.config
        self._throttle = (
            TokenBucket(config.max_messages_per_second, config.messages_burst)
            if config.max_messages_per_second
            else None
        )
        self._messages = 0
        self._frame_budget = (
            FrameBudget(
                frame_limit(config.max_frames_per_second, config.frames_burst), self.loop.time()
            )
            if config.max_frames_per_second
            else None
        )
        self._frames = 0

    # --- 1. request head and $connect -----------------------------------------------------------

    def fail(self, exc: HttpError) -> bool:
        if not isinstance(exc, ConnectRefused):
            return super().fail(exc)
        self.status = exc.status
        answer = exc.answer
        body = answer.body[:MAX_REFUSAL_BODY]
        phrase = _phrase(exc.status)
        headers = [
            ("Content-Type", answer.content_type or "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        response = serialize_response_head(
            ResponseHead("HTTP/1.1", exc.status, phrase, tuple(headers))
        )
        self.handshake_bytes_out += len(response) + len(body)
        self.client.write(response + body)
        return True

    async def _run(
        self, buffer: HeadBuffer, head_read: asyncio.Future[tuple[bytes, bytes]]
    ) -> None:
        raw_head, rest = await self._read_request_head(buffer, head_read)
        del buffer, head_read
        head, target, _host = self._parse_head(raw_head)
        if not wants_upgrade(head):
            raise UpgradeRequired(
                f"listener '{self.context.name}' serves the WebSocket API '{self.api.name}'; "
                "connect with a WebSocket client"
            )
        validate_upgrade_request(head)
        api = self.api
        config = api.config
        self.connection_id = api.ids.new()
        cert = self.client_cert
        self.ce_headers = connection_headers(
            api.name,
            self.connection_id,
            self.client_ip,
            cert.subject if cert is not None else None,
            cert.fingerprint_sha256 if cert is not None else None,
        )
        offered = [
            p.strip()
            for value in head.get_all("sec-websocket-protocol")
            for p in value.split(",")
            if p.strip()
        ]
        chosen = await self._connect(head.headers, target.path, target.query, offered)
        protocol = ApiServerProtocol(
            extensions=[ServerPerMessageDeflateFactory()],
            select_subprotocol=lambda _protocol, _offered: chosen,
            max_size=(config.max_message_bytes, config.max_frame_bytes),
            logger=_QUIET,
        )
        # The protocol reads the head itself (its parser then goes on to frames); ours has
        # already refused every head it would stumble on.
        protocol.receive_data(raw_head)
        events = protocol.events_received()
        if len(events) != 1 or not isinstance(events[0], Request):
            raise BadRequest(f"the upgrade request cannot be read: {protocol.handshake_exc}")
        response = protocol.accept(events[0])
        if response.status_code != 101:  # validate_upgrade_request refused these already
            raise BadRequest(f"the upgrade was refused: {response.reason_phrase}")
        if "Server" in response.headers:
            del response.headers["Server"]  # no version banner for scanners
        protocol.send_response(response)
        self.protocol = protocol
        self.status = 101
        self._open(rest)

    async def _connect(
        self,
        headers: Any,
        path: str,
        query: str | None,
        offered: list[str],
    ) -> Subprotocol | None:
        """Call $connect, if the API has it: the subprotocol it chose (one the client offered),
        and the connection's user and groups from its answer."""
        route = self.api.route(CONNECT_ROUTE)
        if route is None:
            return None
        selected = {
            name.lower(): value for name, value in headers if name.lower() in CONNECT_HEADERS
        }
        body = json.dumps(
            {
                "connectionId": self.connection_id,
                "path": path,
                "query": query or "",
                "headers": selected,
                "sourceIp": self.client_ip,
                "identity": self._identity(),
            },
            separators=(",", ":"),
        ).encode()
        self.phase = Phase.UPGRADE
        try:
            answer = await self.api.call(
                route, CONNECT, self, Api.request_id(), body, "application/json"
            )
        except IntegrationFailed as exc:
            log.info("listener '%s': $connect of %s: %s", self.context.name, self.client_ip, exc)
            if exc.error is ApiError.INTEGRATION_TIMEOUT:
                raise TargetHandshakeTimeout(str(exc)) from None
            if exc.error is ApiError.UNAVAILABLE:
                raise NoTargets(str(exc)) from None
            raise BadTargetResponse(str(exc)) from None
        if not 200 <= answer.status < 300:
            self.api.count_error(CONNECT_ROUTE, ApiError.INTEGRATION_ERROR)
            raise ConnectRefused(answer)
        chosen = answer.headers.get("sec-websocket-protocol")
        if chosen is not None and chosen not in offered:
            self.api.count_error(CONNECT_ROUTE, ApiError.INTEGRATION_ERROR)
            raise BadTargetResponse(
                f"$connect chose subprotocol {chosen[:64]!r}, which the client did not offer "
                f"({', '.join(offered) or 'none'})"
            )
        self._take_identity(answer)
        return Subprotocol(chosen) if chosen is not None else None

    def _take_identity(self, answer: Answer) -> None:
        """``{"user": "...", "groups": [...]}`` in a JSON answer names who this is."""
        if not answer.body or not (answer.content_type or "").startswith("application/json"):
            return
        try:
            value = json.loads(answer.body)
        except (ValueError, RecursionError):
            raise BadTargetResponse("$connect answered JSON that does not parse") from None
        if not isinstance(value, dict):
            return
        user, groups = value.get("user"), value.get("groups", [])
        if user is not None and not (isinstance(user, str) and valid_name(user)):
            raise BadTargetResponse("$connect answered a 'user' that is not a name")
        if not isinstance(groups, list) or not all(
            isinstance(g, str) and valid_name(g) for g in groups
        ):
            raise BadTargetResponse("$connect answered 'groups' that are not a list of names")
        if len(groups) > MAX_GROUPS_PER_CONNECTION:
            raise BadTargetResponse(
                f"$connect answered {len(groups)} groups; a connection joins at most "
                f"{MAX_GROUPS_PER_CONNECTION}"
            )
        self.user = user
        self.groups = set(groups)

    def _identity(self) -> dict[str, Any] | None:
        cert = self.client_cert
        if cert is None:
            return None
        return {"subject": cert.subject, "fingerprint": cert.fingerprint_sha256}

    # --- 2. the open connection -----------------------------------------------------------------

    def _open(self, rest: bytes) -> None:
        client = self.client
        if client.lost:
            raise asyncio.CancelledError  # the client left during $connect
        self.task = None
        self.phase = Phase.DATA
        now = self.loop.time()
        self.connected_at = self.last_active = self._heard = now
        self.wall_connected_at = time.time()
        self.api.registry.add(self)
        self.api.stats.connections += 1
        callbacks = client.callbacks
        callbacks.on_eof = self._client_eof
        callbacks.on_lost = self._client_lost
        client.on_data = self._data
        self._flush()
        self._arm_tick()
        limit = self.api.config.max_session_seconds
        if limit > 0:
            self._session_timer = self.loop.call_later(limit, self._session_expired)
        held = rest + client.take_held()
        if self.draining:
            self.close_by_proxy(1001, "going away", Reason.DRAINING)
        elif held:
            self._feed(held)
        self._release()

    def _data(self, data: bytes) -> None:
        protocol = self.protocol
        if protocol is None or self.finished:
            return
        self.handshake_bytes_in += len(data)
        self._heard = self.loop.time()
        if self._held or self._holding():
            self._held += data  # at most what arrives before the pause takes effect
            self.client.pause_reading()
            return
        self._feed(data)

    def _holding(self) -> bool:
        """Whether client bytes must wait unparsed: messages are waiting for an integration
        slot (and the connection is not closing, when its Close must be read)."""
        return self._end is None and bool(self._pending)

    def _feed(self, data: bytes) -> None:
        """Give ``data`` to the protocol, in slices when it inflates messages, and keep what
        is left once a message has to wait: a compressed read could otherwise inflate into a
        thousand messages held at once (up to ~1000x its size)."""
        protocol = self.protocol
        if protocol is None:
            return
        step = INFLATED_SLICE_BYTES if protocol.extensions else len(data) or 1
        for start in range(0, len(data), step):
            protocol.receive_data(data[start : start + step])
            if not self._events(protocol):
                break
            if self._holding():
                self._held = data[start + step :] + self._held
                self.client.pause_reading()
                break
        self._flush()

    def _events(self, protocol: ServerProtocol) -> bool:
        """Handle what the protocol parsed; False once the connection failed."""
        events = protocol.events_received()
        budget = self._frame_budget
        if budget is not None and events:
            self._frames += len(events)
            if self._frames > budget.free_until() and budget.spend(self._frames, self._heard):
                self._end = Reason.FRAME_RATE_EXCEEDED
                protocol.fail(1008, "frame rate exceeded")
                return False
        for event in events:
            if isinstance(event, Frame):
                self._frame(event)
        return True

    def _release(self) -> None:
        """A slot freed (or the connection is closing): parse what was held, then read on."""
        if self.finished:
            return
        if self._held and not self._holding():
            held, self._held = self._held, b""
            self._feed(held)
        closing = self._end is not None  # its Close must be read, whatever is in flight
        if not self._held and (
            closing or self._in_flight < self.api.config.max_in_flight_per_connection
        ):
            self.client.resume_reading()

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        data = frame.data if isinstance(frame.data, bytes) else bytes(frame.data)
        if opcode is not Opcode.PING and opcode is not Opcode.PONG:
            self.last_active = self._heard  # data, not keepalive, keeps a connection from idling
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            text = opcode is Opcode.TEXT
            if frame.fin:
                if text and not valid_text(data):
                    self._invalid_utf8()
                    return
                self._message(data, text)
                return
            self._fragments = [data]
            self._fragments_text = text
            if text:
                self._decoder = codecs.getincrementaldecoder("utf-8")()
                self._check_fragment(data, final=False)
        elif opcode is Opcode.CONT:
            self._fragments.append(data)
            if self._fragments_text and not self._check_fragment(data, frame.fin):
                return
            if frame.fin:
                payload = b"".join(self._fragments)
                self._fragments = []
                self._decoder = None
                self._message(payload, self._fragments_text)
        elif opcode is Opcode.PONG:
            self._ping_deadline = 0.0
        # Ping: websockets queued the Pong. Close: it answered, and _flush ends the connection.

    def _check_fragment(self, data: bytes, final: bool) -> bool:
        """Fail fast on invalid UTF-8 in a fragmented text message (Autobahn 6.4)."""
        decoder = self._decoder
        if decoder is None:
            return True
        try:
            decoder.decode(data, final)
        except UnicodeDecodeError:
            self._invalid_utf8()
            return False
        return True

    def _invalid_utf8(self) -> None:
        protocol = self.protocol
        if protocol is not None:
            self._end = Reason.WS_INVALID_UTF8
            protocol.fail(1007, "invalid UTF-8 in a text message")

    def _message(self, payload: bytes, text: bool) -> None:
        api = self.api
        if self._end is not None:
            return  # closing: messages still arriving are not routed
        key = select_route(payload, api.fields, api.route_keys)
        self.route_counts[key] += 1
        api.stats.messages[(key, "in")] += 1
        throttle = self._throttle
        if throttle is not None:
            self._messages += 1
            if throttle.spend(self._messages, self.loop.time()):
                api.count_error(key, ApiError.THROTTLED)
                self._send_error(
                    ApiError.THROTTLED, Api.request_id(), _ERROR_TEXT[ApiError.THROTTLED]
                )
                return
        self._pending.append((key, payload, text))
        self._pending_bytes += len(payload)
        self._pump()

    def _pump(self) -> None:
        limit = self.api.config.max_in_flight_per_connection
        while self._pending and self._in_flight < limit:
            key, payload, text = self._pending.popleft()
            self._pending_bytes -= len(payload)
            route = self.api.route(key)
            if route is None:
                self.api.count_error(key, ApiError.NO_ROUTE)
                self._send_error(ApiError.NO_ROUTE, Api.request_id(), "no route for the message")
                continue
            self._in_flight += 1
            self.context.spawn(self._deliver(key, payload, text))
        if self._in_flight >= limit and self._end is None:
            self.client.pause_reading()  # at the limit: the client's bytes wait in the kernel

    async def _deliver(self, key: str, payload: bytes, text: bool) -> None:
        api = self.api
        request_id = api.request_id()
        try:
            route = api.route(key)
            if route is None:  # removed by a reload meanwhile
                api.count_error(key, ApiError.NO_ROUTE)
                self._send_error(ApiError.NO_ROUTE, request_id, "no route for the message")
                return
            content_type = message_content_type(payload, text)
            try:
                answer = await api.call(route, MESSAGE, self, request_id, payload, content_type)
            except IntegrationFailed as exc:
                log.info("api '%s' route '%s' (%s): %s", api.name, key, self.connection_id, exc)
                self._send_error(exc.error, request_id, _ERROR_TEXT[exc.error])
                return
            if not 200 <= answer.status < 300:
                api.count_error(key, ApiError.INTEGRATION_ERROR)
                log.info("api '%s' route '%s' (%s): integration answered %d",
                         api.name, key, self.connection_id, answer.status)  # fmt: skip
                self._send_error(ApiError.INTEGRATION_ERROR, request_id, "integration error")
                return
            # A 2xx body is the response, an empty one too (an empty message); 204 says none.
            if not route.respond or answer.status == 204:
                return
            text = is_text(answer.content_type)
            if text and not valid_text(answer.body):
                api.count_error(key, ApiError.INTEGRATION_ERROR)
                log.info("api '%s' route '%s' (%s): a text answer that is not UTF-8",
                         api.name, key, self.connection_id)  # fmt: skip
                self._send_error(ApiError.INTEGRATION_ERROR, request_id, "integration error")
                return
            if self.send_message(answer.body, text) is Delivery.QUEUED:
                api.stats.messages[(key, "out")] += 1
        except Exception:  # connection boundary: this message fails, the connection stays
            log.exception("api '%s': unexpected error in an integration call", api.name)
            self._send_error(ApiError.INTEGRATION_ERROR, request_id, "integration error")
        finally:
            self._in_flight -= 1
            if not self.finished:
                self._pump()
                self._release()

    def _send_error(self, error: ApiError, request_id: str, message: str) -> None:
        body = json.dumps(
            {
                "message": message,
                "error": error.value,
                "connectionId": self.connection_id,
                "requestId": request_id,
            },
            separators=(",", ":"),
        ).encode()
        self.send_message(body, True)

    # --- what management calls do (registry.ApiConnection) --------------------------------------

    def send_message(self, data: bytes, text: bool) -> Delivery:
        return self.send_prepared(Prepared(data, text))

    def send_prepared(self, message: Prepared) -> Delivery:
        protocol = self.protocol
        transport = self.client.transport
        if (
            protocol is None
            or self.finished
            or self._end is not None
            or protocol.state is not State.OPEN
            or transport is None
            or transport.is_closing()
        ):
            return Delivery.GONE
        if transport.get_write_buffer_size() > self.api.config.max_send_buffer_bytes:
            return Delivery.SLOW
        self.last_active = self.loop.time()
        if protocol.extensions:  # compressed for this connection by its protocol
            if message.text:
                protocol.send_text(message.data)
            else:
                protocol.send_binary(message.data)
            self._flush()
            return Delivery.QUEUED
        frame = message.frame  # a plain frame: the same bytes for every member of a group
        self.handshake_bytes_out += len(frame)
        transport.write(frame)
        return Delivery.QUEUED

    def close_by_api(self, code: int, reason: str) -> bool:
        """DELETE /@connections/{id}: a Close with ``code``; False when already closing."""
        protocol = self.protocol
        if self._end is not None or self.finished or protocol is None:
            return False
        if protocol.state is not State.OPEN:
            return False  # the client's own Close is under way
        self.close_by_proxy(code, reason, Reason.CLOSED_BY_API)
        return True

    def info(self) -> dict[str, Any]:
        return {
            "connectionId": self.connection_id,
            "api": self.api.name,
            "listener": self.context.name,
            "connectedAt": _iso(self.wall_connected_at),
            "lastActiveAt": _iso(self.wall_connected_at + self.last_active - self.connected_at),
            "sourceIp": self.client_ip,
            "identity": self._identity(),
            "user": self.user,
            "groups": sorted(self.groups),
        }

    # --- the end --------------------------------------------------------------------------------

    def close_by_proxy(self, code: int, reason: str, why: Reason) -> None:
        """Send a Close (at a message boundary: we only ever send whole messages) and give the
        client ``CLOSE_TIMEOUT_SECONDS`` to answer."""
        protocol = self.protocol
        if protocol is None or self._end is not None or self.finished:
            return
        self._end = why
        # Messages still waiting are not sent on; what was held is read now, for the Close.
        self._pending.clear()
        self._pending_bytes = 0
        if protocol.state is State.OPEN:
            protocol.send_close(code, reason)
            self._flush()
        self._release()
        if not self.finished and self._close_timer is None:
            self._close_timer = self.loop.call_later(CLOSE_TIMEOUT_SECONDS, self._close_expired)

    def _close_expired(self) -> None:
        self._close_timer = None
        protocol = self.protocol
        answered = protocol is not None and protocol.close_rcvd is not None
        if self._end is None and not answered:
            self._end = Reason.CLOSE_TIMEOUT  # our Close was never answered
        self.client.abort()

    def _flush(self) -> None:
        protocol = self.protocol
        if protocol is None:
            return
        client = self.client
        for chunk in protocol.data_to_send():
            if chunk:
                self.handshake_bytes_out += len(chunk)
                client.write(chunk)
            else:  # websockets' "close the connection now" (after the close handshake)
                self._shut()
        if protocol.state is State.CLOSED and client.open:
            self._shut()

    def _shut(self) -> None:
        """End our side without losing what we wrote last: closing a socket with unread input
        makes the kernel send RST, which can destroy our Close before the client reads it
        (a client that is still sending: a flood, a message on its way). So unless the client
        has sent its Close, send FIN, read and discard until the client's own FIN (RFC 6455
        §7.1.1: the client closes once the server has), and cut it after
        ``CLOSE_TIMEOUT_SECONDS``."""
        client = self.client
        protocol = self.protocol
        if protocol is not None and protocol.close_rcvd is not None:
            client.close()  # the client sent its Close, and nothing may follow it (§5.5.1)
            return
        if self._close_timer is None:
            self._close_timer = self.loop.call_later(CLOSE_TIMEOUT_SECONDS, self._close_expired)
        if not client.write_eof():  # TLS cannot half-close: close (close_notify) now
            client.close()

    def _client_eof(self) -> bool:
        protocol = self.protocol
        if protocol is not None:
            protocol.receive_eof()
            self._flush()
        return False  # asyncio closes the transport

    def _client_lost(self, exc: Exception | None) -> None:
        self.finish(self._reason(exc))

    def _reason(self, exc: Exception | None) -> Reason:
        if self._end is not None:
            return self._end
        protocol = self.protocol
        if protocol is not None:
            sent = protocol.close_sent
            if sent is not None and sent.code in _CLOSE_REASONS and protocol.close_rcvd is None:
                failure = protocol.parser_exc
                if isinstance(failure, PayloadTooBig) and failure.message is None:
                    size = failure.size
                    if size is not None and size > self.api.config.max_frame_bytes:
                        return Reason.WS_FRAME_TOO_LARGE  # one frame alone is over the limit
                return _CLOSE_REASONS[sent.code]
            if protocol.close_rcvd is not None:
                return Reason.CLOSED
        return Reason.CLIENT_RESET if exc is not None else Reason.CLIENT_CLOSED

    def _arm_tick(self) -> None:
        interval = self.context.config.ping_interval_seconds or self.api.config.idle_timeout_seconds
        interval = min(interval, self.api.config.idle_timeout_seconds)
        self._tick = self.loop.call_later(interval, self._on_tick)

    def _on_tick(self) -> None:
        """Idle, keepalive and pong checks, once per interval (no timer per message)."""
        self._tick = None
        if self.finished or self._end is not None:
            return
        now = self.loop.time()
        busy = self._in_flight > 0  # a call under way: not idle, and not reading its answers
        if not busy and now - self.last_active >= self.api.config.idle_timeout_seconds:
            self.close_by_proxy(1001, "idle timeout", Reason.IDLE_TIMEOUT)
            return
        if busy or self._held:
            self._ping_deadline = 0.0  # reading is paused: a Pong could not be read
            self._arm_tick()
            return
        if self._ping_deadline and now >= self._ping_deadline:
            self._end = Reason.PING_TIMEOUT
            self.client.abort()
            return
        interval = self.context.config.ping_interval_seconds
        protocol = self.protocol
        silent = now - self._heard
        if interval and protocol is not None and not self._ping_deadline and silent >= interval:
            protocol.send_ping(b"wsproxy")
            self._ping_deadline = now + self.context.config.ping_timeout_seconds
            self._flush()
        self._arm_tick()

    def _session_expired(self) -> None:
        self._session_timer = None
        self.close_by_proxy(1001, "session lifetime reached", Reason.MAX_SESSION_DURATION)

    def drain_relay(self, timeout: float) -> None:
        if self.protocol is not None and self.phase is Phase.DATA:
            self.close_by_proxy(1001, "going away", Reason.DRAINING)
            self.loop.call_later(timeout, self.client.abort)

    def revoke(self) -> None:
        log.info("listener '%s': closing %s: client certificate revoked",
                 self.context.name, self.client_ip)  # fmt: skip
        if self.protocol is not None and self.phase is Phase.DATA:
            self.close_by_proxy(1008, "client certificate revoked", Reason.SESSION_REVOKED)
        else:
            self.client.abort()

    def abort(self) -> None:
        if self._end is None:
            self._end = Reason.SHUTDOWN
        self.client.abort()

    def live_counts(self) -> LiveCounts:
        return LiveCounts(None, self.handshake_bytes_in, self.handshake_bytes_out)

    def finish(self, reason: Reason) -> None:
        if self.finished:
            return
        self.finished = True
        for timer in (self._tick, self._session_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._pending.clear()
        opened = self.phase is Phase.DATA and self.protocol is not None
        if self.ip_admitted is not None:
            self.context.release_ip(self.ip_admitted)
        protocol = self.protocol
        if protocol is not None:
            sent, received = protocol.close_sent, protocol.close_rcvd
            close = received or sent
            self.close_code = close.code if close is not None else 1006
        session = self.loop.time() - self.started if opened else None
        bytes_in, bytes_out = self.handshake_bytes_in, self.handshake_bytes_out
        self.context.finished(self, reason, bytes_in, bytes_out, session)
        if opened:
            api = self.api
            api.registry.remove(self)
            api.stats.connections -= 1
            route = api.route(DISCONNECT_ROUTE)
            if route is not None:
                api.spawn_disconnect(self._disconnect(reason))
        if connection_logging():
            log_connection(self.log_record(bytes_in, bytes_out, reason))

    async def _disconnect(self, reason: Reason) -> None:
        """Best-effort: the client's socket is already closed; a failure is logged and counted
        (by ``Api.call``)."""
        api = self.api
        route = api.route(DISCONNECT_ROUTE)
        if route is None:
            return
        protocol = self.protocol
        received = protocol.close_rcvd if protocol is not None else None
        sent = protocol.close_sent if protocol is not None else None
        close = received or sent
        if received is not None and (
            sent is None or bool(protocol and protocol.close_rcvd_then_sent)
        ):
            by = "client"
        elif sent is not None:
            by = "proxy"
        else:
            by = "none"  # the connection was cut without a Close
        body = json.dumps(
            {
                "connectionId": self.connection_id,
                "closeCode": close.code if close is not None else 1006,
                "reason": close.reason if close is not None else "",
                "closedBy": by,
                "cause": reason.value,
            },
            separators=(",", ":"),
        ).encode()
        try:
            answer = await api.call(
                route, DISCONNECT, self, Api.request_id(), body, "application/json"
            )
        except IntegrationFailed as exc:
            log.info("api '%s': $disconnect of %s failed: %s", api.name, self.connection_id, exc)
            return
        if not 200 <= answer.status < 300:
            api.count_error(DISCONNECT_ROUTE, ApiError.INTEGRATION_ERROR)
            log.info("api '%s': $disconnect of %s answered %d",
                     api.name, self.connection_id, answer.status)  # fmt: skip

    def log_record(self, bytes_in: int, bytes_out: int, reason: Reason) -> dict[str, Any]:
        record = super().log_record(bytes_in, bytes_out, reason)
        record["api"] = self.api.name
        record["connection_id"] = self.connection_id or None
        record["routes"] = dict(self.route_counts)
        return record
