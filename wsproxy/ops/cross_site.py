"""Refusing a browser's cross-site requests to the proxy's HTTP endpoints (the admin and the
management listeners): see ``cross_site_refusal``."""

from __future__ import annotations

import ipaddress

from aiohttp import web

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _host_is_an_address(host: str) -> bool:
    """Whether a Host value names this machine by address or as localhost (no DNS name a
    rebinding attack could point here); the port, if any, is not looked at."""
    if host.startswith("["):  # an IPv6 literal, with or without a port
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if ":" in host else host
    name = name.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def cross_site_refusal(request: web.Request, tokenless: bool) -> str | None:
    """Why a state-changing request is refused as a browser's cross-site request, or None.

    A web page the operator opens can send a form-like POST (no preflight) to the admin port,
    and a DNS name it controls can be re-pointed at 127.0.0.1 (rebinding) so that the request
    even looks same-origin. Browsers name the page in ``Origin`` and ``Sec-Fetch-Site``; a
    rebinding request still names the attacker's host in ``Host``, which matters only where no
    token protects the endpoint (a browser never adds our bearer token by itself)."""
    if request.method in _SAFE_METHODS:
        return None
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return f"a browser's {site} request (Sec-Fetch-Site)"
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        return f"a request from the page at {origin!r} (Origin)"
    if tokenless and not _host_is_an_address(request.host):
        return (
            f"a request addressed to {request.host!r}: without [admin] token_file, changes are "
            "accepted only at an IP address or localhost (a DNS name may be rebound to this "
            "machine by a web page)"
        )
    return None
