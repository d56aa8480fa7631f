"""config_diff: what a reload changes, from two configs and their TLS files' digests (pure)."""

from __future__ import annotations

import json
import tomllib

import pytest

from wsproxy.config import Config
from wsproxy.config_diff import Action, Change, Kind, diff, summary, tls_files

BASE = """
[admin]
address = "127.0.0.1:9900"

[listeners.edge]
address = "0.0.0.0:8443"
protocol = "tls"
websocket = true
default_target_group = "chat"
[listeners.edge.tls]
certificates = [{ cert = "/c/edge.pem", key = "/c/edge.key" }]
client_auth = "required"
client_ca = "/c/ca.pem"
crl = "/c/crl.pem"

[listeners.plain]
address = "0.0.0.0:8080"
default_target_group = "chat"

[target_groups.chat]
algorithm = "round_robin"
targets = [{ address = "10.0.0.1:80" }, { address = "10.0.0.2:80", weight = 2 }]
[target_groups.chat.health_check]
interval_seconds = 10

[target_groups.secure]
protocol = "tls"
tls = { ca = "/c/ca.pem", client_cert = "/c/wsproxy.pem", client_key = "/c/wsproxy.key" }
targets = [{ address = "10.0.1.1:443" }]
"""


def config(text: str) -> Config:
    # Structure only: the files named need not exist for a pure comparison.
    return Config.model_validate(tomllib.loads(text))


def edit(*replacements: tuple[str, str]) -> Config:
    text = BASE
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new, 1)
    return config(text)


DIGESTS = {path: path.encode() for path in tls_files(config(BASE))}

CASES: list[tuple[str, Config, list[Change]]] = [
    ("nothing", config(BASE), []),
    (
        "listener address",
        edit(('"0.0.0.0:8443"', '"0.0.0.0:9443"')),
        [Change(Kind.LISTENER, Action.CHANGED, "edge", ("address",))],
    ),
    (
        "nested key",
        edit(('client_auth = "required"', 'client_auth = "required"\npolicy = "modern"')),
        [Change(Kind.LISTENER, Action.CHANGED, "edge", ("tls.policy",))],
    ),
    (
        "rules are one key",
        edit(
            (
                "[listeners.edge.tls]",
                '[[listeners.edge.rules]]\npath_prefix = "/v2/"\ntarget_group = "chat"\n'
                "[listeners.edge.tls]",
            )
        ),
        [Change(Kind.LISTENER, Action.CHANGED, "edge", ("rules",))],
    ),
    (
        "listener removed and added",
        edit(("[listeners.plain]", "[listeners.api]")),
        [
            Change(Kind.LISTENER, Action.ADDED, "api"),
            Change(Kind.LISTENER, Action.REMOVED, "plain"),
        ],
    ),
    (
        "group setting, targets untouched",
        edit(('algorithm = "round_robin"', 'algorithm = "random_two"')),
        [Change(Kind.TARGET_GROUP, Action.CHANGED, "chat", ("algorithm",))],
    ),
    (
        "health check key",
        edit(("interval_seconds = 10", "interval_seconds = 6")),
        [Change(Kind.TARGET_GROUP, Action.CHANGED, "chat", ("health_check.interval_seconds",))],
    ),
    (
        "targets only: no group entry",
        edit(
            ('{ address = "10.0.0.1:80" }, ', ""),
            ("weight = 2 }]", 'weight = 3 }, { address = "10.0.0.3:80" }]'),
        ),
        [
            Change(Kind.TARGET, Action.REMOVED, "10.0.0.1:80", target_group="chat"),
            Change(Kind.TARGET, Action.CHANGED, "10.0.0.2:80", ("weight",), "chat"),
            Change(Kind.TARGET, Action.ADDED, "10.0.0.3:80", target_group="chat"),
        ],
    ),
    (
        "group added: its targets are part of it",
        edit(
            (
                "[target_groups.secure]",
                '[target_groups.more]\ntargets = [{ address = "10.9.9.9:1" }]\n'
                "[target_groups.secure]",
            )
        ),
        [Change(Kind.TARGET_GROUP, Action.ADDED, "more")],
    ),
    (
        "admin settings apply at restart",
        edit(('"127.0.0.1:9900"', '"127.0.0.1:9901"')),
        [Change(Kind.SETTINGS, Action.CHANGED, "admin", ("address",))],
    ),
    (
        "a certificate file renamed",
        edit(('"/c/edge.pem"', '"/c/edge-2.pem"')),
        [
            Change(Kind.LISTENER, Action.CHANGED, "edge", ("tls.certificates",)),
            Change(
                Kind.CERTIFICATE,
                Action.ADDED,
                "/c/edge-2.pem",
                used_by=("listeners.edge.tls.certificates[0].cert",),
            ),
            Change(
                Kind.CERTIFICATE,
                Action.REMOVED,
                "/c/edge.pem",
                used_by=("listeners.edge.tls.certificates[0].cert",),
            ),
        ],
    ),
]


@pytest.mark.parametrize(("new", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_config_changes(new: Config, expected: list[Change]) -> None:
    new_digests = {path: path.encode() for path in tls_files(new)}
    assert diff(config(BASE), new, DIGESTS, new_digests) == expected


def test_a_file_changed_under_the_same_name() -> None:
    old, new = config(BASE), config(BASE)
    changed = {**DIGESTS, "/c/ca.pem": b"another CA", "/c/crl.pem": b"a newer CRL"}
    assert diff(old, new, DIGESTS, changed) == [
        Change(
            Kind.CERTIFICATE,
            Action.CHANGED,
            "/c/ca.pem",
            used_by=("listeners.edge.tls.client_ca", "target_groups.secure.tls.ca"),
        ),
        Change(Kind.CERTIFICATE, Action.CHANGED, "/c/crl.pem", used_by=("listeners.edge.tls.crl",)),
    ]
    # Unreadable both times: nothing to say; readable again: it changed.
    unreadable = {**DIGESTS, "/c/edge.key": None}
    assert diff(old, new, unreadable, unreadable) == []
    assert [c.name for c in diff(old, new, unreadable, DIGESTS)] == ["/c/edge.key"]


def test_descriptions_and_summary() -> None:
    new = edit(
        ('"127.0.0.1:9900"', '"127.0.0.1:9901"'),
        ('"0.0.0.0:8443"', '"0.0.0.0:9443"'),
        ("weight = 2 }]", 'weight = 2 }, { address = "10.0.0.3:80" }]'),
    )
    digests = {**DIGESTS, "/c/edge.key": b"new key"}
    changes = diff(config(BASE), new, DIGESTS, digests)
    assert [change.describe() for change in changes] == [
        "[admin] changed (address) (applies at the next restart)",
        "listener 'edge' changed (address)",
        "target 10.0.0.3:80 of target group 'chat' added",
        "key file /c/edge.key changed (listeners.edge.tls.certificates[0].key)",
    ]
    assert summary(changes).startswith("4 changes: [admin] changed (address)")
    assert summary([]) == "no changes"
    assert summary(changes[1:2]) == "1 change: listener 'edge' changed (address)"
    assert json.loads(json.dumps([change.as_dict() for change in changes])) == [
        {"kind": "settings", "action": "changed", "name": "admin", "fields": ["address"]},
        {"kind": "listener", "action": "changed", "name": "edge", "fields": ["address"]},
        {"kind": "target", "action": "added", "name": "10.0.0.3:80", "target_group": "chat"},
        {
            "kind": "certificate",
            "action": "changed",
            "name": "/c/edge.key",
            "used_by": ["listeners.edge.tls.certificates[0].key"],
        },
    ]


def test_a_long_summary_is_cut_but_counts_everything() -> None:
    many = ", ".join(f'{{ address = "10.1.0.{i}:80" }}' for i in range(25))
    new = edit(("weight = 2 }]", f"weight = 2 }}, {many}]"))
    changes = diff(config(BASE), new, DIGESTS, DIGESTS)
    assert len(changes) == 25
    text = summary(changes)
    assert text.startswith("25 changes: ") and text.endswith(
        "and 5 more (the JSON event lists them all)"
    )
    assert text.count("added") == 20
