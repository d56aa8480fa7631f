"""The byte pump between a client and a target.

Both sockets are asyncio Protocols (``Endpoint``); nothing on the hot path allocates or awaits:
``data_received`` on one side is a ``write`` on the other plus an integer addition. Backpressure is
crossed over: when one side's transport asks us to stop writing (``pause_writing``), we stop reading
the other side, and resume when it drains. Half-close (EOF) is propagated where the transport can
send one. Every close has a deadline: a peer that never reads cannot pin a connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from wsproxy.ticker import Ticker

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


class Endpoint(asyncio.Protocol):
    """One socket of a proxied connection (client side or target side).

    Its callbacks are plain attributes, so a flow rewires them as it moves from handshake to relay
    without creating new objects. It remembers whether its transport asked to pause writing, so the
    relay can start in the right backpressure state.
    """

    __slots__ = (
        "_linger",
        "held",
        "lost",
        "on_data",
        "on_eof",
        "on_lost",
        "on_made",
        "on_pause_writing",
        "on_resume_writing",
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
        self.on_made: Callable[[], None] = _nothing
        # Until a flow takes over, bytes are held (and reading paused), never dropped: an event
        # loop may deliver data before a pause_reading() in connection_made takes effect.
        self.on_data: Callable[[bytes], None] = self.hold
        self.on_eof: Callable[[], bool] = _keep_open
        self.on_lost: Callable[[Exception | None], None] = _ignore_lost
        self.on_pause_writing: Callable[[], None] = _nothing
        self.on_resume_writing: Callable[[], None] = _nothing

    # --- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.tls = transport.get_extra_info("sslcontext") is not None
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        # No TCP_NODELAY here: uvloop sets it on every TCP transport it makes (a test checks).
        self.on_made()

    def data_received(self, data: bytes) -> None:
        self.on_data(data)

    def eof_received(self) -> bool:
        # Asking to stay open after EOF only draws a warning on a TLS transport.
        return self.on_eof() and not self.tls

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self.on_lost(exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.on_pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.on_resume_writing()

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
        self.on_eof = _close_on_eof
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


class Relay:
    """Moves bytes both ways between two connected endpoints until both are closed.

    ``bytes_in`` counts client→target bytes, ``bytes_out`` target→client. ``on_done`` runs once,
    after both sockets are gone; ``reason`` says why the connection ended (the first cause wins).
    """

    __slots__ = (
        "_client_eof",
        "_done",
        "_idle_mark",
        "_idle_since",
        "_idle_slot",
        "_idle_timeout",
        "_loop",
        "_on_done",
        "_target_eof",
        "bytes_in",
        "bytes_out",
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
        on_done: Callable[[Relay], None],
        ticker: Ticker,
    ) -> None:
        self.client = client
        self.target = target
        self.bytes_in = 0
        self.bytes_out = 0
        self.reason: str | None = None
        self._idle_timeout = idle_timeout
        self._on_done = on_done
        self._client_eof = False
        self._target_eof = False
        self._done = False
        self.ticker = ticker
        self._idle_slot: int | None = None
        self._idle_mark = -1
        self._idle_since = 0.0
        self._loop = asyncio.get_running_loop()

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self, to_target: bytes = b"", to_client: bytes = b"") -> None:
        """Take over both endpoints; ``to_target``/``to_client`` are bytes already read from the
        client/target during the handshake that belong to the relayed stream."""
        client, target = self.client, self.target
        # Bytes handed over by the handshake came first; bytes held since then follow them.
        to_target += client.take_held()
        to_client += target.take_held()
        client.on_data = self.from_client
        target.on_data = self.from_target
        client.on_eof = self._client_eof_received
        target.on_eof = self._target_eof_received
        client.on_lost = self._client_lost
        target.on_lost = self._target_lost
        client.on_pause_writing = target.pause_reading
        client.on_resume_writing = target.resume_reading
        target.on_pause_writing = client.pause_reading
        target.on_resume_writing = client.resume_reading
        if client.lost:
            self._client_lost(None)
            return
        if target.lost:
            self._target_lost(None)
            return
        if to_target:
            self.from_client(to_target)
        if to_client:
            self.from_target(to_client)
        if not target.write_paused:
            client.resume_reading()
        if not client.write_paused:
            target.resume_reading()
        self._idle_since = self._loop.time()
        self._schedule_idle_check()

    def close(self, reason: str) -> None:
        """Flush and close both sides."""
        self.set_reason(reason)
        self.client.close()
        self.target.close()

    def abort(self, reason: str) -> None:
        self.set_reason(reason)
        self.client.abort()
        self.target.abort()

    def set_reason(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    @property
    def done(self) -> bool:
        return self._done

    # --- hot path -------------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        self.bytes_in += len(data)  # also the log line's bytes and the idle check's clock
        self.target.write(data)

    def from_target(self, data: bytes) -> None:
        self.bytes_out += len(data)  # also the log line's bytes and the idle check's clock
        self.client.write(data)

    # --- half-close and loss ----------------------------------------------------------------------

    def _client_eof_received(self) -> bool:
        self._client_eof = True
        if self._target_eof:
            self.close("closed")
        elif not self.target.write_eof():
            self.close("client_closed")
        return True

    def _target_eof_received(self) -> bool:
        self._target_eof = True
        if self._client_eof:
            self.close("closed")
        elif not self.client.write_eof():
            self.close("target_closed")
        return True

    def _client_lost(self, exc: Exception | None) -> None:
        self.set_reason("client_reset" if exc else "client_closed")
        self.target.close()
        self._maybe_done()

    def _target_lost(self, exc: Exception | None) -> None:
        self.set_reason("target_reset" if exc else "target_closed")
        self.client.close()
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._done or not (self.client.lost and self.target.lost):
            return
        self._done = True
        if self._idle_slot is not None:
            self.ticker.discard(self, self._idle_slot)
            self._idle_slot = None
        self._on_done(self)

    # --- idle timeout ---------------------------------------------------------------------------

    def _schedule_idle_check(self) -> None:
        # Checking the byte counters a few times per timeout keeps the hot path free of clock
        # reads; the connection closes between 1 and 1.25 timeouts after the last byte moved
        # (plus the ticker's resolution).
        self._idle_slot = self.ticker.add(self, self._idle_timeout / 8)

    def tick(self) -> None:
        """The idle check, called by the ticker."""
        self._idle_slot = None
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
        self._schedule_idle_check()

    def on_idle(self) -> None:
        """No byte moved either way for ``idle_timeout`` seconds."""
        self.close("idle_timeout")
