"""wire/ must stay sans-I/O: importing it pulls in no asyncio, socket, ssl or time."""

from __future__ import annotations

import subprocess
import sys

import pytest

MODULES = [
    "wsproxy.wire.clienthello",
    "wsproxy.wire.cloudevents",
    "wsproxy.wire.forwarding",
    "wsproxy.wire.http1",
    "wsproxy.wire.proxyproto",
    "wsproxy.wire.request_target",
    "wsproxy.wire.route_selection",
    "wsproxy.wire.upgrade",
    "wsproxy.wire.wsframe",
    "wsproxy.wire.wssession",
]


@pytest.mark.parametrize("module", MODULES)
def test_wire_module_imports_no_io(module: str) -> None:
    # The interpreter itself loads `time` at start-up, so only modules new after the import count.
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        f"import {module}\n"
        "new = set(sys.modules) - before\n"
        "bad = sorted({'asyncio', 'socket', 'ssl', 'time', 'selectors'} & new)\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"{module} imports {result.stdout.strip()}"


def test_wire_sources_import_no_io() -> None:
    # `time` is loaded by the interpreter anyway, so read the import statements themselves too.
    import ast
    from pathlib import Path

    import wsproxy.wire

    forbidden = {"asyncio", "socket", "ssl", "time", "selectors"}
    for path in Path(wsproxy.wire.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"
