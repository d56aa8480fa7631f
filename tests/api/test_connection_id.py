"""Connection ids (issue 14): URL-safe, unguessable, unique across workers and restarts, and
naming their owner so a management call needs no lookup."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsproxy.api.connection_id import (
    ID_LENGTH,
    RANDOM_BYTES,
    ConnectionIds,
    Owner,
    UnknownConnection,
    owner_of,
)

URL_SAFE = re.compile(r"[A-Za-z0-9_-]+")


def test_ids_are_url_safe_and_name_their_owner() -> None:
    ids = ConnectionIds(worker=3, instance=b"\x00\x01\x02\x03")
    made = ids.new()
    assert len(made) == ID_LENGTH and URL_SAFE.fullmatch(made)
    assert owner_of(made) == Owner(b"\x00\x01\x02\x03", 3) == ids.owner


def test_ids_differ_in_96_random_bits() -> None:
    ids = ConnectionIds()
    made = {ids.new() for _ in range(10_000)}
    assert len(made) == 10_000
    tails = {base64.urlsafe_b64decode(one)[-RANDOM_BYTES:] for one in made}
    assert len(tails) == 10_000


def test_a_restarted_proxy_names_another_instance() -> None:
    """Each start draws its instance bytes: an id from before a restart names an owner that
    no longer exists (410), never a connection of the new process."""
    before, after = ConnectionIds(worker=0), ConnectionIds(worker=0)
    assert before.owner != after.owner
    assert owner_of(before.new()) != after.owner


def test_workers_of_one_instance_are_told_apart() -> None:
    instance = b"abcd"
    owners = {owner_of(ConnectionIds(worker, instance).new()) for worker in (0, 1, 255)}
    assert owners == {Owner(instance, 0), Owner(instance, 1), Owner(instance, 255)}


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "x",
        "A" * (ID_LENGTH + 1),
        "!" * ID_LENGTH,
        "Ł" * ID_LENGTH,
        base64.urlsafe_b64encode(bytes([2]) + bytes(17)).decode(),  # another version
        "../../" + "A" * (ID_LENGTH - 6),
    ],
)
def test_anything_else_is_an_unknown_connection(bad: str) -> None:
    with pytest.raises(UnknownConnection):
        owner_of(bad)


def test_a_worker_slot_outside_one_byte_is_refused() -> None:
    with pytest.raises(ValueError, match="worker slot"):
        ConnectionIds(worker=256)


@given(st.text(max_size=40))
def test_any_text_gives_an_owner_or_unknown_and_nothing_else(text: str) -> None:
    try:
        owner = owner_of(text)
    except UnknownConnection:
        return
    assert len(owner.instance) == 4 and 0 <= owner.worker < 256
