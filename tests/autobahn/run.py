"""Runs Autobahn|Testsuite's fuzzing client against a WebSocket server and judges the report.

``wstest -m fuzzingclient`` (installed by ``tests/autobahn/install.sh``) connects to the server's
``ws://`` URL once per case, and writes ``reports/servers/index.json``: one entry per case with
its ``behavior`` (the messages and frames the server sent back) and ``behaviorClose`` (how it
closed). A case passes when both are OK, NON-STRICT or INFORMATIONAL; anything else (FAILED,
WRONG CODE, UNCLEAN, UNIMPLEMENTED, ...) fails it.

Cases whose messages or frames are over the API's size limits (``max_frame_bytes = 32768``,
``max_message_bytes = 131072``) get Close 1009, which Autobahn counts as a failure; they are left
out (``SIZE_LIMIT_EXCLUSIONS``, each with its reason). Every case left out was measured: it fails
with 1009 under those limits and passes with the limits off (see tests/autobahn/README.md).

By hand::

    bash tests/autobahn/install.sh
    python -m tests.autobahn.run ws://127.0.0.1:9001/ [--all] [--cases 1.* 7.*] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

INSTALL_SCRIPT = "tests/autobahn/install.sh"
AGENT = "wsproxy"
PASSING = frozenset({"OK", "NON-STRICT", "INFORMATIONAL"})

# Whole run of the CI selection: about 40 s of cases here; the bound is for a server that stops
# answering (wstest then waits on each case's own timeout, minutes long).
DEFAULT_TIMEOUT_SECONDS = 600.0


@dataclass(frozen=True, slots=True)
class Exclusion:
    """Cases left out of a run: a wstest case pattern (``*`` matches any rest) and why."""

    pattern: str
    reason: str


_FRAME = "a single frame over max_frame_bytes (32768)"
_DEFLATED_FRAME = (
    "a compressed frame that inflates to more than max_frame_bytes (32768): the limit bounds "
    "each frame's inflated size too (deflate bombs get 1009)"
)
_MESSAGE = "a message over max_message_bytes (131072)"
_AT_MESSAGE = (
    "at max_message_bytes (131072) once inflated, counted as over it by the bounded inflate "
    "(passes with the limit off)"
)

# Measured, not guessed: with the stand-in at max_frame_bytes = 32768 and max_message_bytes =
# 131072, exactly these cases failed, each with the server's Close 1009, and each passed once
# the limits were off. 9.7.* and 9.8.* (1000 small messages) are within the limits and stay in.
SIZE_LIMIT_EXCLUSIONS: tuple[Exclusion, ...] = (
    Exclusion("1.1.6", f"text message of 65535 bytes in one frame: {_FRAME}"),
    Exclusion("1.1.7", f"text message of 65536 bytes in one frame: {_FRAME}"),
    Exclusion("1.1.8", f"text message of 65536 bytes in one frame, sent in chops: {_FRAME}"),
    Exclusion("1.2.6", f"binary message of 65535 bytes in one frame: {_FRAME}"),
    Exclusion("1.2.7", f"binary message of 65536 bytes in one frame: {_FRAME}"),
    Exclusion("1.2.8", f"binary message of 65536 bytes in one frame, sent in chops: {_FRAME}"),
    Exclusion("9.1.*", f"text messages of 64 KiB to 16 MiB in one frame: {_FRAME}; {_MESSAGE}"),
    Exclusion("9.2.*", f"binary messages of 64 KiB to 16 MiB in one frame: {_FRAME}; {_MESSAGE}"),
    Exclusion("9.3.*", f"a 4 MiB text message in fragments of 64 B to 4 MiB: {_MESSAGE}"),
    Exclusion("9.4.*", f"a 4 MiB binary message in fragments of 64 B to 4 MiB: {_MESSAGE}"),
    Exclusion("9.5.*", f"a 1 MiB text message in one frame, sent in chops: {_FRAME}; {_MESSAGE}"),
    Exclusion("9.6.*", f"a 1 MiB binary message in one frame, sent in chops: {_FRAME}; {_MESSAGE}"),
    *(
        Exclusion(
            f"{group}.{kind}.{n}", f"{size} bytes compressed into one frame: {_DEFLATED_FRAME}"
        )
        for group, kinds in ((12, 5), (13, 7))
        for kind in range(1, kinds + 1)
        for n, size in ((9, 65536), (10, 131072))
    ),
    Exclusion(
        "12.4.8", f"32768 random bytes grow when compressed, over 32768 on the wire: {_FRAME}"
    ),
    *(
        Exclusion(f"12.{kind}.{n}", f"131072 bytes sent as compressed fragments: {_DEFLATED_FRAME}")
        for kind, ns in ((1, (17, 18)), (2, (18,)), (3, (18,)))
        for n in ns
    ),
    *(
        Exclusion(
            f"13.{offer}.{n}", f"131072 bytes sent as compressed fragments: {_DEFLATED_FRAME}"
        )
        for offer in range(1, 8)
        for n in (17, 18)
    ),
    # These still got 1009 with max_frame_bytes off and passed only with max_message_bytes off:
    # a message of exactly max_message_bytes, whose compressed form is over it (random bytes,
    # 12.4), or that websockets' bounded inflate reports as over it (12.2, 12.3, 12.5: not yet
    # known whether a message one byte under the limit passes).
    *(
        Exclusion(f"12.{kind}.{n}", f"a message of 131072 bytes, compressed: {_AT_MESSAGE}")
        for kind, ns in (
            (2, (15, 16, 17)),
            (3, (15, 16)),
            (4, (10, 15, 16, 17, 18)),
            (5, (15, 16, 17, 18)),
        )
        for n in ns
    ),
)


@dataclass(frozen=True, slots=True)
class CaseResult:
    """One case of the report. ``duration_ms`` is wstest's own measure."""

    case: str
    behavior: str
    behavior_close: str
    remote_close_code: int | None
    duration_ms: int

    @property
    def passed(self) -> bool:
        return self.behavior in PASSING and self.behavior_close in PASSING

    def __str__(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        return (
            f"{verdict} {self.case}: {self.behavior} / close {self.behavior_close} "
            f"(server's close code {self.remote_close_code}, {self.duration_ms} ms)"
        )


class AutobahnError(Exception):
    """wstest could not be run, did not finish, or wrote no report."""


def case_key(case: str) -> tuple[int, ...]:
    """Sort key: 9.10.1 after 9.2.1."""
    return tuple(int(part) for part in case.split("."))


def find_wstest() -> Path | None:
    """The wstest that install.sh installed, or the one WSPROXY_WSTEST names; None if neither."""
    named = os.environ.get("WSPROXY_WSTEST")
    if named:
        path = Path(named)
        return path if os.access(path, os.X_OK) else None
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    home = Path(os.environ.get("WSPROXY_AUTOBAHN_HOME") or cache / "wsproxy" / "autobahn")
    path = home / "venv" / "bin" / "wstest"
    stamp = home / "venv" / ".wsproxy-installed"
    # The stamp is written last: without it the install did not finish.
    return path if stamp.is_file() and os.access(path, os.X_OK) else None


def write_spec(
    path: Path,
    url: str,
    *,
    cases: Sequence[str] = ("*",),
    exclude: Iterable[Exclusion] = SIZE_LIMIT_EXCLUSIONS,
) -> None:
    """The fuzzingclient spec: one server (agent ``wsproxy``) at ``url``, its report under
    ``path.parent / "reports" / "servers"``."""
    if not url.startswith(("ws://", "wss://")):
        raise AutobahnError(f"Autobahn needs a ws:// or wss:// URL, not {url!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = {
        "outdir": str(path.parent / "reports" / "servers"),
        "servers": [{"agent": AGENT, "url": url}],
        "cases": list(cases),
        "exclude-cases": [exclusion.pattern for exclusion in exclude],
        "exclude-agent-cases": {},
    }
    path.write_text(json.dumps(spec, indent=2) + "\n")


def parse_report(index: Path, agent: str = AGENT) -> list[CaseResult]:
    """The cases of ``reports/servers/index.json``, in case order."""
    try:
        report = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise AutobahnError(f"cannot read the Autobahn report {index}: {exc}") from None
    if agent not in report:
        raise AutobahnError(f"the Autobahn report {index} has no agent {agent!r}")
    results = [
        CaseResult(
            case=case,
            behavior=str(entry["behavior"]),
            behavior_close=str(entry["behaviorClose"]),
            remote_close_code=entry.get("remoteCloseCode"),
            duration_ms=int(entry.get("duration", 0)),
        )
        for case, entry in report[agent].items()
    ]
    return sorted(results, key=lambda result: case_key(result.case))


def _last_case(log: Path) -> str:
    lines = [
        line for line in log.read_text(errors="replace").splitlines() if "test case ID" in line
    ]
    return lines[-1].strip() if lines else "none started"


async def run_fuzzingclient(
    url: str,
    *,
    wstest: Path,
    workdir: Path,
    cases: Sequence[str] = ("*",),
    exclude: Iterable[Exclusion] = SIZE_LIMIT_EXCLUSIONS,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
) -> list[CaseResult]:
    """Run ``wstest -m fuzzingclient`` against ``url`` in ``workdir`` (spec, log and HTML report
    stay there), and return every case it ran. Async so that a server in the same event loop
    keeps serving; past ``timeout_seconds`` wstest is killed and AutobahnError names the last
    case it started."""
    spec = workdir / "spec.json"
    write_spec(spec, url, cases=cases, exclude=exclude)
    log = workdir / "wstest.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            str(wstest),
            "-m",
            "fuzzingclient",
            "-s",
            str(spec),
            cwd=workdir,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            status = await asyncio.wait_for(process.wait(), timeout_seconds)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AutobahnError(
                f"wstest did not finish within {timeout_seconds:.0f} s against {url}; "
                f"last case: {_last_case(log)}; log: {log}"
            ) from None
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
    index = workdir / "reports" / "servers" / "index.json"
    if status != 0 or not index.is_file():
        tail = log.read_text(errors="replace")[-2000:]
        raise AutobahnError(
            f"wstest exited with {status} and report {index}; its log ends:\n{tail}"
        )
    return parse_report(index)


def failures(results: Iterable[CaseResult]) -> list[CaseResult]:
    return [result for result in results if not result.passed]


def summary(results: Sequence[CaseResult]) -> str:
    failed = failures(results)
    return f"autobahn: {len(results) - len(failed)} passed, {len(failed)} failed"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run Autobahn|Testsuite's fuzzing client against a ws:// URL."
    )
    parser.add_argument("url", help="the server, e.g. ws://127.0.0.1:9001/")
    parser.add_argument("--cases", nargs="+", default=["*"], help="wstest case patterns")
    parser.add_argument(
        "--all", action="store_true", help="also run the cases over the size limits"
    )
    parser.add_argument("--keep", type=Path, help="write spec, log and report here")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS)
    args = parser.parse_args(argv)
    wstest = find_wstest()
    if wstest is None:
        print(f"wstest is not installed: run `bash {INSTALL_SCRIPT}`", file=sys.stderr)
        return 2
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="autobahn-"))
    exclude = () if args.all else SIZE_LIMIT_EXCLUSIONS
    started = time.monotonic()
    try:
        results = asyncio.run(
            run_fuzzingclient(
                args.url,
                wstest=wstest,
                workdir=workdir,
                cases=args.cases,
                exclude=exclude,
                timeout_seconds=args.timeout,
            )
        )
    except AutobahnError as exc:
        print(f"autobahn: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    for result in results:
        print(result)
    print(f"autobahn: {time.monotonic() - started:.1f} s")
    print(summary(results))
    return 1 if failures(results) else 0


if __name__ == "__main__":
    sys.exit(main())
