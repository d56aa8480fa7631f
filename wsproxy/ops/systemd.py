"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET per state change.

With ``Type=notify`` systemd waits for READY=1 before it starts dependent units, shows STATUS=
in ``systemctl status``, and knows a reload (RELOADING=1 ... READY=1) or a stop (STOPPING=1)
is under way. Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


def notify(*assignments: str) -> bool:
    """Send ``KEY=value`` lines to the service manager; True if a manager was told."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    if target.startswith("@"):  # an abstract socket
        target = "\0" + target[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(assignments).encode(), target)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", target, exc)
        return False
    return True


def ready(status: str) -> None:
    notify("READY=1", f"STATUS={status}")


def reloading() -> None:
    # MONOTONIC_USEC lets systemd tell this reload apart from an earlier one (systemd >= 253).
    notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")


def stopping() -> None:
    notify("STOPPING=1", "STATUS=draining")
