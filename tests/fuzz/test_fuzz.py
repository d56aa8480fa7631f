"""Every fuzz target under hypothesis: random bytes, and valid inputs mutated (bytes flipped,
inserted, removed, truncated), in chunks of every size. Only declared errors may escape."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.seeds import seeds
from tests.fuzz.targets import TARGETS

SEEDS = seeds()


@st.composite
def mutated(draw: st.DrawFn, name: str) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS[name])))
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if action == "flip":
            data[at] = draw(st.integers(0, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    chunk_size = draw(st.integers(0, 16))
    return bytes([chunk_size]) + bytes(data)


@pytest.mark.parametrize("name", sorted(TARGETS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_only_declared_errors_escape(name: str, data: st.DataObject) -> None:
    strategy = st.one_of(st.binary(max_size=600), mutated(name))
    TARGETS[name](data.draw(strategy))
