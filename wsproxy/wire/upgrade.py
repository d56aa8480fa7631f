"""The WebSocket opening handshake (RFC 6455 §4), sans-I/O: validate, compute the accept key."""

from __future__ import annotations

import base64
import binascii
import hashlib

from wsproxy.errors import BadRequest, MethodNotAllowed, UpgradeRequired
from wsproxy.wire.http1 import RequestHead, ResponseHead
from wsproxy.wire.request_target import AUTHORITY_RE

# RFC 6455 §1.3: the GUID appended to the client's key before hashing.
WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WEBSOCKET_VERSION = "13"


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2 step 5.4)."""
    digest = hashlib.sha1((key + WEBSOCKET_GUID).encode("ascii"), usedforsecurity=False).digest()
    return base64.b64encode(digest).decode("ascii")


def wants_upgrade(head: RequestHead) -> bool:
    """True when the client asks for any protocol upgrade; such a request is validated in full."""
    return bool(head.get_all("upgrade")) or "upgrade" in head.tokens("connection")


def check_host(head: RequestHead) -> str:
    """The single Host value; ``BadRequest`` (400) when it is missing, repeated (RFC 9112 §3.2)
    or not ``host [":" port]`` with host a DNS-style name, an IPv4 address or an IP literal.

    Stricter than RFC 3986's reg-name on purpose: host rules read the value up to its port, and
    a target parsing ``http://`` + Host as a URL reads ``a:80@b`` as host ``b`` (userinfo); a
    comma, space, ``/`` or ``?`` would also reach the target and its ``X-Forwarded-Host``, where a
    comma lets a client add the list element some frameworks trust (Werkzeug's ProxyFix takes
    the last). Absolute-form authorities are held to the same pattern."""
    hosts = head.get_all("host")
    if len(hosts) != 1:
        raise BadRequest(f"expected exactly one Host header, got {len(hosts)}")
    host = hosts[0]
    if not host:
        raise BadRequest("empty Host header")
    if not AUTHORITY_RE.fullmatch(host):
        raise BadRequest(
            f"Host header {host[:100]!a} is not a host name or address with an optional "
            "numeric port; send e.g. 'example.com', 'example.com:8080', '192.0.2.1:80', '[::1]:80'"
        )
    return host


def validate_upgrade_request(head: RequestHead) -> str:
    """Check a client's opening handshake (RFC 6455 §4.2.1); return its ``Sec-WebSocket-Key``.

    Raises ``MethodNotAllowed`` (405), ``UpgradeRequired`` (426, wrong version) or ``BadRequest``.
    """
    if head.method != "GET":
        raise MethodNotAllowed(f"WebSocket upgrade needs GET, got {head.method}")
    if head.version != "HTTP/1.1":
        raise BadRequest(f"WebSocket upgrade needs HTTP/1.1, got {head.version}")
    if not head.target.startswith("/"):
        raise BadRequest("request-target must be in origin-form (start with '/')")
    check_host(head)
    upgrades = head.tokens("upgrade")
    if upgrades != {"websocket"}:
        raise BadRequest(f"Upgrade must be 'websocket', got {', '.join(sorted(upgrades)) or '-'}")
    if "upgrade" not in head.tokens("connection"):
        raise BadRequest("Connection header must contain 'upgrade'")
    versions = head.get_all("sec-websocket-version")
    if versions != [WEBSOCKET_VERSION]:
        raise UpgradeRequired(f"Sec-WebSocket-Version must be 13, got {', '.join(versions) or '-'}")
    keys = head.get_all("sec-websocket-key")
    if len(keys) != 1:
        raise BadRequest(f"expected exactly one Sec-WebSocket-Key, got {len(keys)}")
    key = keys[0]
    try:
        decoded = base64.b64decode(key.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise BadRequest("Sec-WebSocket-Key is not base64") from None
    if len(decoded) != 16:
        raise BadRequest(f"Sec-WebSocket-Key must decode to 16 bytes, got {len(decoded)}")
    if head.get_all("content-length") not in ([], ["0"]) or head.get_all("transfer-encoding"):
        raise BadRequest("a WebSocket upgrade request must not carry a body")
    return key


def is_valid_upgrade_response(head: ResponseHead, key: str) -> bool:
    """True only for a real switch: 101, Upgrade websocket, Connection upgrade, matching accept.

    Anything else must not open a tunnel (tunnelling on a 4xx is how WebSocket smuggling works).
    """
    return (
        head.status == 101
        and head.tokens("upgrade") == {"websocket"}
        and "upgrade" in head.tokens("connection")
        and head.get_all("sec-websocket-accept") == [accept_key(key)]
    )
