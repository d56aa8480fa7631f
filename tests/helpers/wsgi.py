"""A real WSGI target: the stdlib's wsgiref server in a thread, answering with what the app saw.

WSGI (PEP 3333, after CGI) names a request header ``HTTP_`` + its name upper-cased with ``-`` read
as ``_``, so ``X-Forwarded-For`` and ``X_Forwarded_For`` land on the same key, and wsgiref joins
repeated keys with a comma. That folding is what a forged identity header relies on, so tests of
the proxy's header rules look at the environ an application gets, not only at the bytes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from wsproxy.address import Address


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Keep the access lines of wsgiref off the test's stderr."""


def _environ_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """Answer with the JSON object of the request's ``HTTP_*`` environ keys."""
    seen = {key: value for key, value in environ.items() if key.startswith("HTTP_")}
    body = json.dumps(seen).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


class WsgiTarget:
    """wsgiref serving ``_environ_app`` on 127.0.0.1 (a port of its own) from a daemon thread."""

    def __init__(self) -> None:
        self._server: WSGIServer = make_server(
            "127.0.0.1", 0, _environ_app, handler_class=_QuietHandler
        )
        self.address = Address("127.0.0.1", self._server.server_port)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def environ_of(response: bytes) -> dict[str, str]:
    """The ``HTTP_*`` environ the WSGI app reported in a response forwarded by the proxy."""
    head, sep, body = response.partition(b"\r\n\r\n")
    assert sep and b" 200 " in head.split(b"\r\n", 1)[0], response[:200]
    seen: dict[str, str] = json.loads(body)
    return seen
