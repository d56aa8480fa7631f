"""External programs some tests drive (promtool, prometheus, chromium, systemd-analyze).

`.ci/run` installs them and sets WSPROXY_REQUIRE_TOOLS=1, so in CI a missing one fails the test;
on a developer machine without them the test is skipped with the command that installs them.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} not found; install it with `apt-get install {package}`"
    if os.environ.get("WSPROXY_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)
