"""A successful reload logs what it changed: one INFO line, and `changes` in the JSON event."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.helpers.pki import make_pki
from wsproxy.config import load_config
from wsproxy.demo import EchoTarget
from wsproxy.ops.logs import JsonFormatter
from wsproxy.proxy import Proxy


def reload_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "reload"]


async def test_reload_logs_what_changed(
    tmp_path: Path, echo_targets: list[EchoTarget], caplog: pytest.LogCaptureFixture
) -> None:
    pki = make_pki(tmp_path)
    cert, key = pki.files("edge")
    first, second = echo_targets[0], echo_targets[1]
    path = tmp_path / "wsproxy.toml"
    text = f"""
[admin]
address = "127.0.0.1:0"
[listeners.edge]
address = "127.0.0.1:0"
protocol = "tls"
websocket = true
default_target_group = "chat"
idle_timeout_seconds = 350
[listeners.edge.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
[target_groups.chat]
targets = [{{ address = "{first.address}" }}]
"""
    path.write_text(text)
    proxy = Proxy(load_config(path), path=str(path))
    await proxy.start()
    caplog.set_level(logging.INFO, logger="wsproxy.proxy")
    try:
        assert await proxy.reload() == []
        (unchanged,) = reload_records(caplog)
        assert unchanged.levelno == logging.INFO
        assert unchanged.getMessage() == f"reloaded {path}: no changes"
        assert unchanged.fields["changes"] == []  # type: ignore[attr-defined]
        caplog.clear()

        path.write_text(
            text.replace("idle_timeout_seconds = 350", "idle_timeout_seconds = 60").replace(
                f'{{ address = "{first.address}" }}]',
                f'{{ address = "{first.address}" }}, {{ address = "{second.address}" }}]\n'
                f'[target_groups.spare]\ntargets = [{{ address = "{second.address}" }}]',
            )
        )
        # The certificate is re-issued under the same file names: only the contents change.
        pki.ca.revoke("edge", "superseded")
        pki.ca.issue_server("edge", ["edge.internal"], ["127.0.0.1"])
        assert await proxy.reload() == []
        (record,) = reload_records(caplog)
        assert record.levelno == logging.INFO
        assert record.getMessage() == (
            f"reloaded {path}: 5 changes: "
            "listener 'edge' changed (idle_timeout_seconds); "
            "target group 'spare' added; "
            f"target {second.address} of target group 'chat' added; "
            f"key file {key} changed (listeners.edge.tls.certificates[0].key); "
            f"certificate file {cert} changed (listeners.edge.tls.certificates[0].cert)"
        )
        event = json.loads(JsonFormatter().format(record))
        assert event["event"] == "reload" and event["result"] == "success"
        assert event["changes"] == [
            {
                "kind": "listener",
                "action": "changed",
                "name": "edge",
                "fields": ["idle_timeout_seconds"],
            },
            {"kind": "target_group", "action": "added", "name": "spare"},
            {
                "kind": "target",
                "action": "added",
                "name": str(second.address),
                "target_group": "chat",
            },
            {
                "kind": "certificate",
                "action": "changed",
                "name": key,
                "used_by": ["listeners.edge.tls.certificates[0].key"],
            },
            {
                "kind": "certificate",
                "action": "changed",
                "name": cert,
                "used_by": ["listeners.edge.tls.certificates[0].cert"],
            },
        ]
        caplog.clear()
        assert await proxy.reload() == []  # compared with the generation just applied
        assert reload_records(caplog)[0].getMessage().endswith(": no changes")
    finally:
        await proxy.shutdown(grace=0)
