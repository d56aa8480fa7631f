"""Connection ids of the WebSocket API mode: opaque to clients and backends, unguessable, and
routable, so a management call finds the owner without a lookup.

An id is 18 bytes, base64url without padding (24 characters, safe in a URL path):

- a version byte (``1``), so the format can change without misreading old ids;
- 4 bytes naming the instance: random per process start (``[cluster]`` will give each
  instance its own), so an id of a restarted proxy names no live instance and gets 410,
  never someone else's connection;
- 1 byte: the worker slot that holds the connection (0 without workers);
- 12 random bytes (96 bits, ``secrets``): an id cannot be guessed from others.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from typing import NamedTuple

from wsproxy.errors import WsproxyError

VERSION = 1
INSTANCE_BYTES = 4
RANDOM_BYTES = 12  # 96 bits, as the issue asks at least
ID_BYTES = 1 + INSTANCE_BYTES + 1 + RANDOM_BYTES
ID_LENGTH = 24  # base64 of 18 bytes: no padding to strip
MAX_WORKERS = 256


class UnknownConnection(WsproxyError):
    """No connection has this id (malformed, of another instance or version, or ended): 410."""


class Owner(NamedTuple):
    """Who holds the connection an id names."""

    instance: bytes
    worker: int


class ConnectionIds:
    """Makes the ids of one worker of one instance, and reads any id's owner."""

    __slots__ = ("_prefix", "owner")

    def __init__(self, worker: int = 0, instance: bytes | None = None) -> None:
        if not 0 <= worker < MAX_WORKERS:
            raise ValueError(f"worker slot {worker} is not 0-{MAX_WORKERS - 1}")
        instance = secrets.token_bytes(INSTANCE_BYTES) if instance is None else instance
        if len(instance) != INSTANCE_BYTES:
            raise ValueError(f"an instance is named by {INSTANCE_BYTES} bytes")
        self.owner = Owner(instance, worker)
        self._prefix = bytes([VERSION]) + instance + bytes([worker])

    def new(self) -> str:
        """A fresh id of a connection this worker holds."""
        raw = self._prefix + secrets.token_bytes(RANDOM_BYTES)
        return base64.urlsafe_b64encode(raw).decode("ascii")


def owner_of(connection_id: str) -> Owner:
    """The owner an id names; ``UnknownConnection`` for anything that is not such an id (a
    management call answers 410 then, as for an ended connection)."""
    if len(connection_id) != ID_LENGTH:
        raise UnknownConnection(f"no connection {connection_id[:40]!r}: ids are {ID_LENGTH} chars")
    try:
        raw = base64.urlsafe_b64decode(connection_id.encode("ascii"))
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise UnknownConnection(f"no connection {connection_id!r}: not an id") from None
    if (
        len(raw) != ID_BYTES
        or raw[0] != VERSION
        or base64.urlsafe_b64encode(raw).decode("ascii") != connection_id  # one spelling only
    ):
        raise UnknownConnection(f"no connection {connection_id!r}: not an id of this version")
    return Owner(raw[1 : 1 + INSTANCE_BYTES], raw[1 + INSTANCE_BYTES])
