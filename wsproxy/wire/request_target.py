"""The request line's version and request-target, as routing must see them; sans-I/O.

Rules (each refusal names what to send instead):
- versions: HTTP/1.0 and HTTP/1.1 only; anything else is a 505 (RFC 9110 §15.6.6). HTTP/0.9 has
  no head to route on and HTTP/2 does not use a request line, so neither can be forwarded safely.
- forms (RFC 9112 §3.2): origin-form (``/path?query``); absolute-form with scheme http or https,
  whose authority replaces Host (§3.2.2) and which goes to the target in origin-form with that
  authority as Host, so the target and the rules see one host and one path; ``*`` for OPTIONS
  only (§3.2.4). Authority-form (CONNECT) is for forward proxies and is refused.
- paths are normalised before routing and forwarded normalised, as Envoy's ``normalize_path`` with
  ``merge_slashes`` does (RFC 3986 §6.2.2): percent-encoded unreserved characters decoded, the
  other escapes upper-cased, runs of ``/`` merged, ``.`` and ``..`` segments removed. A path whose
  meaning a target might still read differently is refused instead: ``%2F`` and ``%5C`` (a target
  that decodes them before resolving ``..`` walks out of the prefix the rule matched), ``%00``
  (truncates paths in C targets), a literal backslash (a ``/`` to Windows and some frameworks),
  a ``%`` not followed by two hex digits, ``#`` (a fragment is never part of a request), and a
  ``.`` or ``..`` segment with ``;parameters`` (Java servlet containers drop those, then
  resolve the dot segment).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from wsproxy.errors import BadRequestTarget, VersionNotSupported
from wsproxy.wire.http1 import RequestHead

SUPPORTED_VERSIONS = ("HTTP/1.1", "HTTP/1.0")

# RFC 3986 §2.3: unreserved characters, the only ones whose escapes may be decoded (§6.2.2.2).
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# Escapes refused outright: "/" and "\" (see the module docstring) and NUL.
_REFUSED_ESCAPES = {"2F": "%2F (an encoded '/')", "5C": "%5C (an encoded '\\')", "00": "%00"}
_SLASHES_RE = re.compile(r"/{2,}")
# absolute-URI for http(s) (RFC 9110 §4.2): scheme "://" authority path-abempty [ "?" query ].
_ABSOLUTE_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?]*)([^?]*)(?:\?(.*))?")
# The authority's host (reg-name of unreserved characters, IPv4, or an IP literal) and port; also
# what a Host header must be (wire/upgrade.py check_host). No userinfo, no pct-encoding.
AUTHORITY_RE = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(?::[0-9]{0,5})?")


class RequestTarget(NamedTuple):
    """A request-target after checking: ``path`` normalised (``*`` for OPTIONS *), ``query``
    as sent (None when there is none), ``authority`` from an absolute-form target, else None.

    A NamedTuple: one is built per request, and it costs half a frozen dataclass."""

    path: str
    query: str | None = None
    authority: str | None = None

    @property
    def origin_form(self) -> str:
        """What the target is sent: the normalised path and the query untouched."""
        return self.path if self.query is None else f"{self.path}?{self.query}"


def check_version(head: RequestHead) -> None:
    """Raise ``VersionNotSupported`` (505) unless the request is HTTP/1.0 or HTTP/1.1."""
    if head.version not in SUPPORTED_VERSIONS:
        raise VersionNotSupported(
            f"{head.version} is not supported; send HTTP/1.1 (or HTTP/1.0) requests"
        )


def parse_request_target(method: str, target: str) -> RequestTarget:
    """Check the form of ``target`` and normalise its path; ``BadRequestTarget`` (400) when it
    cannot be routed safely. ``target`` is what the request line holds (visible ASCII)."""
    if "#" in target:
        raise BadRequestTarget("a request-target cannot hold a fragment ('#'); leave it out")
    if target.startswith("/"):
        path, sep, query = target.partition("?")
        return RequestTarget(normalize_path(path), query if sep else None)
    if target == "*":
        if method != "OPTIONS":
            raise BadRequestTarget(f"'*' is a request-target for OPTIONS only, not {method}")
        return RequestTarget("*")
    match = _ABSOLUTE_RE.fullmatch(target)
    if match is None:
        raise BadRequestTarget(
            "the request-target must be a path ('/...') or an http(s) URL; "
            "this proxy is not a forward proxy (no CONNECT)"
        )
    scheme, authority, path, query = match.groups()
    if scheme.lower() not in ("http", "https"):
        raise BadRequestTarget(f"scheme {scheme!r} is not http or https")
    if "@" in authority:
        # RFC 9110 §4.2.4: userinfo in an http(s) URI must be treated as an error.
        raise BadRequestTarget("the URL holds userinfo ('user@'); leave it out")
    if not AUTHORITY_RE.fullmatch(authority):
        raise BadRequestTarget(f"the URL's host {authority!r} is not a host name or address")
    return RequestTarget(normalize_path(path or "/"), query, authority)


def normalize_path(path: str) -> str:
    """``path`` (starting with ``/``) in normal form; ``BadRequestTarget`` for what the module
    docstring lists. Idempotent: a normal path comes back unchanged."""
    if "\\" in path:
        raise BadRequestTarget("a backslash in the path; use '/'")
    if "%" in path:
        path = _normalize_escapes(path)
    if ";" in path:
        _check_dot_parameters(path)
    if "//" in path:
        path = _SLASHES_RE.sub("/", path)
    if "/." in path:
        path = _remove_dot_segments(path)
    return path


def _normalize_escapes(path: str) -> str:
    parts = path.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        code = part[:2]
        if len(code) < 2 or not (code[0] in _HEX and code[1] in _HEX):
            raise BadRequestTarget("a '%' in the path not followed by two hex digits; send %25")
        code = code.upper()
        refused = _REFUSED_ESCAPES.get(code)
        if refused is not None:
            raise BadRequestTarget(f"the path holds {refused}, which targets decode differently")
        char = chr(int(code, 16))
        out.append(char + part[2:] if char in _UNRESERVED else f"%{code}{part[2:]}")
    return "".join(out)


def _check_dot_parameters(path: str) -> None:
    """Refuse ``..;x`` and ``.;x`` segments: Tomcat, Jetty and Spring drop a segment's
    ``;parameters`` before resolving it, so ``/public/..;/admin`` is /admin to them while it
    matches ``/public/`` here."""
    for segment in path.split("/"):
        if segment.partition(";")[0] in (".", "..") and ";" in segment:
            raise BadRequestTarget(
                f"the path segment {segment!r} is a dot segment with ';' parameters, which "
                "targets resolve differently; leave the parameters out"
            )


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 on a path that starts with ``/`` and has no ``//``."""
    segments = path.split("/")[1:]
    kept: list[str] = []
    for segment in segments:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    # A path ending in "." or ".." names a directory: keep its trailing slash ("/a/b/.." → "/a/").
    if segments[-1] in (".", ".."):
        kept.append("")
    return "/" + "/".join(kept)


def in_origin_form(head: RequestHead, target: RequestTarget) -> RequestHead:
    """``head`` with the normalised target in origin-form and, for an absolute-form target, the
    URL's authority as the Host value (RFC 9112 §3.2.2); ``head`` itself when nothing changes."""
    host = target.authority
    if target.origin_form == head.target and host is None:
        return head
    headers = head.headers
    if host is not None:
        headers = tuple(
            (name, host) if name.lower() == "host" else (name, value) for name, value in headers
        )
    return RequestHead(head.method, target.origin_form, head.version, headers)
