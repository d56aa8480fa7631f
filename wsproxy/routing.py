"""Listener rules: which target group serves a request (first match wins, else the default)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def host_without_port(host: str) -> str:
    """``Example.COM:8080`` → ``example.com``; ``[::1]:80`` → ``[::1]``; trailing dot dropped."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end >= 0 else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


@dataclass(frozen=True, slots=True)
class Rule:
    """Matches when every condition given matches: ``host`` exactly (case-insensitive, port
    ignored), ``path_prefix`` as a plain string prefix of the path (query excluded)."""

    target_group: str
    host: str | None = None
    path_prefix: str | None = None

    def matches(self, host: str, path: str) -> bool:
        if self.host is not None and host_without_port(host) != host_without_port(self.host):
            return False
        return self.path_prefix is None or path.startswith(self.path_prefix)


@dataclass(frozen=True, slots=True)
class Router:
    rules: Sequence[Rule]
    default_target_group: str

    def route(self, host: str, path: str) -> str:
        for rule in self.rules:
            if rule.matches(host, path):
                return rule.target_group
        return self.default_target_group
