"""Active health probes: tcp (connect), http/https (status in matcher), websocket (real upgrade).

Control-plane code on asyncio streams; each probe is bounded by the check's timeout. Groups that
speak PROXY v2 get the LOCAL command first, as the spec asks for connections a proxy makes for
itself; groups with TLS get the group's own client context (client certificate included).
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import struct
from typing import assert_never

from wsproxy.address import Address
from wsproxy.config import HealthCheckConfig
from wsproxy.errors import WireError
from wsproxy.openssl import limit_groups
from wsproxy.targets.health import status_matches
from wsproxy.wire.http1 import HeadBuffer, parse_response_head
from wsproxy.wire.proxyproto import encode_v2
from wsproxy.wire.upgrade import is_valid_upgrade_response
from wsproxy.wire.wsframe import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, encode_close, encode_frame

MAX_HEAD = 16 * 1024


class ProbeFailed(Exception):
    """A probe's answer was wrong; the message says how."""


async def run_probe(
    check: HealthCheckConfig,
    target: Address,
    *,
    tls: ssl.SSLContext | None,
    server_name: str | None,
    proxy_v2: bool,
) -> tuple[bool, str, bool]:
    """(ok, detail, timed_out) for one probe of ``target``."""
    try:
        async with asyncio.timeout(check.timeout_seconds):
            detail = await _probe(check, target, tls, server_name, proxy_v2)
        return True, detail, False
    except TimeoutError:
        return False, f"no answer within {check.timeout_seconds:g} s", True
    except ProbeFailed as exc:
        return False, str(exc), False
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError, WireError) as exc:
        return False, f"{type(exc).__name__}: {exc}", False


async def _probe(
    check: HealthCheckConfig,
    target: Address,
    tls: ssl.SSLContext | None,
    server_name: str | None,
    proxy_v2: bool,
) -> str:
    use_tls = tls is not None and check.protocol != "tcp"
    if check.protocol == "https" and tls is None:
        # An https check on a plain group: TLS without verification, as AWS health checks do.
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
        limit_groups(tls)  # the groups every other context of ours offers (security.md)
        use_tls = True
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        if proxy_v2:
            writer.write(encode_v2(None, None, local=True))
        if use_tls and tls is not None:
            await writer.start_tls(tls, server_hostname=server_name or target.host)
        # Every protocol is named: a value added to the config but not here fails loudly
        # (mypy and assert_never), instead of being probed as some other protocol.
        match check.protocol:
            case "tcp":
                return "connected"
            case "http" | "https":
                return await _http(check, target, reader, writer)
            case "websocket":
                return await _websocket(check, target, reader, writer)
            case _:
                assert_never(check.protocol)
    finally:
        writer.close()


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    buffer = HeadBuffer(MAX_HEAD)
    while True:
        data = await reader.read(4096)
        if not data:
            raise ProbeFailed("target closed before answering")
        result = buffer.feed(data)
        if result is not None:
            return result[0]


async def _http(
    check: HealthCheckConfig,
    target: Address,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> str:
    writer.write(
        f"GET {check.path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: wsproxy-health-check\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    head = parse_response_head(await _read_head(reader))
    if not status_matches(check.matcher, head.status):
        raise ProbeFailed(f"status {head.status} not in {check.matcher}")
    return f"status {head.status}"


async def _websocket(
    check: HealthCheckConfig,
    target: Address,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> str:
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {check.path} HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "User-Agent: wsproxy-health-check\r\n\r\n".encode()
    )
    head = parse_response_head(await _read_head(reader))
    if not is_valid_upgrade_response(head, key):
        raise ProbeFailed(f"upgrade answered {head.status}, not a valid 101")
    detail = "101"
    if check.send is not None:
        writer.write(encode_frame(OP_TEXT, check.send.encode(), mask=os.urandom(4)))
        reply = await _read_text(reader, writer)
        if reply != check.expect:
            raise ProbeFailed(f"expected {check.expect!r}, got {reply[:60]!r}")
        detail = "101, message round trip"
    writer.write(encode_close(1000, mask=os.urandom(4)))
    await writer.drain()
    return detail


async def _read_text(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    """The first text message (unfragmented, at most 64 KiB); answers pings on the way."""
    while True:
        first, second = await reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await reader.readexactly(8))
        if second & 0x80 or length > 65536:
            raise ProbeFailed("target sent a masked or oversized frame")
        payload = await reader.readexactly(length)
        opcode = first & 0x0F
        if opcode == OP_TEXT and first & 0x80:
            return payload.decode("utf-8", "replace")
        if opcode == OP_PING:
            writer.write(encode_frame(OP_PONG, payload, mask=os.urandom(4)))
        elif opcode == OP_CLOSE:
            raise ProbeFailed("target closed the WebSocket before answering")
        elif opcode != OP_PONG:
            raise ProbeFailed(f"unexpected frame opcode {opcode}")
