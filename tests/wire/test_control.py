"""Supervisor-worker message framing: whole messages out, in order, however the bytes arrive."""

from __future__ import annotations

import pytest

from wsproxy.errors import MalformedControlMessage
from wsproxy.wire.control import MAX_MESSAGE_BYTES, MessageDecoder, encode_message


def test_messages_survive_any_split() -> None:
    messages = [{"op": "report", "id": 1}, {"reply_to": 1, "rows": ["é", 2.5, None]}, {}]
    data = b"".join(encode_message(message) for message in messages)
    for size in (1, 3, 7, len(data)):
        decoder = MessageDecoder()
        got = []
        for start in range(0, len(data), size):
            got += decoder.feed(data[start : start + size])
        assert got == messages
        assert decoder.pending == 0


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        ((MAX_MESSAGE_BYTES + 1).to_bytes(4, "big"), "announced"),
        (b"\x00\x00\x00\x03abc", "not JSON"),
        (b"\x00\x00\x00\x02\xff\xfe", "not JSON"),
        (b"\x00\x00\x00\x02[]", "not a JSON object"),
    ],
)
def test_bad_messages_are_refused(data: bytes, complaint: str) -> None:
    with pytest.raises(MalformedControlMessage, match=complaint):
        MessageDecoder().feed(data)


def test_an_incomplete_message_waits() -> None:
    decoder = MessageDecoder()
    data = encode_message({"op": "drain", "grace": 3})
    assert decoder.feed(data[:-1]) == []
    assert decoder.feed(data[-1:]) == [{"op": "drain", "grace": 3}]
