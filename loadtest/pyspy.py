"""Where a process's time goes over a window: ``py-spy record`` attached by PID while the window
lasts (``--nonblocking``, so the process is not paused to be sampled), collapsed stacks written
to a file, and the functions that take the most samples, by own time and with what they call.

py-spy is not a dependency: ``pip install py-spy`` anywhere and put it on PATH (or pass its
path). Attaching needs ptrace rights over the process (same user, and Yama's ptrace_scope 0 or
the tracer being an ancestor; here the target is a sibling, so ptrace_scope must be 0).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

RATE = 500  # samples per second: enough for a window of a few seconds


class Recording:
    """``py-spy record`` of ``pid`` into ``out`` (collapsed stacks) until ``stop``."""

    def __init__(self, pid: int, out: Path, py_spy: str | None = None) -> None:
        program = py_spy or shutil.which("py-spy")
        if program is None:
            raise RuntimeError("py-spy is not on PATH: pip install py-spy, or pass --py-spy PATH")
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [program, "record", "--pid", str(pid), "--rate", str(RATE), "--nonblocking",
             "--format", "raw", "--output", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip

    def stop(self) -> None:
        """SIGINT: py-spy writes what it sampled and exits."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            _, err = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        if not self.out.exists():
            raise RuntimeError(f"py-spy wrote no profile: {err.decode(errors='replace')[-500:]}")


def top(out: Path, count: int = 15) -> dict[str, Any]:
    """The functions with the most samples in a collapsed-stacks file: ``own`` (the sample's
    innermost frame) and ``total`` (anywhere on the stack, once per sample), as shares."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in out.read_text().splitlines():
        stack, _, weight = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            n = int(weight)
            frames = [_short(frame) for frame in stack.split(";") if frame]
            if not frames:
                continue
            samples += n
            own[frames[-1]] += n
            for frame in set(frames):
                total[frame] += n
    share = max(samples, 1)
    return {
        "samples": samples,
        "own": [{"function": f, "share": round(n / share, 3)} for f, n in own.most_common(count)],
        "total": [
            {"function": f, "share": round(n / share, 3)} for f, n in total.most_common(count)
        ],
    }


def _short(frame: str) -> str:
    """``function (path/to/module.py:LINE)`` -> ``function (module.py)``: one entry per function,
    whatever line of it was running."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("/site-packages/", "/wsproxy/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/wsproxy/":
                path = "wsproxy/" + path
            elif marker == "/lib/python3.":
                path = path.split("/", 1)[-1]
            break
    return f"{name} ({path})"
