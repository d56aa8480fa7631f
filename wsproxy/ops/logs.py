"""Logging setup (text or JSON on stderr), the one line per finished connection, lifecycle events.

Lines are formatted on the event loop but written by a thread of their own through a bounded
queue: when stderr is slow or blocked (a full pipe, a stalled journald), lines are dropped and
counted (``wsproxy_log_lines_dropped_total``) instead of stalling every session on a write.

Python itself writes to stderr on the calling thread in a few places: "Exception ignored"
reports (an exception raised inside a C callback such as OpenSSL's SNI callback, or in
``__del__``), exceptions that end a thread, warnings, and logging's own errors. ``configure``
routes each of them through the same handler, so no client input can make the event loop wait
on stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sys
import threading
import time
from typing import Any, TextIO

ACCESS_LOGGER = "wsproxy.access"

# The fields of a connection log line, in order (CONVENTIONS.md).
CONNECTION_FIELDS = (
    "client",
    "listener",
    "sni",
    "host",
    "path",
    "target_group",
    "target",
    "tls_version",
    "client_cert_subject",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_seconds",
    "close_code",
    "reason",
    "termination",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; connection records carry their fields at top level."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        connection = getattr(record, "connection", None)
        if isinstance(connection, dict):
            entry["event"] = "connection"
            entry.update(connection)
        else:
            event = getattr(record, "event", None)
            if isinstance(event, str):
                entry["event"] = event
                entry.update(getattr(record, "fields", {}))
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        connection = getattr(record, "connection", None)
        if isinstance(connection, dict):
            record.msg = "connection " + " ".join(
                f"{key}={value}" for key, value in connection.items() if value is not None
            )
            record.args = None
        return super().format(record)


class NonBlockingHandler(logging.Handler):
    """Formats on the caller's thread, writes on its own; drops (and counts) when the queue is
    full rather than blocking the event loop."""

    def __init__(self, stream: TextIO, capacity: int = 10_000) -> None:
        super().__init__()
        self.stream = stream
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=capacity)
        self.dropped_full = 0  # counted by emitters
        self.dropped_failed = 0  # counted by the writer thread (stderr closed or broken)
        self.dropped_unformattable = 0  # records whose message could not be formatted
        self._writer = threading.Thread(target=self._write, name="wsproxy-log", daemon=True)
        self._writer.start()

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_failed + self.dropped_unformattable

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:  # noqa: BLE001  # logging must never raise into the data path
            self.handleError(record)
            return
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self.dropped_full += 1

    def handleError(self, record: logging.LogRecord) -> None:
        """A record that cannot be formatted (a log call whose arguments do not fit its message):
        counted, and a one-line note queued in its place. logging's default prints a traceback
        to stderr on the caller's thread, which would block the event loop on a stalled stderr.
        """
        self.dropped_unformattable += 1
        note = f"logging error: cannot format a record of {record.name} ({record.pathname}:"
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(f"{note}{record.lineno}); dropped\n")

    def _write(self) -> None:
        while True:
            line = self._queue.get()
            if line is None:
                return
            batch = [line]
            while len(batch) < 256:  # one write for a burst of lines
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._flush(batch)
                    return
                batch.append(more)
            self._flush(batch)

    def _flush(self, batch: list[str]) -> None:
        try:
            self.stream.write("".join(batch))
            self.stream.flush()
        except (OSError, ValueError):
            self.dropped_failed += len(batch)

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued, waiting at most ``timeout`` seconds for a blocked stderr."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._writer.join(timeout)
        super().close()


_handler: NonBlockingHandler | None = None


def configure(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every wsproxy log to stderr; called once, by the CLI."""
    global _handler  # one handler per process, replaced by a new configure()
    if _handler is not None:
        _handler.close()
    _handler = NonBlockingHandler(stream or sys.stderr)
    _handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [_handler]
    root.setLevel(level.upper())
    # aiohttp's own access log would duplicate ours for the admin listener.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    install_hooks()


def _short_repr(value: object, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters; a repr that raises is named, not raised."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001  # a broken __repr__ must not lose the report it is part of
        text = f"<{type(value).__name__} object (repr failed)>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def report_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    """``sys.unraisablehook``: an exception Python could not raise to any caller, as one log line
    (``event = "unraisable"``, level warning) through the non-blocking handler.

    CPython reports this way, among others, a server name in a ClientHello that is not ASCII
    (it cannot decode it for the SNI callback, and OpenSSL then refuses the handshake with an
    internal_error alert): a client can cause it at will, hence a warning, not an error.
    """
    try:
        where = unraisable.err_msg or "Exception ignored in"
        target = _short_repr(unraisable.object) if unraisable.object is not None else None
        exc_info = None
        if unraisable.exc_value is not None:
            exc_info = (unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)
        _HOOKS.warning(
            "%s: %s",
            where,
            target,
            exc_info=exc_info,
            extra={"event": "unraisable", "fields": {"object": target}},
        )
    except Exception:  # noqa: BLE001, S110  # a hook that raises is reported on stderr
        pass


def report_thread_exception(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook``: an exception that ended a thread, as one log line
    (``event = "thread_exception"``, level error) through the non-blocking handler."""
    if args.exc_type is SystemExit:
        return  # the default hook ignores it too: a thread that asked to end
    try:
        name = args.thread.name if args.thread is not None else "unknown"
        exc_info = None
        if args.exc_value is not None:
            exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
        _HOOKS.error(
            "thread %s ended by an exception",
            name,
            exc_info=exc_info,
            extra={"event": "thread_exception", "fields": {"thread": name}},
        )
    except Exception:  # noqa: BLE001, S110  # a hook that raises is reported on stderr
        pass


def install_hooks() -> None:
    """Route what Python writes to stderr by itself through the log handler: unraisable
    exceptions, exceptions that end threads, and warnings (logger ``py.warnings``). Called by
    ``configure``; the hooks are process-wide, as the logging configuration is."""
    sys.unraisablehook = report_unraisable
    threading.excepthook = report_thread_exception
    logging.captureWarnings(True)


def flush() -> None:
    """At exit: write out what is queued (bounded wait)."""
    if _handler is not None:
        _handler.close()


def lines_dropped() -> int:
    """Log lines dropped so far because stderr could not keep up."""
    return _handler.dropped if _handler is not None else 0


def log_event(
    logger: logging.Logger,
    event: str,
    message: str,
    *args: object,
    level: int = logging.INFO,
    **fields: Any,
) -> None:
    """A lifecycle event (listener up, target state, reload, drain): a readable message in text
    logs; in JSON, ``event`` plus ``fields`` at top level so they can be queried."""
    logger.log(level, message, *args, extra={"event": event, "fields": fields})


def log_connection(fields: dict[str, Any]) -> None:
    _ACCESS.info("connection", extra={"connection": fields})


def connection_logging() -> bool:
    """Whether connection lines are wanted at all (not at ``--log-level warning``): a flow then
    skips building its line, which is most of what ending a connection costs in Python."""
    return _ACCESS.isEnabledFor(logging.INFO)


_ACCESS = logging.getLogger(ACCESS_LOGGER)
_HOOKS = logging.getLogger("wsproxy.python")
