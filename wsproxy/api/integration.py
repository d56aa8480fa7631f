"""Integration calls of the WebSocket API mode: one POST to an ``http``/``https`` target group.

One ``Integrations`` per running proxy owns one aiohttp ``ClientSession`` and its connection
pool: HTTP/1.1 keep-alive connections per target, reused across calls and clients. A call
picks a target with the group's balancer, POSTs, and reads the whole answer within a deadline:

- Only a failed *connect* (refused, connect timeout, TLS handshake failure) moves the call to
  another target (at most ``MAX_ATTEMPTS`` in all, as a tunnel's dial does), and counts toward
  the group's passive health check. A request that was sent is never sent again: the backend
  may have acted on it (RFC 9110 §9.2.2: POST is not idempotent; aiohttp itself retries only
  idempotent methods).
- Any status is an ``Answer``: what a non-2xx means is the caller's business.
- Everything else is ``IntegrationFailed``: ``UNAVAILABLE`` (no target took the connection),
  ``INTEGRATION_TIMEOUT`` (no full answer within the call's deadline) or ``INTEGRATION_ERROR``
  (not HTTP, closed mid-answer, body over ``max_body``).

While a call runs, its target's ``active`` count includes it, so ``least_connections`` and
``random_two`` see in-flight calls the way they see a tunnel's connections.

Cookies are never stored (a backend's ``Set-Cookie`` for one client must not ride along on
another's call) and answers are not decompressed (``Accept-Encoding: identity`` is sent), so
``max_body`` bounds what is held in memory.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiohttp
from yarl import URL

from wsproxy import __version__
from wsproxy.errors import ApiError, IntegrationFailed, NoTargets
from wsproxy.targets.target import Target
from wsproxy.targets.target_group import MAX_ATTEMPTS, TargetGroup

log = logging.getLogger(__name__)

# aiohttp's own default: a pooled connection idle this long is closed by us first. A backend
# that closes idle connections sooner (Node's default is 5 s) is seen closing by the pool
# before reuse, except in the instant both happen at once.
KEEPALIVE_SECONDS = 15.0
# Cached URLs (scheme, target, path): a few per route and target; cleared past this many so
# targets that came and went cannot grow it without bound.
_URL_CACHE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class Answer:
    """What an integration answered: any status, its whole body (at most ``max_body`` bytes).

    ``content_type`` is the Content-Type field as sent, None when absent; ``headers`` are all
    the answer's fields, looked up case-insensitively (``Sec-WebSocket-Protocol`` for
    ``$connect``).
    """

    status: int
    content_type: str | None
    body: bytes
    headers: Mapping[str, str]

    @property
    def ok(self) -> bool:
        """A 2xx: the integration took the call."""
        return 200 <= self.status < 300


class Integrations:
    """The integration client of one running proxy: a keep-alive connection pool shared by
    every API route and client. Build and use it inside the running event loop; ``close()``
    ends the pooled connections."""

    def __init__(self, *, keepalive_seconds: float = KEEPALIVE_SECONDS) -> None:
        self._keepalive_seconds = keepalive_seconds
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[tuple[str, str, int, str], URL] = {}
        # One ClientTimeout per group connect timeout (a few values); the whole call's deadline
        # is asyncio.timeout, so a connect timeout and a late answer are told apart.
        self._connect_timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.ClientSession:
        # Made on first use, inside the running loop, which aiohttp's connector needs.
        connector = aiohttp.TCPConnector(
            # No cap of aiohttp's (100 by default): calls in flight are already bounded by
            # clients x max_in_flight_per_connection, and a call waiting for a pool slot would
            # spend its deadline queueing inside the proxy.
            limit=0,
            keepalive_timeout=self._keepalive_seconds,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": f"wsproxy/{__version__}", "Accept-Encoding": "identity"},
            skip_auto_headers=("Accept",),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None),
        )
        return self._session

    async def close(self) -> None:
        """Close the pool's connections; a call made afterwards opens a new pool."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def call(
        self,
        group: TargetGroup,
        path: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        *,
        client_ip: str,
        timeout: float,  # noqa: ASYNC109  # the route's deadline, named in the error it raises
        max_body: int,
    ) -> Answer:
        """POST ``body`` with ``headers`` to ``path`` on a target of ``group`` and return its
        answer, whatever the status.

        ``timeout`` (seconds) bounds the whole call, connects and retries included;
        ``max_body`` (bytes) bounds the answer's body. ``client_ip`` feeds the balancer
        (``source_ip``). Raises ``IntegrationFailed`` (see the module docstring).
        """
        session = self._session or self._open()
        try:
            async with asyncio.timeout(timeout):
                return await self._attempts(
                    session, group, path, headers, body, client_ip, max_body
                )
        except TimeoutError:
            # Every aiohttp timeout is turned into IntegrationFailed inside: this is the deadline.
            raise IntegrationFailed(
                ApiError.INTEGRATION_TIMEOUT,
                f"target group '{group.name}': no answer to POST {path} within {timeout:g} s",
            ) from None

    async def _attempts(
        self,
        session: aiohttp.ClientSession,
        group: TargetGroup,
        path: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        client_ip: str,
        max_body: int,
    ) -> Answer:
        config = group.config
        https = config.protocol == "https"
        context: ssl.SSLContext | bool = (group.ssl_context or True) if https else True
        server_name = config.tls.server_name if https and config.tls is not None else None
        connect_timeout = self._connect_timeout(config.connect_timeout_seconds)
        last: Target | None = None
        failure = f"target group '{group.name}' has no target to try"
        for _attempt in range(MAX_ATTEMPTS):
            try:
                target = group.pick(client_ip, avoid=last)
            except NoTargets as exc:
                raise IntegrationFailed(ApiError.UNAVAILABLE, str(exc)) from None
            if target is None:
                break
            url = self._url("https" if https else "http", target, path)
            target.active += 1  # the balancers see the call in flight
            try:
                try:
                    response = await session.post(
                        url,
                        data=body,
                        headers=headers,
                        ssl=context,
                        server_hostname=server_name,
                        timeout=connect_timeout,
                    )
                except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                    # Nothing was sent: another target may take the call.
                    reason, detail = _connect_failure(exc, config.connect_timeout_seconds)
                    group.connect_failed(target, reason)
                    failure = f"target {target} of '{group.name}': {detail}"
                    log.debug("integration connect failed: %s", failure)
                    last = target
                    continue
                except (aiohttp.ClientError, OSError) as exc:
                    raise _sent_failure(group, target, path, exc) from None
                target.connect_failures = 0  # it answered: connects to it work
                try:
                    data = await _read_body(response, max_body)
                except (aiohttp.ClientError, OSError) as exc:
                    response.close()
                    raise _sent_failure(group, target, path, exc) from None
                except BaseException:
                    response.close()  # cancelled or over the deadline: drop the connection
                    raise
                if data is None:
                    response.close()
                    raise IntegrationFailed(
                        ApiError.INTEGRATION_ERROR,
                        f"target {target} of '{group.name}': the answer to POST {path} has a "
                        f"body over {max_body} bytes",
                    )
                answer_headers = response.headers
                return Answer(
                    response.status, answer_headers.get("Content-Type"), data, answer_headers
                )
            finally:
                target.active -= 1
        raise IntegrationFailed(ApiError.UNAVAILABLE, failure)

    def _url(self, scheme: str, target: Target, path: str) -> URL:
        address = target.address
        key = (scheme, address.host, address.port, path)
        url = self._urls.get(key)
        if url is None:
            if len(self._urls) >= _URL_CACHE_LIMIT:
                self._urls.clear()
            url = self._urls[key] = URL(f"{scheme}://{address}{path}")
        return url

    def _connect_timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        timeout = self._connect_timeouts.get(seconds)
        if timeout is None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=seconds)
            if len(self._connect_timeouts) < 64:  # a few configured values, reloads included
                self._connect_timeouts[seconds] = timeout
        return timeout


async def _read_body(response: aiohttp.ClientResponse, max_body: int) -> bytes | None:
    """The whole body, or None when it is over ``max_body`` bytes; never holds more than
    ``max_body + 1`` bytes of it."""
    length = response.content_length
    if length is not None:
        if length > max_body:
            return None
        return await response.read()  # the parser stops at Content-Length
    # Chunked or delimited by the close: read in steps that cannot pass the bound.
    content = response.content
    parts: list[bytes] = []
    size = 0
    while chunk := await content.read(max_body + 1 - size):
        size += len(chunk)
        if size > max_body:
            return None
        parts.append(chunk)
    return b"".join(parts)


def _connect_failure(exc: Exception, connect_timeout: float) -> tuple[str, str]:
    """(reason for ``connect_failed``, detail for the log) of a connect that failed."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "timeout", f"did not accept within {connect_timeout:g} s"
    if isinstance(exc, aiohttp.ClientSSLError):
        cause = exc.__cause__ or exc
        why = getattr(cause, "reason", None) or cause
        return "tls", f"TLS failed ({why})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        reason = "refused" if isinstance(os_error, ConnectionRefusedError) else "error"
        return reason, os_error.strerror or str(os_error)
    return "error", str(exc)


def _sent_failure(
    group: TargetGroup, target: Target, path: str, exc: BaseException
) -> IntegrationFailed:
    """The request went out (or may have): the target's failure, never retried."""
    what = type(exc).__name__
    return IntegrationFailed(
        ApiError.INTEGRATION_ERROR,
        f"target {target} of '{group.name}': POST {path} got no usable answer ({what}: {exc})",
    )
