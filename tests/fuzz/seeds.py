"""Valid inputs for every fuzz target, for mutation (hypothesis) and as atheris's corpus."""

from __future__ import annotations

import contextlib
import ssl

from tests.helpers.wsraw import upgrade_request
from wsproxy.wire.control import encode_message
from wsproxy.wire.proxyproto import encode_v2
from wsproxy.wire.wsframe import (
    OP_BINARY,
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    encode_close,
    encode_frame,
)

MASK = b"\x01\x02\x03\x04"


def client_hello(server_name: str = "chat.internal") -> bytes:
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1", "h2"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


CONFIG = b"""
[proxy]
shutdown_grace_seconds = 5
workers = 1
[admin]
address = "127.0.0.1:0"
[listeners.edge]
address = "127.0.0.1:0"
websocket = true
default_target_group = "chat"
max_connections_per_ip = 10
max_messages_per_second = 50
[[listeners.edge.rules]]
path_prefix = "/chat"
target_group = "chat"
[target_groups.chat]
algorithm = "least_connections"
targets = [{ address = "127.0.0.1:9001", weight = 2 }, { address = "127.0.0.1:9002" }]
[target_groups.chat.health_check]
protocol = "http"
path = "/health"
matcher = "200-399"
interval_seconds = 1
timeout_seconds = 0.5
"""


def seeds() -> dict[str, list[bytes]]:
    chunked = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nTrailer: x\r\n\r\n"
    return {
        "http_request": [
            upgrade_request(),
            b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
            b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked,
            b"GET http://in.ternal:80/a/%2e%2E//b/./../%7e?q=/.. HTTP/1.0\r\nHost: a\r\n\r\n",
        ],
        "http_response": [
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
        ],
        "chunked_body": [chunked],
        "client_hello": [client_hello()],
        "proxy_header": [
            b"PROXY TCP4 10.0.0.1 10.0.0.2 51000 443\r\n",
            encode_v2(("10.0.0.1", 51000), ("10.0.0.2", 443), tlvs=[(2, b"chat.internal")]),
            encode_v2(("::1", 1), ("::2", 2)),
            encode_v2(None, None, local=True),
        ],
        "websocket_frames": [
            encode_frame(OP_TEXT, b"hello", mask=MASK)
            + encode_frame(OP_BINARY, b"x" * 300, fin=False, mask=MASK)
            + encode_frame(OP_PING, b"p", mask=MASK)
            + encode_frame(OP_CONTINUATION, b"y" * 70, mask=MASK)
            + encode_close(1000, "bye", mask=MASK),
            encode_frame(OP_TEXT, b"server") + encode_close(1001),
        ],
        "control_messages": [
            encode_message({"op": "report", "id": 1}) + encode_message({"reply_to": 1, "x": [1]})
        ],
        "config_text": [CONFIG],
    }
