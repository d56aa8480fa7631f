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
    default_target_group: str | None

    def route(self, host: str, path: str) -> str | None:
        for rule in self.rules:
            if rule.matches(host, path):
                return rule.target_group
        return self.default_target_group


class SniRouter:
    """TLS passthrough routing on the ClientHello's server name: an exact name first, then the
    longest matching ``*.suffix`` (any depth below it), then the default; None means no route."""

    def __init__(self, rules: Sequence[tuple[str, str]], default_target_group: str | None) -> None:
        self._exact: dict[str, str] = {}
        suffixes: list[tuple[str, str]] = []
        for pattern, group in rules:
            pattern = pattern.lower().rstrip(".")
            if pattern.startswith("*."):
                suffixes.append((pattern[1:], group))  # ".example.com"
            else:
                self._exact.setdefault(pattern, group)
        self._suffixes = sorted(suffixes, key=lambda item: -len(item[0]))
        self.default_target_group = default_target_group

    def route(self, server_name: str | None) -> str | None:
        if server_name:
            name = server_name.lower().rstrip(".")
            if name in self._exact:
                return self._exact[name]
            for suffix, group in self._suffixes:
                if name.endswith(suffix):
                    return group
        return self.default_target_group
