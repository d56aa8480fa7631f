"""Route selection of the WebSocket API mode (issue 14): a message's field picks its route."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsproxy.wire.route_selection import (
    DEFAULT_ROUTE,
    MAX_DEPTH,
    BadSelectionExpression,
    parse_expression,
    select_route,
)

KEYS = {"sendmessage", "whoami"}
ACTION = parse_expression("$request.body.action")


def test_expressions_name_a_field_path() -> None:
    assert ACTION == ("action",)
    assert parse_expression("$request.body.meta.type") == ("meta", "type")


@pytest.mark.parametrize(
    "expression",
    [
        "action",
        "$request.header.action",
        "$request.body.",
        "$request.body.a..b",
        "$request.body.a b",
        "$request.body." + ".".join("x" * 9),
        "$request.body.${x}",
    ],
)
def test_expressions_the_proxy_cannot_evaluate_are_refused(expression: str) -> None:
    with pytest.raises(BadSelectionExpression, match="route_selection_expression"):
        parse_expression(expression)


@pytest.mark.parametrize(
    ("message", "route"),
    [
        ('{"action": "sendmessage", "text": "hi"}', "sendmessage"),
        (b'{"action": "whoami"}', "whoami"),  # binary messages are selected the same way
        ('  {"action":"whoami"}', "whoami"),
        ('{"action": "unknown"}', DEFAULT_ROUTE),
        ('{"action": 1}', DEFAULT_ROUTE),  # not a string
        ('{"action": ["whoami"]}', DEFAULT_ROUTE),
        ('{"other": "whoami"}', DEFAULT_ROUTE),  # missing field
        ('["whoami"]', DEFAULT_ROUTE),  # JSON, not an object
        ('"whoami"', DEFAULT_ROUTE),
        ("whoami", DEFAULT_ROUTE),  # not JSON
        ('{"action": "whoami"', DEFAULT_ROUTE),  # broken JSON
        (b'{"action": "who\xffami"}', DEFAULT_ROUTE),  # not UTF-8
        ('{"action": "$connect"}', DEFAULT_ROUTE),  # reserved keys are never selected
        ('{"action": "$default"}', DEFAULT_ROUTE),
        ("", DEFAULT_ROUTE),
    ],
)
def test_a_message_goes_to_the_route_its_field_names(message: str | bytes, route: str) -> None:
    assert select_route(message, ACTION, KEYS | {"$connect"}) == route


def test_nested_fields_are_followed() -> None:
    fields = parse_expression("$request.body.meta.type")
    assert select_route('{"meta": {"type": "whoami"}}', fields, KEYS) == "whoami"
    assert select_route('{"meta": "whoami"}', fields, KEYS) == DEFAULT_ROUTE
    assert select_route('{"meta": {}}', fields, KEYS) == DEFAULT_ROUTE


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 10_000, 100_000])
def test_deep_nesting_is_not_parsed(depth: int) -> None:
    """Past MAX_DEPTH nothing is parsed (json's recursion would otherwise run to the
    interpreter's limit, which 100,000 levels pass)."""
    deep = '{"action": "whoami", "x": ' + "[" * depth + "]" * depth + "}"
    assert select_route(deep, ACTION, KEYS) == DEFAULT_ROUTE
    shallow = '{"action": "whoami", "x": ' + "[" * 10 + "]" * 10 + "}"
    assert select_route(shallow, ACTION, KEYS) == "whoami"


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    message = json.dumps({"action": "whoami", "text": "[" * (MAX_DEPTH * 2)})
    assert select_route(message, ACTION, KEYS) == "whoami"


@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_any_message_selects_a_route_and_raises_nothing(message: bytes | str) -> None:
    assert select_route(message, ACTION, KEYS) in KEYS | {DEFAULT_ROUTE}


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
        ),
        max_leaves=30,
    )
)
def test_any_json_value_beside_the_action_keeps_its_route(value: object) -> None:
    message = json.dumps({"payload": value, "action": "sendmessage"})
    assert select_route(message, ACTION, KEYS) == "sendmessage"
