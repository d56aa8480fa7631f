"""Which of a client's request header fields go on to the target, sans-I/O.

Two rules, both about headers the target will trust because the proxy sent them:

* Hop-by-hop fields stay on the client's hop (RFC 9110 §7.6.1): ``Connection``, ``Keep-Alive``,
  ``Proxy-Connection`` and every field the client named in ``Connection``. The proxy then sends
  its own ``Connection`` (``Upgrade`` or ``close``). Forwarding the client's ``Connection`` would
  let it name the proxy's ``X-Forwarded-For`` there, so that the next hop removes it
  (CVE-2024-45410 one hop later).
* The proxy's own fields are its alone: any client field whose name equals one the proxy
  reserves, or starts with a prefix it reserves, after folding case and reading ``_`` as ``-``,
  is dropped. CGI, WSGI, Rack and PHP map ``X_Client_Cert_Subject`` and ``X-Client-Cert-Subject`` to
  the same variable (nginx refuses underscores in names by default for this reason).
"""

from __future__ import annotations

from wsproxy.wire.http1 import Headers, RequestHead

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection"})

# Named in Connection, these still go on: the proxy forwards the body exactly as the client framed
# it and routed on Host, so it re-sends them as its own for the next hop. Dropping Content-Length or
# Transfer-Encoding there would make the target read the body as the next request. Upgrade is
# named by every upgrade request's ``Connection: Upgrade`` and is re-sent with ours.
_KEPT_WHEN_NAMED = frozenset({"host", "content-length", "transfer-encoding", "upgrade"})


def fold(name: str) -> str:
    """A field name as CGI-derived frameworks see it: case folded, ``_`` read as ``-``."""
    return name.lower().replace("_", "-")


def forwarded_fields(
    head: RequestHead,
    add: Headers,
    *,
    reserved: frozenset[str],
    reserved_prefixes: tuple[str, ...] = (),
) -> Headers:
    """The client's fields to forward, in their order, followed by ``add`` (the proxy's own).

    Removed: the hop-by-hop fields above, and every field whose folded name is in ``reserved``
    or starts with one of ``reserved_prefixes`` (both folded: lower-case, ``-`` separated). These
    must cover every name in ``add`` but ``Connection``, which ``add`` should carry; the test
    ``test_every_header_the_proxy_adds_is_reserved_in_any_spelling`` checks it on the wire.
    Reserved names are given rather than taken from ``add`` so that a request costs no set
    building: this runs once per request.
    """
    named = head.tokens("connection") - _KEPT_WHEN_NAMED
    kept = []
    for name, value in head.headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named:
            continue
        folded = lower.replace("_", "-")
        if folded in reserved or folded.startswith(reserved_prefixes):
            continue
        kept.append((name, value))
    return (*kept, *add)
