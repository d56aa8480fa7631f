"""Provisional integration client (replaced by the pooled one on merge)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiohttp

from wsproxy.errors import ApiError, IntegrationFailed
from wsproxy.targets.target_group import TargetGroup


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    content_type: str | None
    body: bytes
    headers: Mapping[str, str]


class Integrations:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def call(
        self,
        group: TargetGroup,
        path: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        *,
        client_ip: str,
        timeout: float,  # noqa: ASYNC109 (the whole call's budget, not a cancel scope)
        max_body: int,
    ) -> Answer:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        target = group.pick(client_ip)
        if target is None:
            raise IntegrationFailed(ApiError.UNAVAILABLE, "no target")
        url = f"http://{target.address.host}:{target.address.port}{path}"
        try:
            async with asyncio.timeout(timeout):
                async with self._session.post(url, data=body, headers=list(headers)) as response:
                    data = await response.content.read(max_body + 1)
                    if len(data) > max_body:
                        raise IntegrationFailed(ApiError.INTEGRATION_ERROR, "too large")
                    return Answer(
                        response.status,
                        response.headers.get("Content-Type"),
                        data,
                        {k.lower(): v for k, v in response.headers.items()},
                    )
        except TimeoutError:
            raise IntegrationFailed(ApiError.INTEGRATION_TIMEOUT, "timeout") from None
        except aiohttp.ClientConnectorError as exc:
            raise IntegrationFailed(ApiError.UNAVAILABLE, str(exc)) from None
        except aiohttp.ClientError as exc:
            raise IntegrationFailed(ApiError.INTEGRATION_ERROR, str(exc)) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
