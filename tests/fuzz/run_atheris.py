"""Coverage-guided fuzzing of the targets in targets.py with atheris (libFuzzer).

    python -m tests.fuzz.run_atheris TARGET [SECONDS] [libFuzzer flags...]
    python -m tests.fuzz.run_atheris all 5          # every target, 5 s each (what CI runs)

The corpus starts from seeds.py; a crashing input is written to
$TMPDIR/wsproxy-fuzz-crashes/TARGET-crash-* and the process exits non-zero (rerun it with
``python -m tests.fuzz.run_atheris TARGET 0 FILE``). Each input is bounded in time (-timeout)
and the process in memory (-rss_limit_mb), so a hang or a leak is a failure too.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["wsproxy"]):
    from tests.fuzz.targets import TARGETS


def fuzz_one(name: str, seconds: int, extra: list[str]) -> None:
    from tests.fuzz.seeds import seeds

    target = TARGETS[name]
    corpus = Path(tempfile.mkdtemp(prefix=f"wsproxy-fuzz-{name}-"))
    for index, seed in enumerate(seeds()[name]):
        (corpus / f"seed-{index}").write_bytes(b"\x00" + seed)  # first byte: chunking
    artifacts = Path(tempfile.gettempdir()) / "wsproxy-fuzz-crashes"
    artifacts.mkdir(exist_ok=True)
    flags = [
        f"-max_total_time={seconds}",
        "-timeout=5",
        "-rss_limit_mb=1024",
        f"-artifact_prefix={artifacts}/{name}-",
        *extra,
    ]
    atheris.Setup([sys.argv[0], *flags, str(corpus)], target)
    atheris.Fuzz()


def main() -> int:
    name = sys.argv[1] if len(sys.argv) > 1 else "all"
    seconds = int(sys.argv[2]) if len(sys.argv) > 2 else 60
    extra = sys.argv[3:]
    if name != "all":
        fuzz_one(name, seconds, extra)  # exits the process when done
        return 0
    failed = []
    for each in sorted(TARGETS):  # one process per target: libFuzzer exits when it is done
        command = [sys.executable, "-m", "tests.fuzz.run_atheris", each, str(seconds), *extra]
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        print(f"{each}: exit {result.returncode}: {last}", flush=True)
        if result.returncode != 0:
            print(result.stderr[-4000:], file=sys.stderr)
            failed.append(each)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
