"""Targets discovered by DNS: a target group whose members are what a name answers.

``discovery = { dns = NAME, port = P }`` takes the A and AAAA records of NAME, each at port P;
without ``port``, NAME is queried as SRV and each answer of the lowest priority (RFC 2782: clients
try those first) gives a target host, resolved to its A and AAAA records, and its port. Every
``refresh_seconds`` (±10 %) the group's membership becomes the answer set, through the same
``register`` / ``deregister`` the admin API uses: a new address starts ``initial`` and is
health-checked, a vanished one drains (deregistration delay, Close 1001 spread).

A failed lookup keeps the last good set (HAProxy's resolvers hold a server on NXDOMAIN and
timeouts too, ``hold nx`` / ``hold timeout``): a DNS outage is not an outage of the targets. An
answer with no record at all counts as a failure for the same reason: draining every target
because of an empty answer would turn a DNS glitch into an outage. Each lookup is counted; a
failure is logged when the state changes (ok -> failing, one reason -> another, failing -> ok),
not at every refresh.

Only the process that owns target states runs this (one process, or the supervisor of
``[proxy] workers``); workers learn the membership from the supervisor's target snapshots.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections.abc import Callable
from enum import StrEnum

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from wsproxy.address import Address
from wsproxy.config import DnsDiscoveryConfig
from wsproxy.errors import TargetExists
from wsproxy.ops.logs import log_event
from wsproxy.targets.target import LEAVING_STATES, Target
from wsproxy.targets.target_group import TargetGroup

log = logging.getLogger(__name__)

JITTER = 0.1  # as health checks: proxies started together do not query in the same instant
# A lookup may not outlive its refresh interval (nor 5 s, dnspython's default lifetime).
MAX_LOOKUP_SECONDS = 5.0


class DiscoveryFailure(StrEnum):
    """Why a lookup gave no usable answer (``reason`` of ``wsproxy_target_discovery_errors``)."""

    TIMEOUT = "timeout"  # no server answered in time (also: a server that does not listen)
    SERVFAIL = "servfail"  # the server answered SERVFAIL (or REFUSED)
    NXDOMAIN = "nxdomain"  # the name does not exist
    NO_RECORDS = "no_records"  # the name exists but has no record of the types asked
    UNREACHABLE = "unreachable"  # the server could not be reached (e.g. ICMP port unreachable)
    ERROR = "error"  # anything else (a malformed answer, an SRV target without addresses)


class LookupFailed(Exception):
    def __init__(self, reason: DiscoveryFailure, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


Register = Callable[[str, Address, int], Target]
Deregister = Callable[[str, Address], Target]


def make_resolver(config: DnsDiscoveryConfig) -> dns.asyncresolver.Resolver:
    """dnspython's asyncio resolver: the configured servers, else /etc/resolv.conf's."""
    resolver = dns.asyncresolver.Resolver(configure=config.nameservers is None)
    if config.nameservers is not None:
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(server.host, server.port) for server in config.nameservers
        ]
    resolver.lifetime = min(config.refresh_seconds, MAX_LOOKUP_SECONDS)
    resolver.timeout = resolver.lifetime
    resolver.cache = None  # every refresh asks the server: the point is to see changes
    return resolver


def _failure(exc: Exception) -> LookupFailed:
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return LookupFailed(DiscoveryFailure.NXDOMAIN, "the name does not exist (NXDOMAIN)")
    if isinstance(exc, dns.exception.Timeout):
        return LookupFailed(DiscoveryFailure.TIMEOUT, "no nameserver answered in time")
    if isinstance(exc, dns.resolver.NoNameservers):
        errors = exc.kwargs.get("errors") or []
        if errors and all(isinstance(error[3], OSError) for error in errors):
            return LookupFailed(DiscoveryFailure.UNREACHABLE, f"nameserver unreachable: {exc}")
        return LookupFailed(DiscoveryFailure.SERVFAIL, f"every nameserver failed: {exc}")
    return LookupFailed(DiscoveryFailure.ERROR, f"{type(exc).__name__}: {exc}")


async def _query(
    resolver: dns.asyncresolver.Resolver, name: str, kind: dns.rdatatype.RdataType
) -> list[str] | list[tuple[int, int, str]]:
    """The records of one type; ``[]`` when the name has none of that type (NOERROR, no data)."""
    try:
        answer = await resolver.resolve(name, kind, search=False)
    except dns.resolver.NoAnswer:
        return []
    except (dns.exception.DNSException, OSError) as exc:
        raise _failure(exc) from None
    if kind == dns.rdatatype.SRV:
        return [(r.priority, r.port, r.target.to_text(omit_final_dot=True)) for r in answer]
    return [r.to_text() for r in answer]


async def _addresses(resolver: dns.asyncresolver.Resolver, name: str) -> list[str]:
    """A then AAAA records of ``name``, IP literals as text (no lookup for an IP literal)."""
    try:
        return [str(ipaddress.ip_address(name))]
    except ValueError:
        pass
    found = await asyncio.gather(
        _query(resolver, name, dns.rdatatype.A), _query(resolver, name, dns.rdatatype.AAAA)
    )
    return [str(value) for values in found for value in values]


async def lookup(resolver: dns.asyncresolver.Resolver, config: DnsDiscoveryConfig) -> set[Address]:
    """The answer set of ``config``; raises ``LookupFailed`` (never an empty set)."""
    if config.port is not None:
        hosts = await _addresses(resolver, config.dns)
        found = {Address(host, config.port) for host in hosts}
    else:
        records = await _query(resolver, config.dns, dns.rdatatype.SRV)
        srv = [r for r in records if isinstance(r, tuple)]
        best = min((priority for priority, _, _ in srv), default=0)
        found = set()
        for priority, port, target in srv:
            if priority == best:
                found |= {Address(h, port) for h in await _addresses(resolver, target)}
    if not found:
        kind = "A or AAAA" if config.port is not None else "SRV (with addresses)"
        raise LookupFailed(DiscoveryFailure.NO_RECORDS, f"no {kind} record")
    return found


class DnsDiscovery:
    """Keeps one target group's membership equal to its DNS answers; ``start``, then ``stop``."""

    def __init__(
        self,
        group: TargetGroup,
        config: DnsDiscoveryConfig,
        rng: random.Random,
        register: Register,
        deregister: Deregister,
    ) -> None:
        self.group = group
        self.config = config
        self._rng = rng
        self._register = register
        self._deregister = deregister
        self._resolver = make_resolver(config)
        self.failing: DiscoveryFailure | None = None  # the state last logged
        self.lookups = 0  # finished lookups, ok or not (tests wait on it)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def cancel(self) -> None:
        """Stop at once: no answer is applied after this (``stop`` then awaits the task)."""
        if self._task is not None:
            self._task.cancel()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def refresh(self) -> None:
        """One lookup, applied (or counted and kept as it was)."""
        stats = self.group.stats
        try:
            found = await lookup(self._resolver, self.config)
        except LookupFailed as exc:
            stats.discovery_lookups["error"] += 1
            stats.discovery_errors[exc.reason] += 1
            self._failed(exc)
        else:
            stats.discovery_lookups["ok"] += 1
            self._recovered(len(found))
            self.apply(found)
        self.lookups += 1

    def apply(self, found: set[Address]) -> None:
        """Register what is new, deregister what vanished (draining targets are left alone: one
        that comes back is registered again once its drain is over)."""
        group = self.group
        present = {t.address for t in group.targets if t.state not in LEAVING_STATES}
        for address in sorted(found - present):
            try:
                self._register(group.name, address, 1)
            except TargetExists:
                continue  # still draining: the next refresh after its drain takes it back
        for address in sorted(present - found):
            self._deregister(group.name, address)

    async def _loop(self) -> None:
        while True:
            await self.refresh()
            jitter = 1 + self._rng.uniform(-JITTER, JITTER)
            await asyncio.sleep(self.config.refresh_seconds * jitter)

    def _failed(self, exc: LookupFailed) -> None:
        if self.failing is exc.reason:
            return
        self.failing = exc.reason
        kept = sum(1 for t in self.group.targets if t.state not in LEAVING_STATES)
        log_event(
            log,
            "target_discovery",
            "target group '%s': DNS lookup of %s failed (%s: %s); keeping the last %d target(s)",
            self.group.name,
            self.config.dns,
            exc.reason.value,
            exc,
            kept,
            level=logging.WARNING,
            target_group=self.group.name,
            name=self.config.dns,
            result="error",
            reason=exc.reason.value,
            detail=str(exc),
        )

    def _recovered(self, count: int) -> None:
        if self.failing is None:
            return
        before, self.failing = self.failing, None
        log_event(
            log,
            "target_discovery",
            "target group '%s': DNS lookup of %s answers again (%d address(es)) after %s",
            self.group.name,
            self.config.dns,
            count,
            before.value,
            target_group=self.group.name,
            name=self.config.dns,
            result="ok",
            previous_reason=before.value,
        )
