"""The descriptor budget shared by every listener of a process.

A proxied connection holds two descriptors (client and target) and a TLS handshake one. Refusing
a connection at accept, while descriptors remain, is better than running out: then accept,
target dials, health probes, the admin listener and log files all fail at once. As HAProxy derives
its maxconn from the descriptor limit, wsproxy keeps ``RESERVED`` descriptors for everything
that is not a proxied connection and refuses new connections beyond the rest (reason
``fd_exhausted``), so the admin listener keeps answering under a connection flood. Descriptors
are counted as they are held: one per client connection (handshakes included) and one per
target connection, so 10,000 silent clients cost 10,000, not 20,000.
"""

from __future__ import annotations

import resource

RESERVED = 64  # admin connections, probes, listening sockets, logs, the event loop's own
PER_CONNECTION = 2  # what a new connection will need: its own descriptor and its target's


class DescriptorBudget:
    """Descriptors the data path may hold at once, given the process's limit."""

    __slots__ = ("limit", "open")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0  # held by clients (handshakes included) and targets, across listeners

    @classmethod
    def from_rlimit(cls) -> DescriptorBudget:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return cls(1 << 30)
        return cls(max(PER_CONNECTION, soft - RESERVED))

    @property
    def exhausted(self) -> bool:
        """No room for one more connection and the target it will dial."""
        return self.open + PER_CONNECTION > self.limit
