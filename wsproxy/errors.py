"""The one exception hierarchy of wsproxy.

Every class carries a stable ``reason``: the value of the ``reason`` label in metrics and of the
``reason`` field in connection logs. Classes that end an HTTP exchange carry the status the client
gets; classes that end a WebSocket session carry the close code each side gets. The mapping lives
here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass


class WsproxyError(Exception):
    """Base of every error wsproxy raises on purpose."""

    reason = "error"


# --- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file: where (a key path) and what to do about it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(WsproxyError):
    """The config file cannot be used; ``issues`` lists every problem found, not just the first."""

    reason = "config"

    def __init__(self, source: str, issues: list[ConfigIssue]) -> None:
        self.source = source
        self.issues = issues
        lines = "\n".join(f"  {issue}" for issue in issues)
        super().__init__(f"{source}: {len(issues)} error(s)\n{lines}")


# --- HTTP handshake (client side) -------------------------------------------------------------


class HttpError(WsproxyError):
    """The client's request cannot be served; the client gets ``status`` and the connection ends."""

    status = 400
    reason = "bad_request"

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)


class BadRequest(HttpError):
    status = 400
    reason = "bad_request"


class MethodNotAllowed(HttpError):
    status = 405
    reason = "method_not_allowed"


class RequestTimeout(HttpError):
    status = 408
    reason = "request_timeout"


class UpgradeRequired(HttpError):
    """426: wrong or missing WebSocket version, or a plain request on a websocket_only listener."""

    status = 426
    reason = "upgrade_required"


class HeadTooLarge(HttpError):
    status = 431
    reason = "head_too_large"


# --- targets -----------------------------------------------------------------------------------


class TargetError(HttpError):
    """A target could not serve the connection; in websocket mode the client gets ``status``."""

    status = 502
    reason = "target_error"


class NoTargets(TargetError):
    status = 503
    reason = "no_targets"


class TargetRefused(TargetError):
    status = 502
    reason = "target_refused"


class TargetTlsFailed(TargetError):
    """The TLS handshake with a target failed (bad certificate, name mismatch, ...)."""

    status = 502
    reason = "target_tls"


class TargetConnectTimeout(TargetError):
    status = 504
    reason = "target_connect_timeout"


class TargetClosed(TargetError):
    """The target closed or reset the connection before it answered the handshake."""

    status = 502
    reason = "target_closed"


class TargetHandshakeTimeout(TargetError):
    status = 504
    reason = "target_handshake_timeout"


class BadTargetResponse(TargetError):
    """The target answered something that is not valid HTTP or a 101 with the wrong accept key."""

    status = 502
    reason = "bad_target_response"


# --- wire format (sans-I/O parsers raise these) ------------------------------------------------


class WireError(WsproxyError):
    """Bytes that do not follow the protocol they claim to follow."""

    reason = "protocol_error"


class MalformedHead(WireError):
    """An HTTP/1.1 head that cannot be parsed safely (RFC 9112)."""

    reason = "malformed_head"


class HeadLimitExceeded(WireError):
    """An HTTP/1.1 head longer than the configured limit."""

    reason = "head_too_large"


class MalformedBody(WireError):
    """A chunked body or Content-Length that does not follow RFC 9112 §6-7."""

    reason = "malformed_body"


class FrameError(WireError):
    """A WebSocket frame that breaks RFC 6455; ``offset`` is where its header starts in the chunk.

    ``close_code`` is what the sender of the frame is told.
    """

    close_code = 1002
    reason = "ws_protocol_error"

    def __init__(self, detail: str, offset: int) -> None:
        self.offset = offset
        super().__init__(detail)


class FrameTooLarge(FrameError):
    close_code = 1009
    reason = "ws_frame_too_large"


class MessageTooLarge(FrameTooLarge):
    """A data message whose fragments together pass ``max_message_bytes``."""

    reason = "ws_message_too_large"


class UnmaskedFrame(FrameError):
    close_code = 1002
    reason = "ws_unmasked_frame"


class MaskedFrame(FrameError):
    close_code = 1002
    reason = "ws_masked_frame"


class ClientClosed(WsproxyError):
    """The client closed or reset its connection before the handshake finished."""

    reason = "client_closed"


class CAError(WsproxyError):
    """The certificate authority cannot do what was asked; the message says how to fix it."""

    reason = "ca"


class TlsConfigError(WsproxyError):
    """A TLS listener's certificates, keys, CA or CRL cannot be used."""

    reason = "tls_config"


class ClientCertRejected(WsproxyError):
    """A client certificate failed a check OpenSSL does not make (e.g. the clientAuth EKU)."""

    def __init__(self, result: str, detail: str) -> None:
        self.result = result  # ok | missing | untrusted | expired | revoked | bad_eku
        self.reason = f"client_cert_{result}"
        super().__init__(detail)


class NotTls(WireError):
    """The first bytes are not a TLS handshake record."""

    reason = "tls_not_tls"


class MalformedClientHello(WireError):
    reason = "tls_malformed_client_hello"


class ClientHelloTooLarge(WireError):
    reason = "tls_client_hello_too_large"


class ClientHelloTimeout(WsproxyError):
    reason = "tls_client_hello_timeout"


class NoRoute(WsproxyError):
    """No rule matched and the listener has no default target group."""

    reason = "no_route"


class MalformedProxyHeader(WireError):
    reason = "proxy_protocol_error"


class TargetExists(WsproxyError):
    """A registration or deregistration that conflicts with the target's current state."""

    reason = "conflict"


# --- supervisor and workers -------------------------------------------------------------------


class MalformedControlMessage(WireError):
    """A message between the supervisor and a worker that cannot be decoded (a bug, or a
    process that is not a wsproxy worker writing to the channel)."""

    reason = "control_protocol"


class WorkerUnavailable(WsproxyError):
    """A worker did not answer the supervisor in time, or its channel is closed."""

    reason = "worker_unavailable"
