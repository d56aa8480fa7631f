"""What wsproxy needs from OpenSSL that Python's ``ssl`` module does not give.

For the proxy's own contexts only (nothing process-wide changes):

- **The alert of a refused handshake.** OpenSSL writes the TLS alert (``certificate_required``,
  ``unknown_ca``, ``certificate_expired``...) into the outgoing memory BIO before
  ``SSLObject.do_handshake`` raises, but the SSLProtocol of asyncio and of uvloop closes the
  transport on that error without sending what the BIO holds, so the client sees only the
  connection end ("unexpected eof", curl's "Empty reply"). ``ListenerContext`` hands out
  ``SSLObject``s that send those bytes on the accepted socket themselves, then let the same
  error go on, so uvloop's transport, its classification and its timing stay as they were.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator
from contextvars import ContextVar

# The accepted socket whose handshake runs in this context. asyncio and uvloop run a
# transport's callbacks (and so OpenSSL's handshake) in a copy of the context that was current
# when the transport was made, so a value set around ``connect_accepted_socket`` is seen there.
_HANDSHAKE_SOCKET: ContextVar[socket.socket | None] = ContextVar(
    "wsproxy_handshake_socket", default=None
)


@contextlib.contextmanager
def alerts_to(connection: socket.socket) -> Iterator[None]:
    """Within this block, a ``ListenerContext`` handshake that fails sends its alert on
    ``connection`` (the accepted socket the transport is made from)."""
    token = _HANDSHAKE_SOCKET.set(connection)
    try:
        yield
    finally:
        _HANDSHAKE_SOCKET.reset(token)


class _AlertingSSLObject(ssl.SSLObject):
    """An ``SSLObject`` whose failed handshake puts OpenSSL's alert on the wire itself."""

    _alert_socket: socket.socket | None = None
    _outgoing: ssl.MemoryBIO | None = None

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # needs more bytes: the transport sends what the BIO holds, and reads
        except ssl.SSLError:
            self._send_alert()
            raise
        self._alert_socket = self._outgoing = None  # done: hold no socket for the session

    def _send_alert(self) -> None:
        connection, outgoing = self._alert_socket, self._outgoing
        self._alert_socket = self._outgoing = None
        if connection is None or outgoing is None or not outgoing.pending:
            return
        # Straight to the socket, ahead of the transport: nothing of ours can be queued there,
        # because the client's bytes that failed the handshake were its answer to our whole
        # previous flight (or its first flight, before we sent anything). An error means the
        # client is gone or not reading: nobody left to tell.
        with contextlib.suppress(OSError):
            connection.send(outgoing.read())


class ListenerContext(ssl.SSLContext):
    """A server ``SSLContext`` whose refused handshakes send their TLS alert (see the module
    docstring); otherwise an ordinary ``SSLContext``."""

    sslobject_class = _AlertingSSLObject

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        ssl_object = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        if isinstance(ssl_object, _AlertingSSLObject):
            ssl_object._alert_socket = _HANDSHAKE_SOCKET.get()
            ssl_object._outgoing = outgoing
        return ssl_object
