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


def call_headers(call: Call, body: bytes, secret: bytes | None = None) -> list[tuple[str, str]]:
    """The ``ce-*`` fields of ``call`` (Content-Type is the caller's: it names the data)."""
    time = format_time(call.time)
    event_id = encode_value(call.event_id)  # signed as sent
    headers = [
        ("ce-specversion", SPEC_VERSION),
        ("ce-id", event_id),
        ("ce-type", call.event_type),
        ("ce-source", encode_value(f"/apis/{call.api}/connections/{call.connection_id}")),
        ("ce-time", time),
        ("ce-api", encode_value(call.api)),
        ("ce-connectionid", encode_value(call.connection_id)),
        ("ce-routekey", encode_value(call.route_key)),
        ("ce-sourceip", encode_value(call.source_ip)),
    ]
    if call.client_subject is not None:
        headers.append(("ce-clientsubject", encode_value(call.client_subject)))
    if call.client_fingerprint is not None:
        headers.append(("ce-clientfingerprint", encode_value(call.client_fingerprint)))
    if secret is not None:
        headers.append(("ce-signature", sign(secret, event_id, time, body)))
    return headers


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
