"""``python -m loadtest ab``: two versions of wsproxy side by side, measured in alternating rounds.

    python -m loadtest ab --base REV [--head REV|PATH] [--scenarios ...] [--rounds 5] [--seconds 4]

Each version's source is a git worktree of REV made for the run in a temp directory (removed at
the end), or a checkout given by its path (the default head: this working tree, uncommitted
changes included). Both versions run at once, each ``python -m wsproxy run`` with ``PYTHONPATH``
and the working directory at its own source (the launcher refuses a wsproxy imported from
elsewhere), from the same generated config and certificates, every listener bound to port 0 and
read back from the log. Both are pinned to core 0 (``taskset``), this process (the load
generator) and the echo target to core 1, as in ``compare``. Every round runs each scenario
against A and B, the order reversed every round, so drift of a shared machine hits both alike.

Reported per scenario, for A and B: median and range (min-max) over the rounds of the proxy's CPU
per operation (bytes per idle session for ``hold-*``, each in a freshly started process), the
ratio B/A of the medians, the ratio B/A within each round (median and range), and a verdict:
``worse`` when every B round cost more than every A round, ``better`` when every B round cost
less, ``within spread`` otherwise (no verdict under 4 rounds). Rounds and seconds are bounded;
so is the whole run (``--budget-minutes``: rounds not yet started when it runs out are skipped,
and the report says so). Every process started is stopped by PID, every worktree added is removed.

``--instructions`` counts instead of timing, for the ``echo-*`` and ``connect-*`` scenarios: each
round starts each version afresh under valgrind's callgrind twice, serving exactly N and then 3N
operations on each of ``--instr-sessions`` sessions (echo round trips) or workers (connects);
the difference of the two totals over 2N operations is the instructions per operation, with
start-up and shutdown cancelled out. Free of the machine's noise, repeatable to about 2 %.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvloop

from loadtest import compare, scenarios
from loadtest.client import Endpoint, open_session
from loadtest.compare import LOAD_CORE, PROXY_CORE, Bench, Run
from loadtest.scenarios import Result

ROOT = Path(__file__).resolve().parent.parent
LABELS = ("A", "B")
MAX_ROUNDS = 20
MAX_HOLD = 9000  # the fd hard limit here is 20,000; each session holds two proxy descriptors
GIT_TIMEOUT = 120.0
# Two samples of the same distribution fall apart by chance with probability 2 / C(2n, n): 10 %
# at 3 rounds each, 2.9 % at 4, 0.8 % at 5. Below 4 rounds no verdict is given.
MIN_VERDICT_ROUNDS = 4
MAX_OPS = 5000  # --instructions: operations per session in the shorter count

# ab scenario -> (the ``compare`` scenario it runs, the wsproxy listener it runs against).
SCENARIOS: dict[str, tuple[str, str]] = {
    "connect-ws": ("connect-ws", "ws"),
    "connect-stream": ("connect-ws", "stream"),
    "connect-wss": ("connect-wss", "tls"),
    "connect-passthrough": ("connect-wss", "passthrough"),
    "echo-100-ws": ("echo-100", "ws"),
    "echo-100-stream": ("echo-100", "stream"),
    "echo-1-ws": ("echo-1", "ws"),
    "echo-tls": ("echo-tls", "tls"),
    "throughput-ws": ("throughput", "ws"),
    "throughput-stream": ("throughput", "stream"),
    "hold-ws": ("hold", "ws"),
    "hold-stream": ("hold", "stream"),
    "hold-tls": ("hold", "tls"),
}
DEFAULT_SCENARIOS = (
    "connect-ws,connect-stream,connect-wss,echo-100-ws,echo-100-stream,hold-ws,hold-tls"
)


class AbError(Exception):
    """A version or an option that cannot be used; the message says what to give instead."""


@dataclass
class Version:
    """One side of the comparison: the source tree its wsproxy is imported from."""

    label: str
    spec: str  # what was given: a revision or a path
    root: Path
    commit: str  # full hash ("" outside git)
    description: str
    worktree: Path | None = None  # added for this run, removed at the end

    def popen(self) -> dict[str, Any]:
        """How its wsproxy is started: its source first on the path, and as working directory
        (``python -c`` puts the working directory before ``PYTHONPATH``)."""
        env = {**os.environ, "PYTHONPATH": str(self.root), "LOADTEST_WSPROXY_ROOT": str(self.root)}
        return {"env": env, "cwd": str(self.root)}


def _git(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-C", str(cwd), *args],
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT,
        check=False,
    )


def materialise(label: str, spec: str, scratch: Path) -> Version:
    """The source of ``spec``: a directory holding ``wsproxy/`` as it is, else a git revision of
    this repository checked out into a new worktree under ``scratch``."""
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "wsproxy" / "__init__.py").is_file():
        root = path.resolve()
        head = _git("rev-parse", "HEAD", cwd=root)
        commit = head.stdout.strip() if head.returncode == 0 else ""
        dirty = _git("status", "--porcelain", "--", "wsproxy", cwd=root).stdout.strip()
        state = " with uncommitted changes in wsproxy/" if dirty else ""
        at = f" at {commit[:10]}{state}" if commit else ""
        return Version(label, spec, root, commit, f"checkout {root}{at}")
    resolved = _git("rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}")
    if resolved.returncode != 0:
        raise AbError(
            f"{label} = {spec!r} is neither a directory holding wsproxy/ nor a revision of the "
            f"git repository {ROOT}; give a commit, branch or tag (see `git log --oneline`) "
            "or the path of a checkout"
        )
    commit = resolved.stdout.strip()
    where = scratch / f"{label}-{commit[:12]}"
    added = _git("worktree", "add", "--detach", "--quiet", str(where), commit)
    if added.returncode != 0:
        raise AbError(f"git worktree add {where} {commit[:12]} failed: {added.stderr.strip()}")
    subject = _git("log", "-1", "--format=%s", commit).stdout.strip()
    version = Version(label, spec, where, commit, f"{commit[:10]} ({subject})", worktree=where)
    if not (where / "wsproxy" / "__init__.py").is_file():
        remove_worktree(version)
        raise AbError(f"revision {spec} ({commit[:12]}) has no wsproxy/ package")
    return version


def remove_worktree(version: Version) -> None:
    """Remove the worktree added for ``version`` (and git's record of it)."""
    if version.worktree is None:
        return
    removed = _git("worktree", "remove", "--force", str(version.worktree))
    if removed.returncode != 0:
        print(f"git worktree remove {version.worktree}: {removed.stderr.strip()}", file=sys.stderr)
        _git("worktree", "prune")
    version.worktree = None


# --- measuring -----------------------------------------------------------------------------------


def metric_of(kind: str, result: Result) -> tuple[str, float | None]:
    """(unit, value) compared between A and B: CPU per operation, or bytes per idle session."""
    if result["scenario"] == "instructions":
        return "instructions/op", float(result["instructions_per_op"])
    if kind == "hold":
        value = result.get("marginal_bytes_per_session")
        return "B/session", float(value) if value is not None else None
    return compare.cost_per_op(result)


async def measure(
    bench: Bench, names: list[str], args: argparse.Namespace, deadline: float
) -> tuple[list[Run], list[str]]:
    """Every scenario, ``args.rounds`` rounds of A and B in alternating order. Returns the runs
    and what was skipped because the time budget ran out."""
    runs: list[Run] = []
    skipped: list[str] = []
    for name in names:
        kind, listener = SCENARIOS[name]
        for round_no in range(args.rounds):
            if time.monotonic() > deadline:
                skipped.append(f"{name} rounds {round_no + 1}-{args.rounds}")
                break
            for label in LABELS if round_no % 2 == 0 else LABELS[::-1]:
                system = bench.systems[f"{label}-{listener}"]
                if kind == "hold" and system.pid is not None:
                    # A fresh process: memory an earlier scenario left to the allocator would
                    # otherwise flatter whichever version ran more before.
                    bench.restart(system.pid)
                result = await compare.run_one(kind, system, args, bench.ca_file)
                result.pop("latency_sample", None)
                runs.append(Run(name, label, round_no, result))
                unit, value = metric_of(kind, result)
                errors = f", errors {result['errors']}" if result.get("errors") else ""
                shown = f"{value:,.3f}" if value is not None else "n/a"
                print(f"[{time.strftime('%H:%M:%S')}] {name:<16} {label} round {round_no + 1}: "
                      f"{shown} {unit}{errors}", file=sys.stderr, flush=True)  # fmt: skip
    return runs, skipped


# --- counting instructions ----------------------------------------------------------------------


async def fixed_load(kind: str, endpoint: Endpoint, parallel: int, ops: int) -> None:
    """Exactly ``ops`` operations on each of ``parallel`` sessions (``echo``: round trips of
    128 B) or workers (``connect``: open, upgrade, close): the same work for either version."""
    payload = bytes(128)

    async def echo() -> None:
        session = await open_session(endpoint, timeout=300)
        for _ in range(ops):
            session.send(payload)
            _, data = await session.receive()
            if data != payload:
                raise RuntimeError(f"echo through {endpoint.port}: a message came back changed")
        await session.close(timeout=60)

    async def connect() -> None:
        for _ in range(ops):
            session = await open_session(endpoint, timeout=300)
            await session.close(timeout=60)

    one = echo if kind.startswith("echo") else connect
    await asyncio.gather(*(one() for _ in range(parallel)))


def callgrind_total(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {path}")


@dataclass
class Counting:
    """What ``--instructions`` needs to start a version's proxy afresh for every count."""

    bench: Bench
    versions: dict[str, Version]
    echo: int
    echo_tls: int
    cert: str
    key: str
    started: int = 0

    def instructions(self, label: str, listener: str, kind: str, ops: int, parallel: int) -> int:
        """Instructions the proxy process of version ``label`` executed, from start to exit,
        serving ``ops`` operations on each of ``parallel`` sessions or workers."""
        self.started += 1
        name = f"{label}-count{self.started}"
        out = self.bench.workdir / f"callgrind-{name}.out"
        wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--quiet"]
        if shutil.which("taskset"):
            wrapper = ["taskset", "-c", PROXY_CORE, *wrapper]
        popen = self.versions[label].popen()
        popen["env"]["PYTHONHASHSEED"] = "0"  # the same dict and set layouts in every run
        process = compare.start_wsproxy(
            self.bench, self.echo, self.echo_tls, self.cert, self.key, name, wrapper, **popen
        )
        try:
            system = self.bench.systems[f"{name}-{listener}"]
            endpoint = Endpoint.from_url(
                system.url, cacert=self.bench.ca_file, server_hostname="bench.internal"
            )
            uvloop.run(fixed_load(kind, endpoint, parallel, ops))
        finally:
            process.terminate()  # a drain with nothing left to drain, then exit: callgrind writes
            process.wait(timeout=300)
            for suffix in ("stream", "ws", "tls", "passthrough"):
                self.bench.systems.pop(f"{name}-{suffix}", None)
        return callgrind_total(out)


def measure_instructions(
    counting: Counting, names: list[str], args: argparse.Namespace, deadline: float
) -> tuple[list[Run], list[str]]:
    """Per scenario and round, A and B in alternating order: instructions per operation."""
    runs: list[Run] = []
    skipped = [name for name in names if not SCENARIOS[name][0].startswith(("echo", "connect"))]
    small, large = args.ops, 3 * args.ops
    for name in names:
        kind, listener = SCENARIOS[name]
        if name in skipped:
            continue
        parallel = 1 if kind == "echo-1" else args.instr_sessions
        for round_no in range(args.rounds):
            if time.monotonic() > deadline:
                skipped.append(f"{name} rounds {round_no + 1}-{args.rounds}")
                break
            for label in LABELS if round_no % 2 == 0 else LABELS[::-1]:
                counts = [
                    counting.instructions(label, listener, kind, ops, parallel)
                    for ops in (small, large)
                ]
                per_op = (counts[1] - counts[0]) / ((large - small) * parallel)
                result = {
                    "scenario": "instructions",
                    "kind": kind,
                    "ops": [small, large],
                    "parallel": parallel,
                    "instructions": counts,
                    "instructions_per_op": round(per_op, 1),
                    "errors": {},
                }
                runs.append(Run(name, label, round_no, result))
                print(f"[{time.strftime('%H:%M:%S')}] {name:<16} {label} round {round_no + 1}: "
                      f"{per_op:,.0f} instructions/op", file=sys.stderr, flush=True)  # fmt: skip
    return runs, skipped


# --- report --------------------------------------------------------------------------------------


def _spread(values: list[float]) -> dict[str, Any]:
    median = statistics.median(values)
    return {
        "median": round(median, 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "spread": round((max(values) - min(values)) / median, 3) if median else None,
        "values": [round(v, 3) for v in values],
    }


def summarize(runs: list[Run], names: list[str]) -> dict[str, dict[str, Any]]:
    """Per scenario: A's and B's figures, B/A of the medians, B/A per round, the verdict."""
    table: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = [run for run in runs if run.scenario == name]
        if not mine:
            continue
        counted = mine[0].result["scenario"] == "instructions"
        kind = "instructions" if counted else SCENARIOS[name][0]
        unit = metric_of(kind, mine[0].result)[0]
        entry: dict[str, Any] = {"unit": unit, "kind": kind}
        by_round: dict[str, dict[int, float]] = {label: {} for label in LABELS}
        for label in LABELS:
            rows = [run for run in mine if run.system == label]
            values = [v for v in (metric_of(kind, run.result)[1] for run in rows) if v is not None]
            side: dict[str, Any] = _spread(values) if values else {"median": None}
            side["errors"] = sum(sum(run.result["errors"].values()) for run in rows)
            if kind == "hold":
                side["alive"] = [run.result["alive_at_end"] for run in rows]
                side["sessions"] = [run.result["steps"][-1]["sessions"] for run in rows]
            elif kind == "instructions":
                small, large = rows[0].result["ops"]
                side["load"] = f"{small} / {large} ops x {rows[0].result['parallel']}"
            else:
                side["rate_unit"], _ = compare.rate_of(rows[0].result)
                side["rate"] = round(
                    statistics.median(compare.rate_of(run.result)[1] for run in rows), 1
                )
            for run in rows:
                value = metric_of(kind, run.result)[1]
                if value is not None:
                    by_round[label][run.round] = value
            entry[label] = side
        a, b = entry["A"], entry["B"]
        if a["median"] and b["median"] is not None:
            entry["ratio"] = round(b["median"] / a["median"], 3)
            paired = [
                by_round["B"][r] / by_round["A"][r]
                for r in sorted(by_round["A"].keys() & by_round["B"].keys())
                if by_round["A"][r]
            ]
            if paired:
                entry["ratio_per_round"] = _spread(paired)
            if len(paired) < MIN_VERDICT_ROUNDS:
                entry["verdict"] = f"n/a (< {MIN_VERDICT_ROUNDS} rounds)"
            elif b["min"] > a["max"]:
                entry["verdict"] = "worse"
            elif b["max"] < a["min"]:
                entry["verdict"] = "better"
            else:
                entry["verdict"] = "within spread"
        else:
            entry["verdict"] = "no figures"
        table[name] = entry
    return table


def _figure(side: dict[str, Any], digits: int) -> str:
    return "n/a" if side.get("median") is None else f"{side['median']:,.{digits}f}"


def _span(side: dict[str, Any], digits: int) -> str:
    if side.get("median") is None:
        return ""
    return f"{side['min']:,.{digits}f}-{side['max']:,.{digits}f}"


def command_line(args: argparse.Namespace) -> str:
    parts = ["python", "-m", "loadtest", "ab", "--base", args.base, "--head", args.head]
    parts += ["--scenarios", ",".join(args.scenarios), "--rounds", str(args.rounds)]
    if args.instructions:
        parts += ["--instructions", "--ops", str(args.ops)]
        parts += ["--instr-sessions", str(args.instr_sessions)]
    else:
        parts += ["--seconds", f"{args.seconds:g}", "--sessions", str(args.sessions)]
        parts += ["--hold", str(args.hold)]
    parts += ["--out", args.out, "--name", args.name]
    return shlex.join(parts)


def markdown(
    table: dict[str, dict[str, Any]],
    versions: list[Version],
    args: argparse.Namespace,
    skipped: list[str],
    seconds: float,
) -> str:
    a, b = versions
    if args.instructions:
        how = (
            f"Instructions counted by valgrind's callgrind: each round starts each version afresh "
            f"twice, serving {args.ops} and then {3 * args.ops} operations on each of "
            f"{args.instr_sessions} sessions (echo round trips of 128 B) or workers (connect, "
            "upgrade, close); instructions per operation = the difference of the two totals / "
            f"the difference of operations. {args.rounds} rounds, A and B alternating."
        )
    else:
        how = (
            f"Both proxies running at once, pinned to core {PROXY_CORE}; load generator and echo "
            f"target on core {LOAD_CORE}; {args.rounds} rounds x {args.seconds:g} s per scenario, "
            "A and B alternating, the order reversed every round. "
            f"`hold-*`: {args.hold} idle sessions, each round in a freshly started process, "
            "bytes per session = RSS slope between the first and the last step."
        )
    lines = [
        f"A/B of wsproxy: A = {a.description}; B = {b.description}.",
        "",
        f"`{command_line(args)}` ({seconds:.0f} s end to end). {how}",
        "",
        "Verdict: `worse` = every B round cost more than every A round (B's min > A's max), "
        "`better` = the reverse, `within spread` otherwise (with 5 rounds, two samples of the "
        "same version fall apart by chance 0.8 % of the time). B/A per round pairs the two "
        "runs of the same round.",
        "",
        "| scenario | unit | A median | A min-max | B median | B min-max | B/A | B/A per round "
        "(median, min-max) | verdict | rate A | rate B | errors A / B |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in table.items():
        sa, sb = e["A"], e["B"]
        digits = 0 if e["kind"] in ("hold", "instructions") else 3

        paired = e.get("ratio_per_round")
        pairs = f"{paired['median']} ({paired['min']}-{paired['max']})" if paired else ""
        if e["kind"] == "hold":
            rate_a = f"alive {min(sa['alive'])}/{max(sa['sessions'])}"
            rate_b = f"alive {min(sb['alive'])}/{max(sb['sessions'])}"
        elif e["kind"] == "instructions":
            rate_a, rate_b = sa["load"], sb["load"]
        else:
            rate_a = f"{sa['rate']:,} {sa['rate_unit']}"
            rate_b = f"{sb['rate']:,} {sb['rate_unit']}"
        lines.append(
            f"| {name} | {e['unit']} | {_figure(sa, digits)} | {_span(sa, digits)} "
            f"| {_figure(sb, digits)} | {_span(sb, digits)} "
            f"| {e.get('ratio', '')} | {pairs} | {e['verdict']} | {rate_a} | {rate_b} "
            f"| {sa['errors']} / {sb['errors']} |"
        )
    if skipped:
        lines += ["", "Not run (not counted in instructions, or --budget-minutes ran out): "
                  + "; ".join(skipped) + "."]  # fmt: skip
    return "\n".join(lines)


# --- entry point ---------------------------------------------------------------------------------


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "ab", help="two versions of wsproxy (git revisions or checkouts), alternating rounds"
    )
    parser.add_argument("--base", required=True, help="A: a git revision, or a checkout's path")
    parser.add_argument(
        "--head", default=str(ROOT), help="B: a git revision, or a checkout's path (default: here)"
    )
    parser.add_argument(
        "--scenarios", default=DEFAULT_SCENARIOS, help=f"comma list of: {', '.join(SCENARIOS)}"
    )
    parser.add_argument("--rounds", type=int, default=5, help=f"at least 1, at most {MAX_ROUNDS}")
    parser.add_argument("--seconds", type=float, default=4.0, help="per version, scenario, round")
    parser.add_argument("--sessions", type=int, default=100, help="sessions of echo-100/echo-tls")
    parser.add_argument("--throughput-size", type=int, default=64 * 1024)
    parser.add_argument("--hold", type=int, default=4000, help=f"idle sessions, at most {MAX_HOLD}")
    parser.add_argument(
        "--budget-minutes", type=float, default=90.0, help="rounds not started by then are skipped"
    )
    parser.add_argument("--out", default="loadtest/results", help="where reports are written")
    parser.add_argument("--name", default="ab", help="report file names: NAME.md, NAME.json")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per operation under valgrind (echo-*, connect-*) instead",
    )
    parser.add_argument(
        "--ops", type=int, default=200, help=f"--instructions: N (then 3N), at most {MAX_OPS}"
    )
    parser.add_argument(
        "--instr-sessions", type=int, default=4, help="--instructions: sessions or workers"
    )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl-C, so the proxies are stopped and the worktrees removed.
    raise KeyboardInterrupt


def run_ab(args: argparse.Namespace) -> int:
    args.rounds = max(1, min(args.rounds, MAX_ROUNDS))
    args.seconds = min(max(args.seconds, 0.2), 120.0)
    args.hold = max(10, min(args.hold, MAX_HOLD))
    args.ops = max(1, min(args.ops, MAX_OPS))
    args.instr_sessions = max(1, min(args.instr_sessions, 100))
    if args.instructions and shutil.which("valgrind") is None:
        print("--instructions needs valgrind: apt-get install valgrind", file=sys.stderr)
        return 2
    args.scenarios = [s for s in str(args.scenarios).split(",") if s]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown or not args.scenarios:
        print(f"unknown scenarios {unknown}; choose from: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {LOAD_CORE})  # the load generator and the echo target
    scenarios.raise_fd_limit()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + 60 * args.budget_minutes
    previous = signal.signal(signal.SIGTERM, _interrupt)
    versions: list[Version] = []
    try:
        with tempfile.TemporaryDirectory(prefix="wsproxy-ab-") as name:
            scratch = Path(name)
            bench = Bench(scratch)
            try:
                for label, spec in zip(LABELS, (args.base, args.head), strict=True):
                    versions.append(materialise(label, spec, scratch))
                bench.ca_file, cert, key = compare.mint_certificates(bench.workdir)
                echo, echo_tls = compare.start_echo(bench, cert, key)
                if args.instructions:
                    by_label = {version.label: version for version in versions}
                    counting = Counting(bench, by_label, echo, echo_tls, cert, key)
                    runs, skipped = measure_instructions(counting, args.scenarios, args, deadline)
                else:
                    for version in versions:
                        compare.start_wsproxy(
                            bench, echo, echo_tls, cert, key, version.label, **version.popen()
                        )
                    runs, skipped = uvloop.run(measure(bench, args.scenarios, args, deadline))
            finally:
                bench.stop_all()
                for version in versions:
                    remove_worktree(version)
    except AbError as exc:
        print(f"loadtest ab: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    elapsed = time.monotonic() - started
    table = summarize(runs, args.scenarios)
    report = markdown(table, versions, args, skipped, elapsed)
    (out / f"{args.name}.md").write_text(report + "\n")
    document = {
        "command": command_line(args),
        "settings": vars(args),
        "versions": [
            {
                "label": v.label,
                "spec": v.spec,
                "commit": v.commit,
                "description": v.description,
                "root": str(v.root),
            }
            for v in versions
        ],
        "machine": compare.machine(),
        "seconds": round(elapsed, 1),
        "skipped": skipped,
        "summary": table,
        "runs": [
            {"scenario": r.scenario, "version": r.system, "round": r.round, "result": r.result}
            for r in runs
        ],
    }
    (out / f"{args.name}.json").write_text(json.dumps(document, indent=1))
    print(json.dumps({"summary": table, "versions": document["versions"],
                      "seconds": document["seconds"]}))  # fmt: skip
    print(report)
    print(f"written: {out / (args.name + '.md')}, {out / (args.name + '.json')}")
    return 0
