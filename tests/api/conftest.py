"""Fixtures of the API-listener tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.helpers.api_backend import Backend, running_backend


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    """A recording integration backend (echo unless a path's handler says otherwise)."""
    async with running_backend() as server:
        yield server
