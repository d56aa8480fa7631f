"""Where the proxies under test listen, without a bind-and-release race.

A port found by binding port 0 and closing the socket again can be taken by any other program
before the proxy binds it. So nothing here releases a port it picked:

- wsproxy binds port 0 itself and says which port each listener got (its ``listener_up`` log
  event, and ``admin_up`` for the admin listener), read back by ``announced_ports``;
- HAProxy and nginx are handed listening sockets this process bound and keeps open for the whole
  run (``held_sockets``): HAProxy through ``bind fd@N``, nginx through its ``NGINX`` environment
  variable (the sockets it inherits across a binary upgrade). A restarted proxy gets the same
  sockets again. As the socket listens before the proxy runs, a connection succeeds at once;
  ``wait_serving`` therefore waits for a WebSocket upgrade answered through it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

BACKLOG = 4096

# ``python -m wsproxy`` as shipped, with one change to what it logs: its lifecycle lines (listener
# and admin up, target health changes: a handful per run) at info, so the ports can be read back,
# while the line per connection stays off as at ``--log-level warning`` (HAProxy and nginx here
# log nothing per connection either). Run as ``[*WSPROXY, *cli_arguments]``. It runs older
# versions of wsproxy too (``loadtest ab``): the logs module moved into ``ops/`` in e8fa092. With
# ``LOADTEST_WSPROXY_ROOT`` set, it refuses to run a wsproxy imported from anywhere else, so an
# A/B run cannot silently measure the same version twice.
_ANNOUNCING = """
import logging, os, sys
import wsproxy
root = os.environ.get("LOADTEST_WSPROXY_ROOT")
if root and not wsproxy.__file__.startswith(os.path.join(root, "wsproxy", "")):
    sys.exit(f"wsproxy was imported from {wsproxy.__file__}, not from {root}")
from wsproxy.cli import main
try:
    from wsproxy.ops.logs import ACCESS_LOGGER
except ImportError:
    from wsproxy.logs import ACCESS_LOGGER
logging.getLogger("wsproxy").setLevel(logging.INFO)
logging.getLogger(ACCESS_LOGGER).setLevel(logging.WARNING)
sys.exit(main(sys.argv[1:]))
"""
WSPROXY = [sys.executable, "-c", _ANNOUNCING]


def announced_ports(
    process: subprocess.Popen[bytes], names: Iterable[str], what: str, timeout: float = 20
) -> dict[str, int]:
    """The port of each named listener (``admin`` for the admin listener), read from the JSON
    log of ``process`` (started with ``--log-format json`` and ``stderr=PIPE``). Once all are
    known, the rest of its log is copied to our stderr by a thread, so the pipe never fills."""
    assert process.stderr is not None
    wanted = set(names)
    ports: dict[str, int] = {}
    seen: list[str] = []
    # readline() blocks; the deadline is kept by a timer that kills a process which never says.
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    try:
        while not wanted <= ports.keys():
            line = process.stderr.readline().decode(errors="replace")
            if not line:
                process.wait()
                raise RuntimeError(
                    f"{what} exited with {process.returncode} before listening "
                    f"(or took over {timeout:g} s):\n{''.join(seen[-20:])}"
                )
            seen.append(line)
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "listener_up":
                    ports[event["listener"]] = int(event["address"].rsplit(":", 1)[1])
                elif event.get("event") == "admin_up":
                    ports["admin"] = int(event["address"].rsplit(":", 1)[1])
    finally:
        timer.cancel()
    threading.Thread(target=_copy_log, args=(process.stderr,), daemon=True).start()
    return ports


def _copy_log(log: Iterable[bytes]) -> None:
    for line in log:
        sys.stderr.write(line.decode(errors="replace"))


def held_sockets(names: Iterable[str]) -> dict[str, socket.socket]:
    """A listening socket on 127.0.0.1 and a port of the kernel's choice per name, inheritable,
    for a proxy that takes sockets from its parent. The caller keeps them open for the run."""
    sockets: dict[str, socket.socket] = {}
    for name in names:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(BACKLOG)
        sock.set_inheritable(True)
        sockets[name] = sock
    return sockets


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def answers_upgrade(url: str, ca_file: str | None, timeout: float = 1.0) -> bool:
    """Whether a WebSocket upgrade to ``url`` (ws:// or wss://, TLS checked against ``ca_file``
    for bench.internal) is answered with a 101 within ``timeout`` seconds."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    try:
        with socket.create_connection((host, port), timeout) as raw:
            if parts.scheme != "wss":
                return _upgraded(raw, request)
            context = ssl.create_default_context(cafile=ca_file)
            with context.wrap_socket(raw, server_hostname="bench.internal") as tls:
                return _upgraded(tls, request)
    except OSError:  # refused, reset, timed out, TLS failed: not serving yet
        return False


def _upgraded(sock: socket.socket, request: bytes) -> bool:
    sock.sendall(request)
    return sock.recv(64).startswith(b"HTTP/1.1 101")


def wait_serving(
    urls: Iterable[str],
    process: subprocess.Popen[bytes],
    what: str,
    ca_file: str | None,
    timeout: float = 20,
) -> None:
    """Until every URL answers a WebSocket upgrade through ``process``; fail if it exits."""
    deadline = time.monotonic() + timeout
    for url in urls:
        while not answers_upgrade(url, ca_file):
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited with {process.returncode} at start")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} does not serve {url} after {timeout:g} s")
            time.sleep(0.05)
