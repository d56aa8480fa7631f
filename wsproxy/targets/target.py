"""Target groups and their targets: membership, state, and who may take a new connection."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum

from wsproxy.address import Address
from wsproxy.ops.logs import log_event

log = logging.getLogger(__name__)


class TargetState(StrEnum):
    """A target's state, as in AWS target health (``TargetHealth.State``)."""

    INITIAL = "initial"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"
    UNUSED = "unused"


ROUTABLE_STATES = frozenset((TargetState.INITIAL, TargetState.HEALTHY))


@dataclass(slots=True, eq=False)
class Target:
    """One backend address with its weight, state and live connection count.

    ``active`` counts client connections currently assigned to it: the balancers read it and the
    flows keep it exact (``acquire``/``release``).
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


@dataclass(slots=True, eq=False)
class TargetGroup:
    """Targets that serve one kind of traffic, and the policy used to spread connections."""

    name: str
    targets: list[Target] = field(default_factory=list)

    def candidates(self, *, fail_open: bool = True) -> tuple[list[Target], bool]:
        """Targets that may take a new connection, and whether the group is failing open.

        Healthy and initial targets first; when none is, the group fails open to every target that
        is not draining or unused, as an AWS NLB does, so a health-check outage is not an outage
        (unless ``fail_open`` is off: then there is no candidate).
        """
        routable = [t for t in self.targets if t.state in ROUTABLE_STATES]
        if routable or not fail_open:
            return routable, False
        unhealthy = [t for t in self.targets if t.state is TargetState.UNHEALTHY]
        return unhealthy, bool(unhealthy)

    def find(self, address: Address) -> Target | None:
        for target in self.targets:
            if target.address == address:
                return target
        return None


def log_target_state(group: str, target: Target, before: TargetState, detail: str) -> None:
    """The lifecycle event of a target changing state (health checks, passive checks, API)."""
    log_event(
        log,
        "target_state",
        "target group '%s': target %s %s -> %s (%s)",
        group,
        target.address,
        before.value,
        target.state.value,
        f"{target.reason}: {detail}" if target.reason else detail,
        level=logging.WARNING if target.state is TargetState.UNHEALTHY else logging.INFO,
        target_group=group,
        target=str(target.address),
        previous_state=before.value,
        state=target.state.value,
        state_reason=target.reason,
        detail=detail,
    )
