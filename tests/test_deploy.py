"""The files in deploy/ are checked by the tools that will consume them."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers.tools import require_tool

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def run(*command: str, cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_alert_rules_are_valid_and_their_unit_tests_pass() -> None:
    promtool = require_tool("promtool", "prometheus")
    prometheus_dir = DEPLOY / "prometheus"
    assert "SUCCESS: 9 rules found" in run(
        promtool, "check", "rules", "alerts.yml", cwd=prometheus_dir
    )
    assert "SUCCESS" in run(promtool, "test", "rules", "alerts_test.yml", cwd=prometheus_dir)


def test_prometheus_config_is_valid() -> None:
    promtool = require_tool("promtool", "prometheus")
    run(promtool, "check", "config", "prometheus.yml", cwd=DEPLOY / "prometheus")
