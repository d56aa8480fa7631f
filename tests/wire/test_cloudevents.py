"""Integration calls as CloudEvents 1.0 in HTTP binary mode (issue 14): attributes, the
binding's percent-encoding, and the signature a backend checks."""

from __future__ import annotations

import datetime as dt
from urllib.parse import unquote

from hypothesis import given
from hypothesis import strategies as st

from wsproxy.wire.cloudevents import (
    MESSAGE,
    Call,
    call_headers,
    encode_value,
    format_time,
    verify_signature,
)

AT = dt.datetime(2026, 12, 1, 5, 59, 58, 123456, tzinfo=dt.UTC)
CALL = Call(
    event_id="e-1",
    event_type=MESSAGE,
    api="chat",
    connection_id="AQBxyz",
    route_key="sendmessage",
    source_ip="203.0.113.9",
    time=AT,
)
SECRET = b"s3cret"


def as_map(headers: list[tuple[str, str]]) -> dict[str, str]:
    names = [name for name, _ in headers]
    assert len(names) == len(set(names)), names
    return dict(headers)


def test_a_call_carries_the_required_attributes_and_ours() -> None:
    headers = as_map(call_headers(CALL, b"{}"))
    assert headers == {
        "ce-specversion": "1.0",
        "ce-id": "e-1",
        "ce-type": "wsproxy.message",
        "ce-source": "/apis/chat/connections/AQBxyz",
        "ce-time": "2026-12-01T05:59:58.123Z",
        "ce-api": "chat",
        "ce-connectionid": "AQBxyz",
        "ce-routekey": "sendmessage",
        "ce-sourceip": "203.0.113.9",
    }


def test_client_identity_is_added_under_mtls_percent_encoded() -> None:
    call = CALL._replace(client_subject='CN=Łukasz Nowak,O="x" 100%', client_fingerprint="ab12")
    headers = as_map(call_headers(call, b""))
    assert headers["ce-clientsubject"] == "CN=%C5%81ukasz%20Nowak,O=%22x%22%20100%25"
    assert unquote(headers["ce-clientsubject"]) == call.client_subject
    assert headers["ce-clientfingerprint"] == "ab12"


@given(st.text(max_size=40))
def test_encoded_values_are_printable_ascii_and_decode_back(value: str) -> None:
    encoded = encode_value(value)
    assert all(0x21 <= ord(char) < 0x7F for char in encoded)
    assert unquote(encoded) == value


def test_time_is_rfc3339_utc_with_milliseconds() -> None:
    local = AT.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30)))
    assert format_time(local) == "2026-12-01T05:59:58.123Z"


def test_a_signed_call_verifies_and_a_changed_one_does_not() -> None:
    body = b'{"action": "sendmessage"}'
    headers = as_map(call_headers(CALL, body, SECRET))
    assert headers["ce-signature"].startswith("sha256=")
    now = AT + dt.timedelta(seconds=2)
    assert verify_signature(SECRET, headers, body, now)
    assert not verify_signature(SECRET, headers, body + b" ", now)  # body changed
    assert not verify_signature(b"other", headers, body, now)  # another secret
    assert not verify_signature(SECRET, {**headers, "ce-id": "e-2"}, body, now)  # id changed
    assert not verify_signature(
        SECRET, {**headers, "ce-time": "2026-12-01T06:00:00.000Z"}, body, now
    )
    assert not verify_signature(
        SECRET, headers, body, AT + dt.timedelta(minutes=6)
    )  # replayed late
    unsigned = as_map(call_headers(CALL, body))
    assert "ce-signature" not in unsigned
    assert not verify_signature(SECRET, unsigned, body, now)
