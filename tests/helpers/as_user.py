"""wsproxy run as another uid, as a deployment runs it: for tests of file permissions.

The tests run as root, which reads every file; the proxy must run as the unprivileged uid the
deploy files name. The child starts as root, imports wsproxy (the interpreter and its standard
library may sit where that uid cannot reach, as under /root/.pyenv), then drops to the uid, its
group and supplementary groups with ``os.setuid`` before ``main`` reads any config or key.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_LAUNCHER = """
import encodings.idna, os, sys
import wsproxy.cli, wsproxy.proxy, wsproxy.process.supervisor, wsproxy.tls, wsproxy.demo
uid, gid, groups = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.setgroups([int(g) for g in groups.split(",") if g])
os.setgid(gid)
os.setuid(uid)
assert os.geteuid() == uid and os.getegid() == gid
sys.exit(wsproxy.cli.main(sys.argv[4:]))
"""


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the proxy runs as another uid and the files belong to root")


def wsproxy_as(uid: int, gid: int, groups: tuple[int, ...], *arguments: str) -> list[str]:
    """The command line that runs ``wsproxy ARGUMENTS`` as ``uid:gid`` with ``groups``."""
    joined = ",".join(str(group) for group in groups)
    return [sys.executable, "-c", _LAUNCHER, str(uid), str(gid), joined, *arguments]


@contextlib.contextmanager
def shared_directory() -> Iterator[Path]:
    """A fresh directory any uid may enter (pytest's tmp_path sits under a 0700 directory);
    removed afterwards. Skips the test unless it runs as root."""
    require_root()
    path = Path(tempfile.mkdtemp(prefix="wsproxy-as-user-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path)
