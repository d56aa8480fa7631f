from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsproxy.errors import FrameError, FrameTooLarge, MaskedFrame, UnmaskedFrame
from wsproxy.wire.wsframe import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    STOP_FRAME,
    STOP_MESSAGE,
    FrameHeader,
    FrameTracker,
    encode_close,
    encode_frame,
    parse_header,
)

MASK = b"\x01\x02\x03\x04"


@st.composite
def messages(draw: st.DrawFn, masked: bool) -> tuple[bytes, int, int]:
    """A valid frame sequence: (bytes, frames, messages)."""
    mask = MASK if masked else b""
    out = b""
    frames = count = 0
    for _ in range(draw(st.integers(0, 6))):
        size = draw(st.sampled_from([0, 1, 125, 126, 127, 300, 65535, 65536, 70000]))
        parts = draw(st.integers(1, 3))
        payload = b"p" * size
        chunk = max(1, size // parts) if size else 1
        pieces = [payload[i : i + chunk] for i in range(0, size, chunk)] or [b""]
        first = draw(st.sampled_from([OP_TEXT, OP_BINARY]))
        for index, piece in enumerate(pieces):
            opcode = first if index == 0 else OP_CONTINUATION
            out += encode_frame(opcode, piece, fin=index == len(pieces) - 1, mask=mask)
            frames += 1
            if draw(st.booleans()) and index < len(pieces) - 1:
                out += encode_frame(OP_PING, b"hi", mask=mask)  # control frame inside a message
                frames += 1
        count += 1
    return out, frames, count


def feed_all(tracker: FrameTracker, data: bytes, cuts: list[int]) -> int:
    taken = 0
    start = 0
    for cut in [*sorted({c for c in cuts if c <= len(data)}), len(data)]:
        taken += tracker.feed(data[start:cut])
        start = cut
    return taken


@given(messages(masked=True), st.lists(st.integers(0, 300000), max_size=20))
def test_any_chunking_gives_the_same_counts(
    sample: tuple[bytes, int, int], cuts: list[int]
) -> None:
    data, frames, count = sample
    tracker = FrameTracker(masked=True, max_frame_bytes=1 << 20)
    assert feed_all(tracker, data, cuts) == len(data)
    assert (tracker.frames, tracker.messages) == (frames, count)
    assert tracker.at_message_boundary


@given(messages(masked=False), st.lists(st.integers(0, 300000), max_size=8))
def test_stop_at_message_boundary_cuts_between_messages(
    sample: tuple[bytes, int, int], cuts: list[int]
) -> None:
    data, _frames, count = sample
    tail = encode_frame(OP_TEXT, b"last")
    data = data + tail
    tracker = FrameTracker(masked=False, max_frame_bytes=1 << 20)
    # Feed everything but the last message, then ask to stop: the stream is at a boundary.
    feed_all(tracker, data[: -len(tail)], cuts)
    assert tracker.feed(tail, STOP_MESSAGE) == 0
    assert tracker.messages == count


def test_stop_at_message_boundary_mid_stream() -> None:
    first = encode_frame(OP_TEXT, b"a", fin=False) + encode_frame(OP_CONTINUATION, b"b")
    second = encode_frame(OP_TEXT, b"c")
    tracker = FrameTracker(masked=False, max_frame_bytes=100)
    assert tracker.feed(first[:2]) == 2
    assert tracker.feed(first[2:] + second, STOP_MESSAGE) == len(first) - 2
    assert tracker.feed(second) == len(second)


def test_stop_at_frame_boundary_inside_fragmented_message() -> None:
    data = encode_frame(OP_TEXT, b"a", fin=False) + encode_frame(OP_CONTINUATION, b"b")
    tracker = FrameTracker(masked=False, max_frame_bytes=100)
    assert tracker.feed(data, STOP_FRAME) == 0
    assert tracker.feed(data[:3]) == 3
    assert tracker.feed(data[3:], STOP_FRAME) == 0
    assert not tracker.at_message_boundary
    assert tracker.at_frame_boundary


def test_close_code_is_read_through_the_mask() -> None:
    tracker = FrameTracker(masked=True, max_frame_bytes=100)
    frame = encode_close(4001, "bye", mask=os.urandom(4))
    for byte in range(len(frame)):
        tracker.feed(frame[byte : byte + 1])
    assert tracker.close_code == 4001
    assert tracker.closes == 1
    empty = FrameTracker(masked=False, max_frame_bytes=100)
    empty.feed(encode_frame(OP_CLOSE, b""))
    assert empty.close_code == 1005


@pytest.mark.parametrize(
    ("data", "masked", "error"),
    [
        (encode_frame(OP_TEXT, b"x"), True, UnmaskedFrame),
        (encode_frame(OP_TEXT, b"x", mask=MASK), False, MaskedFrame),
        (encode_frame(OP_BINARY, b"x" * 200), False, FrameTooLarge),
        (encode_frame(0x3, b""), False, FrameError),
        (encode_frame(OP_PING, b"x", fin=False), False, FrameError),
        (encode_frame(OP_PING, b"x" * 126), False, FrameError),
        (encode_frame(OP_CONTINUATION, b"x"), False, FrameError),
        (encode_frame(OP_TEXT, b"x", fin=False) + encode_frame(OP_TEXT, b"y"), False, FrameError),
        (encode_frame(OP_CLOSE, b"x"), False, FrameError),
        (b"\x82\x7f\x80\x00\x00\x00\x00\x00\x00\x00", False, FrameError),
    ],
)
def test_violations(data: bytes, masked: bool, error: type[FrameError]) -> None:
    tracker = FrameTracker(masked=masked, max_frame_bytes=128)
    with pytest.raises(error):
        tracker.feed(data)


def test_violation_offset_points_at_the_bad_header() -> None:
    good = encode_frame(OP_TEXT, b"ok")
    tracker = FrameTracker(masked=False, max_frame_bytes=10)
    with pytest.raises(FrameTooLarge) as caught:
        tracker.feed(good + encode_frame(OP_BINARY, b"x" * 11))
    assert caught.value.offset == len(good)
    assert caught.value.close_code == 1009
    split = FrameTracker(masked=False, max_frame_bytes=10)
    big = encode_frame(OP_BINARY, b"x" * 300)
    split.feed(big[:1])
    with pytest.raises(FrameTooLarge) as caught:
        split.feed(big[1:])
    assert caught.value.offset == -1


def test_oversized_frame_detected_from_header_alone() -> None:
    tracker = FrameTracker(masked=False, max_frame_bytes=1024)
    header = encode_frame(OP_BINARY, b"x" * 70000)[:10]
    with pytest.raises(FrameTooLarge):
        tracker.feed(header)


@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=10), st.booleans())
def test_only_declared_errors_escape(data: bytes, cuts: list[int], masked: bool) -> None:
    tracker = FrameTracker(masked=masked, max_frame_bytes=1000)
    with contextlib.suppress(FrameError):
        feed_all(tracker, data, cuts)


@given(st.binary(max_size=200), st.booleans())
def test_encode_decode_roundtrip(payload: bytes, masked: bool) -> None:
    frame = encode_frame(OP_BINARY, payload, mask=MASK if masked else b"")
    tracker = FrameTracker(masked=masked, max_frame_bytes=1000)
    assert tracker.feed(frame) == len(frame)
    assert (tracker.frames, tracker.messages) == (1, 1)
    if masked:
        body = frame[-len(payload) :] if payload else b""
        assert bytes(b ^ MASK[i % 4] for i, b in enumerate(body)) == payload


def test_rsv_bits_need_a_negotiated_extension() -> None:
    frame = encode_frame(OP_TEXT, b"x")
    compressed = bytes([frame[0] | 0x40]) + frame[1:]  # RSV1, as permessage-deflate sets it
    with pytest.raises(FrameError, match="RSV"):
        FrameTracker(masked=False, max_frame_bytes=100).feed(compressed)
    tracker = FrameTracker(masked=False, max_frame_bytes=100, allow_rsv=True)
    assert tracker.feed(compressed) == len(compressed)
    assert (tracker.frames, tracker.messages) == (1, 1)


@pytest.mark.parametrize(
    ("frame", "header"),
    [
        (encode_frame(OP_TEXT, b"hi"), FrameHeader(2, True, OP_TEXT, False, 2, b"", 0)),
        (
            encode_frame(OP_BINARY, b"x" * 300, fin=False, mask=MASK),
            FrameHeader(8, False, OP_BINARY, True, 300, MASK, 0),
        ),
        (
            encode_frame(OP_CONTINUATION, b"y" * 70000),
            FrameHeader(10, True, OP_CONTINUATION, False, 70000, b"", 0),
        ),
        (bytes([0xC1, 0x00]), FrameHeader(2, True, OP_TEXT, False, 0, b"", 0x40)),
    ],
)
def test_parse_header_names_every_field(frame: bytes, header: FrameHeader) -> None:
    parsed = parse_header(frame)
    assert parsed == header
    assert parsed is not None and parsed.payload_len == len(frame) - parsed.header_len
    for cut in range(header.header_len):
        assert parse_header(frame[:cut]) is None  # short: need more
    assert parse_header(b"pad" + frame, 3) == header
