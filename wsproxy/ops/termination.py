"""The termination code of a connection log line: two characters, like HAProxy's termination state.

The first says what ended the connection, the second how far it had got. ``--`` is a clean end
of a relayed session. The table is in docs/operations.md; every reason the proxy logs maps to one
cause here (anything new defaults to ``P``, a refusal by the proxy).
"""

from __future__ import annotations

# Phases, in the order a connection goes through them.
PHASE_ACCEPT = "A"  # refused at accept (a limit)
PHASE_TLS = "T"  # the TLS handshake of a terminating listener
PHASE_PROXY_HEADER = "P"  # reading a PROXY protocol header
PHASE_REQUEST = "R"  # reading the request head or the ClientHello
PHASE_CONNECT = "C"  # connecting to a target
PHASE_UPGRADE = "U"  # waiting for the target's answer to the handshake
PHASE_DATA = "D"  # relaying

_CAUSES = {
    # clean ends
    "closed": "-",
    "http_forwarded": "-",
    # the client
    "client_closed": "C",
    "client_reset": "C",
    # a target
    "target_closed": "S",
    "target_reset": "S",
    "target_refused": "S",
    "target_tls": "S",
    "target_error": "S",
    "bad_target_response": "S",
    # timeouts waiting for the client, or for a target
    "request_timeout": "c",
    "idle_timeout": "c",
    "tls_handshake_timeout": "c",
    "tls_client_hello_timeout": "c",
    "proxy_protocol_timeout": "c",
    "target_connect_timeout": "s",
    "target_handshake_timeout": "s",
    "target_ping_timeout": "s",
    # the proxy's own decisions
    "draining": "D",
    "shutdown": "D",
    "client_cert_revoked": "K",
    "no_targets": "N",
    # resource limits
    "limit": "R",  # max_connections
    "per_ip_limit": "R",
    "fd_exhausted": "R",
    "message_rate_exceeded": "R",
    "max_session_duration": "R",
    "internal_error": "I",
}


def termination(reason: str, phase: str) -> str:
    """``reason`` (the log line's reason) and the phase reached -> a two-character code."""
    cause = _CAUSES.get(reason, "P")  # malformed input, failed checks, policy: refused by us
    return "--" if cause == "-" else cause + phase
