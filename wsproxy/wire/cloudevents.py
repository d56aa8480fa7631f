"""The head of an integration call of the WebSocket API mode: CloudEvents 1.0, HTTP binary
content mode; sans-I/O.

Every call is a ``POST`` whose body is the event's data and whose ``ce-*`` headers are its
attributes, so a backend can read it with any CloudEvents SDK. Besides the required ``id``,
``source``, ``specversion`` and ``type`` (and ``time``), wsproxy sets the extension attributes
``connectionid``, ``routekey``, ``api`` and ``sourceip``, under mTLS ``clientsubject`` and
``clientfingerprint``, and with a signing secret ``signature``.

``signature`` is ``sha256=`` and the hex HMAC-SHA256, keyed with the secret, of
``id + "." + time + "." + body`` (bytes; ``id`` and ``time`` exactly as their headers carry
them). A backend
recomputes it, compares in constant time, refuses a ``time`` older than its tolerance, and
remembers ids it has seen for that long (``verify_signature`` does the first two).

Header values are percent-encoded as the HTTP binding says (§3.1.3.2): space, ``"``, ``%`` and
everything outside printable ASCII, as UTF-8 bytes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Mapping
from typing import NamedTuple

SPEC_VERSION = "1.0"
CONNECT = "wsproxy.connect"
MESSAGE = "wsproxy.message"
DISCONNECT = "wsproxy.disconnect"
SIGNATURE_PREFIX = "sha256="

_PLAIN = frozenset(range(0x21, 0x7F)) - {ord('"'), ord("%")}


class Call(NamedTuple):
    """What one integration call says about itself (the CloudEvent's attributes)."""

    event_id: str
    event_type: str
    api: str
    connection_id: str
    route_key: str
    source_ip: str
    time: dt.datetime
    client_subject: str | None = None
    client_fingerprint: str | None = None


def encode_value(value: str) -> str:
    """A header value as the HTTP binding percent-encodes it."""
    if all(ord(char) in _PLAIN for char in value):
        return value
    return "".join(
        chr(byte) if byte in _PLAIN else f"%{byte:02X}" for byte in value.encode("utf-8")
    )


def format_time(time: dt.datetime) -> str:
    """RFC 3339 in UTC with milliseconds, as ``ce-time`` carries it."""
    utc = time.astimezone(dt.UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def sign(secret: bytes, event_id: str, time: str, body: bytes) -> str:
    """The ``ce-signature`` value of a call (module docstring)."""
    digest = hmac.new(secret, f"{event_id}.{time}.".encode() + body, hashlib.sha256)
    return SIGNATURE_PREFIX + digest.hexdigest()


def connection_headers(
    api: str,
    connection_id: str,
    source_ip: str,
    client_subject: str | None = None,
    client_fingerprint: str | None = None,
) -> tuple[tuple[str, str], ...]:
    """The ``ce-*`` fields every call of one connection carries alike (built once per
    connection: percent-encoding each value costs more than the rest of a call's head)."""
    headers = [
        ("ce-specversion", SPEC_VERSION),
        ("ce-source", encode_value(f"/apis/{api}/connections/{connection_id}")),
        ("ce-api", encode_value(api)),
        ("ce-connectionid", encode_value(connection_id)),
        ("ce-sourceip", encode_value(source_ip)),
    ]
    if client_subject is not None:
        headers.append(("ce-clientsubject", encode_value(client_subject)))
    if client_fingerprint is not None:
        headers.append(("ce-clientfingerprint", encode_value(client_fingerprint)))
    return tuple(headers)


def event_headers(
    connection: tuple[tuple[str, str], ...],
    event_id: str,
    event_type: str,
    route_key: str,
    time: str,
    body: bytes,
    secret: bytes | None = None,
) -> list[tuple[str, str]]:
    """A call's ``ce-*`` fields: ``connection``'s (``connection_headers``) and this call's.
    ``time`` as ``format_time`` gives it; Content-Type is the caller's (it names the data)."""
    event_id = encode_value(event_id)  # signed as sent
    headers = [
        *connection,
        ("ce-id", event_id),
        ("ce-type", event_type),
        ("ce-time", time),
        ("ce-routekey", encode_value(route_key)),
    ]
    if secret is not None:
        headers.append(("ce-signature", sign(secret, event_id, time, body)))
    return headers


def call_headers(call: Call, body: bytes, secret: bytes | None = None) -> list[tuple[str, str]]:
    """The ``ce-*`` fields of ``call`` (Content-Type is the caller's: it names the data)."""
    fixed = connection_headers(
        call.api, call.connection_id, call.source_ip, call.client_subject, call.client_fingerprint
    )
    time = format_time(call.time)
    return event_headers(fixed, call.event_id, call.event_type, call.route_key, time, body, secret)


def verify_signature(
    secret: bytes,
    headers: Mapping[str, str],
    body: bytes,
    now: dt.datetime,
    tolerance: dt.timedelta = dt.timedelta(minutes=5),
) -> bool:
    """What a backend does with a call (``headers`` by lower-case name): the signature matches
    and ``ce-time`` is within ``tolerance`` of ``now``. Replays within the tolerance are the
    backend's to refuse, by remembering the ``ce-id`` values it has seen that long."""
    event_id, time = headers.get("ce-id", ""), headers.get("ce-time", "")
    expected = sign(secret, event_id, time, body)
    if not hmac.compare_digest(expected.encode(), headers.get("ce-signature", "").encode()):
        return False
    try:
        sent = dt.datetime.fromisoformat(time.replace("Z", "+00:00"))
    except ValueError:
        return False
    return abs(now - sent) <= tolerance
