"""Messages between the supervisor and its workers, sans-I/O: length-prefixed JSON objects.

A message is a 4-byte big-endian length, then that many bytes of UTF-8 JSON holding an object.
Descriptors (listening sockets) travel beside the bytes as SCM_RIGHTS; the message that owns them
says how many in its ``fds`` field, so the reader takes them in order.
"""

from __future__ import annotations

import json
from typing import Any

from wsproxy.errors import MalformedControlMessage

# Metrics of a worker with a few hundred targets are ~100 KB; anything near this is a bug.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_LENGTH = 4

Message = dict[str, Any]


def encode_message(message: Message) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE_BYTES:
        raise MalformedControlMessage(f"control message of {len(body)} bytes is over the limit")
    return len(body).to_bytes(_LENGTH, "big") + body


class MessageDecoder:
    """Feed bytes as they arrive; get every complete message, in order."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        messages: list[Message] = []
        while len(self._buffer) >= _LENGTH:
            size = int.from_bytes(self._buffer[:_LENGTH], "big")
            if size > MAX_MESSAGE_BYTES:
                raise MalformedControlMessage(f"control message of {size} bytes announced")
            if len(self._buffer) < _LENGTH + size:
                break
            body = bytes(self._buffer[_LENGTH : _LENGTH + size])
            del self._buffer[: _LENGTH + size]
            try:
                message = json.loads(body)
            except ValueError as exc:  # UnicodeDecodeError is a ValueError too
                raise MalformedControlMessage(f"control message is not JSON: {exc}") from None
            if not isinstance(message, dict):
                raise MalformedControlMessage("control message is not a JSON object")
            messages.append(message)
        return messages

    @property
    def pending(self) -> int:
        return len(self._buffer)
