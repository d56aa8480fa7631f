"""Socket addresses as written in config and logs: ``host:port``, ``[v6]:port``."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

# Labels of 1-63 characters (RFC 1035 §2.3.4) joined by dots, an optional root dot, 253 in all.
# Each label after the first starts right after a dot: with the dot optional, "aaaa…!" could be
# cut into labels in exponentially many ways: 24 letters and a "!" took 5 s, each further
# letter doubled it, and the admin API checks addresses on the event loop.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\.?")


@dataclass(frozen=True, slots=True, order=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, *, allow_port_zero: bool = False) -> Address:
    """Parse ``host:port``; raises ValueError with a message a user can act on."""
    if not isinstance(text, str):
        raise ValueError(f"must be a string like '127.0.0.1:9001', got {text!r}")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected '[ipv6]:port', got {text!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected 'host:port', got {text!r}")
        if ":" in host:
            raise ValueError(f"IPv6 addresses need brackets: '[{host}]:{port_text}'")
        if not _HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"{host!r} is neither an IP address nor a host name")
    if not port_text.isdigit() or not port_text.isascii():
        raise ValueError(f"port must be a number, got {port_text!r}")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port must be in {low}-65535, got {port}")
    return Address(host, port)
