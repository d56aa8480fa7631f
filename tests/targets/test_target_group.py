"""TargetGroup: membership under churn, health records, the drain index, loud factories."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import wait_for
from tests.helpers.servers import RawServer
from wsproxy.address import Address
from wsproxy.config import Algorithm, HealthCheckConfig, TargetGroupConfig, load_config
from wsproxy.proxy import Proxy
from wsproxy.targets.balancer import make_balancer
from wsproxy.targets.probe import run_probe
from wsproxy.targets.target import LEAVING_STATES, TargetState
from wsproxy.targets.target_group import Session, TargetGroup


async def _accept_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


@pytest.fixture
async def tcp_servers() -> AsyncIterator[list[RawServer]]:
    servers = [RawServer(_accept_and_close) for _ in range(3)]
    for server in servers:
        await server.start()
    yield servers
    for server in servers:
        await server.stop()


def _write(path: Path, address: Address) -> None:
    path.write_text(
        f"""
[admin]
enabled = false
[listeners.edge]
address = "127.0.0.1:0"
default_target_group = "g"
[target_groups.g]
deregistration_delay_seconds = 0
targets = [{{ address = "{address}" }}]
[target_groups.g.health_check]
interval_seconds = 0.5
timeout_seconds = 0.4
"""
    )


async def test_churn_keeps_every_target_probed_and_records_only_live_targets(
    tmp_path: Path, tcp_servers: list[RawServer]
) -> None:
    """Issue 12 §1.1: register, deregister and reload 100 times. Records and checker tasks were
    keyed by id(target): a new target allocated where a removed one had been was taken for it
    (never probed, stuck `initial`, showing the other's checks), and records grew forever."""
    first, second, extra = (server.address for server in tcp_servers)
    path = tmp_path / "wsproxy.toml"
    _write(path, first)
    proxy = Proxy(load_config(path), path=str(path), rng=random.Random(1))
    await proxy.start()
    try:
        group = proxy.target_groups["g"]
        checker = proxy.health_checkers["g"]

        def settled() -> bool:
            return not any(t.state in LEAVING_STATES for t in group.targets)

        for cycle in range(100):
            proxy.register("g", extra, 1)
            proxy.deregister("g", extra)
            _write(path, second if cycle % 2 == 0 else first)
            assert await proxy.reload() == []
            await wait_for(settled)
            live = set(group.targets)
            assert set(group.records) <= live, f"cycle {cycle}: records of departed targets"
            await wait_for(lambda: checker.watched == frozenset(group.targets))
        # The target the last reload added is probed like any other: out of `initial` within
        # one interval, with a history of its own.
        await wait_for(lambda: all(t.state is TargetState.HEALTHY for t in group.targets), 3)
        (target,) = group.targets
        assert target.address == first
        assert len(group.records[target].history) >= 1
    finally:
        await proxy.shutdown(grace=0)


def _group(*addresses: str) -> TargetGroup:
    config = TargetGroupConfig.model_validate(
        {"targets": [{"address": a} for a in addresses], "deregistration_delay_seconds": 0.05}
    )
    return TargetGroup("g", config, make_balancer(config.algorithm, random.Random(1)))


class _Session:
    def __init__(self) -> None:
        self.drained: list[float] = []
        self.aborted = False
        self.target_prev: Session | None = None
        self.target_next: Session | None = None

    def drain(self, timeout: float) -> None:
        self.drained.append(timeout)

    def abort(self) -> None:
        self.aborted = True


async def test_deregistering_drains_only_the_sessions_of_that_target() -> None:
    group = _group("127.0.0.1:7001", "127.0.0.1:7002")
    one, two = group.targets
    mine, others = [_Session(), _Session()], [_Session()]
    for session in mine:
        group.attach(one, session)
    group.attach(two, others[0])
    assert (one.active, two.active) == (2, 1)
    group.detach(one, mine[1])
    assert one.active == 1 and group.sessions_of(one) == [mine[0]]
    group.deregister(one.address)
    await wait_for(lambda: one not in group.targets)
    assert mine[0].drained and not mine[1].drained  # detached sessions are not touched
    assert not others[0].drained and not others[0].aborted
    assert one.state is TargetState.UNUSED and one not in group.records
    assert list(group.sessions_of(one)) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 1), st.integers(0, 5)), max_size=60))
def test_the_session_lists_follow_any_attach_and_detach_order(
    steps: list[tuple[bool, int, int]],
) -> None:
    """The intrusive per-target lists against a model: any order of attach and detach, on two
    targets, leaves each list holding exactly the sessions attached to it, and ``active`` equal
    to their number."""
    group = _group("127.0.0.1:7001", "127.0.0.1:7002")
    sessions = [_Session() for _ in range(6)]
    model: dict[int, int] = {}  # session index -> target index
    for attach, target_index, index in steps:
        target = group.targets[target_index]
        if attach and index not in model:
            group.attach(target, sessions[index])
            model[index] = target_index
        elif not attach and model.get(index) == target_index:
            group.detach(target, sessions[index])
            del model[index]
    for target_index, target in enumerate(group.targets):
        expected = {i for i, t in model.items() if t == target_index}
        listed = group.sessions_of(target)
        assert len(listed) == len(expected) == target.active
        assert {sessions.index(s) for s in listed} == expected  # type: ignore[arg-type]  # the list holds our _Session objects


def test_an_unknown_algorithm_fails_loudly() -> None:
    with pytest.raises(AssertionError):
        make_balancer(cast(Algorithm, "weighted_magic"), random.Random(1))


async def test_an_unknown_probe_protocol_fails_loudly(tcp_servers: list[RawServer]) -> None:
    check = HealthCheckConfig.model_construct(
        **{**HealthCheckConfig().model_dump(), "protocol": cast(Any, "smtp")}
    )
    with pytest.raises(AssertionError):
        await run_probe(check, tcp_servers[0].address, tls=None, server_name=None, proxy_v2=False)
