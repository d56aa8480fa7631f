from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsproxy.errors import HeadLimitExceeded, MalformedBody, MalformedHead, WireError
from wsproxy.wire.http1 import (
    BodyKind,
    BodyTracker,
    HeadBuffer,
    parse_request_head,
    parse_response_head,
    request_body,
    response_body,
    serialize_request_head,
)

REQUEST = (
    b"GET /chat?x=1 HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\nX-Empty: \r\n\r\n"
)


def feed_chunks(buffer: HeadBuffer, data: bytes, cuts: list[int]) -> tuple[bytes, bytes] | None:
    result = None
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if result is not None:
            break
        result = buffer.feed(data[start:cut])
        start = cut
    return result


def test_parse_request_head() -> None:
    head = parse_request_head(REQUEST)
    assert head.method == "GET"
    assert head.target == "/chat?x=1"
    assert head.path == "/chat"
    assert head.version == "HTTP/1.1"
    assert head.get("HOST") == "example.com"
    assert head.tokens("connection") == {"keep-alive", "upgrade"}
    assert head.get("x-empty") == ""
    assert serialize_request_head(head) == REQUEST


def test_head_buffer_returns_rest_after_head() -> None:
    buffer = HeadBuffer(16384)
    assert buffer.feed(REQUEST[:10]) is None
    result = buffer.feed(REQUEST[10:] + b"\x81\x00")
    assert result == (REQUEST, b"\x81\x00")


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
        b"GET / HTTP/1.1\nHost: x\n\n",  # bare LF
        b"\x00\x01\x02",
        b"GET /\x01 HTTP/1.1\r\n",
    ],
)
def test_head_buffer_refuses_non_http_at_once(data: bytes) -> None:
    with pytest.raises(MalformedHead):
        HeadBuffer(16384).feed(data)


def test_head_buffer_limit() -> None:
    buffer = HeadBuffer(1024)
    assert buffer.feed(b"GET / HTTP/1.1\r\n") is None
    with pytest.raises(HeadLimitExceeded):
        buffer.feed(b"X-Long: " + b"a" * 2000)


def test_head_buffer_limit_counts_the_end() -> None:
    head = b"GET / HTTP/1.1\r\nX: " + b"a" * 1100 + b"\r\n\r\n"
    with pytest.raises(HeadLimitExceeded):
        HeadBuffer(1024).feed(head)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",  # space before colon (RFC 9112 §5.1)
        b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/11\r\n\r\n",
        b"GET / FTP/1.1\r\n\r\n",
        b"G(ET / HTTP/1.1\r\n\r\n",
    ],
)
def test_parse_request_head_rejects(raw: bytes) -> None:
    with pytest.raises(MalformedHead):
        parse_request_head(raw)


def test_parse_response_head() -> None:
    head = parse_response_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    assert (head.status, head.reason, head.get("upgrade")) == (
        101,
        "Switching Protocols",
        "websocket",
    )
    assert parse_response_head(b"HTTP/1.1 204\r\n\r\n").reason == ""
    with pytest.raises(MalformedHead):
        parse_response_head(b"HTTP/1.1 99 x\r\n\r\n")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"POST / HTTP/1.1\r\nHost: x\r\n\r\n", (BodyKind.NONE, 0)),
        (b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n", (BodyKind.LENGTH, 5)),
        (b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n", (BodyKind.LENGTH, 5)),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", (BodyKind.CHUNKED, 0)),
    ],
)
def test_request_body_framing(raw: bytes, expected: tuple[BodyKind, int]) -> None:
    assert request_body(parse_request_head(raw)) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 0x10\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
    ],
)
def test_request_body_framing_ambiguous(raw: bytes) -> None:
    with pytest.raises(MalformedHead):
        request_body(parse_request_head(raw))


def test_response_body_framing() -> None:
    ok = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
    assert response_body(ok, "GET") == (BodyKind.LENGTH, 3)
    assert response_body(ok, "HEAD") == (BodyKind.NONE, 0)
    plain = parse_response_head(b"HTTP/1.1 200 OK\r\n\r\n")
    assert response_body(plain, "GET") == (BodyKind.UNTIL_CLOSE, 0)
    assert response_body(parse_response_head(b"HTTP/1.1 204 x\r\n\r\n"), "GET")[0] is BodyKind.NONE


CHUNKED = b"5;ext=1\r\nhello\r\n1A\r\n" + b"x" * 26 + b"\r\n0\r\nTrailer: t\r\n\r\n"


def test_chunked_body_end_found_with_trailing_bytes() -> None:
    tracker = BodyTracker(BodyKind.CHUNKED)
    assert tracker.feed(CHUNKED + b"NEXT") == len(CHUNKED)
    assert tracker.done


@given(st.lists(st.integers(min_value=0, max_value=len(CHUNKED)), max_size=10))
def test_chunked_any_chunking(cuts: list[int]) -> None:
    tracker = BodyTracker(BodyKind.CHUNKED)
    data = CHUNKED + b"tail"
    taken = 0
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        taken += tracker.feed(data[start:cut])
        start = cut
    assert taken == len(CHUNKED)
    assert tracker.done


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\n",
        b"5\r\nhelloX\r\n",
        b"5\nhello\n",
        # Found by the review of issue 13 ("funky chunks": parsers that disagree on these split
        # a body differently): whitespace before the size, control bytes in an extension.
        b" 1\r\nx\r\n0\r\n\r\n",
        b"1;a\rX\r\nx\r\n0\r\n\r\n",
        b"1;a=\x00\r\nx\r\n0\r\n\r\n",
        b"1\x0b\r\nx\r\n0\r\n\r\n",
    ],
)
def test_chunked_malformed(body: bytes) -> None:
    with pytest.raises(MalformedBody):
        BodyTracker(BodyKind.CHUNKED).feed(body)


def test_chunk_size_may_have_whitespace_before_its_extensions() -> None:
    body = b"1 ;a=b\r\nx\r\n1\t;c\r\ny\r\n0\r\n\r\n"
    tracker = BodyTracker(BodyKind.CHUNKED)
    assert tracker.feed(body) == len(body) and tracker.done


def test_request_trailers_are_refused() -> None:
    """A trailer section can carry fields a target merges into the head (Apache's
    MergeTrailers, Tomcat's allowedTrailerHeaders): `X-Forwarded-For` there would bypass the
    head's reserved names. Requests with trailers are refused; responses keep theirs."""
    trailer = b"1\r\nx\r\n0\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    with pytest.raises(MalformedBody, match="trailer"):
        BodyTracker(BodyKind.CHUNKED, trailers=False).feed(trailer)
    assert BodyTracker(BodyKind.CHUNKED).feed(trailer) == len(trailer)
    no_trailer = b"1\r\nx\r\n0\r\n\r\n"
    assert BodyTracker(BodyKind.CHUNKED, trailers=False).feed(no_trailer) == len(no_trailer)


def test_length_body() -> None:
    tracker = BodyTracker(BodyKind.LENGTH, 4)
    assert tracker.feed(b"ab") == 2
    assert tracker.feed(b"cdef") == 2
    assert tracker.done


@given(st.lists(st.integers(min_value=0, max_value=len(REQUEST) + 2), max_size=12))
def test_head_buffer_any_chunking(cuts: list[int]) -> None:
    data = REQUEST + b"\x81\x00"
    buffer = HeadBuffer(16384)
    result = None
    start = 0
    rest = b""
    for cut in [*sorted(set(cuts)), len(data)]:
        piece = data[start:cut]
        start = cut
        if result is None:
            result = buffer.feed(piece)
        else:
            rest += piece
    assert result is not None
    assert result[0] == REQUEST
    assert result[1] + rest == b"\x81\x00"


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=8))
def test_head_parsing_only_raises_declared_errors(data: bytes, cuts: list[int]) -> None:
    buffer = HeadBuffer(256)
    try:
        result = feed_chunks(buffer, data, [c for c in cuts if c <= len(data)])
        if result is not None:
            parse_request_head(result[0])
    except WireError:
        pass


@given(st.binary(max_size=200))
def test_chunked_only_raises_declared_errors(data: bytes) -> None:
    with contextlib.suppress(MalformedBody):
        BodyTracker(BodyKind.CHUNKED).feed(data)


# Field lines built from the bytes that matter to the two parsers: token characters, the colon,
# whitespace, CR/LF, controls, obs-text.
_FIELD_BYTES = st.sampled_from(list(b'aZ-_:; \t\r\n\x00\x01\x7f\x80\xff"/='))


@given(
    st.lists(
        st.binary(min_size=0, max_size=12).map(bytes)
        | st.lists(_FIELD_BYTES, max_size=12).map(bytes),
        max_size=6,
    )
)
def test_fast_field_parser_agrees_with_the_strict_one(lines: list[bytes]) -> None:
    """The regex path and the line-by-line path accept the same heads, with the same fields."""
    from wsproxy.wire.http1 import _field_lines_strictly, _split_head

    raw = b"GET / HTTP/1.1\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
    try:
        strict: list[tuple[str, str]] | None = _field_lines_strictly(raw)
    except MalformedHead:
        strict = None
    try:
        fast: list[tuple[str, str]] | None = _split_head(raw)[1]
    except MalformedHead:
        fast = None
    assert fast == strict


def test_fast_field_parser_keeps_inner_whitespace_and_obs_text() -> None:
    head = parse_request_head(
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A:  one \t two \t\r\nX-B:\r\nX-C: caf\xe9\r\n\r\n"
    )
    assert head.headers[1:] == (("X-A", "one \t two"), ("X-B", ""), ("X-C", "caf\xe9"))
    assert head.get_all("x-a") == ["one \t two"] and head.get("X-C") == "caf\xe9"
