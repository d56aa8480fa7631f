"""The config loader given valid TOML with random values in the real keys (and a few unknown
ones): it returns a Config or raises ConfigError naming the problems, never anything else."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from wsproxy.config import (
    AdminSection,
    HealthCheckConfig,
    ListenerConfig,
    ProxySection,
    RuleConfig,
    TargetGroupConfig,
    parse_config,
)
from wsproxy.errors import ConfigError

SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, -1, 65535, 65536, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "127.0.0.1:0",
            "[::1]:8080",
            "0.0.0.0:99999",
            "auto",
            "tls",
            "tcp",
            "websocket",
            "round_robin",
            "http",
            "/health",
            "200-399",
            "g",
            "edge",
            "",
        ]
    ),
    st.text(max_size=20),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are TOML basic-string escapes
    return "[" + ", ".join(toml_value(item) for item in value) + "]"


@st.composite
def table(draw: st.DrawFn, model: type[BaseModel], keep: dict[str, str] | None = None) -> str:
    fields = sorted(model.model_fields)
    chosen = draw(st.lists(st.sampled_from([*fields, "unknown_key"]), max_size=6, unique=True))
    lines = dict(keep or {})
    for name in chosen:
        lines[name] = toml_value(draw(VALUES))
    return "".join(f"{name} = {value}\n" for name, value in lines.items())


@st.composite
def documents(draw: st.DrawFn) -> str:
    listener_base = {"address": '"127.0.0.1:0"', "default_target_group": '"g"'}
    parts = [
        "[proxy]\n" + draw(table(ProxySection)),
        "[admin]\n" + draw(table(AdminSection)),
        "[listeners.edge]\n" + draw(table(ListenerConfig, listener_base)),
        "[[listeners.edge.rules]]\n" + draw(table(RuleConfig, {"target_group": '"g"'})),
        "[target_groups.g]\n"
        + draw(table(TargetGroupConfig, {"targets": '[{ address = "127.0.0.1:9" }]'})),
        "[target_groups.g.health_check]\n" + draw(table(HealthCheckConfig)),
    ]
    kept = [part for part in parts if draw(st.booleans()) or part.startswith("[listeners.edge]")]
    return "\n".join(kept)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_random_values_give_a_config_or_a_config_error(text: str) -> None:
    try:
        parse_config(text, "<fuzz>")
    except ConfigError as exc:
        assert exc.issues, "a ConfigError must say what is wrong"
