"""Fuzz targets: every sans-I/O parser and the config loader, fed arbitrary bytes.

Each target takes one byte string, splits it into chunks where the input says (a parser must not
care how bytes arrive), and lets only the errors the parser declares escape. Anything else (an
IndexError, a hang, a buffer that grows past its bound) is a bug. The same functions run under
hypothesis in CI (test_fuzz.py) and under atheris, coverage-guided, by hand or for a bounded
time in CI (run_atheris.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from wsproxy.config import parse_config
from wsproxy.errors import ConfigError, HttpError, WireError
from wsproxy.wire.clienthello import ClientHelloReader
from wsproxy.wire.control import MAX_MESSAGE_BYTES, MessageDecoder
from wsproxy.wire.http1 import (
    BodyKind,
    BodyTracker,
    HeadBuffer,
    parse_request_head,
    parse_response_head,
    request_body,
)
from wsproxy.wire.proxyproto import ProxyHeaderReader
from wsproxy.wire.request_target import check_version, in_origin_form, parse_request_target
from wsproxy.wire.upgrade import check_host, validate_upgrade_request, wants_upgrade
from wsproxy.wire.wsframe import FrameTracker

HEAD_LIMIT = 4096


def chunks(data: bytes) -> Iterator[bytes]:
    """The first byte picks a chunk size (1-16 bytes, or all at once); the rest is the input."""
    if not data:
        return
    size = data[0] % 17 or len(data)
    body = data[1:]
    for start in range(0, len(body), size):
        yield body[start : start + size]


def http_request(data: bytes) -> None:
    buffer = HeadBuffer(HEAD_LIMIT)
    with contextlib.suppress(WireError, HttpError):
        for chunk in chunks(data):
            found = buffer.feed(chunk)
            assert buffer.size <= HEAD_LIMIT + 16 * 1024, "head buffer grew past its bound"
            if found is not None:
                head = parse_request_head(found[0])
                check_version(head)
                in_origin_form(head, parse_request_target(head.method, head.target))
                check_host(head)
                if wants_upgrade(head):
                    validate_upgrade_request(head)
                else:
                    kind, length = request_body(head)
                    tracker = BodyTracker(kind, length)
                    tracker.feed(found[1])
                return


def http_response(data: bytes) -> None:
    with contextlib.suppress(WireError):
        parse_response_head(data)


def chunked_body(data: bytes) -> None:
    tracker = BodyTracker(BodyKind.CHUNKED)
    with contextlib.suppress(WireError):
        for chunk in chunks(data):
            taken = tracker.feed(chunk)
            assert 0 <= taken <= len(chunk)
            if tracker.done:
                return


def client_hello(data: bytes) -> None:
    reader = ClientHelloReader(max_bytes=8192)
    with contextlib.suppress(WireError):
        for chunk in chunks(data):
            if reader.feed(chunk) is not None:
                return
            assert len(reader.buffered) <= 8192 + 17, "ClientHello buffer grew past its bound"


def proxy_header(data: bytes) -> None:
    reader = ProxyHeaderReader()
    with contextlib.suppress(WireError):
        for chunk in chunks(data):
            assert reader.needed() >= 1
            if reader.feed(chunk) is not None:
                return


def websocket_frames(data: bytes) -> None:
    masked = bool(data[:1]) and data[0] & 0x80 != 0
    tracker = FrameTracker(masked=masked, max_frame_bytes=4096, max_message_bytes=8192)
    with contextlib.suppress(WireError):
        for chunk in chunks(data):
            taken = tracker.feed(chunk)
            assert 0 <= taken <= len(chunk)


def control_messages(data: bytes) -> None:
    decoder = MessageDecoder()
    with contextlib.suppress(WireError):
        for chunk in chunks(data):
            decoder.feed(chunk)
            assert decoder.pending <= MAX_MESSAGE_BYTES + 4


def config_text(data: bytes) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(data.decode("utf-8", "replace"), "<fuzz>")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "http_request": http_request,
    "http_response": http_response,
    "chunked_body": chunked_body,
    "client_hello": client_hello,
    "proxy_header": proxy_header,
    "websocket_frames": websocket_frames,
    "control_messages": control_messages,
    "config_text": config_text,
}
