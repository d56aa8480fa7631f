"""Which route of a WebSocket API a client message goes to; sans-I/O.

An API's ``route_selection_expression`` names a field of the message body, as API Gateway's
does: ``$request.body.action``, or a nested one, ``$request.body.meta.action``. A message (text
or binary) that parses as a JSON object whose field at that path is a string equal to a route
key goes to that route; anything else (not JSON, not an object, the field missing or not a
string, no route with that key) goes to ``$default``. Parsing is bounded: the message is at
most ``max_message_bytes`` long before it gets here, and nesting deeper than ``MAX_DEPTH`` is
not parsed at all (it cannot hold a selectable field the expression would reach anyway, and
json's recursion would otherwise run to the interpreter's limit).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection

from wsproxy.errors import WsproxyError

DEFAULT_ROUTE = "$default"
CONNECT_ROUTE = "$connect"
DISCONNECT_ROUTE = "$disconnect"
RESERVED_ROUTES = (CONNECT_ROUTE, DISCONNECT_ROUTE, DEFAULT_ROUTE)

_PREFIX = "$request.body."
# A field name of the expression: what API Gateway's examples use (letters, digits, _ and -).
_FIELD = re.compile(r"[A-Za-z0-9_-]{1,128}")
MAX_FIELDS = 8  # the path's length (a.b.c...)
MAX_DEPTH = 64  # JSON nesting parsed at all


class BadSelectionExpression(WsproxyError):
    """A ``route_selection_expression`` the proxy cannot evaluate (a config error)."""


def parse_expression(expression: str) -> tuple[str, ...]:
    """The field path of ``expression`` (``$request.body.a.b`` -> ``("a", "b")``);
    ``BadSelectionExpression`` naming what to write instead."""
    if not expression.startswith(_PREFIX):
        raise BadSelectionExpression(
            f"route_selection_expression {expression!r} must start with '{_PREFIX}' "
            "(e.g. '$request.body.action'): routes are selected by a field of the message"
        )
    fields = tuple(expression[len(_PREFIX) :].split("."))
    if len(fields) > MAX_FIELDS:
        raise BadSelectionExpression(
            f"route_selection_expression {expression!r} names {len(fields)} nested fields; "
            f"at most {MAX_FIELDS}"
        )
    for field in fields:
        if not _FIELD.fullmatch(field):
            raise BadSelectionExpression(
                f"route_selection_expression {expression!r}: field {field!r} must be 1-128 "
                "letters, digits, '_' or '-'"
            )
    return fields


def _too_deep(data: bytes | str) -> bool:
    """Whether brackets outside strings nest deeper than ``MAX_DEPTH`` (a cheap bound: one pass,
    no allocation per byte, before json builds anything)."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif char in "]}":
            depth -= 1
    return False


def select_route(message: bytes | str, fields: tuple[str, ...], keys: Collection[str]) -> str:
    """The route key ``message`` goes to: a key of ``keys`` (the API's custom route keys) or
    ``DEFAULT_ROUTE``. Never raises for any message."""
    if isinstance(message, bytes):
        opening = message.lstrip()[:1] == b"{"
        brackets = message.count(b"{") + message.count(b"[")
    else:
        opening = message.lstrip()[:1] == "{"
        brackets = message.count("{") + message.count("[")
    if not opening:  # not a JSON object: nothing to parse
        return DEFAULT_ROUTE
    if brackets > MAX_DEPTH and _too_deep(message):  # only then can it nest that deep
        return DEFAULT_ROUTE
    try:
        value: object = json.loads(message)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return DEFAULT_ROUTE
    for field in fields:
        if not isinstance(value, dict):
            return DEFAULT_ROUTE
        value = value.get(field)
    if isinstance(value, str) and value in keys and value not in RESERVED_ROUTES:
        return value
    return DEFAULT_ROUTE
