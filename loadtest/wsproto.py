"""Just enough RFC 6455 for the load generator and its echo target, independent of wsproxy's own
parser (so a bug there cannot hide itself here).

The generator masks with the key 0000: legal framing (every client frame is masked, RFC 6455 §5.3
asks only that keys be unpredictable to defeat cache poisoning, moot on loopback) and it leaves the
payload bytes as they are, so neither the generator nor the echo target spends CPU on XOR for
frames the proxy under test only forwards. Frames with a real key are unmasked correctly.
"""

from __future__ import annotations

import base64
import hashlib
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
ZERO_MASK = b"\0\0\0\0"


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())  # noqa: S324  # RFC 6455 §4.2.2


def upgrade_request(host: str, path: str, key: bytes) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def encode(opcode: int, payload: bytes, *, masked: bool) -> bytes:
    """One final frame; masked frames use the zero key (payload unchanged)."""
    length = len(payload)
    first = 0x80 | opcode
    mask_bit = 0x80 if masked else 0
    if length < 126:
        head = struct.pack("!BB", first, mask_bit | length)
    elif length < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, length)
    return head + (ZERO_MASK if masked else b"") + payload


def unmask(payload: bytes, key: bytes) -> bytes:
    if key == ZERO_MASK or not payload:
        return payload
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    value = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    return value.to_bytes(len(payload), "big")


class FrameReader:
    """Incremental frame parser: ``feed`` bytes, get ``(opcode, payload)`` of complete messages
    (fragments joined; control frames returned as they come)."""

    __slots__ = ("_buffer", "_fragments", "_opcode")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fragments: list[bytes] = []
        self._opcode = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buffer = self._buffer
        buffer += data
        messages: list[tuple[int, bytes]] = []
        pos = 0
        size = len(buffer)
        while size - pos >= 2:
            first, second = buffer[pos], buffer[pos + 1]
            length = second & 0x7F
            offset = pos + 2
            if length == 126:
                if size - offset < 2:
                    break
                (length,) = struct.unpack_from("!H", buffer, offset)
                offset += 2
            elif length == 127:
                if size - offset < 8:
                    break
                (length,) = struct.unpack_from("!Q", buffer, offset)
                offset += 8
            key = b""
            if second & 0x80:
                if size - offset < 4:
                    break
                key = bytes(buffer[offset : offset + 4])
                offset += 4
            if size - offset < length:
                break
            payload = bytes(buffer[offset : offset + length])
            if key:
                payload = unmask(payload, key)
            pos = offset + length
            opcode = first & 0x0F
            fin = first & 0x80
            if opcode >= OP_CLOSE or (fin and not self._fragments and opcode != OP_CONT):
                messages.append((opcode, payload))
            else:
                if opcode != OP_CONT:
                    self._opcode = opcode
                self._fragments.append(payload)
                if fin:
                    messages.append((self._opcode, b"".join(self._fragments)))
                    self._fragments.clear()
        del buffer[:pos]
        return messages
