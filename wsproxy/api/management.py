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
An id names its connection whatever the API; with several APIs, ``?api=NAME`` says which one a
group or user belongs to.

The operations themselves (``Management.local``) are plain functions of the request's parts,
so a supervisor (``[proxy] workers`` > 1) hands a call to the worker its id names, or to every
worker for a group or user, over the control channel (``Workers``), and sums the answers.
"""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from aiohttp import web

from wsproxy.api.api import Api
from wsproxy.api.connection_id import ConnectionIds, UnknownConnection, owner_of
from wsproxy.api.registry import (
    MAX_GROUPS_PER_CONNECTION,
    MAX_PAGE,
    ApiConnection,
    Delivery,
    is_text,
    valid_text,
)
from wsproxy.api.registry import valid_name as valid_group_name

# How long a client over its send buffer is asked to wait (429): about what a client on a
# slow link needs to drain a 1 MiB buffer.
RETRY_AFTER_SECONDS = 1
DEFAULT_PAGE = 100
# Close codes a backend may send (RFC 6455 §7.4: 1000, or 3000-4999 for applications).
_CLOSE_CODES = range(3000, 5000)
_BY_ID = frozenset(
    {"post_connection", "get_connection", "delete_connection", "join_group", "leave_group"}
)
_FAN_OUT = frozenset({"post_group", "post_user"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Reply(NamedTuple):
    """A management answer: status, JSON body (None: empty) and extra headers."""

    status: int
    body: dict[str, Any] | None = None
    headers: Mapping[str, str] | None = None

    def as_message(self) -> dict[str, Any]:
        return {"status": self.status, "body": self.body, "headers": dict(self.headers or {})}

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> Reply:
        body = message.get("body")
        headers = message.get("headers") or {}
        return cls(int(message["status"]), body if isinstance(body, dict) else None, headers)


class Call(NamedTuple):
    """One management request, as its parts (what crosses to a worker)."""

    operation: str
    api: str
    params: Mapping[str, str]  # id, group, user
    query: Mapping[str, str]
    text: bool
    body: bytes

    def as_message(self) -> dict[str, Any]:
        return {
            "op": "management",
            "operation": self.operation,
            "api": self.api,
            "params": dict(self.params),
            "query": dict(self.query),
            "text": self.text,
            "body": base64.b64encode(self.body).decode("ascii"),
        }

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> Call:
        return cls(
            str(message["operation"]),
            str(message["api"]),
            {str(k): str(v) for k, v in message["params"].items()},
            {str(k): str(v) for k, v in message["query"].items()},
            bool(message["text"]),
            base64.b64decode(str(message["body"])),
        )


class Workers(Protocol):
    """A supervisor's workers, as management calls reach them."""

    @property
    def slot_count(self) -> int: ...

    async def management(self, worker: int, call: Call) -> Reply:
        """``call`` run by worker ``worker`` (503 when it cannot answer)."""


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Reply:
    return Reply(status, {"error": message}, headers)


_NOT_UTF8 = Reply(
    422,
    {
        "error": "the body is not UTF-8, so it cannot be a text message; send binary data as "
        "application/octet-stream"
    },
)


def _gone(cid: str, why: str) -> Reply:
    return _error(410, f"no connection {cid[:40]}: {why}")


class Management:
    """The routes above over the APIs of this process (``apis``, the proxy's live mapping).

    ``only``: the API a management listener of its own serves (None on the admin listener).
    ``workers``: set on a supervisor, whose workers hold the connections.
    """

    def __init__(
        self,
        apis: Mapping[str, Api],
        ids: ConnectionIds,
        only: str | None = None,
        workers: Workers | None = None,
    ) -> None:
        self._apis = apis
        self._ids = ids
        self._only = only
        self.workers = workers
        self.requests: Counter[tuple[str, int]] = Counter()  # (operation, status)

    def serving(self, only: str) -> Management:
        """The same APIs and workers, for a management listener of the API ``only``; its
        requests are counted with these."""
        view = Management(self._apis, self._ids, only, self.workers)
        view.requests = self.requests
        return view

    def add_routes(self, router: web.UrlDispatcher) -> None:
        for method, path, operation in (
            ("POST", "/@connections/{id}", "post_connection"),
            ("GET", "/@connections/{id}", "get_connection"),
            ("DELETE", "/@connections/{id}", "delete_connection"),
            ("POST", "/@groups/{group}", "post_group"),
            ("GET", "/@groups/{group}", "get_group"),
            ("PUT", "/@groups/{group}/connections/{id}", "join_group"),
            ("DELETE", "/@groups/{group}/connections/{id}", "leave_group"),
            ("POST", "/@users/{user}", "post_user"),
        ):
            router.add_route(method, path, self._handler(operation))

    def _handler(self, operation: str) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            reply = await self._serve(operation, request)
            self.requests[(operation, reply.status)] += 1
            if reply.body is None:
                return web.Response(status=reply.status, headers=reply.headers)
            return web.json_response(reply.body, status=reply.status, headers=reply.headers)

        return handle

    async def _serve(self, operation: str, request: web.Request) -> Reply:
        name = request.query.get("api") or self._only
        if operation in _BY_ID and name is None:
            # An id names one connection whatever its API: no ?api= needed; the body is
            # bounded by the largest limit here, and by its own API's where it is held.
            limit = max((api.config.max_message_bytes for api in self._apis.values()), default=0)
            name = ""
        else:
            api = self._api(name)
            if isinstance(api, Reply):
                return api
            name, limit = api.name, api.config.max_message_bytes
        body = b""
        if request.method == "POST":
            read = await _read_body(request, limit)
            if isinstance(read, Reply):
                return read
            body = read
        text = is_text(request.headers.get("Content-Type"))
        call = Call(operation, name, request.match_info, request.query, text, body)
        if self.workers is None:
            return self.local(call)
        return await self._forward(call, self.workers)

    def _api(self, name: str | None) -> Api | Reply:
        name = name or self._only
        if name is None:
            if len(self._apis) == 1:
                return next(iter(self._apis.values()))
            served = ", ".join(sorted(self._apis)) or "none"
            return _error(400, f"several APIs are served here ({served}); add ?api=NAME")
        if self._only is not None and name != self._only:
            return _error(404, f"this listener serves the API '{self._only}' only")
        api = self._apis.get(name)
        if api is None:
            return _error(404, f"no API {name[:64]!r}; defined: {', '.join(sorted(self._apis))}")
        return api

    # --- a supervisor's side --------------------------------------------------------------------

    async def _forward(self, call: Call, workers: Workers) -> Reply:
        if call.operation in _BY_ID:
            cid = call.params["id"]
            try:
                owner = owner_of(cid)
            except UnknownConnection as exc:
                return _error(410, str(exc))
            if owner.instance != self._ids.owner.instance or owner.worker >= workers.slot_count:
                return _gone(cid, "not held by this proxy (or it restarted)")
            return await workers.management(owner.worker, call)
        if call.operation in _FAN_OUT:
            checked = self._name(call, "group" if call.operation == "post_group" else "user")
            if isinstance(checked, Reply):
                return checked
            # Every worker at once, so one slow worker does not hold up the others' members.
            replies = await asyncio.gather(
                *(workers.management(w, call) for w in range(workers.slot_count))
            )
            delivered = dropped = unavailable = 0
            for reply in replies:
                if reply.status == 503:
                    unavailable += 1  # its members got nothing; the others' did
                    continue
                if reply.status != 200 or reply.body is None:
                    return reply  # the same refusal from every worker (422, 400)
                delivered += int(reply.body["delivered"])
                dropped += int(reply.body["dropped_slow"])
            if unavailable == len(replies):
                return replies[0]
            answer: dict[str, Any] = {"delivered": delivered, "dropped_slow": dropped}
            if unavailable:
                answer["workers_unavailable"] = unavailable  # at most once: do not resend
            return Reply(200, answer)
        return await self._forward_members(call, workers)

    async def _forward_members(self, call: Call, workers: Workers) -> Reply:
        """A group's members across workers: worker by worker, in join order within each; the
        cursor (an id) names the worker to go on from."""
        limit = _limit(call.query)
        if isinstance(limit, Reply):
            return limit
        after = call.query.get("after")
        first = 0
        if after is not None:
            try:
                first = owner_of(after).worker
            except UnknownConnection:
                after = None
        page: list[str] = []
        size = 0
        cursor: str | None = None
        for worker in range(workers.slot_count):
            query = {"limit": str(max(1, limit - len(page)))}
            if worker == first and after is not None:
                query["after"] = after
            reply = await workers.management(worker, call._replace(query=query))
            if reply.status != 200 or reply.body is None:
                return reply
            size += int(reply.body["size"])
            if worker < first or len(page) >= limit:
                continue
            page += reply.body["connections"]
            if reply.body["next"] is not None:
                cursor = page[-1]
        if cursor is None and len(page) >= limit:
            cursor = page[-1] if page else None
        group = call.params["group"]
        return Reply(200, {"group": group, "size": size, "connections": page, "next": cursor})

    # --- the operations, on this process's connections ------------------------------------------

    def local(self, call: Call) -> Reply:
        """``call`` on the connections this process holds."""
        operation = call.operation
        if not call.api and operation in _BY_ID:
            api = self._holder(call.params["id"])
        else:
            api = self._api(call.api)
        if isinstance(api, Reply):
            return api
        if operation == "post_connection":
            return self._post(api, call)
        if operation == "get_connection":
            return self._with_connection(api, call, lambda c: Reply(200, c.info()))
        if operation == "delete_connection":
            return self._delete(api, call)
        if operation in ("post_group", "post_user"):
            return self._fan_out(api, call, "group" if operation == "post_group" else "user")
        if operation == "get_group":
            return self._members(api, call)
        if operation in ("join_group", "leave_group"):
            return self._membership(api, call, join=operation == "join_group")
        return _error(404, f"no operation {operation!r}")

    def _holder(self, cid: str) -> Api | Reply:
        """The API whose connection ``cid`` is (any this listener serves)."""
        for name, api in self._apis.items():
            if (self._only is None or name == self._only) and api.registry.get(cid) is not None:
                return api
        try:
            owner_of(cid)
        except UnknownConnection as exc:
            return _error(410, str(exc))
        return _gone(cid, "it ended")

    def _connection(self, api: Api, cid: str) -> ApiConnection | Reply:
        try:
            owner = owner_of(cid)
        except UnknownConnection as exc:
            return _error(410, str(exc))
        if owner != self._ids.owner:
            return _gone(cid, "not held by this proxy (or it restarted)")
        connection = api.registry.get(cid)
        if connection is None:
            return _gone(cid, "it ended")
        return connection

    def _with_connection(
        self, api: Api, call: Call, then: Callable[[ApiConnection], Reply]
    ) -> Reply:
        found = self._connection(api, call.params["id"])
        return found if isinstance(found, Reply) else then(found)

    def _post(self, api: Api, call: Call) -> Reply:
        found = self._connection(api, call.params["id"])
        if isinstance(found, Reply):
            return found
        if call.text and not valid_text(call.body):
            return _NOT_UTF8
        limit = api.config.max_message_bytes
        if len(call.body) > limit:
            return _error(
                413, f"the message is {len(call.body)} bytes; max_message_bytes is {limit}"
            )
        result = found.send_message(call.body, call.text)
        if result is Delivery.GONE:
            return _gone(call.params["id"], "it is closing")
        if result is Delivery.SLOW:
            return _error(
                429,
                "the client is not reading: its send buffer is over max_send_buffer_bytes",
                {"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        api.stats.messages[("@connections", "out")] += 1
        return Reply(200)

    def _delete(self, api: Api, call: Call) -> Reply:
        raw_code = call.query.get("code", "1000")
        try:
            code = int(raw_code)
        except ValueError:
            code = -1
        if code != 1000 and code not in _CLOSE_CODES:
            return _error(422, f"code {raw_code[:16]!r} must be 1000 or 3000-4999 (RFC 6455 §7.4)")
        reason = call.query.get("reason", "")
        if len(reason.encode()) > 123:  # a Close frame's payload is at most 125 bytes
            return _error(422, "reason is over 123 bytes of UTF-8")
        found = self._connection(api, call.params["id"])
        if isinstance(found, Reply):
            return found
        if not found.close_by_api(code, reason):
            return _gone(call.params["id"], "it is closing")
        return Reply(204)

    @staticmethod
    def _name(call: Call, key: str) -> str | Reply:
        name = call.params[key]
        if not valid_group_name(name):
            return _error(400, f"{key} {name[:64]!r} is not a name: 1-128 URL-safe characters")
        return name

    def _fan_out(self, api: Api, call: Call, kind: str) -> Reply:
        name = self._name(call, kind)
        if isinstance(name, Reply):
            return name
        if call.text and not valid_text(call.body):
            return _NOT_UTF8
        registry = api.registry
        if kind == "group":
            sent = registry.send_group(name, call.body, call.text)
        else:
            sent = registry.send_user(name, call.body, call.text)
        api.stats.messages[(f"@{kind}s", "out")] += sent.delivered
        return Reply(200, {"delivered": sent.delivered, "dropped_slow": sent.dropped_slow})

    def _members(self, api: Api, call: Call) -> Reply:
        name = self._name(call, "group")
        if isinstance(name, Reply):
            return name
        limit = _limit(call.query)
        if isinstance(limit, Reply):
            return limit
        page, cursor = api.registry.members(name, call.query.get("after"), limit)
        size = api.registry.group_size(name)
        return Reply(200, {"group": name, "size": size, "connections": page, "next": cursor})

    def _membership(self, api: Api, call: Call, join: bool) -> Reply:
        name = self._name(call, "group")
        if isinstance(name, Reply):
            return name
        found = self._connection(api, call.params["id"])
        if isinstance(found, Reply):
            return found
        if join:
            full = len(found.groups) >= MAX_GROUPS_PER_CONNECTION
            if full and name not in found.groups:
                return _error(
                    409, f"the connection is in {MAX_GROUPS_PER_CONNECTION} groups already"
                )
            api.registry.join(name, found)
        else:
            api.registry.leave(name, found)
        return Reply(204)


def _limit(query: Mapping[str, str]) -> int | Reply:
    try:
        limit = int(query.get("limit", DEFAULT_PAGE))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE:
        return _error(422, f"limit must be 1-{MAX_PAGE}")
    return limit


async def _read_body(request: web.Request, limit: int) -> bytes | Reply:
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


__all__: Sequence[str] = ("Call", "Management", "Reply", "Workers")
