"""The one exception hierarchy of wsproxy, and the one registry of reasons a connection ends.

``Reason`` is the only mapping from a reason to what each audience sees of it: the ``reason``
label in metrics and the ``reason`` field of the connection log (its value), the first character
of the log's termination code (``cause``), the HTTP status or WebSocket close code the client
gets (``code``), and a line of documentation (``doc``). docs/operations.md's table is generated
from it (``python -m wsproxy.ops.termination``) and a test keeps the two equal. Exceptions carry a
member as ``reason``; code passes members, never strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Self


class DescribedEnum(StrEnum):
    """A string enum whose members are tuples: the value first, then what ``__init__`` of the
    subclass keeps of the rest (a doc line, codes). The value alone is what compares, hashes,
    formats and serializes, so members go straight into metric labels and JSON logs."""

    def __new__(cls, value: str, *details: object) -> Self:
        member = str.__new__(cls, value)
        member._value_ = value
        return member


class Cause(DescribedEnum):
    """What ended a connection: the first character of its termination code (after HAProxy's
    termination state); the second is the phase it had reached (``ops.termination.Phase``)."""

    def __init__(self, char: str, doc: str) -> None:
        self.doc = doc

    CLEAN = "-", "normal end"
    CLIENT = "C", "the client closed or reset"
    TARGET = "S", "a target closed, reset, refused or misbehaved"
    CLIENT_TIMEOUT = "c", "a client-side timeout"
    TARGET_TIMEOUT = "s", "a target-side timeout"
    REFUSED = "P", "the proxy refused the input (malformed, over a size limit, failed a check)"
    DRAINING = "D", "draining or shutdown"
    KILLED = "K", "killed: the client certificate was revoked while connected"
    NO_TARGET = "N", "no target available"
    RESOURCE = "R", "a resource limit"
    INTERNAL = "I", "an internal error (a bug: please report it)"


class Reason(DescribedEnum):
    """Why a connection ended (or a handshake or upgrade failed).

    The value is the metric label and log field; ``cause`` the termination code's first
    character; ``code`` the HTTP status (handshake failures) or WebSocket close code the client is
    sent (session ends), ``None`` when the connection just closes; ``doc`` one line for the docs.
    """

    def __init__(self, label: str, cause: Cause, code: int | None, doc: str) -> None:
        self.cause = cause
        self.code = code
        self.doc = doc

    # --- clean ends
    CLOSED = (
        "closed",
        Cause.CLEAN,
        None,
        "the session ended cleanly: Close frames both ways (WebSocket), FIN both ways (stream)",
    )
    HTTP_FORWARDED = (
        "http_forwarded",
        Cause.CLEAN,
        None,
        "a request that was not an upgrade went to a target alone and its answer came back",
    )
    # --- the client
    CLIENT_CLOSED = "client_closed", Cause.CLIENT, None, "the client closed its connection"
    CLIENT_RESET = "client_reset", Cause.CLIENT, None, "the client reset its connection"
    # --- a target
    TARGET_CLOSED = (
        "target_closed",
        Cause.TARGET,
        502,
        "the target closed the connection (before answering, or a session without a Close)",
    )
    TARGET_RESET = "target_reset", Cause.TARGET, 502, "the target reset the connection"
    TARGET_REFUSED = "target_refused", Cause.TARGET, 502, "every target tried refused the connect"
    TARGET_TLS = "target_tls", Cause.TARGET, 502, "the TLS handshake with the target failed"
    TARGET_ERROR = "target_error", Cause.TARGET, 502, "the target could not serve the connection"
    BAD_TARGET_RESPONSE = (
        "bad_target_response",
        Cause.TARGET,
        502,
        "the target's answer was not valid HTTP, or a 101 with the wrong Sec-WebSocket-Accept",
    )
    CONNECT_REJECTED = (
        "connect_rejected",
        Cause.TARGET,
        None,
        "API listeners: the $connect integration answered non-2xx; the client got that status",
    )
    CLOSED_BY_API = (
        "closed_by_api",
        Cause.CLEAN,
        None,
        "API listeners: a backend closed the connection (DELETE /@connections/{id})",
    )
    REJECTED_BY_TARGET = (
        "rejected_by_target",
        Cause.TARGET,
        None,
        "upgrade result only: the target answered the upgrade with something else than 101 "
        "(forwarded to the client; the connection then ends as http_forwarded)",
    )
    # --- client-side timeouts
    REQUEST_TIMEOUT = (
        "request_timeout",
        Cause.CLIENT_TIMEOUT,
        408,
        "the request head did not arrive within request_head_timeout_seconds",
    )
    IDLE_TIMEOUT = (
        "idle_timeout",
        Cause.CLIENT_TIMEOUT,
        1001,
        "no byte moved either way for idle_timeout_seconds",
    )
    TLS_HANDSHAKE_TIMEOUT = (
        "tls_handshake_timeout",
        Cause.CLIENT_TIMEOUT,
        None,
        "the TLS handshake did not finish within tls_handshake_timeout_seconds",
    )
    TLS_CLIENT_HELLO_TIMEOUT = (
        "tls_client_hello_timeout",
        Cause.CLIENT_TIMEOUT,
        None,
        "passthrough: no complete ClientHello within client_hello_timeout_seconds",
    )
    PROXY_PROTOCOL_TIMEOUT = (
        "proxy_protocol_timeout",
        Cause.CLIENT_TIMEOUT,
        None,
        "no PROXY protocol header within proxy_protocol_timeout_seconds",
    )
    PING_TIMEOUT = (
        "ping_timeout",
        Cause.CLIENT_TIMEOUT,
        1001,
        "the client did not answer the proxy's keepalive ping within ping_timeout_seconds "
        "(the target gets Close 1001)",
    )
    CLOSE_TIMEOUT = (
        "close_timeout",
        Cause.CLIENT_TIMEOUT,
        None,
        "the client did not answer the proxy's Close within the close deadline",
    )
    # --- target-side timeouts
    TARGET_CONNECT_TIMEOUT = (
        "target_connect_timeout",
        Cause.TARGET_TIMEOUT,
        504,
        "no target accepted within connect_timeout_seconds",
    )
    TARGET_HANDSHAKE_TIMEOUT = (
        "target_handshake_timeout",
        Cause.TARGET_TIMEOUT,
        504,
        "the target did not answer the upgrade within handshake_timeout_seconds",
    )
    TARGET_PING_TIMEOUT = (
        "target_ping_timeout",
        Cause.TARGET_TIMEOUT,
        1001,
        "the target did not answer the proxy's keepalive ping (the client gets Close 1001)",
    )
    TARGET_CLOSE_TIMEOUT = (
        "target_close_timeout",
        Cause.TARGET_TIMEOUT,
        None,
        "the target did not answer the proxy's Close within the close deadline",
    )
    # --- the proxy's own decisions
    DRAINING = (
        "draining",
        Cause.DRAINING,
        1001,
        "closed by a drain (SIGTERM, POST /v1/drain, a deregistered target, a removed listener)",
    )
    SHUTDOWN = "shutdown", Cause.DRAINING, None, "cut when the drain's grace period ended"
    SESSION_REVOKED = (
        "session_revoked",
        Cause.KILLED,
        1008,
        "a live session closed because a new CRL revokes its client certificate",
    )
    NO_TARGETS = (
        "no_targets",
        Cause.NO_TARGET,
        503,
        "the target group has no target that may take the connection",
    )
    # --- resource limits
    LIMIT = "limit", Cause.RESOURCE, None, "closed at accept: the listener is at max_connections"
    PER_IP_LIMIT = (
        "per_ip_limit",
        Cause.RESOURCE,
        None,
        "closed at accept: the client address is at max_connections_per_ip",
    )
    FD_EXHAUSTED = (
        "fd_exhausted",
        Cause.RESOURCE,
        None,
        "closed at accept: the process's descriptor budget is used up",
    )
    MESSAGE_RATE_EXCEEDED = (
        "message_rate_exceeded",
        Cause.RESOURCE,
        1008,
        "the client sent more than max_messages_per_second (with messages_burst)",
    )
    FRAME_RATE_EXCEEDED = (
        "frame_rate_exceeded",
        Cause.RESOURCE,
        1008,
        "the client sent more than max_frames_per_second frames of any kind (with frames_burst)",
    )
    MAX_SESSION_DURATION = (
        "max_session_duration",
        Cause.RESOURCE,
        1001,
        "the session reached max_session_seconds (closed at a message boundary)",
    )
    # --- refused input: HTTP
    BAD_REQUEST = "bad_request", Cause.REFUSED, 400, "the request head is malformed or not allowed"
    NO_ROUTE = (
        "no_route",
        Cause.REFUSED,
        404,
        "no rule matched the request (or SNI) and the listener has no default_target_group",
    )
    METHOD_NOT_ALLOWED = "method_not_allowed", Cause.REFUSED, 405, "an upgrade that is not a GET"
    UPGRADE_REQUIRED = (
        "upgrade_required",
        Cause.REFUSED,
        426,
        "a wrong WebSocket version, or a plain request on a websocket_only listener",
    )
    HEAD_TOO_LARGE = (
        "head_too_large",
        Cause.REFUSED,
        431,
        "the request head is longer than max_request_head_bytes",
    )
    MALFORMED_HEAD = "malformed_head", Cause.REFUSED, 400, "an HTTP/1.1 head that cannot be parsed"
    MALFORMED_BODY = (
        "malformed_body",
        Cause.REFUSED,
        400,
        "a chunked body or Content-Length that breaks RFC 9112",
    )
    BAD_REQUEST_TARGET = (
        "bad_request_target",
        Cause.REFUSED,
        400,
        "a request-target that is not origin-form, absolute-form (http, https) or OPTIONS *, "
        "or a path the proxy will not normalise (%2F, %5C, %00, a backslash, a bad %-escape)",
    )
    HTTP_VERSION_NOT_SUPPORTED = (
        "http_version_not_supported",
        Cause.REFUSED,
        505,
        "a request line whose version is not HTTP/1.0 or HTTP/1.1",
    )
    # --- refused input: WebSocket frames (the offending side gets the close code)
    WS_PROTOCOL_ERROR = "ws_protocol_error", Cause.REFUSED, 1002, "a frame that breaks RFC 6455"
    WS_INVALID_UTF8 = (
        "ws_invalid_utf8",
        Cause.REFUSED,
        1007,
        "API listeners: a text message that is not valid UTF-8 (RFC 6455 §8.1)",
    )
    WS_FRAME_TOO_LARGE = (
        "ws_frame_too_large",
        Cause.REFUSED,
        1009,
        "a frame over max_frame_bytes (refused before any byte of it is forwarded)",
    )
    WS_MESSAGE_TOO_LARGE = (
        "ws_message_too_large",
        Cause.REFUSED,
        1009,
        "a fragmented message whose fragments pass max_message_bytes",
    )
    WS_UNMASKED_FRAME = (
        "ws_unmasked_frame",
        Cause.REFUSED,
        1002,
        "a client frame without a mask (RFC 6455 §5.1)",
    )
    WS_MASKED_FRAME = (
        "ws_masked_frame",
        Cause.REFUSED,
        1002,
        "a target frame with a mask (RFC 6455 §5.1)",
    )
    # --- refused input: TLS and the bytes before it
    TLS_NOT_TLS = "tls_not_tls", Cause.REFUSED, None, "the first bytes are not a TLS handshake"
    TLS_HTTP_REQUEST = (
        "tls_http_request",
        Cause.REFUSED,
        None,
        "plain HTTP sent to a TLS listener",
    )
    TLS_PROTOCOL_VERSION = (
        "tls_protocol_version",
        Cause.REFUSED,
        None,
        "the client offered no TLS version the listener's policy allows",
    )
    TLS_NO_SHARED_CIPHER = (
        "tls_no_shared_cipher",
        Cause.REFUSED,
        None,
        "no cipher suite in common with the client",
    )
    TLS_HANDSHAKE_ERROR = (
        "tls_handshake_error",
        Cause.REFUSED,
        None,
        "the TLS handshake failed for another reason (the log says which)",
    )
    TLS_BAD_SERVER_NAME = (
        "tls_bad_server_name",
        Cause.REFUSED,
        None,
        "a ClientHello whose server name (SNI) is not ASCII; refused with a TLS alert",
    )
    TLS_MALFORMED_CLIENT_HELLO = (
        "tls_malformed_client_hello",
        Cause.REFUSED,
        None,
        "passthrough: a ClientHello that cannot be parsed",
    )
    TLS_CLIENT_HELLO_TOO_LARGE = (
        "tls_client_hello_too_large",
        Cause.REFUSED,
        None,
        "passthrough: a ClientHello over max_client_hello_bytes",
    )
    PROXY_PROTOCOL_ERROR = (
        "proxy_protocol_error",
        Cause.REFUSED,
        None,
        "a PROXY protocol header that cannot be parsed",
    )
    PROTOCOL_ERROR = "protocol_error", Cause.REFUSED, None, "bytes that break their protocol"
    CLIENT_CERT_MISSING = (
        "client_cert_missing",
        Cause.REFUSED,
        None,
        "client_auth = required and the client sent no certificate",
    )
    CLIENT_CERT_UNTRUSTED = (
        "client_cert_untrusted",
        Cause.REFUSED,
        None,
        "the client certificate does not chain to client_ca",
    )
    CLIENT_CERT_EXPIRED = (
        "client_cert_expired",
        Cause.REFUSED,
        None,
        "the client certificate is expired or not yet valid",
    )
    CLIENT_CERT_REVOKED = (
        "client_cert_revoked",
        Cause.REFUSED,
        None,
        "the client certificate is on the CRL (refused in the handshake)",
    )
    CLIENT_CERT_BAD_EKU = (
        "client_cert_bad_eku",
        Cause.REFUSED,
        None,
        "the client certificate lacks the clientAuth extended key usage",
    )
    # --- the proxy itself
    CONTROL_PROTOCOL = (
        "control_protocol",
        Cause.INTERNAL,
        None,
        "a message between the supervisor and a worker that cannot be decoded",
    )
    INTERNAL_ERROR = (
        "internal_error",
        Cause.INTERNAL,
        1011,
        "an unexpected error in the proxy (a bug: the log has the traceback; please report it)",
    )

    @classmethod
    def client_cert(cls, result: str) -> Reason:
        """The reason of a refused client certificate, from its verification result
        (``missing``, ``untrusted``, ``expired``, ``revoked``, ``bad_eku``)."""
        return cls[f"CLIENT_CERT_{result.upper()}"]

    @property
    def client_cert_result(self) -> str | None:
        """``expired`` for ``client_cert_expired``..., None for other reasons."""
        prefix = "client_cert_"
        return self.value.removeprefix(prefix) if self.value.startswith(prefix) else None


class ApiError(DescribedEnum):
    """Why a WebSocket API could not serve one message or integration call (the session stays
    open): the ``error`` field of the error message the client gets, the ``reason`` label of
    ``wsproxy_api_integration_errors_total``, and for ``$connect`` the HTTP status the client
    gets instead of its 101 (``status``)."""

    def __init__(self, label: str, status: int, doc: str) -> None:
        self.status = status
        self.doc = doc

    NO_ROUTE = "no_route", 404, "no route takes the message and the API has no $default route"
    INTEGRATION_ERROR = (
        "integration_error",
        502,
        "the integration answered non-2xx, something that is not HTTP, or a body over "
        "max_message_bytes",
    )
    INTEGRATION_TIMEOUT = (
        "integration_timeout",
        504,
        "the integration did not answer within integration_timeout_seconds",
    )
    UNAVAILABLE = (
        "unavailable",
        503,
        "the route's target group has no target that accepted a connection",
    )
    THROTTLED = (
        "throttled",
        429,
        "the connection sent over its listener's max_messages_per_second (the message is "
        "dropped), or $disconnect calls were over 10,000 in flight",
    )


class WsproxyError(Exception):
    """Base of every error wsproxy raises on purpose."""

    reason = Reason.INTERNAL_ERROR


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

    def __init__(self, source: str, issues: list[ConfigIssue]) -> None:
        self.source = source
        self.issues = issues
        lines = "\n".join(f"  {issue}" for issue in issues)
        super().__init__(f"{source}: {len(issues)} error(s)\n{lines}")


# --- HTTP handshake (client side) -------------------------------------------------------------


class HttpError(WsproxyError):
    """The client's request cannot be served; the client gets ``status`` (the reason's code) and
    the connection ends."""

    reason = Reason.BAD_REQUEST

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)

    @property
    def status(self) -> int:
        return self.reason.code or 500


class BadRequest(HttpError):
    reason = Reason.BAD_REQUEST


class NoRoute(HttpError):
    """No rule matched and the listener has no default target group."""

    reason = Reason.NO_ROUTE


class MethodNotAllowed(HttpError):
    reason = Reason.METHOD_NOT_ALLOWED


class RequestTimeout(HttpError):
    reason = Reason.REQUEST_TIMEOUT


class UpgradeRequired(HttpError):
    """426: wrong or missing WebSocket version, or a plain request on a websocket_only listener."""

    reason = Reason.UPGRADE_REQUIRED


class HeadTooLarge(HttpError):
    reason = Reason.HEAD_TOO_LARGE


class BadRequestBody(HttpError):
    """The client's request body broke its framing (RFC 9112 §7) while it was forwarded."""

    reason = Reason.MALFORMED_BODY


class BadRequestTarget(HttpError):
    """A request-target the proxy cannot route safely (RFC 9112 §3.2, RFC 3986 §6.2.2)."""

    reason = Reason.BAD_REQUEST_TARGET


class VersionNotSupported(HttpError):
    """505: a request line with a version other than HTTP/1.0 or HTTP/1.1 (RFC 9110 §15.6.6)."""

    reason = Reason.HTTP_VERSION_NOT_SUPPORTED


# --- targets -----------------------------------------------------------------------------------


class TargetError(HttpError):
    """A target could not serve the connection; in websocket mode the client gets ``status``."""

    reason = Reason.TARGET_ERROR


class NoTargets(TargetError):
    reason = Reason.NO_TARGETS


class TargetRefused(TargetError):
    reason = Reason.TARGET_REFUSED


class TargetTlsFailed(TargetError):
    """The TLS handshake with a target failed (bad certificate, name mismatch, ...)."""

    reason = Reason.TARGET_TLS


class TargetConnectTimeout(TargetError):
    reason = Reason.TARGET_CONNECT_TIMEOUT


class TargetClosed(TargetError):
    """The target closed or reset the connection before it answered the handshake."""

    reason = Reason.TARGET_CLOSED


class TargetHandshakeTimeout(TargetError):
    reason = Reason.TARGET_HANDSHAKE_TIMEOUT


class BadTargetResponse(TargetError):
    """The target answered something that is not valid HTTP or a 101 with the wrong accept key."""

    reason = Reason.BAD_TARGET_RESPONSE


# --- wire format (sans-I/O parsers raise these) ------------------------------------------------


class WireError(WsproxyError):
    """Bytes that do not follow the protocol they claim to follow."""

    reason = Reason.PROTOCOL_ERROR


class MalformedHead(WireError):
    """An HTTP/1.1 head that cannot be parsed safely (RFC 9112)."""

    reason = Reason.MALFORMED_HEAD


class HeadLimitExceeded(WireError):
    """An HTTP/1.1 head longer than the configured limit."""

    reason = Reason.HEAD_TOO_LARGE


class MalformedBody(WireError):
    """A chunked body or Content-Length that does not follow RFC 9112 §6-7."""

    reason = Reason.MALFORMED_BODY


class FrameError(WireError):
    """A WebSocket frame that breaks RFC 6455; ``offset`` is where its header starts in the chunk.

    ``close_code`` (the reason's code) is what the sender of the frame is told.
    """

    reason = Reason.WS_PROTOCOL_ERROR

    def __init__(self, detail: str, offset: int) -> None:
        self.offset = offset
        super().__init__(detail)

    @property
    def close_code(self) -> int:
        return self.reason.code or 1002


class FrameTooLarge(FrameError):
    reason = Reason.WS_FRAME_TOO_LARGE


class MessageTooLarge(FrameTooLarge):
    """A data message whose fragments together pass ``max_message_bytes``."""

    reason = Reason.WS_MESSAGE_TOO_LARGE


class UnmaskedFrame(FrameError):
    reason = Reason.WS_UNMASKED_FRAME


class MaskedFrame(FrameError):
    reason = Reason.WS_MASKED_FRAME


class ClientClosed(WsproxyError):
    """The client closed or reset its connection before the handshake finished."""

    reason = Reason.CLIENT_CLOSED


class CAError(WsproxyError):
    """The certificate authority cannot do what was asked; the message says how to fix it."""


class CAInputError(CAError):
    """A value given to the certificate authority is malformed (a name with a control character,
    a bad URL or IP); ``wsproxy ca`` exits 2, as for other bad command-line input."""


class TlsConfigError(WsproxyError):
    """A TLS listener's certificates, keys, CA or CRL cannot be used."""


class ClientCertRejected(WsproxyError):
    """A client certificate failed a check OpenSSL does not make (e.g. the clientAuth EKU)."""

    def __init__(self, result: str, detail: str) -> None:
        self.result = result  # missing | untrusted | expired | revoked | bad_eku
        self.reason = Reason.client_cert(result)
        super().__init__(detail)


class NotTls(WireError):
    """The first bytes are not a TLS handshake record."""

    reason = Reason.TLS_NOT_TLS


class MalformedClientHello(WireError):
    reason = Reason.TLS_MALFORMED_CLIENT_HELLO


class ClientHelloTooLarge(WireError):
    reason = Reason.TLS_CLIENT_HELLO_TOO_LARGE


class ClientHelloTimeout(WsproxyError):
    reason = Reason.TLS_CLIENT_HELLO_TIMEOUT


class MalformedProxyHeader(WireError):
    reason = Reason.PROXY_PROTOCOL_ERROR


class TargetExists(WsproxyError):
    """A registration or deregistration that conflicts with the target's current state."""


# --- supervisor and workers -------------------------------------------------------------------


class MalformedControlMessage(WireError):
    """A message between the supervisor and a worker that cannot be decoded (a bug, or a
    process that is not a wsproxy worker writing to the channel)."""

    reason = Reason.CONTROL_PROTOCOL


class WorkerUnavailable(WsproxyError):
    """A worker did not answer the supervisor in time, or its channel is closed."""


class IntegrationFailed(WsproxyError):
    """An integration call of a WebSocket API failed (``error`` says how); the detail is for
    the log, never for the client."""

    def __init__(self, error: ApiError, detail: str) -> None:
        self.error = error
        super().__init__(detail)
