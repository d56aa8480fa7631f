"""wire.forwarding: which client fields reach the target (issue 13, items 1 and 11)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from wsproxy.wire.forwarding import fold, forwarded_fields
from wsproxy.wire.http1 import Headers, RequestHead

RESERVED = frozenset({"x-forwarded-for", "x-client-cert-subject"})
PREFIXES = ("x-forwarded-", "x-client-cert-")
OURS: Headers = (("X-Forwarded-For", "127.0.0.1"), ("Connection", "Upgrade"))


def head(*headers: tuple[str, str]) -> RequestHead:
    return RequestHead("GET", "/", "HTTP/1.1", (("Host", "test.internal"), *headers))


def forward(request: RequestHead) -> Headers:
    return forwarded_fields(request, OURS, reserved=RESERVED, reserved_prefixes=PREFIXES)


@st.composite
def respelled(draw: st.DrawFn, name: str) -> str:
    """``name`` with each letter in either case and each ``-`` as ``-`` or ``_``."""
    out = []
    for char in name:
        if char == "-":
            out.append(draw(st.sampled_from("-_")))
        else:
            out.append(draw(st.sampled_from((char.lower(), char.upper()))))
    return "".join(out)


RESERVED_SPELLINGS = st.sampled_from(
    ["x-forwarded-for", "x-client-cert-subject", "x-forwarded-ssl", "x-client-cert-verify"]
).flatmap(respelled)


@given(st.lists(RESERVED_SPELLINGS, min_size=1, max_size=6))
def test_reserved_names_in_any_spelling_are_dropped(names: list[str]) -> None:
    forwarded = forward(head(*((name, "forged") for name in names)))
    assert all(value != "forged" for _, value in forwarded)
    assert forwarded[-len(OURS) :] == OURS


@given(st.lists(st.sampled_from(["X-Trace", "Cookie", "TE", "Keep-Alive", "X-Other"]), max_size=5))
def test_fields_named_in_connection_stay_on_the_clients_hop(named: list[str]) -> None:
    fields = [("X-Trace", "t"), ("Cookie", "c"), ("TE", "trailers"), ("X-Other", "o")]
    request = head(("Connection", ", ".join(["Upgrade", *named])), *fields)
    forwarded = forward(request)
    gone = {name.lower() for name in named} | {"keep-alive"}
    names = [name.lower() for name, _ in forwarded]
    assert not gone & set(names)
    assert names.count("connection") == 1 and ("Connection", "Upgrade") in forwarded
    assert [(n, v) for n, v in fields if n.lower() not in gone] == [
        field for field in forwarded if field in fields
    ]


def test_framing_and_host_stay_when_named() -> None:
    request = head(
        ("Connection", "close, Host, Content-Length, Transfer-Encoding"),
        ("Content-Length", "5"),
    )
    forwarded = dict(forward(request))
    assert forwarded["Host"] == "test.internal"
    assert forwarded["Content-Length"] == "5"


def test_fold() -> None:
    assert fold("X_Client_Cert-Subject") == "x-client-cert-subject"
