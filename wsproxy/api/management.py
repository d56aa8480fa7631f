"""The @connections API: backends send to, read and close client connections by id, and fan
out to groups and users (beyond API Gateway) in one call.

Served on the admin listener (behind its token) and on an API's own management listener. The
routes here know nothing of who is asking; the server that mounts them authenticates.

    POST   /@connections/{id}                 one message (text for text/* and JSON) -> 200
    GET    /@connections/{id}                 what is known of the connection -> 200 JSON
    DELETE /@connections/{id}?code=&reason=   a Close (default 1000) -> 204
    POST   /@groups/{group}                   one message to each member -> delivered, dropped_slow
    GET    /@groups/{group}?limit=&after=     members, paged
    PUT    /@groups/{group}/connections/{id}  join -> 204
    DELETE /@groups/{group}/connections/{id}  leave -> 204
    POST   /@users/{user}                     one message to every connection of the user

An unknown, malformed, ended or foreign id gets 410 Gone (never 404: a backend drops the id).
With several APIs, ``?api=NAME`` says which one a group or user belongs to.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from wsproxy.api.api import Api
from wsproxy.api.connection_id import ConnectionIds, UnknownConnection, owner_of
from wsproxy.api.registry import MAX_GROUPS_PER_CONNECTION, MAX_PAGE, ApiConnection, Delivery
from wsproxy.api.registry import valid_name as valid_group_name

# How long a client over its send buffer is asked to wait (429): about what a client on a
# slow link needs to drain a 1 MiB buffer.
RETRY_AFTER_SECONDS = 1
DEFAULT_PAGE = 100
# Close codes a backend may send (RFC 6455 §7.4: 1000, or 3000-4999 for applications).
_CLOSE_CODES = range(3000, 5000)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class Management:
    """The routes above over the APIs of this process (``apis``, the proxy's live mapping).

    ``only``: the API a management listener of its own serves (None on the admin listener).
    """

    def __init__(
        self, apis: Mapping[str, Api], ids: ConnectionIds, only: str | None = None
    ) -> None:
        self._apis = apis
        self._ids = ids
        self._only = only
        self.requests: Counter[tuple[str, int]] = Counter()  # (operation, status)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/@connections/{id}", self._counted("post_connection", self._post))
        router.add_get("/@connections/{id}", self._counted("get_connection", self._get))
        router.add_delete("/@connections/{id}", self._counted("delete_connection", self._delete))
        router.add_post("/@groups/{group}", self._counted("post_group", self._post_group))
        router.add_get("/@groups/{group}", self._counted("get_group", self._get_group))
        router.add_put("/@groups/{group}/connections/{id}", self._counted("join_group", self._join))
        router.add_delete(
            "/@groups/{group}/connections/{id}", self._counted("leave_group", self._leave)
        )
        router.add_post("/@users/{user}", self._counted("post_user", self._post_user))

    def _counted(self, operation: str, handler: Handler) -> Handler:
        async def counted(request: web.Request) -> web.StreamResponse:
            response = await handler(request)
            self.requests[(operation, response.status)] += 1
            return response

        return counted

    # --- lookups --------------------------------------------------------------------------------

    def _connection(self, request: web.Request) -> tuple[Api, ApiConnection] | web.Response:
        cid = request.match_info["id"]
        try:
            owner = owner_of(cid)
        except UnknownConnection as exc:
            return _error(410, str(exc))
        if owner != self._ids.owner:
            return _error(410, f"no connection {cid}: not held by this proxy (or it restarted)")
        for name, api in self._apis.items():
            if self._only is not None and name != self._only:
                continue
            connection = api.registry.get(cid)
            if connection is not None:
                return api, connection
        return _error(410, f"no connection {cid}: it ended")

    def _api(self, request: web.Request) -> Api | web.Response:
        name = request.query.get("api", self._only)
        if name is None:
            if len(self._apis) == 1:
                return next(iter(self._apis.values()))
            return _error(
                400,
                f"several APIs are served here ({', '.join(sorted(self._apis))}); add ?api=NAME",
            )
        if self._only is not None and name != self._only:
            return _error(404, f"this listener serves the API '{self._only}' only")
        api = self._apis.get(name)
        if api is None:
            return _error(404, f"no API {name!r}; defined: {', '.join(sorted(self._apis))}")
        return api

    @staticmethod
    def _name(request: web.Request, key: str) -> str | web.Response:
        name = request.match_info[key]
        if not valid_group_name(name):
            return _error(400, f"{key} {name[:64]!r} is not a name: 1-128 URL-safe characters")
        return name

    # --- one connection -------------------------------------------------------------------------

    async def _post(self, request: web.Request) -> web.StreamResponse:
        found = self._connection(request)
        if isinstance(found, web.Response):
            return found
        api, connection = found
        body = await _read_body(request, api.config.max_message_bytes)
        if isinstance(body, web.Response):
            return body
        result = connection.send_message(body, _is_text(request.content_type))
        if result is Delivery.GONE:
            return _error(410, f"no connection {request.match_info['id']}: it is closing")
        if result is Delivery.SLOW:
            return _error(
                429,
                "the client is not reading: its send buffer is over max_send_buffer_bytes",
                {"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        api.stats.messages[("@connections", "out")] += 1
        return web.Response(status=200)

    async def _get(self, request: web.Request) -> web.StreamResponse:
        found = self._connection(request)
        if isinstance(found, web.Response):
            return found
        return web.json_response(found[1].info())

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        found = self._connection(request)
        if isinstance(found, web.Response):
            return found
        raw_code = request.query.get("code", "1000")
        try:
            code = int(raw_code)
        except ValueError:
            code = -1
        if code != 1000 and code not in _CLOSE_CODES:
            return _error(422, f"code {raw_code[:16]!r} must be 1000 or 3000-4999 (RFC 6455 §7.4)")
        reason = request.query.get("reason", "")
        if len(reason.encode()) > 123:  # a Close frame's payload is at most 125 bytes
            return _error(422, "reason is over 123 bytes of UTF-8")
        if not found[1].close_by_api(code, reason):
            return _error(410, f"no connection {request.match_info['id']}: it is closing")
        return web.Response(status=204)

    # --- groups and users -----------------------------------------------------------------------

    async def _post_group(self, request: web.Request) -> web.StreamResponse:
        return await self._fan_out(request, "group")

    async def _post_user(self, request: web.Request) -> web.StreamResponse:
        return await self._fan_out(request, "user")

    async def _fan_out(self, request: web.Request, kind: str) -> web.StreamResponse:
        api = self._api(request)
        if isinstance(api, web.Response):
            return api
        name = self._name(request, kind)
        if isinstance(name, web.Response):
            return name
        body = await _read_body(request, api.config.max_message_bytes)
        if isinstance(body, web.Response):
            return body
        text = _is_text(request.content_type)
        registry = api.registry
        sent = (
            registry.send_group(name, body, text)
            if kind == "group"
            else registry.send_user(name, body, text)
        )
        api.stats.messages[(f"@{kind}s", "out")] += sent.delivered
        return web.json_response({"delivered": sent.delivered, "dropped_slow": sent.dropped_slow})

    async def _get_group(self, request: web.Request) -> web.StreamResponse:
        api = self._api(request)
        if isinstance(api, web.Response):
            return api
        name = self._name(request, "group")
        if isinstance(name, web.Response):
            return name
        try:
            limit = int(request.query.get("limit", DEFAULT_PAGE))
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_PAGE:
            return _error(422, f"limit must be 1-{MAX_PAGE}")
        page, cursor = api.registry.members(name, request.query.get("after"), limit)
        answer: dict[str, Any] = {
            "group": name,
            "size": api.registry.group_size(name),
            "connections": page,
            "next": cursor,
        }
        return web.json_response(answer)

    async def _join(self, request: web.Request) -> web.StreamResponse:
        return self._membership(request, join=True)

    async def _leave(self, request: web.Request) -> web.StreamResponse:
        return self._membership(request, join=False)

    def _membership(self, request: web.Request, join: bool) -> web.Response:
        name = self._name(request, "group")
        if isinstance(name, web.Response):
            return name
        found = self._connection(request)
        if isinstance(found, web.Response):
            return found
        api, connection = found
        if join:
            if (
                len(connection.groups) >= MAX_GROUPS_PER_CONNECTION
                and name not in connection.groups
            ):
                return _error(
                    409, f"the connection is in {MAX_GROUPS_PER_CONNECTION} groups already"
                )
            api.registry.join(name, connection)
        else:
            api.registry.leave(name, connection)
        return web.Response(status=204)


def _is_text(content_type: str) -> bool:
    return content_type.startswith("text/") or content_type == "application/json"


async def _read_body(request: web.Request, limit: int) -> bytes | web.Response:
    """The request body, or 413 once it passes ``limit`` (read no further than that)."""
    length = request.content_length
    if length is not None and length > limit:
        return _error(413, f"the message is {length} bytes; max_message_bytes is {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return _error(413, f"the message is over max_message_bytes ({limit})")
        chunks.append(chunk)
