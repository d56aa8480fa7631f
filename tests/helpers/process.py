"""wsproxy as a real process: started from a config file, ports read from its startup log."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from wsproxy.address import Address

WSPROXY = [sys.executable, "-m", "wsproxy"]


class RunningProxy:
    def __init__(self, process: asyncio.subprocess.Process, ports: dict[str, int]) -> None:
        self.process = process
        self.ports = ports
        self.stderr_lines: list[str] = []

    @property
    def port(self) -> int:
        return self.ports["edge"]

    @property
    def admin(self) -> int:
        return self.ports["admin"]

    async def collect_stderr(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.stderr_lines.append(line.decode())

    def cpu_seconds(self) -> float:
        """utime + stime of the proxy process so far, from /proc."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        return ticks / _CLOCK_TICKS

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            async with asyncio.timeout(15):
                await self.process.wait()


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


async def start_proxy(
    config: Path,
    *extra: str,
    listeners: tuple[str, ...] = ("edge",),
    descriptor_limit: int | None = None,
    env: dict[str, str] | None = None,
) -> RunningProxy:
    """Start ``wsproxy run`` and wait until every named listener and the admin listener are up.

    ``descriptor_limit`` sets RLIMIT_NOFILE of the proxy process (through the shell's ulimit:
    no preexec_fn in a process that has threads). ``env``: its whole environment."""
    command = [*WSPROXY, *extra, "run", "-c", str(config)]
    if descriptor_limit is not None:
        command = ["sh", "-c", f'ulimit -n {int(descriptor_limit)} && exec "$@"', "sh", *command]
    process = await asyncio.create_subprocess_exec(
        *command, stderr=asyncio.subprocess.PIPE, env=env
    )
    assert process.stderr is not None
    ports: dict[str, int] = {}
    lines: list[str] = []
    try:
        async with asyncio.timeout(15):
            while len(ports) < len(listeners) + 1:
                line = (await process.stderr.readline()).decode()
                assert line, "".join(lines)
                lines.append(line)
                if found := re.search(r"listener '([\w-]+)' listening on 127\.0\.0\.1:(\d+)", line):
                    ports[found.group(1)] = int(found.group(2))
                if found := re.search(r"admin listening on http://127\.0\.0\.1:(\d+)", line):
                    ports["admin"] = int(found.group(1))
    except BaseException:
        # A proxy that never came up must not outlive the test.
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    running = RunningProxy(process, ports)
    running.stderr_lines = lines
    return running


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``/metrics`` text -> sample name -> [(labels, value)]."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


class TargetProcess:
    """loadtest's echo target in a process of its own: it can be SIGKILLed, and the CPU it
    spends is not the test process's."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loadtest.echo_target"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        self.address = Address("127.0.0.1", int(self.process.stdout.readline().split()[0]))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
