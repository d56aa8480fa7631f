"""The descriptor budget shared by every listener of a process.

A proxied connection holds two descriptors (client and target) and a TLS handshake one. Refusing
a connection at accept, while descriptors remain, is better than running out: then accept,
target dials, health probes, the admin listener and log files all fail at once. As HAProxy derives
its maxconn from the descriptor limit, wsproxy keeps ``RESERVED`` descriptors for everything
that is not a proxied connection and refuses new connections beyond the rest (reason
``fd_exhausted``), so the admin listener keeps answering under a connection flood.
"""

from __future__ import annotations

import resource

RESERVED = 64  # admin connections, probes, listening sockets, logs, the event loop's own
PER_CONNECTION = 2


class DescriptorBudget:
    """Connections the process may hold at once, given its descriptor limit."""

    __slots__ = ("limit", "open")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0  # connections and TLS handshakes in progress, across listeners

    @classmethod
    def from_rlimit(cls) -> DescriptorBudget:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return cls(1 << 30)
        return cls(max(1, (soft - RESERVED) // PER_CONNECTION))

    @property
    def exhausted(self) -> bool:
        return self.open >= self.limit
