from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsproxy.errors import MalformedProxyHeader, WireError
from wsproxy.wire.proxyproto import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    SIGNATURE,
    ProxyHeader,
    ProxyHeaderReader,
    encode_v2,
)


def read_all(data: bytes, cuts: list[int] | None = None) -> tuple[ProxyHeader, bytes]:
    reader = ProxyHeaderReader()
    start = 0
    result = None
    for cut in [*sorted({min(c, len(data)) for c in cuts or []}), len(data)]:
        if result is None:
            result = reader.feed(data[start:cut])
        else:
            result = (result[0], result[1] + data[start:cut])
        start = cut
    assert result is not None
    return result


def test_v2_spec_layout() -> None:
    header = encode_v2(("192.0.2.1", 51000), ("198.51.100.2", 443))
    # 12-byte signature, 0x21 (v2, PROXY), 0x11 (TCP over IPv4), length 12, addresses, ports.
    assert header == (
        SIGNATURE
        + b"\x21\x11\x00\x0c"
        + bytes([192, 0, 2, 1, 198, 51, 100, 2])
        + b"\xc7\x38\x01\xbb"
    )


@given(
    st.ip_addresses(),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.binary(max_size=40),
    st.lists(st.integers(0, 80), max_size=6),
)
def test_v2_round_trip_any_chunking(
    ip: object, sport: int, dport: int, payload: bytes, cuts: list[int]
) -> None:
    source = (str(ip), sport)
    destination = ("::1", dport) if ":" in str(ip) else ("127.0.0.1", dport)
    tlvs = [(PP2_TYPE_ALPN, b"http/1.1"), (PP2_TYPE_AUTHORITY, b"chat.internal")]
    data = encode_v2(source, destination, tlvs=tlvs) + payload
    header, rest = read_all(data, cuts)
    assert header.command == "PROXY"
    assert header.source == source and header.destination == destination
    assert header.tlvs == dict(tlvs)
    assert rest == payload


def test_v2_local_and_mixed_families() -> None:
    header, rest = read_all(encode_v2(None, None, local=True) + b"x")
    assert (header.command, header.source, rest) == ("LOCAL", None, b"x")
    mixed, _ = read_all(encode_v2(("192.0.2.1", 1), ("::1", 2)))
    assert mixed.source == ("::ffff:c000:201", 1)


def test_v1() -> None:
    header, rest = read_all(b"PROXY TCP4 192.0.2.1 198.51.100.2 51000 443\r\nGET /")
    assert header.source == ("192.0.2.1", 51000) and rest == b"GET /"
    header, _ = read_all(b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n")
    assert header.source == ("2001:db8::1", 1)
    assert read_all(b"PROXY UNKNOWN\r\n")[0].source is None


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
        b"PROXY " + b"x" * 120,
        SIGNATURE + b"\x31\x11\x00\x00",
        SIGNATURE + b"\x21\x11\x00\x04\x00\x00\x00\x00",
        SIGNATURE + b"\x21\x00\x00\x02\x01\x00",
    ],
)
def test_malformed(data: bytes) -> None:
    with pytest.raises(MalformedProxyHeader):
        ProxyHeaderReader().feed(data)


def test_needed_allows_exact_reads() -> None:
    data = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2)) + b"TLS BYTES"
    reader = ProxyHeaderReader()
    position = 0
    result = None
    while result is None:
        need = reader.needed()
        result = reader.feed(data[position : position + need])
        position += need
    assert result[1] == b"" and data[position:] == b"TLS BYTES"


@given(st.binary(max_size=120), st.lists(st.integers(0, 120), max_size=5))
def test_only_declared_errors_escape(data: bytes, cuts: list[int]) -> None:
    reader = ProxyHeaderReader()
    start = 0
    with contextlib.suppress(WireError):
        for cut in [*sorted({min(c, len(data)) for c in cuts}), len(data)]:
            if reader.feed(data[start:cut]) is not None:
                break
            start = cut
