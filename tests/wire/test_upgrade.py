from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsproxy.errors import BadRequest, HttpError, MethodNotAllowed, UpgradeRequired
from wsproxy.wire.http1 import parse_request_head, parse_response_head
from wsproxy.wire.upgrade import (
    accept_key,
    is_valid_upgrade_response,
    validate_upgrade_request,
    wants_upgrade,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def request(
    *lines: str, method: str = "GET", version: str = "HTTP/1.1", target: str = "/"
) -> bytes:
    return (
        f"{method} {target} {version}\r\n" + "".join(f"{line}\r\n" for line in lines) + "\r\n"
    ).encode()


GOOD = (
    "Host: example.com",
    "Upgrade: websocket",
    "Connection: Upgrade",
    f"Sec-WebSocket-Key: {KEY}",
    "Sec-WebSocket-Version: 13",
)


def test_rfc6455_sample_accept_key() -> None:
    # RFC 6455 §1.3 worked example.
    assert accept_key(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_valid_upgrade() -> None:
    head = parse_request_head(request(*GOOD))
    assert wants_upgrade(head)
    assert validate_upgrade_request(head) == KEY


def without(name: str) -> list[str]:
    return [line for line in GOOD if not line.lower().startswith(name.lower())]


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (request(*GOOD, method="POST"), MethodNotAllowed),
        (request(*GOOD, version="HTTP/1.0"), BadRequest),
        (request(*GOOD, target="http://example.com/"), BadRequest),
        (request(*without("host")), BadRequest),
        (request(*GOOD, "Host: other"), BadRequest),
        (request(*without("upgrade"), "Upgrade: h2c"), BadRequest),
        (request(*without("connection"), "Connection: keep-alive"), BadRequest),
        (request(*without("sec-websocket-version"), "Sec-WebSocket-Version: 8"), UpgradeRequired),
        (request(*without("sec-websocket-version")), UpgradeRequired),
        (request(*without("sec-websocket-key")), BadRequest),
        (request(*without("sec-websocket-key"), "Sec-WebSocket-Key: not base64!"), BadRequest),
        (request(*without("sec-websocket-key"), "Sec-WebSocket-Key: YWJj"), BadRequest),
        (request(*GOOD, f"Sec-WebSocket-Key: {KEY}"), BadRequest),
        (request(*GOOD, "Content-Length: 4"), BadRequest),
        (request(*GOOD, "Transfer-Encoding: chunked"), BadRequest),
    ],
)
def test_invalid_upgrades(raw: bytes, error: type[HttpError]) -> None:
    with pytest.raises(error):
        validate_upgrade_request(parse_request_head(raw))


def response(status: int, *lines: str) -> bytes:
    return (f"HTTP/1.1 {status} X\r\n" + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode()


def test_upgrade_response_checks() -> None:
    good = ("Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Accept: {accept_key(KEY)}")
    assert is_valid_upgrade_response(parse_response_head(response(101, *good)), KEY)
    assert not is_valid_upgrade_response(parse_response_head(response(200, *good)), KEY)
    assert not is_valid_upgrade_response(parse_response_head(response(426, *good)), KEY)
    wrong = ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Accept: AAAA")
    assert not is_valid_upgrade_response(parse_response_head(response(101, *wrong)), KEY)
    assert not is_valid_upgrade_response(parse_response_head(response(101, *good[1:])), KEY)


HEADER_NAMES = st.sampled_from(
    ["Host", "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version",
     "Content-Length", "Transfer-Encoding", "X-Other"]
)  # fmt: skip
HEADER_VALUES = st.sampled_from(
    ["", "websocket", "upgrade", "Upgrade, keep-alive", KEY, "13", "8", "0", "4", "chunked",
     "h2c", "x" * 30, "dGhlIHNhbXBsZQ==", "é"]
)  # fmt: skip


@given(
    st.sampled_from(["GET", "POST", "HEAD"]),
    st.sampled_from(["HTTP/1.1", "HTTP/1.0"]),
    st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=10),
)
def test_validation_only_raises_http_errors(
    method: str, version: str, headers: list[tuple[str, str]]
) -> None:
    lines = [f"{name}: {value}" for name, value in headers]
    raw = request(*lines, method=method, version=version).decode().encode("latin-1")
    head = parse_request_head(raw)
    try:
        key = validate_upgrade_request(head)
    except HttpError:
        return
    assert head.method == "GET" and head.get("sec-websocket-version") == "13"
    assert len(base64.b64decode(key)) == 16
