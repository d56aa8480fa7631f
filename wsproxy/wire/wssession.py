"""The rules of a WebSocket session after the 101, sans-I/O: bytes and time in, events out.

The proxy stands between a client and a target. Each byte stream through it is a ``Direction``:
``to_target`` carries what the client sends, ``to_client`` what the target sends. A ``Session``
owns both and applies the rules of RFC 6455 that a proxy must keep: following frames (headers
only, ``FrameTracker``), the close handshake, keepalive, the client's message and frame rates
and the session's lifetime, and which ``Reason`` ends the session. It reads no clock and touches
no socket: an adapter (``relay/websocket.py``) feeds it what each side sent and the time, and
performs the events it queues in ``events``:

- ``Send(side, data)``: write these bytes to that side (forwarded frames, a Close or a Ping of
  the proxy's own);
- ``CloseSide(side)``: flush, then close that side's socket; ``AbortSide(side)``: drop it now;
- ``Ending(reason)``: why the session is ending (the first one an adapter hears is the one to
  report: it may also end for reasons of its own, a reset or a shutdown);
- ``Wake(at)``: call ``tick`` no later than ``at`` (the next deadline moved).

Hot path: ``take(direction, data)`` is for a direction whose ``plain`` is true (open, no ping of
ours outstanding, no message rate limit); it returns None when ``data`` is to be forwarded whole,
queues nothing and allocates nothing. ``FRAMES_DUE``: forward it whole too, then call
``charge_frames`` with the time (the sender's frames reached the point where its frame budget is
looked at). Anything else goes through ``receive(direction, data, now)``, whose return value is
how many leading bytes of ``data`` to forward before the queued events.

The API mode, which ends WebSockets itself instead of tunnelling them, reuses this type for its
one remote side: the API flow plays the target, writing its own frames through ``to_client`` so
that Close and Ping land at their boundaries, and reading the client's through ``to_target``. The
per-direction rules (frame tracking, pong filtering, boundaries, the rate bucket) live in
``Direction`` and take no view of what is at the other end.

State machines
==============

Like h11's ``_state.py``, there are several small machines, written out here; the code below
keeps to them.

1. The session (``State``), one per session::

       OPEN ──request_close()────────> CLOSING ──both sides finished / deadline──> CLOSED
         │                                │                                          ^
         └──violation()──> FAILING <──────┘ (a violation while closing)               │
                              └──each side finished as soon as its Close went out─────┘

   - OPEN: frames flow; keepalive runs. A Close a peer sends passes through and leaves the
     session OPEN (no deadline: the peers finish their own handshake, the idle timeout bounds it).
   - CLOSING: the proxy started a close handshake (drain, idle timeout, rate limit, lifetime,
     revocation): each direction gets the proxy's Close at its next boundary, and each side must
     answer with a Close of its own before ``deadline``. Keepalive stops.
   - FAILING: a side broke RFC 6455 or a limit; the connection is failed (§7.1.7): a Close to each
     side, then its socket is closed without waiting for an answer (still within ``deadline``).
   - CLOSED: the session asked for both sockets to be closed, or both are gone; it does nothing
     more (late bytes are still tracked and forwarded to sockets that are closing anyway).

   A side is *finished* when its socket is gone, when (FAILING) its Close went out, or when it
   answered the proxy's Close with one of its own. When both are finished, both sockets close.
   At the deadline, the side not finished is the one blamed: ``close_timeout`` (the client) or
   ``target_close_timeout``.

2. Each direction (``DirectionState``), two per session::

       OPEN ──request_close()──> CLOSE_AT_FRAME / CLOSE_AT_MESSAGE ──boundary──> CLOSE_SENT
         │                                    │
         ├──the sender's own Close passes─────┴──(CLOSE_PASSING: its end)────> CLOSE_PASSED
         ├──keepalive gives up / the other side vanished (at a frame boundary)─> CLOSE_SENT
         └──a bad frame whose header already went out in part─────────────────> CUT

   - OPEN: the sender's frames pass to the receiver.
   - CLOSE_AT_FRAME, CLOSE_AT_MESSAGE: the proxy holds a Close for the receiver, to go at the next
     frame boundary (after a violation, or where cutting a message is acceptable) or message
     boundary (drain, lifetime: no half-sent message); bytes pass up to it.
   - CLOSE_SENT: the proxy's Close went to the receiver; what the sender still sends is dropped,
     but followed, since the answer to a Close on the other direction comes this way.
   - CLOSE_PASSING: the header of the sender's own Close went through, the rest of that frame
     passes too (it may come in later reads); then CLOSE_PASSED.
   - CLOSE_PASSED: the sender's own Close went through; nothing may follow it (§5.5.1), and the
     proxy injects no Close of its own here. Its answer comes the other way and passes too.
   - CUT: the receiver got part of a frame that cannot be completed; it gets no Close, only its
     socket closed.

3. Keepalive, per direction, of the *sender* (§5.5.2): at each tick after ``ping_due``, a sender
   that sent nothing since the last check is pinged (the Ping goes the other way, at a frame
   boundary of that stream) and ``ping_due`` becomes the pong's deadline. While the ping is
   outstanding, the direction leaves the hot path: the Pong that carries our payload is taken
   out, any other Pong passes (the other peer may be waiting for it). At the deadline, a sender
   that sent bytes since the ping (or since the last deadline) is alive, its Pong only late:
   the deadline moves by ``ping_timeout``. A whole ``ping_timeout`` of silence with the ping
   unanswered: the silent side is aborted, the other told with a Close 1001 and closed
   (``ping_timeout``, ``target_ping_timeout``).

4. The client's message rate (``TokenBucket``, only when configured) is charged per read of the
   client's bytes: a read that overdraws is forwarded whole, then Close 1008 follows at the next
   frame boundary. The client's frame rate (``FrameBudget``: every frame, control frames and
   continuations included) is a flood's: the read that overdraws is forwarded whole, then the
   connection is FAILING (Close 1008 to the client, 1001 to the target, no answer awaited). It
   costs the hot path one integer comparison per read: the budget is looked at, with the time,
   only once the frames counted pass what it held at the last look. The lifetime
   (``max_session_seconds``) ends the session with 1001 at message boundaries, as a drain does.

What depends on how bytes are cut into reads: a frame header split across reads is forwarded in
parts (the proxy holds back no bytes on the hot path), so a bad frame whose header was split can
only be CUT, not answered with a Close; bytes a peer sends after its own Close in the same read
pass, later ones are dropped; the rate limits count per read (above). Everything else, events and
forwarded bytes, is the same for any cutting of the same streams (tests/wire/test_wssession.py).
"""

from __future__ import annotations

import enum
import functools
import math
import os
from collections.abc import Callable
from typing import Generic, NamedTuple, TypeVar

from wsproxy.errors import FrameError, Reason
from wsproxy.wire.wsframe import (
    CLOSE_BAD_GATEWAY,
    CLOSE_GOING_AWAY,
    CLOSE_POLICY_VIOLATION,
    OP_PING,
    STOP_FRAME,
    STOP_MESSAGE,
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
# An abnormal closure, as the client sees it when its socket drops (RFC 6455 §7.1.5).
CLOSE_ABNORMAL = 1006


class Side(enum.IntEnum):
    """A socket of the session (values are bits: ``Session`` keeps the gone ones in a mask)."""

    CLIENT = 1
    TARGET = 2


class Initiator(enum.StrEnum):
    """Who sent the session's first Close (the metric label of ``wsproxy_..._closes_total``)."""

    CLIENT = "client"
    TARGET = "target"
    PROXY = "proxy"


class Boundary(enum.IntEnum):
    """Where the proxy may put a Close of its own into a stream (values: ``wsframe.STOP_*``)."""

    FRAME = STOP_FRAME  # between two frames (control frames may sit inside a message, §5.4)
    MESSAGE = STOP_MESSAGE  # between two messages: no half-sent message


class State(enum.Enum):
    """The session's state; see the module docstring for the rules."""

    OPEN = "open"
    CLOSING = "closing"
    FAILING = "failing"
    CLOSED = "closed"


class DirectionState(enum.Enum):
    """A direction's state; see the module docstring for the rules."""

    OPEN = "open"
    CLOSE_AT_FRAME = "close_at_frame"
    CLOSE_AT_MESSAGE = "close_at_message"
    CLOSE_SENT = "close_sent"
    CLOSE_PASSING = "close_passing"
    CLOSE_PASSED = "close_passed"
    CUT = "cut"


# On Python 3.11 every member lookup through an Enum class takes EnumType.__getattr__'s slow path
# (~150 ns against ~15 ns for a module global; 3.12 dropped it), and a session runs this code for
# every connection: the code below reads the members as module globals.
CLIENT, TARGET = Side.CLIENT, Side.TARGET
BY_CLIENT, BY_TARGET, BY_PROXY = Initiator.CLIENT, Initiator.TARGET, Initiator.PROXY
AT_FRAME, AT_MESSAGE = Boundary.FRAME, Boundary.MESSAGE
S_OPEN, S_CLOSING, S_FAILING, S_CLOSED = State
(
    D_OPEN,
    D_CLOSE_AT_FRAME,
    D_CLOSE_AT_MESSAGE,
    D_CLOSE_SENT,
    D_CLOSE_PASSING,
    D_CLOSE_PASSED,
    D_CUT,
) = DirectionState

_PENDING = (D_CLOSE_AT_FRAME, D_CLOSE_AT_MESSAGE)
# No more of the sender's bytes pass: a Close went to the receiver (or nothing more can).
_SHUT = (D_CLOSE_SENT, D_CLOSE_PASSED, D_CUT)


# --- events (NamedTuples: made on every close, and a tuple is the cheapest thing to make) ---


class Send(NamedTuple):
    """Write ``data`` to the socket of ``side``."""

    side: Side
    data: bytes


class CloseSide(NamedTuple):
    """Flush what was written to ``side``, then close its socket."""

    side: Side


class AbortSide(NamedTuple):
    """Drop the socket of ``side`` now (a peer that stopped answering)."""

    side: Side


class Ending(NamedTuple):
    """The session is ending because of ``reason``."""

    reason: Reason


class Wake(NamedTuple):
    """Call ``Session.tick`` no later than ``at`` (a time on the caller's clock)."""

    at: float


Event = Send | CloseSide | AbortSide | Ending | Wake


class Due(enum.Enum):
    """What ``take`` returns when a look at the sender's frame budget is due: forward the read
    whole, then call ``Session.charge_frames`` with the time."""

    FRAMES = "frames"


FRAMES_DUE = Due.FRAMES
# ``Direction.frames_free`` of a direction with no frame budget, out of reach of a session's frame
# count for a long while (and then pushed as far again). The largest one-digit int: CPython 3.11
# specializes ``<`` only for ints under 2**30, and ``take`` compares this on every read.
_NO_FRAME_LIMIT = (1 << 30) - 1


# --- per direction -----------------------------------------------------------------------------


class TokenBucket:
    """A message-rate limit: ``rate`` tokens per second, at most ``burst`` saved up."""

    __slots__ = ("burst", "counted", "mark", "rate", "tokens")

    def __init__(self, rate: float, burst: int = 0) -> None:
        self.rate = rate
        self.burst = float(burst or max(1.0, rate))  # 0: one second's worth
        self.tokens = self.burst
        self.mark = 0.0  # time of the last refill
        self.counted = 0  # messages charged so far

    def spend(self, messages: int, now: float) -> bool:
        """Charge the messages counted since the last call (``messages`` is the running
        total); True when that overdrew the bucket."""
        used = messages - self.counted
        if not used:
            return False
        self.counted = messages
        self.tokens = min(self.burst, self.tokens + (now - self.mark) * self.rate)
        self.mark = now
        self.tokens -= used
        return self.tokens < 0


class FrameLimit(NamedTuple):
    """The frame-rate settings, one object shared by every session that has them (``rate``
    frames per second, ``burst`` saved up at most): an idle session holds no bucket of its own,
    only this and the frame count (``free``) a full bucket lets pass before the first look."""

    rate: float
    burst: float
    free: int


@functools.lru_cache(maxsize=64)
def frame_limit(rate: float, burst: int) -> FrameLimit:
    """The shared ``FrameLimit`` of a listener's settings (``burst`` 0: one second's worth)."""
    full = float(burst or max(1.0, rate))
    return FrameLimit(rate, full, int(full))


class FrameBudget:
    """A frame-rate limit's bucket, made at the first look (``FrameLimit``), looked at lazily.

    A look (``spend``) is needed only once the frames counted pass what the bucket held at the
    last look, since it cannot be overdrawn before; so the hot path compares two integers per read
    and reads no clock. Each look refills for the time since the last one, then takes the frames
    since: the bucket is capped after the spending, not before, so a sender within ``rate`` is
    never cut however seldom it is looked at, and none sends more than ``burst + rate * seconds``.
    """

    __slots__ = ("burst", "counted", "mark", "rate", "tokens")

    def __init__(self, limit: FrameLimit, since: float) -> None:
        self.rate = limit.rate
        self.burst = limit.burst
        self.tokens = limit.burst  # full at ``since`` (the session's start)
        self.mark = since  # time of the last look
        self.counted = 0  # frames charged so far

    def free_until(self) -> int:
        """The running frame count up to which no look is needed."""
        return self.counted + int(self.tokens)

    def spend(self, frames: int, now: float) -> bool:
        """Charge the frames counted since the last look (``frames`` is the running total);
        True when that overdrew the bucket."""
        tokens = self.tokens + (now - self.mark) * self.rate - (frames - self.counted)
        self.counted = frames
        self.mark = now
        self.tokens = min(self.burst, tokens)
        return tokens < 0


class Direction:
    """One byte stream through the proxy, from a sender to a receiver.

    ``received`` counts the sender's bytes (the log line, the idle check, keepalive). Keepalive
    is of the sender: ``ping_interval`` seconds (0: off), ``ping_due`` the time of the next
    silence check or, while ``ping_payload`` is outstanding, of the pong's deadline.
    ``plain`` is true when nothing but forwarding is to be done (``Session.take``). With a
    ``frame_budget``, ``take`` says when to look at it: once ``tracker.frames`` passes
    ``frames_free``.
    """

    __slots__ = (
        "bucket",
        "close_frame",
        "closes_at_send",
        "frame_budget",
        "frames_free",
        "ping_due",
        "ping_interval",
        "ping_mark",
        "ping_payload",
        "plain",
        "pong_buf",
        "received",
        "state",
        "tracker",
    )

    def __init__(
        self,
        tracker: FrameTracker,
        ping_interval: float = 0.0,
        bucket: TokenBucket | None = None,
        frame_budget: FrameLimit | None = None,
    ) -> None:
        self.tracker = tracker
        self.received = 0
        self.ping_interval = ping_interval
        self.ping_due = 0.0
        self.ping_mark = -1  # ``received`` at the last silence check
        self.ping_payload: bytes | None = None  # our ping that awaits its pong
        self.pong_buf = b""  # the start of a frame held back while pongs are filtered
        self.bucket = bucket  # the sender's messages are charged to it
        # Its frames to this one: the shared settings until the first look makes the bucket.
        self.frame_budget: FrameLimit | FrameBudget | None = frame_budget
        self.frames_free = _NO_FRAME_LIMIT if frame_budget is None else frame_budget.free
        self.state = D_OPEN
        self.close_frame = b""  # the Close the proxy holds for the receiver
        # The receiver's Close frames (counted the other way) when ours went out: one more is
        # its answer.
        self.closes_at_send = 0
        self.plain = bucket is None

    def _replain(self) -> None:
        """Recompute ``plain`` after a change of state, ping or held bytes."""
        self.plain = (
            self.state is D_OPEN
            and self.ping_payload is None
            and not self.pong_buf
            and self.bucket is None
        )

    def at(self, boundary: DirectionState) -> bool:
        """Whether the stream is at the boundary a pending Close waits for."""
        tracker = self.tracker
        if boundary is D_CLOSE_AT_FRAME:
            return tracker.at_frame_boundary
        return tracker.at_message_boundary


# --- the session -------------------------------------------------------------------------------

D = TypeVar("D", bound=Direction)


class Session(Generic[D]):
    """Both directions of one WebSocket session and the rules between them (module docstring).

    ``direction_type`` builds the two directions (an adapter's subclass may add what it needs to
    perform writes). The session starts at ``now``: keepalive and the lifetime count from there.
    Times are seconds on the caller's clock; ``random(n)`` gives ``n`` random bytes (mask keys
    and ping payloads).
    """

    __slots__ = (
        "_gone",
        "_ping_timeout",
        "_random",
        "close_code",
        "close_initiator",
        "deadline",
        "ending",
        "events",
        "expires_at",
        "pings_sent",
        "started",
        "state",
        "to_client",
        "to_target",
    )

    def __init__(
        self,
        direction_type: type[D],
        now: float,
        *,
        max_frame_bytes: int,
        max_message_bytes: int = 0,
        allow_rsv: bool = False,
        ping_interval: float = 0.0,
        target_ping_interval: float = 0.0,
        ping_timeout: float = 30.0,
        max_messages_per_second: float = 0.0,
        messages_burst: int = 0,
        max_frames_per_second: float = 0.0,
        frames_burst: int = 0,
        max_session_seconds: float = 0.0,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        # Client frames must be masked, target frames must not be (§5.1).
        bucket = None
        if max_messages_per_second > 0:
            bucket = TokenBucket(max_messages_per_second, messages_burst)
        frame_budget = None
        if max_frames_per_second > 0:
            frame_budget = frame_limit(max_frames_per_second, frames_burst)
        self.to_target: D = direction_type(
            FrameTracker(
                masked=True,
                max_frame_bytes=max_frame_bytes,
                max_message_bytes=max_message_bytes,
                allow_rsv=allow_rsv,
            ),
            ping_interval,
            bucket,
            frame_budget,
        )
        self.to_client: D = direction_type(
            FrameTracker(
                masked=False,
                max_frame_bytes=max_frame_bytes,
                max_message_bytes=max_message_bytes,
                allow_rsv=allow_rsv,
            ),
            target_ping_interval,
        )
        self.state = S_OPEN
        self.started = now  # a frame budget's bucket is full from here
        self.events: list[Event] | None = None  # queued for the adapter; None when empty
        self.ending: Reason | None = None  # the first reason the session gave for ending
        self.close_code: int | None = None  # of the first Close, whoever sent it
        self.close_initiator: Initiator | None = None
        self.deadline: float | None = None  # of the close handshake (CLOSING, FAILING)
        self.expires_at = now + max_session_seconds if max_session_seconds > 0 else None
        self.pings_sent = 0
        self._ping_timeout = ping_timeout
        self._random = random
        self._gone = 0  # Side bits of sockets lost or asked to close
        for direction in (self.to_target, self.to_client):
            if direction.ping_interval:
                direction.ping_due = now + direction.ping_interval
            if direction.bucket is not None:
                direction.bucket.mark = now

    # --- output ---------------------------------------------------------------------------------

    def take_events(self) -> list[Event]:
        """The queued events, oldest first; the queue is empty afterwards."""
        events, self.events = self.events, None
        return events or []

    def _emit(self, event: Event) -> None:
        if self.events is None:
            self.events = [event]
        else:
            self.events.append(event)

    def _send(self, direction: Direction, data: bytes) -> None:
        """Write ``data`` to the receiver of ``direction``."""
        self._emit(Send(self._receiver(direction), data))

    def _end(self, reason: Reason) -> None:
        """Say why the session ends (the adapter reports the first; ``ending`` keeps it)."""
        if self.ending is None:
            self.ending = reason
        self._emit(Ending(reason))

    def _close_side(self, side: Side) -> None:
        if not self._gone & side:
            self._gone |= side
            self._emit(CloseSide(side))
        if self._gone == CLIENT | TARGET:
            self.state = S_CLOSED
            self.to_target.plain = self.to_client.plain = False  # receive() ignores the rest

    def _receiver(self, direction: Direction) -> Side:
        return CLIENT if direction is self.to_client else TARGET

    def _sender(self, direction: Direction) -> Initiator:
        return BY_CLIENT if direction is self.to_target else BY_TARGET

    def _reverse(self, direction: Direction) -> D:
        return self.to_target if direction is self.to_client else self.to_client

    def _mask(self, direction: Direction) -> bytes:
        """A mask key for frames the proxy writes to the receiver of ``direction``: the target
        is a server and gets masked frames, the client gets unmasked ones (§5.1)."""
        return self._random(4) if direction is self.to_target else b""

    # --- time -----------------------------------------------------------------------------------

    @property
    def next_deadline(self) -> float:
        """When ``tick`` next has something to do (inf: nothing until new input)."""
        due = self.exact_deadline
        if self.state is S_OPEN:
            for direction in (self.to_target, self.to_client):
                if direction.ping_interval and direction.ping_due < due:
                    due = direction.ping_due
        return due

    @property
    def exact_deadline(self) -> float:
        """The next of the deadlines that are promised to the second (the close handshake's,
        the lifetime); keepalive's may be met a coarse tick late (inf: none)."""
        if self.state is S_CLOSED:
            return math.inf
        due = math.inf if self.deadline is None else self.deadline
        if self.expires_at is not None and self.expires_at < due:
            due = self.expires_at
        return due

    def tick(self, now: float) -> None:
        """Do what is due at ``now``: the close deadline, the lifetime, keepalive."""
        if self.state is S_CLOSED:
            return
        if self.deadline is not None and now >= self.deadline:
            self._close_timed_out()
            return
        if self.expires_at is not None and now >= self.expires_at:
            self.expires_at = None
            self.request_close(
                client_code=CLOSE_GOING_AWAY,
                target_code=CLOSE_GOING_AWAY,
                at=AT_MESSAGE,
                reason=Reason.MAX_SESSION_DURATION,
                now=now,
            )
        for direction in (self.to_target, self.to_client):
            if self.state is not S_OPEN:
                return
            if direction.ping_interval and now >= direction.ping_due:
                self._keepalive(direction, now)

    # --- bytes in -------------------------------------------------------------------------------

    def take(self, direction: D, data: bytes) -> FrameError | Due | None:
        """The hot path, for a ``plain`` direction: track ``data`` and count it. None: forward
        it whole. ``FRAMES_DUE``: forward it whole, then call ``charge_frames``. A
        ``FrameError``: forward nothing yet, pass it to ``violation``."""
        direction.received += len(data)
        tracker = direction.tracker
        closes = tracker.closes
        try:
            tracker.feed(data)
        except FrameError as exc:
            return exc
        if tracker.closes != closes:
            self._close_passed(direction)
        if tracker.frames > direction.frames_free:
            return FRAMES_DUE
        return None

    def receive(self, direction: D, data: bytes, now: float) -> int:
        """What the sender of ``direction`` sent, in any state: returns how many leading bytes
        of ``data`` to forward to its receiver, before the events queued meanwhile."""
        if direction.plain:
            error = self.take(direction, data)
            if isinstance(error, FrameError):
                self.violation(direction, data, error, now)
                return 0
            if error is not None:
                self.charge_frames(direction, now)
            return len(data)
        direction.received += len(data)
        taken = 0
        if self.state is S_CLOSED:
            # Both sockets were told to close: a transport stops reading then, and bytes that
            # raced that mean nothing (a bad frame among them must not end the session again).
            return 0
        if direction.ping_payload is not None or direction.pong_buf:
            self._filter_pongs(direction, data, now)
        elif direction.state is D_OPEN:
            taken = self._pass(direction, data, now)
        else:
            self._forward(direction, data, now)
        if direction.bucket is not None:
            self._charge(direction, now)
        if direction.tracker.frames > direction.frames_free:
            self.charge_frames(direction, now)
        return taken

    def _pass(self, direction: D, data: bytes, now: float) -> int:
        """An OPEN direction that is not ``plain`` only because of its rate limit."""
        tracker = direction.tracker
        closes = tracker.closes
        try:
            tracker.feed(data)
        except FrameError as exc:
            self.violation(direction, data, exc, now)
            return 0
        if tracker.closes != closes:
            self._close_passed(direction)
        return len(data)

    def _forward(self, direction: D, data: bytes, now: float) -> None:
        """A direction past OPEN: forward up to the boundary a pending Close waits for and inject
        it there; after a Close went out, only follow what the sender says."""
        state = direction.state
        if state in _SHUT:
            self._watch(direction, data)
            return
        tracker = direction.tracker
        closes = tracker.closes
        stop = STOP_MESSAGE if state is D_CLOSE_AT_MESSAGE else STOP_FRAME
        try:
            taken = tracker.feed(data, stop)
        except FrameError as exc:
            self.violation(direction, data, exc, now)
            return
        if taken:
            self._send(direction, data if taken == len(data) else data[:taken])
        if tracker.closes != closes:
            self._close_passed(direction)
        state = direction.state
        if state in _PENDING and direction.at(state):
            self._inject(direction)
        elif state is D_CLOSE_PASSING and tracker.at_frame_boundary:
            direction.state = D_CLOSE_PASSED
            if self.close_code is None and self.close_initiator is self._sender(direction):
                self.close_code = tracker.close_code  # its status bytes came after its header
        if taken < len(data) and direction.state in _SHUT:
            self._watch(direction, data[taken:])
        self._check_close_handshake()

    def _filter_pongs(self, direction: D, data: bytes, now: float) -> None:
        """While our ping to the sender is outstanding: forward everything it sends but the
        Pong that answers our ping."""
        tracker = direction.tracker
        data = direction.pong_buf + data
        direction.pong_buf = b""
        # A header split at the end of the last read went out already (the hot path forwards
        # what it gets); only one that starts in ``data`` may be held back.
        partial, frames = tracker.partial_header, tracker.frames
        while data:
            if direction.state is not D_OPEN:
                self._forward(direction, data, now)
                direction._replain()
                return
            closes = tracker.closes
            try:
                taken = tracker.feed(data, STOP_PONG)
            except FrameError as exc:
                self.violation(direction, data, exc, now)
                direction._replain()
                return
            if (
                taken == len(data)
                and tracker.partial_header
                and (not partial or tracker.frames != frames)
            ):
                # Hold back a header split here: it may be our Pong's, which must not go out in
                # part (the tracker stops before a Pong only when its header is whole).
                taken -= len(tracker.withdraw_header())
            if taken:
                self._send(direction, data[:taken] if taken < len(data) else data)
            if tracker.closes != closes:
                self._close_passed(direction)
            if taken == len(data):
                break
            rest = data[taken:]  # a Pong frame, or a split header, starts here
            header = parse_header(rest)
            if header is None or len(rest) < header.header_len + header.payload_len:
                direction.pong_buf = rest  # at most 14 + 125 bytes: wait for the rest of it
                direction._replain()
                return
            end = header.header_len + header.payload_len
            frame = rest[:end]
            tracker.feed(frame)
            if unmask(frame[header.header_len :], header.mask_key) == direction.ping_payload:
                self._pong_received(direction, now, len(rest) - end)
            else:
                self._send(direction, frame)  # not ours: the other side may be waiting for it
            data = rest[end:]
            partial = 0
        direction._replain()
        self._check_close_handshake()

    def _watch(self, direction: D, data: bytes) -> None:
        """Follow frames a peer sends after the Close of its direction, for its Close reply."""
        try:
            direction.tracker.feed(data)
        except FrameError:
            direction.tracker.closes += 1  # a peer talking nonsense after Close is as good as done
        self._check_close_handshake()

    def _charge(self, direction: D, now: float) -> None:
        """Charge the sender's new messages to its bucket; overdrawn: Close 1008."""
        bucket = direction.bucket
        if bucket is None or direction.state in _SHUT:
            return
        if bucket.spend(direction.tracker.messages, now):
            self.request_close(
                client_code=CLOSE_POLICY_VIOLATION,
                target_code=CLOSE_GOING_AWAY,
                at=AT_FRAME,
                reason=Reason.MESSAGE_RATE_EXCEEDED,
                now=now,
            )

    def charge_frames(self, direction: D, now: float) -> None:
        """Charge the sender's frames to its frame budget (``take`` said ``FRAMES_DUE``, or
        ``receive`` saw them pass ``frames_free``); overdrawn: the connection fails, Close 1008
        to the client and 1001 to the target at their next frame boundaries, then both sockets
        close without waiting for answers."""
        budget = direction.frame_budget
        frames = direction.tracker.frames
        if budget is None or direction.state in _SHUT:
            direction.frames_free = frames + _NO_FRAME_LIMIT  # nothing more to charge
            return
        if isinstance(budget, FrameLimit):  # the first look: a bucket, full since the start
            budget = direction.frame_budget = FrameBudget(budget, self.started)
        if budget.spend(frames, now):
            direction.frames_free = frames + _NO_FRAME_LIMIT
            # A flood: fail the connection (§7.1.7), the sockets closed as soon as our Close
            # went out, rather than wait for an answer while parsing the rest of the flood (a
            # client still sending then gets a TCP reset, after our Close).
            if self.state is not S_CLOSED:
                self.state = S_FAILING
            self.request_close(
                client_code=CLOSE_POLICY_VIOLATION,
                target_code=CLOSE_GOING_AWAY,
                at=AT_FRAME,
                reason=Reason.FRAME_RATE_EXCEEDED,
                now=now,
            )
            return
        direction.frames_free = budget.free_until()

    # --- keepalive (RFC 6455 §5.5.2) ------------------------------------------------------------

    def _keepalive(self, direction: D, now: float) -> None:
        """Ping a sender that sent nothing for its interval; give up on one that did not
        answer."""
        if direction.ping_payload is not None:
            if direction.received != direction.ping_mark:
                # Bytes came since the ping (or the last such check): the sender is alive, its
                # Pong late (queued behind a large frame, a slow link). Wait for it one more
                # ping_timeout, as the websockets library takes any data received as proof of
                # life; only ping_timeout of silence with the ping unanswered ends the session.
                direction.ping_mark = direction.received
                direction.ping_due = now + self._ping_timeout
                return
            self._ping_expired(direction)
            return
        direction.ping_due = now + direction.ping_interval
        if direction.received != direction.ping_mark:
            direction.ping_mark = direction.received
            return
        toward = self._reverse(direction)  # the stream that reaches the silent sender
        if toward.state in _SHUT or not toward.tracker.at_frame_boundary:
            return  # mid-frame toward that side: next time
        payload = direction.ping_payload = b"wsproxy:" + self._random(8).hex().encode()
        self._send(toward, encode_frame(OP_PING, payload, mask=self._mask(toward)))
        self.pings_sent += 1
        direction.ping_due = now + self._ping_timeout
        direction._replain()

    def _pong_received(self, direction: D, now: float, after: int) -> None:
        """Our pong came, with ``after`` bytes behind it in the same read."""
        direction.ping_payload = None
        # Silence is counted from the end of the pong, not of the read: bytes behind it are
        # activity whether they came in the same read or the next.
        direction.ping_mark = direction.received - after
        direction.ping_due = now + direction.ping_interval
        self._emit(Wake(direction.ping_due))  # the tick waiting now is the pong's deadline

    def _ping_expired(self, direction: D) -> None:
        """No pong in time: the sender is gone. Tell the other side (1001) and cut both."""
        client_gone = direction is self.to_target
        if client_gone:
            self._end(Reason.PING_TIMEOUT)
            gone, why = CLIENT, "client did not answer ping"
        else:
            self._end(Reason.TARGET_PING_TIMEOUT)
            gone, why = TARGET, "target did not answer ping"
        mask = self._mask(direction)
        if self.close_initiator is None:
            self.close_initiator = BY_PROXY
            self.close_code = CLOSE_ABNORMAL if client_gone else CLOSE_GOING_AWAY
        if direction.state not in _SHUT and direction.tracker.at_frame_boundary:
            self._send(direction, encode_close(CLOSE_GOING_AWAY, why, mask=mask))
            self._shut(direction)
        self._gone |= gone
        self._emit(AbortSide(gone))
        self._close_side(self._receiver(direction))

    # --- closing --------------------------------------------------------------------------------

    def request_close(
        self,
        *,
        client_code: int,
        target_code: int,
        at: Boundary,
        reason: Reason,
        now: float,
        timeout: float = CLOSE_TIMEOUT_SECONDS,
    ) -> None:
        """Send Close ``client_code`` to the client and ``target_code`` to the target, each at
        the next ``at`` boundary of its stream; both sockets close once both sides answered, or
        ``timeout`` seconds after the first request (later requests keep that deadline)."""
        self._end(reason)
        if self.state is S_CLOSED:
            return
        if self.close_initiator is None:
            self.close_initiator = BY_PROXY
            self.close_code = client_code
        waiting = D_CLOSE_AT_MESSAGE
        if at is AT_FRAME:
            waiting = D_CLOSE_AT_FRAME
        text = reason.replace("_", " ")
        for direction, code in ((self.to_client, client_code), (self.to_target, target_code)):
            if direction.state is not D_OPEN:
                continue
            direction.close_frame = encode_close(code, text, mask=self._mask(direction))
            direction.state = waiting
            direction.plain = False
            if direction.at(waiting):
                self._inject(direction)
        if self.state is S_OPEN:
            self.state = S_CLOSING
        if self.deadline is None:
            self.deadline = now + timeout
            self._emit(Wake(self.deadline))
        self._check_close_handshake()

    def violation(self, direction: D, data: bytes, error: FrameError, now: float) -> None:
        """The sender of ``direction`` broke RFC 6455 or a limit in ``data`` (``error.offset``
        is where the bad frame starts): forward what came before it, tell the sender why, tell
        the other side the proxy is going away, fail the connection (§7.1.7)."""
        if error.offset > 0:
            self._send(direction, data[: error.offset])
        if direction is self.to_target:
            client_code, target_code = error.close_code, CLOSE_GOING_AWAY
        else:
            client_code, target_code = CLOSE_BAD_GATEWAY, error.close_code
        if error.offset < 0:
            # Part of the bad frame's header already reached the receiver: no clean Close there.
            direction.state = D_CUT
            direction.plain = False
            self._close_side(self._receiver(direction))
        elif direction.state in _PENDING:
            direction.state = D_OPEN  # it is at a frame boundary now: Close here
        if self.state is not S_CLOSED:  # once closed, receive() judges no later read
            self.state = S_FAILING
        self.close_initiator = BY_PROXY
        self.close_code = client_code
        self.request_close(
            client_code=client_code,
            target_code=target_code,
            at=AT_FRAME,
            reason=error.reason,
            now=now,
        )

    def _inject(self, direction: D) -> None:
        self._send(direction, direction.close_frame)
        # The receiver answers the other way: one more Close there than now is its answer.
        self._shut(direction, self._reverse(direction).tracker.closes)

    def _shut(self, direction: D, answered_after: int = 0) -> None:
        """A Close of the proxy's went to the receiver of ``direction``; the receiver is done
        once it has sent more than ``answered_after`` Close frames (0: any Close it sent, before
        or after, answers a goodbye)."""
        direction.state = D_CLOSE_SENT
        direction.plain = False
        direction.closes_at_send = answered_after

    def _close_passed(self, direction: D) -> None:
        """The sender's own Close passed (its header, at least): the proxy must not inject
        another there, and nothing after that frame passes."""
        if self.close_initiator is None:
            self.close_initiator = self._sender(direction)
            self.close_code = direction.tracker.close_code  # None until its status bytes came
        if direction.tracker.at_frame_boundary:
            direction.state = D_CLOSE_PASSED
        else:
            direction.state = D_CLOSE_PASSING  # the rest of its payload is to come
        direction.plain = False

    def _finished(self, direction: D) -> bool:
        """Whether the receiver of ``direction`` is done with the close handshake."""
        if self._gone & self._receiver(direction):
            return True
        if self.state is S_FAILING and direction.state in _SHUT:
            return True
        if direction.state is not D_CLOSE_SENT:
            return False
        return self._reverse(direction).tracker.closes > direction.closes_at_send

    def _check_close_handshake(self) -> None:
        if self.state is not S_CLOSING and self.state is not S_FAILING:
            return
        if self._finished(self.to_client) and self._finished(self.to_target):
            self._close_side(CLIENT)
            self._close_side(TARGET)

    def _close_timed_out(self) -> None:
        self.deadline = None
        # Whoever did not answer the Close is the one that timed out.
        client_done = self._finished(self.to_client)
        self._end(Reason.TARGET_CLOSE_TIMEOUT if client_done else Reason.CLOSE_TIMEOUT)
        self._close_side(CLIENT)
        self._close_side(TARGET)

    def _awaiting_client_reply(self) -> bool:
        """The proxy sent the client a Close and is within its deadline for the answer.

        The target may hang up meanwhile; the client's socket stays open so that its Close
        handshake completes cleanly (a client whose socket drops first reports 1006)."""
        direction = self.to_client
        return (
            (self.state is S_CLOSING or self.state is S_FAILING)
            and direction.state is D_CLOSE_SENT
            and self.to_target.tracker.closes <= direction.closes_at_send
            and not self._gone & CLIENT
        )

    def _handshake_complete(self) -> bool:
        return bool(self.to_target.tracker.closes and self.to_client.tracker.closes)

    # --- the sockets ----------------------------------------------------------------------------

    def eof(self, side: Side) -> bool:
        """``side`` sent a FIN. True: the session has dealt with it (both Close frames passed, so
        both sockets close; or the client's answer to our Close is still awaited). False: carry
        on as for a byte stream (pass the half-close on)."""
        if self._handshake_complete():
            # RFC 6455 §7.1.1: once Close frames went both ways the server closes TCP first; a
            # FIN then means "done", not half-close, and no side should be left holding a socket.
            self._end(Reason.CLOSED)
            self._close_side(CLIENT)
            self._close_side(TARGET)
            return True
        if side is CLIENT:
            if not self.to_target.tracker.closes:
                # A WebSocket ends with a Close frame (§7.1.1): a FIN without one is an abnormal
                # end by the client (its peer sees 1006), whatever the other side does next.
                self._end(Reason.CLIENT_CLOSED)
            self._half_closed(self.to_target)
            return False
        if not self.to_client.tracker.closes:
            # A target that dies (SIGKILL: the kernel sends its FIN) sent no Close: not clean.
            self._end(Reason.TARGET_CLOSED)
        if self._awaiting_client_reply():
            return True
        self._half_closed(self.to_client)
        return False

    @staticmethod
    def _half_closed(direction: D) -> None:
        """The adapter passes the sender's FIN on to the receiver (write_eof): nothing may be
        written there any more, not even a goodbye when the sender's socket goes."""
        if direction.state not in _SHUT:
            direction.state = D_CUT
            direction.plain = False

    def lost(self, side: Side, error: bool) -> None:
        """The socket of ``side`` is gone (``error``: reset, not closed); the other side is
        told and closed, unless it is the client and its Close answer is still awaited."""
        self._gone |= side
        if self.state is S_CLOSED:
            return  # both sockets were already asked to close: nothing is left to tell anyone
        # ``ending`` tested first: most sessions have their reason by now, and looking a Reason
        # up costs ~150 ns on Python 3.11 (see the aliases above).
        if side is CLIENT:
            self._say_goodbye(self.to_target, "client went away")
            if self.ending is None:
                self._end(Reason.CLIENT_RESET if error else Reason.CLIENT_CLOSED)
            self._close_side(TARGET)
            return
        self._say_goodbye(self.to_client, "target went away")
        if self._awaiting_client_reply():
            self._check_close_handshake()
            return
        if self.ending is None:
            self._end(Reason.TARGET_RESET if error else Reason.TARGET_CLOSED)
        self._close_side(CLIENT)

    def closing(self) -> None:
        """The adapter closes or aborts both sockets itself (a shutdown, a FIN it cannot pass
        on): the session is over."""
        self._gone = CLIENT | TARGET
        self.state = S_CLOSED
        self.to_target.plain = self.to_client.plain = False

    def _say_goodbye(self, direction: D, why: str) -> None:
        """One side vanished without a Close: send the other a 1001 if its stream allows it."""
        if (
            direction.state in _SHUT
            or not direction.tracker.at_frame_boundary
            or self._gone & self._receiver(direction)
        ):
            return
        self._send(direction, encode_close(CLOSE_GOING_AWAY, why, mask=self._mask(direction)))
        self._shut(direction)
        if self.close_initiator is None:
            self.close_initiator = BY_PROXY
            self.close_code = CLOSE_GOING_AWAY
