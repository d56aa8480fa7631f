"""Command line: ``wsproxy run | check-config | demo | connect | ca | asyncapi``.

Exit codes: 0 ok, 1 runtime failure, 2 usage, 78 bad config (EX_CONFIG from sysexits.h).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from wsproxy import __version__
from wsproxy.address import parse_address
from wsproxy.config import Config, load_config, read_config
from wsproxy.errors import ConfigError
from wsproxy.ops import logs, systemd

EX_CONFIG = 78
log = logging.getLogger("wsproxy")


DESCRIPTION = (
    "wsproxy: a WebSocket-aware TCP/TLS load balancer (listeners, rules, target groups, health "
    "checks) with its own certificate authority."
)
EPILOG = (
    "Global options (--log-level, --log-format) go before or after the command. Exit codes: "
    "0 ok, 1 runtime failure, 2 usage, 78 bad config. 'wsproxy COMMAND --help' shows a "
    "command's options; docs/config.md lists every config key."
)
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


def _add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--log-level`` and ``--log-format``, on the top parser (with the defaults) and again on
    every command with ``SUPPRESS`` defaults, so that they are accepted after the command too
    and only override what was given before it when given."""
    group = parser.add_argument_group("global options")
    group.add_argument(
        "--log-level",
        default="info" if top else argparse.SUPPRESS,
        choices=LOG_LEVELS,
        help="log this level and above to stderr (default: info)",
    )
    group.add_argument(
        "--log-format",
        default="text" if top else argparse.SUPPRESS,
        choices=LOG_FORMATS,
        help="text for people, json for log pipelines: one object per line (default: text)",
    )


def _commands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every command parser below ``parser``: ``run``, ``ca``, ``ca issue server``..."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:  # argparse offers no public walk of its command tree
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += [child, *_commands(child)]
    return found


def build_parser() -> argparse.ArgumentParser:
    """The command line: run, check-config, demo, connect, ca, asyncapi (and the internal
    worker)."""
    parser = argparse.ArgumentParser(prog="wsproxy", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"wsproxy {__version__}")
    _add_global_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, title="commands")

    run = commands.add_parser(
        "run",
        help="serve the listeners of a config file",
        description="Serve every listener of a config file until SIGTERM/SIGINT, which drain "
        "(a second signal exits at once); SIGHUP reloads the file.",
    )
    run.add_argument("-c", "--config", required=True, help="the TOML config file")

    # Internal: `run` starts it when [proxy] workers > 1. No help, so argparse leaves it out of
    # the command list; the metavar below leaves it out of the usage line.
    commands.add_parser(
        "worker", description="(internal) one worker process, started by 'wsproxy run'"
    )

    check = commands.add_parser(
        "check-config",
        help="validate a config file; opens no socket",
        description="Validate a config file and read its certificate files, without opening a "
        "socket: exit 0 with a summary, or 78 listing every error.",
    )
    check.add_argument("file", help="the TOML config file")

    demo = commands.add_parser(
        "demo",
        help="echo targets and the proxy, in one command",
        description="Mint a CA, start WebSocket echo targets and the proxy (ws://, wss:// with "
        "client certificates, TLS passthrough), check them and print commands to try.",
    )
    demo.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        help="the ws:// listener's address; wss:// takes port+363, passthrough port+364 "
        "(port 0: any free port) (default: %(default)s)",
    )
    demo.add_argument(
        "--admin",
        default="127.0.0.1:9900",
        help="admin address (port 0: any) (default: %(default)s)",
    )
    demo.add_argument(
        "--duration", type=float, default=0, help="stop after N seconds (default: 0, never)"
    )
    demo.add_argument(
        "--dir", help="keep the demo CA and certificates here (default: a temporary folder)"
    )

    connect = commands.add_parser(
        "connect",
        help="an interactive WebSocket client",
        description="Connect to a ws:// or wss:// URL: each line read from stdin is sent as a "
        "text message, each message received is printed.",
    )
    connect.add_argument("url", help="ws://HOST:PORT/PATH or wss://HOST:PORT/PATH")
    connect.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        help="extra header 'Name: value' (repeatable)",
    )
    connect.add_argument(
        "--subprotocol",
        action="append",
        default=[],
        help="offer this Sec-WebSocket-Protocol (repeatable)",
    )
    connect.add_argument("--cacert", help="CA bundle to verify a wss:// server")
    connect.add_argument("--cert", help="client certificate (PEM) for mTLS")
    connect.add_argument("--key", help="client private key (PEM)")
    connect.add_argument("--insecure", action="store_true", help="do not verify the server")

    from wsproxy.ca.cli import add_parser as add_ca_parser

    add_ca_parser(commands)

    asyncapi = commands.add_parser(
        "asyncapi",
        help="an AsyncAPI 3.0 document of a WebSocket API",
        description="Write an AsyncAPI 3.0 document (JSON) of a WebSocket API of a config file: "
        "its listeners, one message per route key, route responses, the error message and "
        "backend pushes. Opens no socket and reads no certificate file.",
    )
    asyncapi.add_argument("-c", "--config", required=True, help="the TOML config file")
    asyncapi.add_argument(
        "--api", help="which [apis.NAME] to describe (needed when the file has several)"
    )
    asyncapi.add_argument(
        "-o", "--output", help="write the document to this file (default: stdout)"
    )

    commands.metavar = "{" + ",".join(c.dest for c in commands._choices_actions) + "}"
    for command in _commands(parser):
        _add_global_options(command, top=False)
    return parser


def _run_with_signals(
    main: Callable[[asyncio.Event], Coroutine[Any, Any, int | None]],
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
) -> int:
    """Run ``main(stop)`` under uvloop; the first of ``signals`` sets ``stop``, a second exits."""

    async def runner() -> int | None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        received: list[int] = []

        def on_signal(signum: int) -> None:
            received.append(signum)
            if len(received) == 1:
                log.info(
                    "%s received: draining (send it again to exit now)", signal.strsignal(signum)
                )
                stop.set()
            else:
                log.warning("second signal: exiting now")
                logging.shutdown()
                os._exit(1)

        for signum in signals:
            loop.add_signal_handler(signum, on_signal, signum)
        return await main(stop)

    result = uvloop.run(runner())
    return result or 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    from wsproxy.tls import check_files

    try:
        config = check_files(load_config(args.file), args.file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG
    targets = sum(len(group.targets) for group in config.target_groups.values())
    print(
        f"{args.file}: ok: {len(config.listeners)} listener(s), "
        f"{len(config.target_groups)} target group(s), {targets} target(s)"
        + (f", {len(config.apis)} API(s)" if config.apis else "")
    )
    return 0


def _raise_descriptor_limit() -> None:
    """Two descriptors per proxied session: take the hard limit, as HAProxy and nginx do, so a
    default soft limit of 1,024 does not cap the proxy at ~500 sessions."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _cmd_run(args: argparse.Namespace) -> int:
    from wsproxy.tls import check_files

    try:
        config, text = read_config(args.config)
        config = check_files(config, args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG

    _raise_descriptor_limit()

    async def serve(stop: asyncio.Event) -> int:
        from wsproxy.errors import TlsConfigError, WorkerUnavailable
        from wsproxy.process.supervisor import WorkerPool, supervised_proxy
        from wsproxy.proxy import Proxy

        pool: WorkerPool | None = None
        try:
            if config.proxy.worker_count() > 1:
                proxy, pool = supervised_proxy(
                    config, args.config, text, log_level=args.log_level, log_format=args.log_format
                )
            else:
                proxy = Proxy(config, path=args.config, config_text=text)
        except (TlsConfigError, OSError) as exc:
            # A file changed between the check above and its use: still a config problem.
            log.error("%s: %s", args.config, exc)
            return EX_CONFIG
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[list[str]]] = set()

        def on_hangup() -> None:
            task = loop.create_task(proxy.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        # Installed before anything binds: a SIGHUP must never kill a starting proxy.
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        try:
            await proxy.start()
            if pool is not None:
                await pool.start()
        except (OSError, WorkerUnavailable) as exc:
            log.error("%s", exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
            if pool is not None:
                await proxy.shutdown(0)
            return 1
        systemd.ready(proxy.status_line())
        await stop.wait()
        systemd.stopping()
        loop.remove_signal_handler(signal.SIGHUP)
        await asyncio.gather(*reloads, return_exceptions=True)
        await proxy.shutdown()
        return 0

    return _run_with_signals(serve)


def _cmd_worker(args: argparse.Namespace) -> int:
    from wsproxy.process.worker import run_worker

    # Ctrl-C in a terminal reaches the whole process group: the supervisor decides for all.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return _run_with_signals(run_worker, signals=(signal.SIGTERM,))


def _cmd_demo(args: argparse.Namespace) -> int:
    from wsproxy.demo import run_demo

    try:
        listen = parse_address(args.listen, allow_port_zero=True)
        admin = parse_address(args.admin, allow_port_zero=True)
    except ValueError as exc:
        print(f"wsproxy demo: {exc}", file=sys.stderr)
        return 2

    async def demo(stop: asyncio.Event) -> int:
        try:
            await run_demo(listen, admin, args.duration, stop, args.dir)
        except OSError as exc:
            log.error("demo: %s (choose other ports with --listen/--admin)", exc.strerror or exc)
            return 1
        except ConfigError as exc:
            # e.g. --admin on a network address: the demo has no admin token to protect it.
            hint = "keep --admin on 127.0.0.1 for the demo"
            print(f"wsproxy demo: {exc}\n  ({hint})", file=sys.stderr)
            return EX_CONFIG
        return 0

    return _run_with_signals(demo)


def _cmd_connect(args: argparse.Namespace) -> int:
    from wsproxy.connect import client_ssl_context, run_connect

    headers: list[tuple[str, str]] = []
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            print(f"wsproxy connect: --header needs 'Name: value', got {header!r}", file=sys.stderr)
            return 2
        headers.append((name.strip(), value.strip()))
    context = None
    if args.url.startswith("wss://"):
        context = client_ssl_context(args.cacert, args.cert, args.key, args.insecure)
    return uvloop.run(run_connect(args.url, headers, args.subprotocol, context))


def _cmd_asyncapi(args: argparse.Namespace) -> int:
    import json

    from wsproxy.api.asyncapi import document

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG
    names = sorted(config.apis)
    api = args.api
    if api is None and len(names) == 1:
        api = names[0]
    if api is None or api not in config.apis:
        if not names:
            problem = "defines no API; add an [apis.NAME] section"
        elif api is None:
            problem = f"defines {len(names)} APIs: choose one with --api ({', '.join(names)})"
        else:
            problem = f"has no API {api!r}; --api takes one of: {', '.join(names)}"
        print(f"wsproxy asyncapi: {args.config} {problem}", file=sys.stderr)
        return 2
    text = json.dumps(document(config, api), indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(text)
    except OSError as exc:
        print(f"wsproxy asyncapi: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


def _cmd_ca(args: argparse.Namespace) -> int:
    from wsproxy.ca.cli import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": _cmd_run,
        "check-config": _cmd_check_config,
        "worker": _cmd_worker,
        "demo": _cmd_demo,
        "connect": _cmd_connect,
        "ca": _cmd_ca,
        "asyncapi": _cmd_asyncapi,
    }
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        return 1
    finally:
        logs.flush()


__all__ = ["Config", "main"]
