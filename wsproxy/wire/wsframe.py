"""WebSocket frame headers (RFC 6455 §5.2), sans-I/O.

``FrameTracker`` follows a byte stream frame by frame reading *headers only*: payloads are skipped
by length, never unmasked or copied (only the two status bytes of a Close frame are read). That is
enough to count frames and messages, refuse frames over a size limit before a byte of them is
forwarded, and find the message boundaries where the proxy may inject a Close frame of its own.
The rules of a session built on it (close handshake, keepalive, limits) are in ``wssession``.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from wsproxy.errors import (
    FrameError,
    FrameTooLarge,
    MaskedFrame,
    MessageTooLarge,
    UnmaskedFrame,
)

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_KNOWN_OPCODES = frozenset((OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))

# RFC 6455 §5.5: control frames carry at most 125 bytes and are never fragmented.
MAX_CONTROL_PAYLOAD = 125
MAX_HEADER = 14

# Where FrameTracker.feed may stop: nowhere, at the next frame boundary, at the next message
# boundary (control frames may sit between the fragments of a message, RFC 6455 §5.4, so a Close
# may be injected at any frame boundary; a message boundary also loses no half-sent message).
STOP_NONE = 0
STOP_FRAME = 1
STOP_MESSAGE = 2
# Stop before any Pong frame (header complete in this chunk), so the proxy can take out the
# answers to its own pings.
STOP_PONG = 3

# Close codes (RFC 6455 §7.4.1, IANA registry).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_BAD_GATEWAY = 1014


_PONG_AHEAD = -2


class FrameHeader(NamedTuple):
    """One frame's header (RFC 6455 §5.2), as ``parse_header`` reads it."""

    header_len: int  # bytes of the header itself: 2 to 14
    fin: bool  # the last frame of its message
    opcode: int  # OP_* (reserved values included: the tracker refuses them)
    masked: bool
    payload_len: int  # bytes of payload after the header (up to 2**64 - 1 as read)
    mask_key: bytes  # 4 bytes when ``masked``, else b""
    rsv: int  # the three RSV bits, in place (0x70 of the first byte)


def parse_header(buf: bytes, pos: int = 0) -> FrameHeader | None:
    """The header of the frame that starts at ``buf[pos]``, or None if ``buf`` ends inside it.
    Nothing is checked here: ``FrameTracker`` applies the rules."""
    return _parse_header(buf, pos)


def unmask(payload: bytes, mask: bytes) -> bytes:
    """Unmask a (small, control-frame) payload."""
    return bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if mask else payload


def _parse_header(buf: bytes, pos: int) -> FrameHeader | None:
    """See ``parse_header``."""
    avail = len(buf) - pos
    if avail < 2:
        return None
    b0 = buf[pos]
    b1 = buf[pos + 1]
    length = b1 & 0x7F
    masked = bool(b1 & 0x80)
    header_len = 2
    if length == 126:
        header_len = 4
        if avail < header_len:
            return None
        (length,) = struct.unpack_from("!H", buf, pos + 2)
    elif length == 127:
        header_len = 10
        if avail < header_len:
            return None
        (length,) = struct.unpack_from("!Q", buf, pos + 2)
    mask_key = b""
    if masked:
        if avail < header_len + 4:
            return None
        mask_key = bytes(buf[pos + header_len : pos + header_len + 4])
        header_len += 4
    return FrameHeader(header_len, b0 >= 0x80, b0 & 0x0F, masked, length, mask_key, b0 & 0x70)


class FrameTracker:
    """Follows one direction of a WebSocket connection.

    ``masked`` is True for the client-to-server direction, whose frames must be masked
    (RFC 6455 §5.1), False for server-to-client, whose frames must not be.
    """

    __slots__ = (
        "_allow_rsv",
        "_close_buf",
        "_close_mask",
        "_header",
        "_in_message",
        "_masked",
        "_max_frame_bytes",
        "_max_message_bytes",
        "_message_bytes",
        "_opcode",
        "_payload_seen",
        "_remaining",
        "close_code",
        "closes",
        "frames",
        "messages",
    )

    def __init__(
        self,
        *,
        masked: bool,
        max_frame_bytes: int,
        max_message_bytes: int = 0,
        allow_rsv: bool = False,
    ) -> None:
        self._masked = masked
        # RSV bits mean something only under a negotiated extension (permessage-deflate sets
        # RSV1); without one they are a protocol error (RFC 6455 §5.2).
        self._allow_rsv = allow_rsv
        self._max_frame_bytes = max_frame_bytes
        # Across the fragments of one message; 0: only max_frame_bytes applies.
        self._max_message_bytes = max_message_bytes or max_frame_bytes
        self._message_bytes = 0  # payload of the fragmented message so far
        self._remaining = 0  # payload bytes of the current frame still to come
        self._header = b""  # a header split across chunks
        self._in_message = False  # inside a fragmented data message
        self._opcode = -1  # opcode of the frame whose payload is flowing, -1 between frames
        self._close_buf = b""
        self._close_mask = b""
        self._payload_seen = 0
        self.frames = 0
        self.messages = 0
        self.closes = 0
        self.close_code: int | None = None  # first Close frame's status code (1005 if none)

    @property
    def at_frame_boundary(self) -> bool:
        return self._opcode < 0 and not self._header

    @property
    def at_message_boundary(self) -> bool:
        """Between two messages: a Close injected here cuts nothing (control frames included)."""
        return self._opcode < 0 and not self._header and not self._in_message

    @property
    def partial_header(self) -> int:
        """Bytes of a frame header fed so far whose end has not come yet (0 to 13)."""
        return len(self._header)

    def withdraw_header(self) -> bytes:
        """Take back the bytes of a frame header split at the end of the last chunk, as if they
        had not been fed: the caller feeds them again in front of what follows."""
        header, self._header = self._header, b""
        return header

    def feed(self, data: bytes, stop: int = STOP_NONE) -> int:
        """Track the frames in ``data``; return how many leading bytes may be forwarded.

        Normally that is ``len(data)``. With ``stop=STOP_FRAME`` (or ``STOP_MESSAGE``) it is the
        offset of the first frame (or message) boundary in ``data``, 0 when the stream is already at
        one; the bytes from there on are not consumed. Raises a ``FrameError`` whose ``offset`` is
        where the bad frame's header starts in ``data`` (negative when it started in an earlier
        chunk): nothing from ``offset`` on was consumed.
        """
        pos = 0
        size = len(data)
        if not stop and self._opcode < 0 and not self._header and not self._in_message:
            pos = self._whole_messages(data)
            if pos == size:
                return size
        while True:
            if self._opcode >= 0:
                remaining = self._remaining
                avail = size - pos
                if self._opcode == OP_CLOSE and len(self._close_buf) < 2:
                    self._capture_close(data, pos, min(remaining, avail))
                if remaining > avail:
                    self._remaining = remaining - avail
                    return size
                pos += remaining
                self._remaining = 0
                self._end_frame()
            if (
                stop
                and stop != STOP_PONG
                and self._opcode < 0
                and not self._header
                and (stop == STOP_FRAME or not self._in_message)
            ):
                return pos
            if pos >= size:
                return size
            start = self._start_frame(data, pos, stop == STOP_PONG)
            if start == _PONG_AHEAD:
                return pos
            if start < 0:
                return size
            pos = start

    def _whole_messages(self, data: bytes) -> int:
        """The common case, fast: skip unfragmented text/binary frames of up to 64 KiB that lie
        wholly in ``data``; return where the first other thing starts (the general path parses
        and checks it). Same rules as ``_check`` for what it skips: known opcode, right mask bit,
        within ``max_frame_bytes``."""
        pos = 0
        size = len(data)
        mask_bit = 0x80 if self._masked else 0
        mask_len = 4 if self._masked else 0
        limit = min(self._max_frame_bytes, self._max_message_bytes)
        frames = 0
        while pos + 2 <= size:
            b0 = data[pos]
            b1 = data[pos + 1]
            if (b0 != 0x81 and b0 != 0x82) or b1 & 0x80 != mask_bit:
                break
            length = b1 & 0x7F
            if length < 126:
                end = pos + 2 + mask_len + length
            elif length == 126 and pos + 4 <= size:
                length = data[pos + 2] << 8 | data[pos + 3]
                end = pos + 4 + mask_len + length
            else:
                break
            if end > size or length > limit:
                break
            pos = end
            frames += 1
        if frames:
            self.frames += frames  # hot-path count
            self.messages += frames  # hot-path count
        return pos

    def _start_frame(self, data: bytes, pos: int, stop_at_pong: bool = False) -> int:
        """Parse the header at ``pos``; return where its payload starts, -1 if incomplete, or
        ``_PONG_AHEAD`` (nothing consumed) for a Pong when ``stop_at_pong``."""
        pending = self._header
        if pending:
            parsed = _parse_header(pending + data[pos : pos + MAX_HEADER], 0)
            start = pos - len(pending)
        else:
            parsed = _parse_header(data, pos)
            start = pos
        if parsed is None:
            self._header = pending + data[pos:]
            return -1
        header_len, fin, opcode, masked, length, mask_key, rsv = parsed
        if rsv and not self._allow_rsv:
            raise FrameError(f"RSV bits 0x{rsv:x} set with no extension negotiated", start)
        self._check(start, fin, opcode, masked, length)
        if stop_at_pong and opcode == OP_PONG and not pending:
            return _PONG_AHEAD
        self._header = b""
        self.frames += 1  # hot-path count
        if opcode < OP_CLOSE:
            self._in_message = not fin
            self._message_bytes = 0 if fin else self._message_bytes + length
            if fin:
                self.messages += 1  # hot-path count
        elif opcode == OP_CLOSE:
            self.closes += 1
        if opcode == OP_CLOSE and self.close_code is None:
            self._close_mask = mask_key
            self._close_buf = b""
            self._payload_seen = 0
            if length < 2:
                self.close_code = 1005  # RFC 6455 §7.1.5: no status code present
        self._opcode = opcode
        self._remaining = length
        return pos + header_len - len(pending)

    def _check(self, start: int, fin: bool, opcode: int, masked: bool, length: int) -> None:
        if opcode not in _KNOWN_OPCODES:
            raise FrameError(f"reserved opcode 0x{opcode:x}", start)
        if masked != self._masked:
            if self._masked:
                raise UnmaskedFrame("client frame is not masked (RFC 6455 §5.1)", start)
            raise MaskedFrame("server frame is masked (RFC 6455 §5.1)", start)
        if length >> 63:
            raise FrameError("payload length has its most significant bit set", start)
        if opcode >= OP_CLOSE:
            if not fin:
                raise FrameError("fragmented control frame", start)
            if length > MAX_CONTROL_PAYLOAD:
                raise FrameError(f"control frame payload of {length} bytes (max 125)", start)
            if opcode == OP_CLOSE and length == 1:
                raise FrameError("close frame with a 1-byte payload", start)
        elif opcode == OP_CONTINUATION and not self._in_message:
            raise FrameError("continuation frame outside a fragmented message", start)
        elif opcode != OP_CONTINUATION and self._in_message:
            raise FrameError("new data frame inside a fragmented message", start)
        if length > self._max_frame_bytes:
            raise FrameTooLarge(
                f"frame payload of {length} bytes exceeds max_frame_bytes {self._max_frame_bytes}",
                start,
            )
        if opcode < OP_CLOSE:
            total = length + (self._message_bytes if opcode == OP_CONTINUATION else 0)
            if total > self._max_message_bytes:
                raise MessageTooLarge(
                    f"message of {total}+ bytes exceeds max_message_bytes "
                    f"{self._max_message_bytes}",
                    start,
                )

    def _capture_close(self, data: bytes, pos: int, count: int) -> None:
        need = 2 - len(self._close_buf)
        piece = data[pos : pos + min(need, count)]
        if self._close_mask:
            offset = self._payload_seen
            piece = bytes(b ^ self._close_mask[(offset + i) % 4] for i, b in enumerate(piece))
        self._payload_seen += len(piece)
        self._close_buf += piece
        if len(self._close_buf) == 2 and self.close_code is None:
            self.close_code = int.from_bytes(self._close_buf, "big")

    def _end_frame(self) -> None:
        self._opcode = -1


def encode_frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bytes = b""
) -> bytes:
    """One frame; ``mask`` is the 4-byte key for client-to-server frames, empty otherwise."""
    if mask and len(mask) != 4:
        raise ValueError("mask key must be 4 bytes")
    length = len(payload)
    head = bytearray([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if mask else 0
    if length < 126:
        head.append(mask_bit | length)
    elif length < 1 << 16:
        head.append(mask_bit | 126)
        head += struct.pack("!H", length)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", length)
    if mask:
        head += mask
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(head) + payload


def encode_close(code: int, reason: str = "", *, mask: bytes = b"") -> bytes:
    """A Close frame with a status code and a short reason (truncated to fit 125 bytes)."""
    payload = code.to_bytes(2, "big") + reason.encode("utf-8")[: MAX_CONTROL_PAYLOAD - 2]
    return encode_frame(OP_CLOSE, payload, mask=mask)
