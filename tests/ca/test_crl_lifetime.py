"""The CRL's lifetime and the advice to refresh it agree (issue 13, item 14, CA side).

A CRL past its nextUpdate makes the proxy refuse every client certificate, so the refresh must
come well inside the lifetime, every command that publishes a CRL says when it expires, and the
docs and the shipped timer give the same numbers as the code.
"""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
from pathlib import Path

from cryptography import x509

from tests.helpers.tools import require_tool
from wsproxy.ca.authority import CRL_DAYS, CRL_REFRESH_HOURS

ROOT = Path(__file__).resolve().parents[2]
TIMER = ROOT / "deploy" / "systemd" / "wsproxy-crl.timer"
SERVICE = TIMER.with_suffix(".service")
# Runs that may fail in a row before the CRL expires: a weekend of a broken timer at least.
MISSED_RUNS_TOLERATED = 5


def ca(directory: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "wsproxy", "ca", *args, "--dir", str(directory)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def published_until(directory: Path) -> str:
    crl = x509.load_pem_x509_crl((directory / "ca" / "crl.pem").read_bytes())
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc <= dt.timedelta(days=CRL_DAYS, minutes=5)
    return f"{crl.next_update_utc:%Y-%m-%d %H:%M:%S} UTC"


def test_every_command_that_publishes_a_crl_says_when_it_expires(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    for command in (["init"], ["issue", "client", "--name", "alice"], ["revoke", "alice"], ["crl"]):
        out = ca(directory, *command)
        if command[0] == "issue":  # publishes nothing
            assert "CRL" not in out
            continue
        assert f"CRL valid until {published_until(directory)}" in out, out
        assert f"({CRL_DAYS} days)" in out and "wsproxy ca crl" in out, out
        assert "daily" in out, out


def test_the_shipped_timer_refreshes_well_inside_the_crl_lifetime(tmp_path: Path) -> None:
    settings = dict(
        line.split("=", 1) for line in TIMER.read_text().splitlines() if re.match(r"^\w+=", line)
    )
    analyze = require_tool("systemd-analyze", "systemd")
    calendar = subprocess.run(
        [analyze, "calendar", "--iterations=2", settings["OnCalendar"]],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    elapses = [
        dt.datetime.strptime(match, "%Y-%m-%d %H:%M:%S")
        for match in re.findall(r"(?:Next elapse|Iter\. #2): \w+ (\S+ \S+)", calendar)
    ]
    assert len(elapses) == 2, calendar
    interval = elapses[1] - elapses[0]
    assert interval == dt.timedelta(hours=CRL_REFRESH_HOURS)
    delay = dt.timedelta(seconds=int(settings["RandomizedDelaySec"].removesuffix("h")) * 3600)
    # Every missed run costs one interval; the random delay can push the next one later.
    assert (MISSED_RUNS_TOLERATED + 1) * interval + delay < dt.timedelta(days=CRL_DAYS)
    assert settings["Persistent"] == "true"  # a run missed while the machine was off runs at boot
    assert "wsproxy ca crl --dir" in SERVICE.read_text()
    # Both units verify as shipped (with ExecStart pointing at this environment's wsproxy).
    wsproxy = str(Path(sys.executable).parent / "wsproxy")
    for unit in (TIMER, SERVICE):
        text = unit.read_text().replace("/opt/wsproxy/venv/bin/wsproxy", wsproxy)
        (tmp_path / unit.name).write_text(text)
    verify = subprocess.run(
        [analyze, "verify", str(tmp_path / TIMER.name), str(tmp_path / SERVICE.name)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stderr


def test_docs_give_the_lifetime_and_refresh_of_the_code() -> None:
    """Wherever `ca crl` is advised, the lifetime is CRL_DAYS and nothing says weekly (a weekly
    refresh of a 7-day CRL leaves no margin at all)."""
    files = [ROOT / "README.md", ROOT / "certs" / "README.md", *sorted(ROOT.glob("docs/*.md"))]
    files += [path for path in sorted((ROOT / "deploy").rglob("*")) if path.is_file()]
    files.append(ROOT / "wsproxy" / "ca" / "cli.py")
    mentions = 0
    for path in files:
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            if "ca crl" not in line and "ca/crl.pem" not in line:
                continue
            mentions += 1
            nearby = " ".join(lines[max(0, number - 1) : number + 3])
            where = f"{path.relative_to(ROOT)}:{number + 1}"
            assert "weekly" not in nearby, where
            for days in re.findall(r"(\d+)[ -]days?\b", nearby):
                if "CRL" in nearby and "alert" not in nearby:
                    assert int(days) == CRL_DAYS, (where, nearby)
    assert mentions >= 5
    operations = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    assert "deploy/systemd/wsproxy-crl.timer" in operations
    assert f"valid {CRL_DAYS} days" in operations and "daily" in operations
