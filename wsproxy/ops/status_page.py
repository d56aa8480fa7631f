"""The status page's first view, rendered on the server (pure: data and ``now`` in, HTML out).

``status.html`` holds ``<!--wsproxy:NAME-->`` markers where the banner, the listener rows and the
target groups go. The server fills them from the same rows ``/v1/listeners`` and
``/v1/target-groups`` return, with the DOM the page's script builds (same elements, classes and
``data-*`` attributes), so a client without JavaScript (curl, a text browser, a screen scraper)
sees the states, and the script then replaces the view every 2 s. Every value is HTML-escaped:
target addresses come from the API, health-check details from what targets answer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

_MARKER = re.compile(r"<!--wsproxy:([a-z_]+)-->")
MARKERS = ("banner", "listeners", "apis", "target_groups")
DASH = "\u2013"  # an en dash, as the script shows a value it does not have
NO_RATE = DASH  # rates need two samples: the script computes them from its second one on


class StatusTemplate:
    """``status.html`` split at its markers once, so rendering is a join (and a value that
    happens to contain a marker is never expanded again)."""

    def __init__(self, html: str) -> None:
        pieces = _MARKER.split(html)
        self._text = pieces[0::2]
        self._names = pieces[1::2]
        if sorted(self._names) != sorted(MARKERS):
            raise ValueError(f"status.html must hold each of {MARKERS} once, got {self._names}")

    def render(self, parts: Mapping[str, str]) -> str:
        out = [self._text[0]]
        for name, text in zip(self._names, self._text[1:], strict=True):
            out += [parts[name], text]
        return "".join(out)


def _cell(content: str, class_name: str | None = None) -> str:
    attribute = f' class="{escape(class_name)}"' if class_name else ""
    return f"<td{attribute}>{escape(content)}</td>"


def _expiry(expiries: Mapping[str, float], now: float) -> str:
    """As the script shows it: ``server 364 d, crl 6 d`` (days left, rounded)."""
    parts = [f"{role} {(when - now) / 86400:.0f} d" for role, when in expiries.items()]
    return ", ".join(parts) or DASH


def listener_rows_html(listeners: Sequence[Mapping[str, Any]], now: float) -> str:
    """The ``<tbody>`` rows of the listeners table."""
    rows = []
    for listener in listeners:
        rows.append(
            f'<tr data-listener="{escape(str(listener["name"]))}">'
            + _cell(str(listener["name"]))
            + _cell(str(listener["address"] or DASH))
            + _cell(str(listener["mode"]))
            + _cell(f"{listener['connections_active']} / {listener['max_connections']}", "num")
            + _cell(f"{NO_RATE} · {NO_RATE}", "num")
            + _cell(f"{NO_RATE} · {NO_RATE}", "num")
            + _cell(_expiry(listener["certificate_not_after"], now))
            + "</tr>"
        )
    return "".join(rows)


_TARGET_COLUMNS = ("target", "state", "reason", "weight", "active", "last health checks")


def target_groups_html(groups: Sequence[Mapping[str, Any]]) -> str:
    """One heading and table per target group, as ``/v1/target-groups`` describes them."""
    out = []
    head = "<tr>" + "".join(f"<th>{escape(name)}</th>" for name in _TARGET_COLUMNS) + "</tr>"
    for group in groups:
        title = f"Target group {group['name']} ({group['algorithm']})"
        if group["failing_open"]:
            title += " — failing open"
        out.append(f"<h2>{escape(title)}</h2>")
        out.append(f'<table data-target-group="{escape(str(group["name"]))}">{head}')
        for target in group["targets"]:
            state = str(target["state"])
            checks = "".join(
                f'<span class="{"check-ok" if check["ok"] else "check-failed"}" '
                f'title="{escape(str(check["detail"]))}"></span>'
                for check in target["health_checks"]
            )
            out.append(
                f'<tr data-target="{escape(str(target["address"]))}" '
                f'data-state="{escape(state)}">'
                + _cell(str(target["address"]))
                + f'<td><span class="state state-{escape(state)}">{escape(state)}</span></td>'
                + _cell(str(target["reason"] or ""))
                + _cell(str(target["weight"]), "num")
                + _cell(str(target["active_connections"]), "num")
                + f'<td class="checks">{checks}</td>'
                + "</tr>"
            )
        out.append("</table>")
    return "".join(out)


_API_COLUMNS = ("route", "target group", "messages in", "messages out", "errors")


def apis_html(apis: Sequence[Mapping[str, Any]]) -> str:
    """One heading, table and summary line per WebSocket API, as ``/v1/apis`` describes them."""
    out = []
    head = "<tr>" + "".join(f"<th>{escape(name)}</th>" for name in _API_COLUMNS) + "</tr>"
    for api in apis:
        title = f"API {api['name']} ({', '.join(api['listeners'])})"
        out.append(f"<h2>{escape(title)}</h2>")
        out.append(f'<table data-api="{escape(str(api["name"]))}">{head}')
        for route in api["routes"]:
            errors = ", ".join(f"{reason} {count}" for reason, count in route["errors"].items())
            out.append(
                f'<tr data-route="{escape(str(route["key"]))}">'
                + _cell(str(route["key"]))
                + _cell(str(route["target_group"]))
                + _cell(str(route["messages_in"]), "num")
                + _cell(str(route["messages_out"]), "num")
                + _cell(errors)
                + "</tr>"
            )
        out.append("</table>")
        summary = f"{api['connections']} connection(s), {api['group_members']} group membership(s)"
        out.append(f"<p>{escape(summary)}</p>")
    return "".join(out)


def banner_html(text: str, class_name: str = "") -> str:
    """The line above the tables (the script rewrites its text and class)."""
    attribute = f' class="{escape(class_name)}"' if class_name else ""
    return f'<div id="banner"{attribute}>{escape(text)}</div>'


def render(
    template: StatusTemplate,
    *,
    version: str,
    draining: bool,
    listeners: Sequence[Mapping[str, Any]],
    target_groups: Sequence[Mapping[str, Any]],
    now: float,
    apis: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The page with its first view filled in; ``now`` in Unix seconds (certificate days)."""
    at = time.strftime("%H:%M:%S UTC", time.gmtime(now))
    state = "DRAINING" if draining else "serving"
    banner = f"{state} · wsproxy {version} · rendered by the server at {at}"
    return template.render(
        {
            "banner": banner_html(banner, "draining" if draining else ""),
            "listeners": listener_rows_html(listeners, now),
            "apis": apis_html(apis),
            "target_groups": target_groups_html(target_groups),
        }
    )


def render_locked(template: StatusTemplate) -> str:
    """The page without data, for a request without the admin token (the script asks for it)."""
    return template.render(
        {
            "banner": banner_html(
                "the admin API needs a token: send Authorization: Bearer TOKEN to see the "
                "data here (in a browser, the page asks for it)",
                "error",
            ),
            "listeners": "",
            "apis": "",
            "target_groups": "",
        }
    )
