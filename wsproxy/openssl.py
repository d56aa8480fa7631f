"""What wsproxy needs from OpenSSL that Python's ``ssl`` module does not give.

Three things, all for the proxy's own contexts only (nothing process-wide changes):

- **The alert of a refused handshake.** OpenSSL writes the TLS alert (``certificate_required``,
  ``unknown_ca``, ``certificate_expired``...) into the outgoing memory BIO before
  ``SSLObject.do_handshake`` raises, but the SSLProtocol of asyncio and of uvloop closes the
  transport on that error without sending what the BIO holds, so the client sees only the
  connection end ("unexpected eof", curl's "Empty reply"). ``ListenerContext`` hands out
  ``SSLObject``s that send those bytes on the accepted socket themselves, then let the same
  error go on, so uvloop's transport, its classification and its timing stay as they were.
- **The key-exchange groups.** OpenSSL 3.0 accepts X448 and P-521 (and, in TLS 1.3, the
  finite-field groups) besides X25519, P-256 and P-384; Mozilla's intermediate and modern
  profiles name exactly the last three, and scanners mark the others down. Python gains
  ``SSLContext.set_groups`` only in 3.15; before, ``limit_groups`` calls OpenSSL's
  ``SSL_CTX_set1_groups_list`` on the context through ctypes.
- **No session resumption.** A resumed handshake presents no certificate, so nothing checks it
  against the CRL again; listeners that verify clients turn resumption off, which needs
  ``SSL_CTX_set_session_cache_mode`` (``disable_resumption``).
"""

from __future__ import annotations

import _ssl
import contextlib
import ctypes
import functools
import socket
import ssl
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

# Mozilla's intermediate and modern profiles: "X25519, prime256v1, secp384r1".
GROUPS = ("X25519", "P-256", "P-384")

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


# --- groups ---------------------------------------------------------------------------------

_SSL_CTRL_SET_GROUPS_LIST = 92  # ssl.h: SSL_CTX_set1_groups_list(ctx, list) is this ctrl


@functools.cache
def _functions() -> tuple[Any, Any, Any]:
    """OpenSSL's SSL_CTX_ctrl, SSL_CTX_get_options and ERR_clear_error, from the library the
    ``_ssl`` module is linked with (dlsym on its handle searches its dependencies)."""
    library = ctypes.CDLL(_ssl.__file__)
    ctrl = library.SSL_CTX_ctrl
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    ctrl.restype = ctypes.c_long
    get_options = library.SSL_CTX_get_options
    get_options.argtypes = [ctypes.c_void_p]
    get_options.restype = ctypes.c_uint64
    clear_errors = library.ERR_clear_error
    clear_errors.argtypes = []
    clear_errors.restype = None
    return ctrl, get_options, clear_errors


def limit_groups(context: ssl.SSLContext) -> str | None:
    """Offer (and accept) exactly ``GROUPS`` for key exchange on ``context``, TLS 1.2 and 1.3.

    Returns None, or why it could not be done (not CPython, an OpenSSL linked in without its
    symbols): then OpenSSL's defaults, which add X448 and P-521, stay; the caller warns.
    """
    groups = ":".join(GROUPS)
    setter = getattr(context, "set_groups", None)  # Python 3.15+
    if setter is not None:
        setter(groups)
        return None
    if sys.implementation.name != "cpython":
        return f"{sys.implementation.name} is not CPython"
    try:
        ctrl, get_options, clear_errors = _functions()
    except (OSError, AttributeError) as exc:
        return f"OpenSSL's functions are not reachable from the _ssl module ({exc})"
    address = _ssl_ctx(context, get_options)
    if address is None:
        return "the SSL_CTX of an SSLContext was not where CPython keeps it"
    if ctrl(address, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode()) != 1:
        clear_errors()  # leave no error queued for the next ssl call to trip over
        return f"OpenSSL refused the groups {groups}"
    return None


def _ssl_ctx(context: ssl.SSLContext, get_options: Any) -> int | None:
    """The address of ``context``'s SSL_CTX, or None where it cannot be found safely."""
    # CPython's PySSLContext starts with its SSL_CTX pointer right after the object header
    # (Modules/_ssl.c, unchanged from 3.0 to 3.14); the options check confirms it.
    address = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not address or get_options(address) != context.options:
        return None
    return int(address)


# --- session resumption ---------------------------------------------------------------------

_SSL_CTRL_SET_SESS_CACHE_MODE = 44  # ssl.h: SSL_CTX_set_session_cache_mode(ctx, mode)
_SSL_SESS_CACHE_OFF = 0


def disable_resumption(context: ssl.SSLContext) -> str | None:
    """Make the server ``context`` resume no session: no TLS 1.2 ticket (``OP_NO_TICKET``), no
    TLS 1.3 ticket (``num_tickets = 0``) and no server-side session cache (TLS 1.2 session
    ids, and the stateful TLS 1.3 tickets ``OP_NO_TICKET`` would otherwise turn on).

    Python has no setter for the cache mode, so ``SSL_CTX_set_session_cache_mode`` is called
    through ctypes, as in ``limit_groups``. Returns None, or why the cache could not be turned
    off (then TLS 1.2 session ids still resume; the caller warns).
    """
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0
    if sys.implementation.name != "cpython":
        return f"{sys.implementation.name} is not CPython"
    try:
        ctrl, get_options, _ = _functions()
    except (OSError, AttributeError) as exc:
        return f"OpenSSL's functions are not reachable from the _ssl module ({exc})"
    address = _ssl_ctx(context, get_options)
    if address is None:
        return "the SSL_CTX of an SSLContext was not where CPython keeps it"
    ctrl(address, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)  # returns the old mode
    return None
