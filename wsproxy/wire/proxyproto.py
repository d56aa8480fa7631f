"""The PROXY protocol (HAProxy's spec, versions 1 and 2), sans-I/O: encode v2, decode v1 and v2.

A PROXY v2 header written before any other byte tells a target the client's real address
(section 2.2); the LOCAL command marks connections the proxy makes for itself, like health checks.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from wsproxy.errors import MalformedProxyHeader

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # spec §2.1: the longest possible v1 line, CRLF included
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
_TCP4 = 0x11
_TCP6 = 0x21
_UNSPEC = 0x00

Endpoint = tuple[str, int]


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    command: str  # "PROXY" or "LOCAL"
    source: Endpoint | None
    destination: Endpoint | None
    tlvs: dict[int, bytes] = field(default_factory=dict)


def encode_v2(
    source: Endpoint | None,
    destination: Endpoint | None,
    *,
    tlvs: list[tuple[int, bytes]] | None = None,
    local: bool = False,
) -> bytes:
    """A v2 header; LOCAL (or unknown addresses) carries no address block."""
    command = 0x20 if local else 0x21
    body = b""
    family = _UNSPEC
    if not local and source is not None and destination is not None:
        src = ipaddress.ip_address(source[0])
        dst = ipaddress.ip_address(destination[0])
        if src.version != dst.version:
            # Mixed families (IPv4 client on an IPv6 listener): use the mapped IPv6 form.
            src = ipaddress.IPv6Address(f"::ffff:{src}") if src.version == 4 else src
            dst = ipaddress.IPv6Address(f"::ffff:{dst}") if dst.version == 4 else dst
        family = _TCP4 if src.version == 4 else _TCP6
        body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    for kind, value in tlvs or []:
        body += struct.pack("!BH", kind, len(value)) + value
    return SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body


class ProxyHeaderReader:
    """Feed bytes; returns ``(header, rest)`` once a v1 or v2 header is complete, else None."""

    def __init__(self) -> None:
        self._buf = b""

    def needed(self) -> int:
        """How many more bytes to read at least (for exact reads that must not over-read)."""
        buf = self._buf
        if not buf:
            return 1
        if buf[:1] == b"P":
            return 1  # v1 ends at CRLF: read a byte at a time
        if len(buf) < 16:
            return 16 - len(buf)
        length = int(struct.unpack_from("!H", buf, 14)[0])
        return max(1, 16 + length - len(buf))

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        self._buf += data
        buf = self._buf
        if buf[:1] == b"P":
            return self._v1(buf)
        if buf[: min(len(buf), 12)] != SIGNATURE[: min(len(buf), 12)]:
            raise MalformedProxyHeader("connection does not start with a PROXY header")
        if len(buf) < 16:
            return None
        version_command, family, length = struct.unpack_from("!BBH", buf, 12)
        if version_command >> 4 != 2 or version_command & 0x0F not in (0, 1):
            raise MalformedProxyHeader(f"bad PROXY v2 version/command 0x{version_command:02x}")
        if len(buf) < 16 + length:
            return None
        body, rest = buf[16 : 16 + length], buf[16 + length :]
        local = version_command & 0x0F == 0
        source = destination = None
        offset = 0
        if family == _TCP4:
            if length < 12:
                raise MalformedProxyHeader("PROXY v2 TCP4 block too short")
            source = (str(ipaddress.IPv4Address(body[0:4])), struct.unpack_from("!H", body, 8)[0])
            destination = (
                str(ipaddress.IPv4Address(body[4:8])),
                struct.unpack_from("!H", body, 10)[0],
            )
            offset = 12
        elif family == _TCP6:
            if length < 36:
                raise MalformedProxyHeader("PROXY v2 TCP6 block too short")
            source = (str(ipaddress.IPv6Address(body[0:16])), struct.unpack_from("!H", body, 32)[0])
            destination = (
                str(ipaddress.IPv6Address(body[16:32])),
                struct.unpack_from("!H", body, 34)[0],
            )
            offset = 36
        elif family != _UNSPEC:
            raise MalformedProxyHeader(f"unsupported PROXY v2 family 0x{family:02x}")
        tlvs: dict[int, bytes] = {}
        while offset < length:
            if length - offset < 3:
                raise MalformedProxyHeader("truncated PROXY v2 TLV")
            kind, size = struct.unpack_from("!BH", body, offset)
            if offset + 3 + size > length:
                raise MalformedProxyHeader("PROXY v2 TLV runs past the header")
            tlvs[kind] = body[offset + 3 : offset + 3 + size]
            offset += 3 + size
        if local:
            return ProxyHeader("LOCAL", None, None, tlvs), rest
        return ProxyHeader("PROXY", source, destination, tlvs), rest

    def _v1(self, buf: bytes) -> tuple[ProxyHeader, bytes] | None:
        end = buf.find(b"\r\n")
        if end < 0:
            if len(buf) >= V1_MAX or not SIGNATURE_V1.startswith(buf[:6]):
                raise MalformedProxyHeader("PROXY v1 line too long or not PROXY")
            return None
        if end + 2 > V1_MAX:
            raise MalformedProxyHeader("PROXY v1 line longer than 107 bytes")
        parts = buf[:end].decode("ascii", "replace").split(" ")
        rest = buf[end + 2 :]
        if parts[:2] == ["PROXY", "UNKNOWN"]:
            return ProxyHeader("PROXY", None, None), rest
        if len(parts) != 6 or parts[0] != "PROXY" or parts[1] not in ("TCP4", "TCP6"):
            raise MalformedProxyHeader("malformed PROXY v1 line")
        try:
            src = ipaddress.ip_address(parts[2])
            dst = ipaddress.ip_address(parts[3])
            ports = int(parts[4]), int(parts[5])
        except ValueError:
            raise MalformedProxyHeader("bad address or port in PROXY v1 line") from None
        if (src.version, dst.version) != ((4, 4) if parts[1] == "TCP4" else (6, 6)):
            raise MalformedProxyHeader("PROXY v1 addresses do not match the family")
        if not all(0 <= port <= 65535 for port in ports):
            raise MalformedProxyHeader("PROXY v1 port out of range")
        return ProxyHeader("PROXY", (str(src), ports[0]), (str(dst), ports[1])), rest


SIGNATURE_V1 = b"PROXY "
