"""The relay after a WebSocket upgrade: bytes still flow untouched, but frame headers are tracked.

Tracking lets the proxy refuse a frame over ``max_frame_bytes`` or an unmasked client frame before
any byte of it is forwarded, count messages, and close a session cleanly: a Close frame of the
proxy's own is injected into each direction only at a boundary (a message boundary when draining,
any frame boundary after a violation), after which that direction's data is discarded while the
proxy waits, within a deadline, for each side to answer with its own Close.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from wsproxy.errors import FrameError, Reason
from wsproxy.relay.relay import Endpoint, Relay, RelayOwner
from wsproxy.relay.ticker import Ticker
from wsproxy.wire.wsframe import (
    CLOSE_BAD_GATEWAY,
    CLOSE_GOING_AWAY,
    CLOSE_POLICY_VIOLATION,
    OP_PING,
    STOP_FRAME,
    STOP_MESSAGE,
    STOP_NONE,
    STOP_PONG,
    FrameTracker,
    encode_close,
    encode_frame,
    parse_header,
    unmask,
)

# How long the proxy waits for both sides to answer its Close before it closes the sockets
# (the websockets library's default close_timeout is 10 s; a proxy should be quicker).
CLOSE_TIMEOUT_SECONDS = 5.0


class _Direction:
    """One direction of the session: its tracker, the Close the proxy wants to inject into it,
    and the sending endpoint's ``on_data`` (calling it forwards bytes toward ``sink``)."""

    __slots__ = (
        "close_frame",
        "closes_at_send",
        "ping_due",
        "ping_interval",
        "ping_mark",
        "ping_payload",
        "pong_buf",
        "rate_limited",
        "received",
        "relay",
        "sent",
        "sink",
        "stop",
        "tracker",
    )

    def __init__(self, relay: WebSocketRelay, tracker: FrameTracker, sink: Endpoint) -> None:
        self.relay = relay
        self.tracker = tracker
        self.sink = sink
        self.received = 0  # bytes the sender sent this way (log line, idle check, keepalive)
        # Keepalive of the sender (RFC 6455 §5.5.2), whose pongs come this way: when it has sent
        # nothing for ``ping_interval`` seconds it is pinged; no pong in time ends the session.
        self.ping_interval = 0.0  # 0: off
        self.ping_due = 0.0  # loop time of the next silence check, or of the pong's deadline
        self.ping_mark = -1  # ``received`` at the last check
        self.ping_payload: bytes | None = None  # our ping that awaits its pong
        self.pong_buf = b""  # a Pong frame split across reads, while pongs are filtered
        self.rate_limited = False  # the sender's messages are charged to the rate limit
        self.close_frame = b""
        self.stop = STOP_NONE  # set while a Close waits for a boundary
        self.sent = False  # a Close (ours or the sender's own) has gone out in this direction
        self.closes_at_send = 0

    def __call__(self, data: bytes) -> None:
        self.received += len(data)
        relay = self.relay
        if self.ping_payload is not None or self.pong_buf:
            relay._forward_filtering_pongs(self, data)
        else:
            relay._forward(self, data)
        if self.rate_limited:
            relay._spend_tokens()

    def at(self, stop: int) -> bool:
        tracker = self.tracker
        return tracker.at_frame_boundary if stop == STOP_FRAME else tracker.at_message_boundary


class WebSocketRelay(Relay):
    """A ``Relay`` that follows frames in both directions (RFC 6455 §5)."""

    __slots__ = (
        "_burst",
        "_close_deadline",
        "_failing",
        "_mask_key",
        "_ping_timeout",
        "_rate",
        "_rate_counted",
        "_rate_mark",
        "_session_seconds",
        "_session_timer",
        "_tokens",
        "close_code",
        "close_initiator",
        "pings_sent",
        "to_client",
        "to_target",
    )

    def __init__(
        self,
        client: Endpoint,
        target: Endpoint,
        *,
        idle_timeout: float,
        max_frame_bytes: int,
        owner: RelayOwner,
        ticker: Ticker,
        ping_interval: float = 0.0,
        ping_timeout: float = 30.0,
        target_ping_interval: float = 0.0,
        mask_key: Callable[[], bytes] = lambda: os.urandom(4),
        max_message_bytes: int = 0,
        max_messages_per_second: float = 0.0,
        messages_burst: int = 0,
        max_session_seconds: float = 0.0,
        allow_rsv: bool = False,
    ) -> None:
        super().__init__(client, target, idle_timeout=idle_timeout, owner=owner, ticker=ticker)
        self._ping_timeout = ping_timeout
        self.pings_sent = 0
        # client → target frames must be masked; target → client frames must not be.
        self.to_target = _Direction(
            self,
            FrameTracker(
                masked=True,
                max_frame_bytes=max_frame_bytes,
                max_message_bytes=max_message_bytes,
                allow_rsv=allow_rsv,
            ),
            target,
        )
        self.to_client = _Direction(
            self,
            FrameTracker(
                masked=False,
                max_frame_bytes=max_frame_bytes,
                max_message_bytes=max_message_bytes,
                allow_rsv=allow_rsv,
            ),
            client,
        )
        self.to_target.ping_interval = ping_interval
        self.to_client.ping_interval = target_ping_interval
        self.to_target.rate_limited = max_messages_per_second > 0
        # Client message rate: a token bucket, refilled on each read (nothing runs when off).
        self._rate = max_messages_per_second
        self._burst = float(messages_burst or max(1.0, max_messages_per_second))
        self._tokens = self._burst
        self._rate_mark = 0.0
        self._rate_counted = 0
        self._session_seconds = max_session_seconds
        self._session_timer: asyncio.TimerHandle | None = None
        self.close_code: int | None = None
        self.close_initiator: str | None = None
        self._mask_key = mask_key
        self._close_deadline: asyncio.TimerHandle | None = None
        # After a violation the connection is failed (RFC 6455 §7.1.7): Close, then close the
        # socket without waiting for an answer.
        self._failing = False

    # --- hot path -------------------------------------------------------------------------------

    @property
    def bytes_in(self) -> int:
        return self.to_target.received

    @property
    def bytes_out(self) -> int:
        return self.to_client.received

    def start(self, to_target: bytes = b"", to_client: bytes = b"") -> None:
        loop = asyncio.get_running_loop()
        now = self._rate_mark = loop.time()
        for direction in (self.to_target, self.to_client):
            direction.ping_due = now + direction.ping_interval
        super().start(to_target, to_client)
        if self._session_seconds > 0 and not self.done:
            self._session_timer = loop.call_later(self._session_seconds, self._session_expired)

    def _route_data(self, client: Endpoint, target: Endpoint) -> None:
        # Every byte goes through a frame tracker (no ``peer``): calling a direction forwards.
        client.on_data = self.to_target
        target.on_data = self.to_client

    def _spend_tokens(self) -> None:
        """Charge the client's new messages to its bucket; over the limit: Close 1008."""
        messages = self.to_target.tracker.messages
        used = messages - self._rate_counted
        if not used or self.to_target.sent:
            return
        self._rate_counted = messages
        now = asyncio.get_running_loop().time()
        self._tokens = min(self._burst, self._tokens + (now - self._rate_mark) * self._rate)
        self._rate_mark = now
        self._tokens -= used
        if self._tokens < 0:
            self.request_close(
                client_code=CLOSE_POLICY_VIOLATION,
                target_code=CLOSE_GOING_AWAY,
                stop=STOP_FRAME,
                reason=Reason.MESSAGE_RATE_EXCEEDED,
            )

    def _session_expired(self) -> None:
        self._session_timer = None
        if not self.done:
            self.request_close(
                client_code=CLOSE_GOING_AWAY,
                target_code=CLOSE_GOING_AWAY,
                stop=STOP_MESSAGE,
                reason=Reason.MAX_SESSION_DURATION,
            )

    def _forward(self, direction: _Direction, data: bytes) -> None:
        sink = direction.sink
        tracker = direction.tracker
        if direction.sent:
            self._watch(direction, data)
            return
        closes = tracker.closes
        try:
            taken = tracker.feed(data, direction.stop)
        except FrameError as exc:
            if exc.offset > 0:
                sink.write(data[: exc.offset])
            self._violation(direction, exc)
            return
        if taken == len(data):
            sink.write(data)
        elif taken:
            sink.write(data[:taken])
        if tracker.closes != closes:
            self._note_peer_close(direction)
        if direction.stop and direction.at(direction.stop):
            self._inject(direction)
            if taken < len(data):
                self._watch(direction, data[taken:])
        if self._close_deadline is not None:  # a call per chunk saved while no Close is pending
            self._check_close_handshake()

    def _forward_filtering_pongs(self, direction: _Direction, data: bytes) -> None:
        """While our ping to one side is outstanding: forward everything that side sends but
        the Pong that answers our ping."""
        sink = direction.sink
        tracker = direction.tracker
        data = direction.pong_buf + data
        direction.pong_buf = b""
        while data:
            if direction.sent or direction.stop:
                self._forward(direction, data)
                return
            closes = tracker.closes
            try:
                taken = tracker.feed(data, STOP_PONG)
            except FrameError as exc:
                if exc.offset > 0:
                    sink.write(data[: exc.offset])
                self._violation(direction, exc)
                return
            if taken:
                sink.write(data[:taken] if taken < len(data) else data)
            if tracker.closes != closes:
                self._note_peer_close(direction)
            if taken == len(data):
                break
            rest = data[taken:]  # a Pong frame starts here
            header = parse_header(rest)
            if header is None or len(rest) < header.header_len + header.payload_len:
                direction.pong_buf = rest  # at most 14 + 125 bytes: wait for the rest of it
                return
            frame = rest[: header.header_len + header.payload_len]
            tracker.feed(frame)
            if unmask(frame[header.header_len :], header.mask_key) == direction.ping_payload:
                self._pong_received(direction)
            else:
                sink.write(frame)  # not ours: the other side may be waiting for it
            data = rest[len(frame) :]
        self._check_close_handshake()

    # --- keepalive (RFC 6455 §5.5.2) ------------------------------------------------------------

    def tick(self) -> None:
        """The relay's one ticker entry: keepalive of both sides, then the idle check."""
        if not self.done and self._close_deadline is None:
            now = self._loop.time()
            for direction in (self.to_target, self.to_client):
                if direction.ping_interval and now >= direction.ping_due:
                    self._keepalive(direction, now)
        super().tick()

    def _next_tick_delay(self) -> float:
        delay = super()._next_tick_delay()
        if self._close_deadline is not None:
            return delay
        now = self._loop.time()
        for direction in (self.to_target, self.to_client):
            if direction.ping_interval:
                delay = min(delay, direction.ping_due - now)
        return max(0.0, delay)

    def _keepalive(self, direction: _Direction, now: float) -> None:
        """Ping a side that sent nothing for its interval; give up on one that did not answer."""
        if direction.ping_payload is not None:
            self._ping_expired(direction)
            return
        direction.ping_due = now + direction.ping_interval
        if direction.received != direction.ping_mark:
            direction.ping_mark = direction.received
            return
        toward = self.to_client if direction is self.to_target else self.to_target
        if toward.sent or not toward.tracker.at_frame_boundary:
            return  # mid-frame toward that side: next time
        payload = direction.ping_payload = b"wsproxy:" + os.urandom(8).hex().encode()
        mask = self._mask_key() if toward is self.to_target else b""  # the target gets masked
        toward.sink.write(encode_frame(OP_PING, payload, mask=mask))
        self.pings_sent += 1
        direction.ping_due = now + self._ping_timeout

    def _pong_received(self, direction: _Direction) -> None:
        direction.ping_payload = None
        direction.ping_mark = direction.received
        direction.ping_due = self._loop.time() + direction.ping_interval
        self._reschedule_tick()  # the tick waiting now is the pong's deadline

    def _ping_expired(self, direction: _Direction) -> None:
        """No pong in time: that side is gone. Tell the other one (1001) and cut it.

        ``direction`` carries what the silent side sends, so it leads to the other side."""
        client_gone = direction is self.to_target
        if client_gone:
            self.set_reason(Reason.PING_TIMEOUT)
            gone, why, mask = self.client, "client did not answer ping", self._mask_key()
        else:
            self.set_reason(Reason.TARGET_PING_TIMEOUT)
            gone, why, mask = self.target, "target did not answer ping", b""
        if self.close_initiator is None:
            self.close_initiator = "proxy"
            self.close_code = 1006 if client_gone else CLOSE_GOING_AWAY
        if not direction.sent and direction.tracker.at_frame_boundary:
            direction.sink.write(encode_close(CLOSE_GOING_AWAY, why, mask=mask))
            direction.sent = True
        gone.abort()
        direction.sink.close()

    def _watch(self, direction: _Direction, data: bytes) -> None:
        """Follow frames a peer sends after the proxy closed that direction, for its Close reply."""
        try:
            direction.tracker.feed(data)
        except FrameError:
            direction.tracker.closes += 1  # a peer talking nonsense after Close is as good as done
        self._check_close_handshake()

    # --- closing --------------------------------------------------------------------------------

    def _note_peer_close(self, direction: _Direction) -> None:
        """A Close frame from one side passed through: the proxy must not inject another there."""
        if self.close_initiator is None:
            self.close_initiator = "client" if direction is self.to_target else "target"
            self.close_code = direction.tracker.close_code
        direction.sent = True
        direction.stop = STOP_NONE
        direction.closes_at_send = -1  # that side's reply travels the other way; just relay it

    def request_close(
        self,
        *,
        client_code: int,
        target_code: int,
        stop: int,
        reason: Reason,
        timeout: float = CLOSE_TIMEOUT_SECONDS,
    ) -> None:
        """Send Close ``client_code`` to the client and ``target_code`` to the target, each at the
        next boundary of kind ``stop`` in its direction; close the sockets once both answered, or
        after ``timeout`` seconds."""
        self.set_reason(reason)
        if self.close_initiator is None:
            self.close_initiator = "proxy"
            self.close_code = client_code
        for direction, code, mask in (
            (self.to_client, client_code, False),
            (self.to_target, target_code, True),
        ):
            if direction.sent or direction.stop:
                continue
            direction.close_frame = encode_close(
                code, reason.replace("_", " "), mask=self._mask_key() if mask else b""
            )
            direction.stop = stop
            if direction.at(stop):
                self._inject(direction)
        if self._close_deadline is None and not self.done:
            loop = asyncio.get_running_loop()
            self._close_deadline = loop.call_later(timeout, self._close_timed_out)
        self._check_close_handshake()

    def _inject(self, direction: _Direction) -> None:
        direction.sink.write(direction.close_frame)
        direction.sent = True
        direction.stop = STOP_NONE
        # The side we closed answers in the opposite direction; remember how many Close frames
        # it had sent so far, so its answer is recognised.
        reply = self.to_target if direction is self.to_client else self.to_client
        direction.closes_at_send = reply.tracker.closes

    def _side_finished(self, direction: _Direction, endpoint: Endpoint) -> bool:
        if endpoint.lost or not endpoint.open:
            return True
        if self._failing and direction.sent:
            return True
        if not direction.sent or direction.closes_at_send < 0:
            return False
        reply = self.to_target if direction is self.to_client else self.to_client
        return reply.tracker.closes > direction.closes_at_send

    def _check_close_handshake(self) -> None:
        if self._close_deadline is None:
            return
        if self._side_finished(self.to_client, self.client) and self._side_finished(
            self.to_target, self.target
        ):
            self.client.close()
            self.target.close()

    def _close_timed_out(self) -> None:
        self._close_deadline = None
        if not self.done:
            # Whoever did not answer the Close is the one that timed out.
            client_done = self._side_finished(self.to_client, self.client)
            self.set_reason(Reason.TARGET_CLOSE_TIMEOUT if client_done else Reason.CLOSE_TIMEOUT)
            self.client.close()
            self.target.close()

    def _violation(self, direction: _Direction, exc: FrameError) -> None:
        """A side broke RFC 6455 or a limit: tell it why, tell the other side we are going away."""
        if direction is self.to_target:
            client_code, target_code = exc.close_code, CLOSE_GOING_AWAY
            if exc.offset < 0:
                # Part of the bad frame's header already reached the target: no clean Close there.
                self.to_target.sent = True
                self.target.close()
        else:
            client_code, target_code = CLOSE_BAD_GATEWAY, exc.close_code
            if exc.offset < 0:
                self.to_client.sent = True
                self.client.close()
        # The offending direction is now at a frame boundary (just before the bad frame).
        offender = direction
        offender.stop = STOP_NONE
        self._failing = True
        self.close_initiator = "proxy"
        self.close_code = client_code
        self.request_close(
            client_code=client_code, target_code=target_code, stop=STOP_FRAME, reason=exc.reason
        )
        if not offender.sent:
            self._inject(offender)
        self._check_close_handshake()

    def _maybe_done(self) -> None:
        if self.client.lost and self.target.lost:
            if self._close_deadline is not None:
                self._close_deadline.cancel()
                self._close_deadline = None
            if self._session_timer is not None:
                self._session_timer.cancel()
                self._session_timer = None
        super()._maybe_done()

    def _handshake_complete(self) -> bool:
        return bool(self.to_target.tracker.closes and self.to_client.tracker.closes)

    def _client_eof_received(self) -> bool:
        if self._handshake_complete():
            self.close(Reason.CLOSED)
            return True
        if not self.to_target.tracker.closes:
            # A WebSocket ends with a Close frame (RFC 6455 §7.1.1): a FIN without one is an
            # abnormal end by the client (its peer sees 1006), whatever the other side does next.
            self.set_reason(Reason.CLIENT_CLOSED)
        return super()._client_eof_received()

    def _target_eof_received(self) -> bool:
        # RFC 6455 §7.1.1: once Close frames went both ways the server closes TCP first; a FIN
        # then means "done", not half-close, and the client should not be left holding the socket.
        if self._handshake_complete():
            self.close(Reason.CLOSED)
            return True
        if not self.to_client.tracker.closes:
            # A target that dies (SIGKILL: the kernel sends its FIN) sent no Close: not clean.
            self.set_reason(Reason.TARGET_CLOSED)
        if self._awaiting_client_reply():
            return True
        return super()._target_eof_received()

    def _awaiting_client_reply(self) -> bool:
        """The proxy sent the client a Close and is within its deadline for the answer.

        The target may hang up meanwhile; the client's socket stays open so that its Close
        handshake completes cleanly (a client whose socket drops first reports 1006)."""
        direction = self.to_client
        return (
            self._close_deadline is not None
            and direction.sent
            and direction.closes_at_send >= 0
            and self.to_target.tracker.closes <= direction.closes_at_send
            and self.client.open
        )

    def _client_lost(self, exc: Exception | None) -> None:
        self._say_goodbye(self.to_target, "client went away")
        super()._client_lost(exc)

    def _target_lost(self, exc: Exception | None) -> None:
        self._say_goodbye(self.to_client, "target went away")
        if self._awaiting_client_reply():
            self._check_close_handshake()
            return
        super()._target_lost(exc)

    def _say_goodbye(self, direction: _Direction, why: str) -> None:
        """One side vanished without a Close: send the other a 1001 if its stream allows it."""
        sink = direction.sink
        if direction.sent or not direction.tracker.at_frame_boundary or not sink.open:
            return
        mask = self._mask_key() if direction is self.to_target else b""
        sink.write(encode_close(CLOSE_GOING_AWAY, why, mask=mask))
        direction.sent = True
        if self.close_initiator is None:
            self.close_initiator = "proxy"
            self.close_code = CLOSE_GOING_AWAY

    def on_idle(self) -> None:
        self.request_close(
            client_code=CLOSE_GOING_AWAY,
            target_code=CLOSE_GOING_AWAY,
            stop=STOP_FRAME,
            reason=Reason.IDLE_TIMEOUT,
        )

    def drain(self, timeout: float) -> None:
        """Close with 1001 at the next message boundary of each direction, within ``timeout``."""
        self.request_close(
            client_code=CLOSE_GOING_AWAY,
            target_code=CLOSE_GOING_AWAY,
            stop=STOP_MESSAGE,
            reason=Reason.DRAINING,
            timeout=timeout,
        )
