"""HTTP/1.1 message heads and body framing (RFC 9112), sans-I/O.

Only what a proxy in front of WebSocket services needs: collect a head within a byte limit, parse it
strictly (anything ambiguous is an error, since ambiguity between two parsers is how requests are
smuggled), serialize it again in canonical form, and find where a body ends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from wsproxy.errors import HeadLimitExceeded, MalformedBody, MalformedHead

CRLF = b"\r\n"
HEAD_END = b"\r\n\r\n"

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN_RE = re.compile(_TOKEN)
_REQUEST_LINE_RE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_STATUS_LINE_RE = re.compile(rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
# RFC 9110 §5.5: field values are VCHAR, SP, HTAB and obs-text; every other control byte is refused.
_BAD_VALUE_BYTE_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN_BYTES = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_PRINTABLE = frozenset(range(0x20, 0x7F))

Headers = tuple[tuple[str, str], ...]


class _HeadFields:
    """Case-insensitive lookups over an ordered header list (names keep their original case)."""

    headers: Headers
    _index: dict[str, list[str]]  # lower-case name -> its values, in order; built once

    def _index_names(self) -> None:
        index: dict[str, list[str]] = {}
        for name, value in self.headers:
            key = name.lower()
            values = index.get(key)
            if values is None:
                index[key] = [value]
            else:
                values.append(value)
        object.__setattr__(self, "_index", index)

    def get_all(self, name: str) -> list[str]:
        values = self._index.get(name.lower())
        return list(values) if values else []

    def get(self, name: str) -> str | None:
        values = self._index.get(name.lower())
        return values[0] if values else None

    def tokens(self, name: str) -> set[str]:
        """Comma-separated tokens of every ``name`` field, lower-cased (RFC 9110 §5.6.1)."""
        found: set[str] = set()
        for value in self._index.get(name.lower(), ()):
            found.update(part.strip().lower() for part in value.split(",") if part.strip())
        return found


@dataclass(frozen=True, slots=True)
class RequestHead(_HeadFields):
    method: str
    target: str
    version: str
    headers: Headers
    _index: dict[str, list[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index_names()

    @property
    def path(self) -> str:
        """The request-target without its query, as routing sees it."""
        return self.target.split("?", 1)[0]


@dataclass(frozen=True, slots=True)
class ResponseHead(_HeadFields):
    version: str
    status: int
    reason: str
    headers: Headers
    _index: dict[str, list[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index_names()


class HeadBuffer:
    """Collects bytes until a head ends with CRLF CRLF.

    ``feed`` returns ``None`` while more bytes are needed, or ``(head, rest)`` once the head is
    complete (``rest`` is whatever followed it in the same chunk). Raises ``HeadLimitExceeded`` when
    ``max_bytes`` arrive without the end, and ``MalformedHead`` as soon as the bytes cannot be
    HTTP/1.1, so garbage is refused at once instead of waiting for the deadline.
    """

    __slots__ = ("_buf", "_first_line_checked", "_max_bytes", "_scanned")

    def __init__(self, max_bytes: int) -> None:
        self._buf = bytearray()
        self._max_bytes = max_bytes
        self._scanned = 0
        self._first_line_checked = False

    @property
    def size(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> tuple[bytes, bytes] | None:
        buf = self._buf
        buf += data
        # Search from 3 bytes back: the CRLF CRLF may straddle two chunks.
        end = buf.find(HEAD_END, max(0, self._scanned - 3))
        limit = len(buf) if end < 0 else end + 4
        self._check_prefix(limit)
        if end < 0:
            if len(buf) > self._max_bytes:
                raise HeadLimitExceeded(
                    f"head exceeds {self._max_bytes} bytes without ending (CRLF CRLF)"
                )
            self._scanned = len(buf)
            return None
        if end + 4 > self._max_bytes:
            raise HeadLimitExceeded(f"head of {end + 4} bytes exceeds {self._max_bytes} bytes")
        head = bytes(buf[: end + 4])
        rest = bytes(buf[end + 4 :])
        buf.clear()
        return head, rest

    def _check_prefix(self, limit: int) -> None:
        buf = self._buf
        # RFC 9112 §2.2: a bare LF is tolerated by some parsers and not others; refuse it early.
        start = max(0, self._scanned - 1)
        lf = buf.find(b"\n", start, limit)
        while lf >= 0:
            if lf == 0 or buf[lf - 1] != 0x0D:
                raise MalformedHead("bare LF in head (lines must end with CRLF)")
            lf = buf.find(b"\n", lf + 1, limit)
        if not self._first_line_checked:
            # Only the bytes new since the last feed are looked at: a head trickled one byte at a
            # time must cost O(n), not O(n^2).
            first_end = buf.find(CRLF, 0, limit)
            probe_end = first_end if first_end >= 0 else limit
            if buf and buf[0] not in _TOKEN_BYTES:
                raise MalformedHead("not HTTP: the first byte is not a method or version token")
            for index in range(self._scanned, probe_end):
                byte = buf[index]
                if byte not in _PRINTABLE and not (byte == 0x0D and index == len(buf) - 1):
                    raise MalformedHead("not HTTP: the first line holds non-printable bytes")
            if first_end >= 0:
                self._first_line_checked = True


# One field line: a token, the colon, optional whitespace, a value of VCHAR, SP, HTAB and obs-text
# (RFC 9110 §5.5) without its trailing whitespace, CRLF. A head whose field lines all match is
# parsed by two regex passes in C; anything else goes line by line to find what is wrong.
_VCHAR = r"[\x21-\x7e\x80-\xff]"
_FIELD_VALUE = r"(?:" + _VCHAR + r"(?:[\t\x20-\x7e\x80-\xff]*" + _VCHAR + r")?)?"
_FIELD_LINE = r"(" + _TOKEN.decode() + r"):[ \t]*(" + _FIELD_VALUE + r")[ \t]*\r\n"
_FIELD_LINE_RE = re.compile(_FIELD_LINE)
_FIELD_BLOCK_RE = re.compile(r"(?:" + _FIELD_LINE + r")*")


def _split_head(raw: bytes) -> tuple[bytes, list[tuple[str, str]]]:
    if not raw.endswith(HEAD_END):
        raise MalformedHead("head does not end with CRLF CRLF")
    first_end = raw.find(CRLF)
    # Latin-1 maps every byte to one character: names stay ASCII (the regex allows only token
    # characters there) and values keep obs-text, exactly as the byte-wise parser would.
    block = raw[first_end + 2 : -2].decode("latin-1")
    if _FIELD_BLOCK_RE.fullmatch(block):
        return raw[:first_end], _FIELD_LINE_RE.findall(block)
    return raw[:first_end], _field_lines_strictly(raw)


def _field_lines_strictly(raw: bytes) -> list[tuple[str, str]]:
    """The slow path, for heads the regex refused: name the first thing that is wrong."""
    field_lines = raw[:-4].split(CRLF)[1:]
    headers: list[tuple[str, str]] = []
    for line in field_lines:
        if not line:
            raise MalformedHead("empty line inside the head")
        if b"\r" in line or b"\n" in line:
            raise MalformedHead("bare CR or LF inside a header line")
        if line[0] in b" \t":
            raise MalformedHead("obsolete line folding is not accepted (RFC 9112 §5.2)")
        name, sep, value = line.partition(b":")
        if not sep:
            raise MalformedHead("header line without a colon")
        if not _TOKEN_RE.fullmatch(name):
            # Includes whitespace before the colon, which RFC 9112 §5.1 requires us to reject.
            raise MalformedHead("invalid header name")
        value = value.strip(b" \t")
        if _BAD_VALUE_BYTE_RE.search(value):
            raise MalformedHead("control character in a header value")
        headers.append((name.decode("ascii"), value.decode("latin-1")))
    return headers


def parse_request_head(raw: bytes) -> RequestHead:
    """Parse a complete request head (as returned by ``HeadBuffer.feed``)."""
    first, headers = _split_head(raw)
    match = _REQUEST_LINE_RE.fullmatch(first)
    if match is None:
        raise MalformedHead("invalid request line")
    method, target, major, minor = match.groups()
    return RequestHead(
        method=method.decode("ascii"),
        target=target.decode("ascii"),
        version=f"HTTP/{major.decode()}.{minor.decode()}",
        headers=tuple(headers),
    )


def parse_response_head(raw: bytes) -> ResponseHead:
    """Parse a complete response head."""
    first, headers = _split_head(raw)
    match = _STATUS_LINE_RE.fullmatch(first)
    if match is None:
        raise MalformedHead("invalid status line")
    major, minor, status, reason = match.groups()
    return ResponseHead(
        version=f"HTTP/{major.decode()}.{minor.decode()}",
        status=int(status),
        reason=(reason or b"").decode("latin-1"),
        headers=tuple(headers),
    )


def serialize_request(method: str, target: str, version: str, headers: Headers) -> bytes:
    """A request head in canonical form (one pass, no intermediate ``RequestHead``)."""
    text = "".join([f"{method} {target} {version}\r\n", *_field_lines(headers), "\r\n"])
    return text.encode("latin-1")


def _field_lines(headers: Headers) -> list[str]:
    return [f"{name}: {value}\r\n" for name, value in headers]


def serialize_request_head(head: RequestHead) -> bytes:
    return serialize_request(head.method, head.target, head.version, head.headers)


def serialize_response_head(head: ResponseHead) -> bytes:
    start = f"{head.version} {head.status} {head.reason}\r\n"
    return "".join([start, *_field_lines(head.headers), "\r\n"]).encode("latin-1")


def replace_headers(headers: Headers, drop: set[str], add: Headers) -> Headers:
    """Remove every field named in ``drop`` (lower-case names) and append ``add``."""
    kept = tuple((name, value) for name, value in headers if name.lower() not in drop)
    return kept + add


# --- body framing ------------------------------------------------------------------------------


class BodyKind(Enum):
    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until_close"


def _content_length(fields: _HeadFields) -> int | None:
    values = fields.get_all("content-length")
    if not values:
        return None
    parts = {part.strip() for value in values for part in value.split(",")}
    if len(parts) != 1:
        raise MalformedHead("conflicting Content-Length values")
    (text,) = parts
    if not text.isdigit() or not text.isascii() or len(text) > 18:
        raise MalformedHead(f"invalid Content-Length {text!r}")
    return int(text)


def _is_chunked(fields: _HeadFields) -> bool | None:
    """None: no Transfer-Encoding; True: final coding is chunked; False: some other final coding."""
    values = fields.get_all("transfer-encoding")
    if not values:
        return None
    codings = [part.strip().lower() for value in values for part in value.split(",")]
    return bool(codings) and codings[-1] == "chunked" and codings.count("chunked") == 1


def request_body(head: RequestHead) -> tuple[BodyKind, int]:
    """How the request's body is framed (RFC 9112 §6.3); ambiguous framing is an error."""
    if head.version == "HTTP/1.0" and head.get_all("transfer-encoding"):
        # RFC 9112 §6.1: HTTP/1.0 has no Transfer-Encoding, so a 1.0 message with one has faulty
        # framing; parsers that honour it and parsers that do not would split it differently.
        raise MalformedHead("Transfer-Encoding in an HTTP/1.0 request; send Content-Length")
    chunked = _is_chunked(head)
    length = _content_length(head)
    if chunked is not None:
        if length is not None:
            raise MalformedHead("both Transfer-Encoding and Content-Length (RFC 9112 §6.1)")
        if not chunked:
            raise MalformedHead("Transfer-Encoding whose final coding is not chunked")
        return BodyKind.CHUNKED, 0
    if length:
        return BodyKind.LENGTH, length
    return BodyKind.NONE, 0


def response_body(head: ResponseHead, request_method: str) -> tuple[BodyKind, int]:
    """How the response's body is framed (RFC 9112 §6.3)."""
    if request_method == "HEAD" or head.status < 200 or head.status in (204, 304):
        return BodyKind.NONE, 0
    chunked = _is_chunked(head)
    length = _content_length(head)
    if chunked:
        return BodyKind.CHUNKED, 0
    if chunked is False:
        return BodyKind.UNTIL_CLOSE, 0
    if length is not None:
        return (BodyKind.LENGTH, length) if length else (BodyKind.NONE, 0)
    return BodyKind.UNTIL_CLOSE, 0


class _Chunk(Enum):
    SIZE = 0
    DATA = 1
    DATA_CRLF = 2
    TRAILER = 3
    DONE = 4


_CHUNK_LINE_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # HTAB is BWS


class BodyTracker:
    """Finds the end of a body without copying it.

    ``feed(data)`` returns how many leading bytes of ``data`` belong to the body; once the body is
    complete ``done`` is True and the rest of ``data`` (if any) belongs to whatever follows.
    ``UNTIL_CLOSE`` bodies never complete: the peer's close ends them. ``trailers=False`` (a
    request's body) refuses a non-empty trailer section: targets that merge trailers into the
    head (Apache's MergeTrailers, Tomcat's allowedTrailerHeaders) would take identity fields
    from it that the head may not carry.
    """

    __slots__ = ("_kind", "_line", "_remaining", "_state", "_trailer_bytes", "_trailers", "done")

    MAX_LINE = 4096
    MAX_TRAILER = 16384

    def __init__(self, kind: BodyKind, length: int = 0, *, trailers: bool = True) -> None:
        self._kind = kind
        self._trailers = trailers
        self._remaining = length
        self._state = _Chunk.SIZE
        self._line = bytearray()
        self._trailer_bytes = 0
        self.done = kind is BodyKind.NONE or (kind is BodyKind.LENGTH and length == 0)

    def feed(self, data: bytes) -> int:
        if self.done:
            return 0
        if self._kind is BodyKind.UNTIL_CLOSE:
            return len(data)
        if self._kind is BodyKind.LENGTH:
            taken = min(self._remaining, len(data))
            self._remaining -= taken
            self.done = self._remaining == 0
            return taken
        return self._feed_chunked(data)

    def _read_line(self, data: bytes, pos: int) -> tuple[bytes | None, int]:
        end = data.find(b"\n", pos)
        if end < 0:
            self._line += data[pos:]
            if len(self._line) > self.MAX_LINE:
                raise MalformedBody("chunk-size or trailer line too long")
            return None, len(data)
        self._line += data[pos : end + 1]
        line = bytes(self._line)
        self._line.clear()
        if len(line) > self.MAX_LINE:
            raise MalformedBody("chunk-size or trailer line too long")
        if not line.endswith(CRLF):
            raise MalformedBody("bare LF in chunked body")
        return line[:-2], end + 1

    def _feed_chunked(self, data: bytes) -> int:
        pos = 0
        size = len(data)
        while pos < size and not self.done:
            state = self._state
            if state is _Chunk.DATA:
                taken = min(self._remaining, size - pos)
                self._remaining -= taken
                pos += taken
                if self._remaining == 0:
                    self._state = _Chunk.DATA_CRLF
            elif state is _Chunk.SIZE:
                line, pos = self._read_line(data, pos)
                if line is None:
                    break
                # chunk-size [ BWS ";" chunk-ext ] (RFC 9112 §7.1.1): whitespace only before the
                # extensions, and no control byte anywhere (parsers that disagree on such lines
                # split the body differently: a smuggling primitive).
                size_text = line.split(b";", 1)[0].rstrip(b" \t")
                if (
                    _CHUNK_LINE_CONTROL.search(line)
                    or not size_text
                    or len(size_text) > 16
                    or not all(c in b"0123456789abcdefABCDEF" for c in size_text)
                ):
                    raise MalformedBody("invalid chunk size")
                self._remaining = int(size_text, 16)
                self._state = _Chunk.DATA if self._remaining else _Chunk.TRAILER
            elif state is _Chunk.DATA_CRLF:
                line, pos = self._read_line(data, pos)
                if line is None:
                    break
                if line:
                    raise MalformedBody("chunk data longer than its size")
                self._state = _Chunk.SIZE
            else:  # TRAILER
                line, pos = self._read_line(data, pos)
                if line is None:
                    break
                self._trailer_bytes += len(line) + 2
                if self._trailer_bytes > self.MAX_TRAILER:
                    raise MalformedBody("trailer section too large")
                if line and not self._trailers:
                    raise MalformedBody(
                        "a request trailer section is not forwarded; send these fields in the head"
                    )
                if not line:
                    self._state = _Chunk.DONE
                    self.done = True
        return pos
