"""A target: one backend address with its weight, state and live connection count (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from wsproxy.address import Address


class TargetState(StrEnum):
    """A target's state, as in AWS target health (``TargetHealth.State``)."""

    INITIAL = "initial"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"
    UNUSED = "unused"


ROUTABLE_STATES = frozenset((TargetState.INITIAL, TargetState.HEALTHY))
# A target in these states takes no new connection and is on its way out of its group.
LEAVING_STATES = frozenset((TargetState.DRAINING, TargetState.UNUSED))


@dataclass(slots=True, eq=False)
class Target:
    """One backend address with its weight, state and live connection count.

    ``active`` counts client connections currently assigned to it: the balancers read it and its
    target group keeps it exact (``TargetGroup.attach``/``detach``). Equality is identity
    (``eq=False``), so a target is its own dictionary key: two registrations of one address are
    two targets, and a key cannot be taken over by a later object the way a recycled ``id()`` can.
    """

    address: Address
    weight: int = 1
    state: TargetState = TargetState.INITIAL
    reason: str = "Elb.RegistrationInProgress"
    active: int = 0
    connect_failures: int = 0
    healthy_since: float | None = None  # loop time of the last move to healthy (slow start)
    ramp: float = 1.0  # slow start: the share of its weight the target gets now, 0-1
    # ``str(address)``, made once: every connection's log record names its target.
    label: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.label = str(self.address)

    @property
    def effective_weight(self) -> float:
        return self.weight * self.ramp

    def acquire(self) -> None:
        self.active += 1

    def release(self) -> None:
        self.active -= 1

    def __str__(self) -> str:
        return self.label
