"""Logging setup (text or JSON on stderr) and the one line per finished connection."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

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


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send every wsproxy log to stderr; called once, by the CLI."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log would duplicate ours for the admin listener.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def log_connection(fields: dict[str, Any]) -> None:
    logging.getLogger(ACCESS_LOGGER).info("connection", extra={"connection": fields})
