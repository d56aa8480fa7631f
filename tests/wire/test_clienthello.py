from __future__ import annotations

import contextlib
import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsproxy.errors import ClientHelloTooLarge, MalformedClientHello, NotTls, WireError
from wsproxy.wire.clienthello import ClientHelloReader


def real_client_hello(
    server_name: str | None = "chat.internal", alpn: list[str] | None = None
) -> bytes:
    """The bytes Python's own TLS stack sends first."""
    context = ssl.create_default_context()
    context.check_hostname = server_name is not None
    if server_name is None:
        context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


HELLO = real_client_hello(alpn=["http/1.1", "h2"])


def resplit_records(hello: bytes, size: int) -> bytes:
    """The same handshake message carried in records of at most ``size`` bytes."""
    message = hello[5:]
    out = b""
    for offset in range(0, len(message), size):
        piece = message[offset : offset + size]
        out += b"\x16\x03\x01" + len(piece).to_bytes(2, "big") + piece
    return out


def test_server_name_and_alpn() -> None:
    hello = ClientHelloReader().feed(HELLO)
    assert hello is not None
    assert hello.server_name == "chat.internal"
    assert hello.alpn == ("http/1.1", "h2")


def test_no_sni() -> None:
    hello = ClientHelloReader().feed(real_client_hello(None))
    assert hello is not None and hello.server_name is None


@given(st.lists(st.integers(1, len(HELLO)), max_size=20), st.sampled_from([1, 7, 100, 4096]))
def test_any_chunking_and_record_split_gives_the_same_result(cuts: list[int], size: int) -> None:
    data = resplit_records(HELLO, size)
    reader = ClientHelloReader()
    result = None
    start = 0
    for cut in [*sorted({min(c, len(data)) for c in cuts}), len(data)]:
        if result is None:
            result = reader.feed(data[start:cut])
        start = cut
    assert result is not None
    assert (result.server_name, result.alpn) == ("chat.internal", ("http/1.1", "h2"))
    assert bytes(reader.buffered) == data


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"GET / HTTP/1.1\r\n", NotTls),
        (b"\x16\x02\x00", NotTls),
        (b"\x16\x03\x01\x00\x00", MalformedClientHello),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", MalformedClientHello),  # ServerHello
        (b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00", MalformedClientHello),
        (b"\x16\x03\x01\x50\x00", MalformedClientHello),  # a record over 2^14
    ],
)
def test_bad_input(data: bytes, error: type[WireError]) -> None:
    with pytest.raises(error):
        ClientHelloReader().feed(data)


def test_too_large() -> None:
    # A 70 KiB ClientHello: its declared length is refused as soon as it is read.
    body_length = 70 * 1024
    header = b"\x01" + body_length.to_bytes(3, "big")
    record = b"\x16\x03\x01" + (4 + 100).to_bytes(2, "big") + header + b"\x00" * 100
    with pytest.raises(ClientHelloTooLarge):
        ClientHelloReader().feed(record)


def test_truncated_hello_waits() -> None:
    reader = ClientHelloReader()
    assert reader.feed(HELLO[:-1]) is None


@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=6))
def test_only_declared_errors_escape(data: bytes, cuts: list[int]) -> None:
    reader = ClientHelloReader(max_bytes=512)
    start = 0
    try:
        for cut in [*sorted({min(c, len(data)) for c in cuts}), len(data)]:
            reader.feed(data[start:cut])
            start = cut
    except WireError:
        pass


@given(st.binary(min_size=40, max_size=300))
def test_mutated_hellos_only_raise_declared_errors(noise: bytes) -> None:
    data = bytearray(HELLO)
    for index, byte in enumerate(noise):
        data[(index * 37) % len(data)] ^= byte
    with contextlib.suppress(WireError):
        ClientHelloReader().feed(bytes(data))
