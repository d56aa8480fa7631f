"""The live connections of a WebSocket API in this process, with their groups and users.

A management call finds its connection here by id (``get``), and a group or user send walks the
members (``send_group``/``send_user``). Every index holds only live connections: a connection
leaves them all in ``remove``, which its flow calls exactly once when it ends. Groups are dicts
in join order, so a member list pages stably (``members``) while others join and leave.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from typing import Any, NamedTuple, Protocol

# Group and user names: what fits a URL path segment unescaped (RFC 3986 unreserved plus a
# few), up to 128 characters, so they can be logged and paged on without quoting.
NAME_RE = re.compile(r"[A-Za-z0-9._~:@!$&'()*+,;=-]{1,128}")
# Groups one connection may be in; joins beyond it are refused (409), like a quota.
MAX_GROUPS_PER_CONNECTION = 100
MAX_PAGE = 1000


class Delivery(enum.Enum):
    """What became of one message sent to one connection."""

    QUEUED = "queued"  # written to the socket's buffer
    SLOW = "slow"  # that client's send buffer is over its high-water mark: dropped
    GONE = "gone"  # the connection is closing or closed


class ApiConnection(Protocol):
    """One client connection of an API, as management calls see it (its flow)."""

    @property
    def connection_id(self) -> str: ...

    @property
    def user(self) -> str | None: ...

    @property
    def groups(self) -> set[str]: ...

    def send_message(self, data: bytes, text: bool) -> Delivery: ...

    def send_prepared(self, message: Prepared) -> Delivery:
        """Send a message serialized once for many connections (a group or user send)."""

    def close_by_api(self, code: int, reason: str) -> bool: ...

    def info(self) -> dict[str, Any]: ...


class Prepared:
    """One message for many connections: its payload, and its frame serialized once for every
    connection without extensions (an unmasked server frame is the same bytes for all)."""

    __slots__ = ("_frame", "data", "text")

    def __init__(self, data: bytes, text: bool) -> None:
        self.data = data
        self.text = text
        self._frame: bytes | None = None

    @property
    def frame(self) -> bytes:
        frame = self._frame
        if frame is None:
            frame = self._frame = encode_frame(self.data, self.text)
        return frame


def encode_frame(data: bytes, text: bool) -> bytes:
    """An unmasked, unfragmented server data frame (RFC 6455 §5.2)."""
    first = 0x81 if text else 0x82
    length = len(data)
    if length < 126:
        head = bytes((first, length))
    elif length < 1 << 16:
        head = bytes((first, 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((first, 127)) + length.to_bytes(8, "big")
    return head + data


class Fanout(NamedTuple):
    """The answer to a group or user send."""

    delivered: int
    dropped_slow: int


def is_text(content_type: str | None) -> bool:
    """Whether a payload of this media type goes to a client as a text message (else binary):
    ``text/*``, ``application/json`` and ``application/*+json``, parameters ignored."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media.startswith("text/") or media == "application/json" or media.endswith("+json")


def valid_text(data: bytes) -> bool:
    """Whether ``data`` may go out as a text message: UTF-8 (RFC 6455 §5.6; a client fails the
    connection with 1007 otherwise, so nothing that is not goes out as text)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def valid_name(name: str) -> bool:
    return NAME_RE.fullmatch(name) is not None


class Registry:
    """Connections of one API in this process, by id, group and user."""

    __slots__ = ("_by_user", "_connections", "_groups")

    def __init__(self) -> None:
        self._connections: dict[str, ApiConnection] = {}
        self._groups: dict[str, dict[str, ApiConnection]] = {}
        self._by_user: dict[str, dict[str, ApiConnection]] = {}

    def __len__(self) -> int:
        return len(self._connections)

    def ids(self) -> list[str]:
        """Every connection id, oldest first."""
        return list(self._connections)

    def get(self, connection_id: str) -> ApiConnection | None:
        return self._connections.get(connection_id)

    def add(self, connection: ApiConnection) -> None:
        """A connection that got its 101; joins its user's index and the groups $connect gave."""
        cid = connection.connection_id
        self._connections[cid] = connection
        if connection.user is not None:
            self._by_user.setdefault(connection.user, {})[cid] = connection
        for group in connection.groups:
            self._groups.setdefault(group, {})[cid] = connection

    def remove(self, connection: ApiConnection) -> None:
        cid = connection.connection_id
        if self._connections.pop(cid, None) is None:
            return
        if connection.user is not None:
            _discard(self._by_user, connection.user, cid)
        for group in connection.groups:
            _discard(self._groups, group, cid)

    # --- groups ---------------------------------------------------------------------------------

    def join(self, group: str, connection: ApiConnection) -> bool:
        """Add ``connection`` to ``group``; False when it already was a member."""
        cid = connection.connection_id
        members = self._groups.setdefault(group, {})
        if cid in members:
            return False
        members[cid] = connection
        connection.groups.add(group)
        return True

    def leave(self, group: str, connection: ApiConnection) -> bool:
        """Take ``connection`` out of ``group``; False when it was not a member."""
        if group not in connection.groups:
            return False
        connection.groups.discard(group)
        _discard(self._groups, group, connection.connection_id)
        return True

    def group_size(self, group: str) -> int:
        return len(self._groups.get(group, ()))

    @property
    def group_members(self) -> int:
        """Memberships across every group (the ``wsproxy_api_group_members`` gauge)."""
        return sum(len(members) for members in self._groups.values())

    def members(self, group: str, after: str | None, limit: int) -> tuple[list[str], str | None]:
        """Up to ``limit`` member ids of ``group`` in join order, starting after the id
        ``after`` (a cursor from the previous page; an id that left starts from the top of
        what remains after it in order, or the beginning if unknown), and the next cursor or
        None on the last page."""
        members = self._groups.get(group, {})
        ids: Iterable[str] = members.keys()
        if after is not None and after in members:
            found = False
            rest: list[str] = []
            for cid in members:
                if found:
                    rest.append(cid)
                elif cid == after:
                    found = True
            ids = rest
        page: list[str] = []
        more = False
        for cid in ids:
            if len(page) == limit:
                more = True
                break
            page.append(cid)
        return page, (page[-1] if more and page else None)

    def send_group(self, group: str, data: bytes, text: bool) -> Fanout:
        return _fan_out(list(self._groups.get(group, {}).values()), data, text)

    def send_user(self, user: str, data: bytes, text: bool) -> Fanout:
        return _fan_out(list(self._by_user.get(user, {}).values()), data, text)


def _fan_out(members: list[ApiConnection], data: bytes, text: bool) -> Fanout:
    # A copy of the member list: a send may end a connection, which leaves the group.
    delivered = dropped = 0
    message = Prepared(data, text)
    for member in members:
        result = member.send_prepared(message)
        if result is Delivery.QUEUED:
            delivered += 1
        elif result is Delivery.SLOW:
            dropped += 1
    return Fanout(delivered, dropped)


def _discard(index: dict[str, dict[str, ApiConnection]], key: str, cid: str) -> None:
    members = index.get(key)
    if members is None:
        return
    members.pop(cid, None)
    if not members:
        del index[key]
