"""The byte pump between a client and a target.

Both sockets are asyncio Protocols (``Endpoint``); nothing on the hot path allocates or awaits:
``data_received`` on one side is a ``write`` on the other plus an integer addition. Backpressure is
crossed over: when one side's transport asks us to stop writing (``pause_writing``), we stop reading
the other side, and resume when it drains. Half-close (EOF) is propagated where the transport can
send one. Every close has a deadline: a peer that never reads cannot pin a connection.

An idle session must cost little memory (``loadtest hold``), so a running relay holds no bound
methods: a stream relay points each endpoint at its ``peer`` (the endpoint writes what it reads
straight there), a WebSocket relay makes each endpoint's ``on_data`` the direction object that
tracks frames, and the rarer events (EOF, loss, backpressure) reach the relay through the
endpoint's ``owner``. Ten bound methods were ~640 bytes per session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol, cast

from wsproxy.errors import Reason
from wsproxy.relay.ticker import TickBucket, Ticker

# Bytes a transport may buffer toward a slow reader before the other side is paused. 64 KiB is
# asyncio's default high-water mark; the low mark resumes reading once a quarter is left.
WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = 16 * 1024
# How long a closing socket may take to flush before it is aborted (HAProxy's timeout client-fin).
CLOSE_LINGER_SECONDS = 5.0


def _keep_open() -> bool:
    return True


def _close_on_eof() -> bool:
    return False  # asyncio closes the transport when eof_received returns a false value


def _discard(data: bytes) -> None:
    return None


def _nothing() -> None:
    return None


def _ignore_lost(exc: Exception | None) -> None:
    return None


class EndpointOwner(Protocol):
    """What takes an endpoint's events: a ``Relay``, or a flow's ``HandshakeCallbacks``."""

    def endpoint_eof(self, endpoint: Endpoint) -> bool: ...

    def endpoint_lost(self, endpoint: Endpoint, exc: Exception | None) -> None: ...

    def endpoint_pause_writing(self, endpoint: Endpoint) -> None: ...

    def endpoint_resume_writing(self, endpoint: Endpoint) -> None: ...


class HandshakeCallbacks:
    """An endpoint's events during a handshake, as plain attributes a flow rewires step by step.

    It exists only while a handshake runs: a relay replaces it as the endpoint's owner, so an idle
    session carries none of these slots.
    """

    __slots__ = ("on_eof", "on_lost", "on_pause_writing", "on_resume_writing")

    def __init__(self) -> None:
        self.on_eof: Callable[[], bool] = _keep_open
        self.on_lost: Callable[[Exception | None], None] = _ignore_lost
        self.on_pause_writing: Callable[[], None] = _nothing
        self.on_resume_writing: Callable[[], None] = _nothing

    def endpoint_eof(self, endpoint: Endpoint) -> bool:
        return self.on_eof()

    def endpoint_lost(self, endpoint: Endpoint, exc: Exception | None) -> None:
        self.on_lost(exc)

    def endpoint_pause_writing(self, endpoint: Endpoint) -> None:
        self.on_pause_writing()

    def endpoint_resume_writing(self, endpoint: Endpoint) -> None:
        self.on_resume_writing()


class Endpoint(asyncio.Protocol):
    """One socket of a proxied connection (client side or target side).

    Its events go to ``owner``: during a handshake ``callbacks`` (made on first use), whose
    attributes a flow rewires as it moves from step to step; once a relay runs, the relay itself.
    ``on_data`` is whatever consumes the bytes, unless a stream relay set ``peer``: then they are
    written to the peer's socket directly. It remembers whether its transport asked to pause
    writing, so the relay can start in the right backpressure state.
    """

    __slots__ = (
        "_linger",
        "held",
        "lost",
        "on_data",
        "on_made",
        "owner",
        "peer",
        "relayed",
        "tls",
        "transport",
        "write_paused",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.tls = False  # TLS cannot half-close: asyncio closes such a transport on EOF
        self.lost = False
        self.write_paused = False
        self._linger: asyncio.TimerHandle | None = None
        self.held = b""
        self.relayed = 0  # bytes a relay wrote to this socket on the peer's behalf
        self.peer: Endpoint | None = None  # set by a stream relay: data goes straight there
        self.owner: EndpointOwner | None = None
        self.on_made: Callable[[], None] = _nothing
        # Until a flow takes over, bytes are held (and reading paused), never dropped: an event
        # loop may deliver data before a pause_reading() in connection_made takes effect.
        self.on_data: Callable[[bytes], None] = self.hold

    @property
    def callbacks(self) -> HandshakeCallbacks:
        """The handshake's event callbacks; an error once a relay owns the endpoint."""
        owner = self.owner
        if owner is None:
            owner = self.owner = HandshakeCallbacks()
        elif not isinstance(owner, HandshakeCallbacks):
            raise RuntimeError("a relay owns this endpoint: its handshake callbacks are gone")
        return owner

    # --- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.tls = transport.get_extra_info("sslcontext") is not None
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        # No TCP_NODELAY here: uvloop sets it on every TCP transport it makes (a test checks).
        made, self.on_made = self.on_made, _nothing
        made()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            self.on_data(data)
            return
        # The stream relay's whole hot path, in the one frame uvloop calls: a method call per
        # chunk more (bound method or __call__) measured 100-150 ns of the ~300.
        peer.relayed += len(data)  # also the log line's bytes and the idle check's clock
        transport = peer.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def eof_received(self) -> bool:
        owner = self.owner
        keep = owner.endpoint_eof(self) if owner is not None else True
        # Asking to stay open after EOF only draws a warning on a TLS transport.
        return keep and not self.tls

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self.owner is not None:
            self.owner.endpoint_lost(self, exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.owner is not None:
            self.owner.endpoint_pause_writing(self)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.owner is not None:
            self.owner.endpoint_resume_writing(self)

    # --- helpers that are safe in every state ---------------------------------------------------

    def hold(self, data: bytes) -> None:
        self.held += data
        self.pause_reading()

    def take_held(self) -> bytes:
        held, self.held = self.held, b""
        return held

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def write_eof(self) -> bool:
        """Send a FIN if the transport can; False when it cannot (TLS) or is closing."""
        transport = self.transport
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            return False
        transport.write_eof()
        return True

    def close(self, linger: float = CLOSE_LINGER_SECONDS) -> None:
        """Flush what is buffered, then close; abort if the peer has not read it in ``linger`` s."""
        transport = self.transport
        if transport is None or self.lost:
            return
        if not transport.is_closing():
            transport.close()
        if self._linger is None:
            loop = asyncio.get_running_loop()
            self._linger = loop.call_later(linger, self.abort)

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def lingering_close(self, seconds: float = 2.0) -> None:
        """Close after an error response without losing it to a TCP reset.

        Closing a socket with unread input makes the kernel send RST, which can destroy the
        response before the client reads it; so send FIN, discard what the client still sends
        until its own FIN or ``seconds``, then close (nginx's lingering_close, RFC 9112 §9.6).
        """
        self.on_data = _discard
        self.callbacks.on_eof = _close_on_eof
        if not self.write_eof():
            self.close()
            return
        self.resume_reading()
        if self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(seconds, self.abort)

    @property
    def peer_address(self) -> tuple[str, int]:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        if isinstance(peer, tuple) and len(peer) >= 2:
            return str(peer[0]), int(peer[1])
        return "", 0

    @property
    def local_port(self) -> int:
        local = self.transport.get_extra_info("sockname") if self.transport else None
        return int(local[1]) if isinstance(local, tuple) and len(local) >= 2 else 0


class RelayOwner(Protocol):
    """Who hears that a relay ended (its flow)."""

    def relay_done(self, relay: Relay) -> None: ...


class Relay:
    """Moves bytes both ways between two connected endpoints until both are closed.

    ``bytes_in`` counts client→target bytes, ``bytes_out`` target→client. ``owner.relay_done``
    runs once, after both sockets are gone; ``reason`` says why the connection ended (the first
    cause wins).
    """

    __slots__ = (
        "_client_eof",
        "_done",
        "_idle_mark",
        "_idle_since",
        "_idle_timeout",
        "_loop",
        "_owner",
        "_target_eof",
        "_tick_bucket",
        "client",
        "reason",
        "target",
        "ticker",
    )

    def __init__(
        self,
        client: Endpoint,
        target: Endpoint,
        *,
        idle_timeout: float,
        owner: RelayOwner,
        ticker: Ticker,
    ) -> None:
        self.client = client
        self.target = target
        self.reason: Reason | None = None
        self._idle_timeout = idle_timeout
        self._owner = owner
        self._client_eof = False
        self._target_eof = False
        self._done = False
        self.ticker = ticker
        self._tick_bucket: TickBucket | None = None
        self._idle_mark = -1
        self._idle_since = 0.0
        self._loop = asyncio.get_running_loop()

    @property
    def bytes_in(self) -> int:
        """Client → target bytes relayed."""
        return self.target.relayed

    @property
    def bytes_out(self) -> int:
        """Target → client bytes relayed."""
        return self.client.relayed

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self, to_target: bytes = b"", to_client: bytes = b"") -> None:
        """Take over both endpoints; ``to_target``/``to_client`` are bytes already read from the
        client/target during the handshake that belong to the relayed stream."""
        client, target = self.client, self.target
        # Bytes handed over by the handshake came first; bytes held since then follow them.
        to_target += client.take_held()
        to_client += target.take_held()
        self._wire(client, target)
        if client.lost:
            self._client_lost(None)
            return
        if target.lost:
            self._target_lost(None)
            return
        if to_target:
            client.data_received(to_target)
        if to_client:
            target.data_received(to_client)
        if not target.write_paused:
            client.resume_reading()
        if not client.write_paused:
            target.resume_reading()
        self._idle_since = self._loop.time()
        self._schedule_tick()

    def _wire(self, client: Endpoint, target: Endpoint) -> None:
        """Take both endpoints' events over; their handshake callbacks (and what those
        reference) go."""
        for endpoint in (client, target):
            endpoint.owner = self
        self._route_data(client, target)

    def _route_data(self, client: Endpoint, target: Endpoint) -> None:
        """Opaque bytes: each endpoint writes what it reads straight to the other."""
        client.on_data = target.on_data = _discard  # the handshake's readers go
        client.peer = target
        target.peer = client

    def close(self, reason: Reason) -> None:
        """Flush and close both sides."""
        self.set_reason(reason)
        self.client.close()
        self.target.close()

    def abort(self, reason: Reason) -> None:
        self.set_reason(reason)
        self.client.abort()
        self.target.abort()

    def set_reason(self, reason: Reason) -> None:
        if self.reason is None:
            self.reason = reason

    @property
    def done(self) -> bool:
        return self._done

    # --- endpoint events (EndpointOwner) --------------------------------------------------------

    def endpoint_eof(self, endpoint: Endpoint) -> bool:
        if endpoint is self.client:
            return self._client_eof_received()
        return self._target_eof_received()

    def endpoint_lost(self, endpoint: Endpoint, exc: Exception | None) -> None:
        if endpoint is self.client:
            self._client_lost(exc)
        else:
            self._target_lost(exc)

    def endpoint_pause_writing(self, endpoint: Endpoint) -> None:
        # Crossed backpressure: a side that cannot take more stops the other from reading.
        (self.target if endpoint is self.client else self.client).pause_reading()

    def endpoint_resume_writing(self, endpoint: Endpoint) -> None:
        (self.target if endpoint is self.client else self.client).resume_reading()

    # --- half-close and loss ----------------------------------------------------------------------

    def _client_eof_received(self) -> bool:
        self._client_eof = True
        if self._target_eof:
            self.close(Reason.CLOSED)
        elif not self.target.write_eof():
            self.close(Reason.CLIENT_CLOSED)
        return True

    def _target_eof_received(self) -> bool:
        self._target_eof = True
        if self._client_eof:
            self.close(Reason.CLOSED)
        elif not self.client.write_eof():
            self.close(Reason.TARGET_CLOSED)
        return True

    # The reason is looked up only when none is set yet: an Enum member costs ~150 ns on Python
    # 3.11 (EnumType.__getattr__), and most sessions already have theirs when a socket goes.

    def _client_lost(self, exc: Exception | None) -> None:
        if self.reason is None:
            self.reason = Reason.CLIENT_RESET if exc else Reason.CLIENT_CLOSED
        self.target.close()
        self._maybe_done()

    def _target_lost(self, exc: Exception | None) -> None:
        if self.reason is None:
            self.reason = Reason.TARGET_RESET if exc else Reason.TARGET_CLOSED
        self.client.close()
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._done or not (self.client.lost and self.target.lost):
            return
        self._done = True
        if self._tick_bucket is not None:
            self.ticker.discard(self, self._tick_bucket)
            self._tick_bucket = None
        self._owner.relay_done(self)

    # --- idle timeout ---------------------------------------------------------------------------

    def _schedule_tick(self) -> None:
        self._tick_bucket = self.ticker.add(self, self._next_tick_delay())

    def _reschedule_tick(self) -> None:
        """Something is due sooner than the tick that waits: move it."""
        if self._tick_bucket is not None:
            self.ticker.discard(self, self._tick_bucket)
            self._schedule_tick()

    def _next_tick_delay(self) -> float:
        # Checking the byte counters a few times per timeout keeps the hot path free of clock
        # reads; the connection closes between 1 and 1.25 timeouts after the last byte moved
        # (plus the ticker's resolution).
        return self._idle_timeout / 8

    def tick(self) -> None:
        """The idle check, called by the ticker (the relay's only timer while it runs)."""
        self._tick_bucket = None
        if self._done:
            return
        now = self._loop.time()
        moved = self.bytes_in + self.bytes_out
        if moved != self._idle_mark:
            self._idle_mark = moved
            self._idle_since = now
        elif now - self._idle_since >= self._idle_timeout:
            self.on_idle()
            return
        self._schedule_tick()

    def on_idle(self) -> None:
        """No byte moved either way for ``idle_timeout`` seconds."""
        self.close(Reason.IDLE_TIMEOUT)
