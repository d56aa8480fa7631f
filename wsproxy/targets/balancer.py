"""Load-balancing algorithms: given candidate targets and a client, pick one.

Pure: no I/O, no clock; randomness comes from an injected ``random.Random`` so tests can replay it.
Some algorithms keep state between picks (round robin's current weights), keyed by address so it
survives target-list changes.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from typing import Protocol, assert_never

from wsproxy.address import Address
from wsproxy.config import Algorithm
from wsproxy.targets.target import Target


class Balancer(Protocol):
    def pick(self, candidates: Sequence[Target], client_ip: str) -> Target:
        """Choose one of ``candidates`` (never empty) for a connection from ``client_ip``."""
        ...


class RoundRobin:
    """Smooth weighted round robin (nginx): over a cycle of sum(weights) picks each target gets
    exactly its weight, interleaved rather than in bursts. Weights are effective weights, so a
    target in slow start gets its growing share."""

    def __init__(self) -> None:
        self._current: dict[Address, float] = {}

    def pick(self, candidates: Sequence[Target], client_ip: str) -> Target:
        total = 0.0
        best: Target | None = None
        best_weight = 0.0
        current = self._current
        for target in candidates:
            effective = target.effective_weight
            weight = current.get(target.address, 0.0) + effective
            current[target.address] = weight
            total += effective
            if best is None or weight > best_weight:
                best, best_weight = target, weight
        if best is None:
            raise ValueError("pick() needs at least one candidate")
        current[best.address] = best_weight - total
        if len(current) > 2 * len(candidates) + 16:
            # Forget targets that left the group so the map cannot grow without bound.
            keep = {t.address for t in candidates}
            for address in [a for a in current if a not in keep]:
                del current[address]
        return best


def _load(target: Target) -> float:
    """Active connections per unit of weight. Division is correctly rounded, so equal ratios
    (1/2 and 2/4) give equal floats and ties stay ties."""
    return target.active / max(target.effective_weight, 1e-3)


class LeastConnections:
    """Fewest active connections per unit of weight; ties broken at random."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, candidates: Sequence[Target], client_ip: str) -> Target:
        if len(candidates) == 1:
            return candidates[0]
        best = min(_load(t) for t in candidates)
        tied = [t for t in candidates if _load(t) == best]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


class RandomTwo:
    """Power of two choices: sample two distinct targets, keep the less loaded (per weight)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, candidates: Sequence[Target], client_ip: str) -> Target:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(list(candidates), 2)
        return second if _load(second) < _load(first) else first


class SourceIp:
    """Weighted rendezvous hashing on the client address.

    Each (client, target) pair gets a score; the highest wins. A client stays on its target while
    the set is unchanged, and adding a target to N moves only the clients for which the newcomer
    now scores highest, about 1/(N+1) of them (Thaler & Ravishankar; weights after Schindelhauer).
    """

    def pick(self, candidates: Sequence[Target], client_ip: str) -> Target:
        return max(candidates, key=lambda t: self.score(client_ip, t))

    @staticmethod
    def score(client_ip: str, target: Target) -> float:
        digest = hashlib.blake2b(f"{client_ip}|{target.address}".encode(), digest_size=8).digest()
        unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # uniform in (0, 1)
        return target.weight / -math.log(unit)


def make_balancer(algorithm: Algorithm, rng: random.Random) -> Balancer:
    """The balancer for ``algorithm``; a value not handled here fails loudly (``assert_never``:
    mypy flags a new ``Algorithm`` member left out, and at run time it raises), never a silent
    fallback to some other algorithm."""
    match algorithm:
        case Algorithm.ROUND_ROBIN:
            return RoundRobin()
        case Algorithm.LEAST_CONNECTIONS:
            return LeastConnections(rng)
        case Algorithm.RANDOM_TWO:
            return RandomTwo(rng)
        case Algorithm.SOURCE_IP:
            return SourceIp()
        case _:
            assert_never(algorithm)
