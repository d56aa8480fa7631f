"""The TLS ClientHello, read without decrypting anything (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2).

Enough to route TLS passthrough: the server name (RFC 6066 §3) and the ALPN protocols
(RFC 7301). The hello may be split across TCP reads and across several TLS records; bytes are
buffered up to a cap and the caller replays them to the target untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

from wsproxy.errors import ClientHelloTooLarge, MalformedClientHello, NotTls

RECORD_HANDSHAKE = 0x16
HANDSHAKE_CLIENT_HELLO = 0x01
EXT_SERVER_NAME = 0x0000
EXT_ALPN = 0x0010
# RFC 8446 §5.1: a record carries at most 2^14 bytes of plaintext.
MAX_RECORD = 1 << 14
# Envoy's tls_inspector reads at most 64 KiB of ClientHello.
DEFAULT_MAX_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str | None
    alpn: tuple[str, ...]
    legacy_version: int


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, count: int) -> bytes:
        end = self.pos + count
        if end > len(self.data):
            raise MalformedClientHello("ClientHello field runs past its end")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> bytes:
        return self.take(self.number(length_size))

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


class ClientHelloReader:
    """Feed bytes as they arrive; ``feed`` returns the ClientHello once complete, else None.

    Raises ``NotTls`` when the first record is not a handshake, ``MalformedClientHello`` when it
    cannot be parsed, and ``ClientHelloTooLarge`` past ``max_bytes``. ``buffered`` holds every
    byte fed so far, to be replayed.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.buffered = bytearray()
        self._records_end = 0  # end of the records already split off
        self._handshake = bytearray()

    def feed(self, data: bytes) -> ClientHello | None:
        self.buffered += data
        buf = self.buffered
        if buf and buf[0] != RECORD_HANDSHAKE:
            raise NotTls(f"first byte 0x{buf[0]:02x} is not a TLS handshake record")
        if len(buf) >= 2 and buf[1] != 0x03:
            raise NotTls(f"record version major {buf[1]} is not 3")
        while len(buf) - self._records_end >= 5:
            start = self._records_end
            if buf[start] != RECORD_HANDSHAKE:
                raise MalformedClientHello("a non-handshake record inside the ClientHello")
            length = int.from_bytes(buf[start + 3 : start + 5], "big")
            if length == 0 or length > MAX_RECORD:
                raise MalformedClientHello(f"record length {length} out of range")
            if len(buf) - start - 5 < length:
                break
            self._handshake += buf[start + 5 : start + 5 + length]
            self._records_end = start + 5 + length
            hello = self._try_parse()
            if hello is not None:
                return hello
        if len(buf) > self.max_bytes:
            raise ClientHelloTooLarge(f"no complete ClientHello in {self.max_bytes} bytes")
        return None

    def _try_parse(self) -> ClientHello | None:
        message = self._handshake
        if len(message) < 4:
            return None
        if message[0] != HANDSHAKE_CLIENT_HELLO:
            raise MalformedClientHello(f"handshake type {message[0]} is not ClientHello")
        length = int.from_bytes(message[1:4], "big")
        if 4 + length > self.max_bytes:
            raise ClientHelloTooLarge(f"ClientHello of {length} bytes exceeds {self.max_bytes}")
        if len(message) < 4 + length:
            return None
        return parse_client_hello_body(bytes(message[4 : 4 + length]))


def parse_client_hello_body(body: bytes) -> ClientHello:
    cursor = _Cursor(body)
    legacy_version = cursor.number(2)
    cursor.take(32)  # random
    session_id = cursor.vector(1)
    if len(session_id) > 32:
        raise MalformedClientHello("session id longer than 32 bytes")
    suites = cursor.vector(2)
    if not suites or len(suites) % 2:
        raise MalformedClientHello("cipher suite list empty or odd")
    if not cursor.vector(1):
        raise MalformedClientHello("no compression method")
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    if cursor.left:
        extensions = _Cursor(cursor.vector(2))
        seen: set[int] = set()
        while extensions.left:
            kind = extensions.number(2)
            data = extensions.vector(2)
            if kind in seen:
                raise MalformedClientHello(f"extension {kind} appears twice")
            seen.add(kind)
            if kind == EXT_SERVER_NAME:
                server_name = _server_name(data)
            elif kind == EXT_ALPN:
                alpn = _alpn(data)
    if cursor.left:
        raise MalformedClientHello("bytes after the extensions")
    return ClientHello(server_name, alpn, legacy_version)


def _server_name(data: bytes) -> str | None:
    names = _Cursor(_Cursor(data).vector(2))
    while names.left:
        name_type = names.number(1)
        name = names.vector(2)
        if name_type == 0:  # host_name
            try:
                text = name.decode("ascii")
            except UnicodeDecodeError:
                raise MalformedClientHello("server name is not ASCII") from None
            if not text or any(c <= " " or c == "\x7f" for c in text):
                raise MalformedClientHello("server name is empty or holds control bytes")
            return text.lower().rstrip(".")
    return None


def _alpn(data: bytes) -> tuple[str, ...]:
    protocols = _Cursor(_Cursor(data).vector(2))
    found = []
    while protocols.left:
        name = protocols.vector(1)
        if not name:
            raise MalformedClientHello("empty ALPN protocol name")
        found.append(name.decode("latin-1"))
    return tuple(found)
