"""The relay after a WebSocket upgrade: two sockets driven by a sans-I/O ``Session``.

Bytes still flow untouched, but every byte passes a frame tracker, so the proxy can refuse a bad
frame before a byte of it is forwarded, count messages, and close a session cleanly. The rules
(the close handshake, keepalive and pong filtering, the message and frame rates, the lifetime,
which reason ends the session) are in ``wire/wssession.py``. This adapter feeds the session what
each endpoint reads, the time, and the ticks of the listener's ``Ticker``, and performs what the
session asks: write to a side, close or abort it, note the reason, wake it at its next deadline.

Time: the ticker's coarse ticks (0.25 s slots) serve the idle check and keepalive, as for every
relay; the deadlines the session keeps to the second (the close handshake's, the lifetime) get a
loop timer of their own, armed only once one is nearer than the next tick, so an idle session
holds no timer.

The hot path: each endpoint's ``on_data`` is a ``_Pipe``, the session's ``Direction`` for the
bytes that endpoint reads, plus the endpoint those bytes go to. While the direction is ``plain``
(open, no ping of ours outstanding, no message rate limit), a chunk costs one call into the
session (``take``: headers tracked, bytes and frames counted, the frame budget's threshold
compared) and one write: no clock read, no allocation, as many Python frames as before the
session moved to ``wire/``. Anything else takes the session's general path, with the time
(``_receive``), as does a chunk after which the client's frame budget is to be looked at.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable

from wsproxy.errors import FrameError, Reason
from wsproxy.relay.relay import Endpoint, Relay, RelayOwner
from wsproxy.relay.ticker import Ticker
from wsproxy.wire.wsframe import CLOSE_GOING_AWAY
from wsproxy.wire.wssession import (
    CLIENT,
    CLOSE_TIMEOUT_SECONDS,
    S_OPEN,
    TARGET,
    AbortSide,
    Boundary,
    CloseSide,
    Direction,
    Due,
    Ending,
    Send,
    Session,
    Side,
)


class _Pipe(Direction):
    """A direction of the session that can forward: calling it with what its sender's endpoint
    read forwards those bytes to ``sink`` (the endpoint of its receiver)."""

    __slots__ = ("relay", "sink")

    relay: WebSocketRelay
    sink: Endpoint

    def __call__(self, data: bytes) -> None:
        relay = self.relay
        if self.plain:
            error = relay.session.take(self, data)
            if error is None:
                self.sink.write(data)
                return
            relay._off_plain(self, data, error)
            return
        relay._receive(self, data)


class WebSocketRelay(Relay):
    """A ``Relay`` that follows frames in both directions (RFC 6455 §5) through a ``Session``.

    Limits and keepalive are the session's (see ``Session``); times in seconds, 0: off.
    """

    __slots__ = ("_timer", "session")

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
        random: Callable[[int], bytes] = os.urandom,
        max_message_bytes: int = 0,
        max_messages_per_second: float = 0.0,
        messages_burst: int = 0,
        max_frames_per_second: float = 0.0,
        frames_burst: int = 0,
        max_session_seconds: float = 0.0,
        allow_rsv: bool = False,
    ) -> None:
        super().__init__(client, target, idle_timeout=idle_timeout, owner=owner, ticker=ticker)
        self._timer: asyncio.TimerHandle | None = None  # at the session's exact deadline
        session = self.session = Session(
            _Pipe,
            self._loop.time(),
            max_frame_bytes=max_frame_bytes,
            max_message_bytes=max_message_bytes,
            allow_rsv=allow_rsv,
            ping_interval=ping_interval,
            target_ping_interval=target_ping_interval,
            ping_timeout=ping_timeout,
            max_messages_per_second=max_messages_per_second,
            messages_burst=messages_burst,
            max_frames_per_second=max_frames_per_second,
            frames_burst=frames_burst,
            max_session_seconds=max_session_seconds,
            random=random,
        )
        for pipe, sink in ((session.to_target, target), (session.to_client, client)):
            pipe.relay = self
            pipe.sink = sink

    # --- what the flow reads --------------------------------------------------------------------

    @property
    def bytes_in(self) -> int:
        return self.session.to_target.received

    @property
    def bytes_out(self) -> int:
        return self.session.to_client.received

    @property
    def to_target(self) -> _Pipe:
        """What the client sends (the client endpoint's ``on_data``)."""
        return self.session.to_target

    @property
    def to_client(self) -> _Pipe:
        """What the target sends (the target endpoint's ``on_data``)."""
        return self.session.to_client

    @property
    def pings_sent(self) -> int:
        return self.session.pings_sent

    # --- feeding the session --------------------------------------------------------------------

    def _route_data(self, client: Endpoint, target: Endpoint) -> None:
        # Every byte goes through a direction of the session (no ``peer``).
        client.on_data = self.session.to_target
        target.on_data = self.session.to_client

    def _receive(self, pipe: _Pipe, data: bytes) -> None:
        """A chunk off the hot path (a Close pending or sent, a ping outstanding, a limit)."""
        session = self.session
        taken = session.receive(pipe, data, self._loop.time())
        if taken:
            pipe.sink.write(data if taken == len(data) else data[:taken])
        if session.events is not None:
            self._perform()

    def _off_plain(self, pipe: _Pipe, data: bytes, error: FrameError | Due) -> None:
        """``take`` refused a chunk (a bad frame) or asked for the time (a look at the client's
        frame budget, after the chunk is forwarded whole)."""
        if isinstance(error, FrameError):
            self.session.violation(pipe, data, error, self._loop.time())
        else:
            pipe.sink.write(data)
            self.session.charge_frames(pipe, self._loop.time())
        self._perform()

    def _perform(self) -> None:
        """Do what the session asked, in order."""
        if self.session.events is None:
            return
        # isinstance and plain attributes, not `match` class patterns: this runs at every close,
        # and a class pattern also reads its fields through __match_args__.
        for event in self.session.take_events():
            if isinstance(event, Send):
                self._endpoint(event.side).write(event.data)
            elif isinstance(event, CloseSide):
                self._endpoint(event.side).close()
            elif isinstance(event, AbortSide):
                self._endpoint(event.side).abort()
            elif isinstance(event, Ending):
                self.set_reason(event.reason)
            else:  # Wake
                self._reschedule_tick()

    def _endpoint(self, side: Side) -> Endpoint:
        return self.client if side is CLIENT else self.target

    # --- time -----------------------------------------------------------------------------------

    def tick(self) -> None:
        """The relay's one ticker entry: the session's deadlines, then the idle check."""
        self._tick_bucket = None
        if self._done:
            return
        now = self._loop.time()
        self.session.tick(now)
        moved = self.bytes_in + self.bytes_out
        if moved != self._idle_mark:
            self._idle_mark = moved
            self._idle_since = now
        elif now - self._idle_since >= self._idle_timeout and self.session.state is S_OPEN:
            self.on_idle()
        self._perform()
        self._schedule_tick()

    def _next_tick_delay(self) -> float:
        # The idle check's cadence (Relay), or sooner when the session has a deadline; one it
        # keeps to the second that could fall before the tick fires gets its own timer.
        session = self.session
        delay = self._idle_timeout / 8
        due = session.next_deadline
        if due < math.inf:
            now = self._loop.time()
            delay = min(delay, due - now)
            exact = session.exact_deadline
            if exact - now <= delay + self.ticker.resolution:
                self._arm(exact)
        return max(0.0, delay)

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(at, self._deadline_passed, at)

    def _deadline_passed(self, at: float) -> None:
        self._timer = None
        if self._done:
            return
        # A loop timer may fire a little early (uvloop's are in whole milliseconds).
        self.session.tick(max(self._loop.time(), at))
        self._perform()
        self._reschedule_tick()

    # --- the sockets ----------------------------------------------------------------------------

    def _client_eof_received(self) -> bool:
        handled = self.session.eof(CLIENT)
        self._perform()
        return handled or super()._client_eof_received()

    def _target_eof_received(self) -> bool:
        handled = self.session.eof(TARGET)
        self._perform()
        return handled or super()._target_eof_received()

    def _client_lost(self, exc: Exception | None) -> None:
        self.session.lost(CLIENT, exc is not None)
        self._perform()
        self._maybe_done()

    def _target_lost(self, exc: Exception | None) -> None:
        self.session.lost(TARGET, exc is not None)
        self._perform()
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._timer is not None and self.client.lost and self.target.lost:
            self._timer.cancel()
            self._timer = None
        super()._maybe_done()

    def close(self, reason: Reason) -> None:
        self.session.closing()
        super().close(reason)

    def abort(self, reason: Reason) -> None:
        self.session.closing()
        super().abort(reason)

    # --- closing on purpose ---------------------------------------------------------------------

    def request_close(
        self,
        *,
        client_code: int,
        target_code: int,
        at: Boundary,
        reason: Reason,
        timeout: float = CLOSE_TIMEOUT_SECONDS,
    ) -> None:
        """Close ``client_code`` to the client and ``target_code`` to the target, each at the
        next ``at`` boundary of its stream; the sockets close once both answered, or after
        ``timeout`` seconds (``Session.request_close``)."""
        self.session.request_close(
            client_code=client_code,
            target_code=target_code,
            at=at,
            reason=reason,
            now=self._loop.time(),
            timeout=timeout,
        )
        self._perform()

    def on_idle(self) -> None:
        self.request_close(
            client_code=CLOSE_GOING_AWAY,
            target_code=CLOSE_GOING_AWAY,
            at=Boundary.FRAME,
            reason=Reason.IDLE_TIMEOUT,
        )

    def drain(self, timeout: float) -> None:
        """Close with 1001 at the next message boundary of each direction, within ``timeout``."""
        self.request_close(
            client_code=CLOSE_GOING_AWAY,
            target_code=CLOSE_GOING_AWAY,
            at=Boundary.MESSAGE,
            reason=Reason.DRAINING,
            timeout=timeout,
        )
