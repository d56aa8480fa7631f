"""The ``wsproxy ca`` command that makes a missing or expired file, for error messages.

A hint must work as printed, so it names the CA directory (``--dir``) and the certificate name
that the file's path implies in the CA's layout (``DIR/issued/NAME.pem``, ``DIR/ca/ca.pem``,
``DIR/ca/crl.pem``; see ``store.py``). For a path outside that layout it gives the command with
``DIR`` to fill in and says which files to point the config at.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Literal


def _issued(path: Path) -> tuple[str, str] | None:
    """``(quoted CA directory, certificate name)`` for ``DIR/issued/NAME.pem|.key``."""
    if path.parent.name == "issued" and path.suffix in (".pem", ".key"):
        return shlex.quote(str(path.parent.parent)), path.stem
    return None


def issue_hint(path: str, kind: Literal["server", "client"], *, expired: bool = False) -> str:
    """How to mint (or, when ``expired``, renew) the certificate or key at ``path``."""
    dns = " --dns HOST" if kind == "server" else ""
    found = _issued(Path(path))
    if found is None:
        name = shlex.quote(Path(path).stem)
        return (
            f"run `wsproxy ca issue {kind} --name {name}{dns} --dir DIR` (DIR: the CA's "
            f"directory) and point cert and key at DIR/issued/{name}.pem and "
            f"DIR/issued/{name}.key"
        )
    directory, name = found
    issue = f"wsproxy ca issue {kind} --name {shlex.quote(name)}{dns} --dir {directory}"
    if expired:  # the CA refuses a second valid certificate of the same name
        return (
            f"revoke it with `wsproxy ca revoke {shlex.quote(name)} --dir {directory} "
            f"--reason superseded`, then run `{issue}`"
        )
    return f"run `{issue}` to mint it"


def ca_hint(path: str, kind: Literal["ca", "crl"]) -> str:
    """How to create the CA certificate (``kind="ca"``) or publish the CRL at ``path``."""
    file = Path(path)
    command = "init" if kind == "ca" else "crl"
    if file.parent.name == "ca" and file.name == f"{kind}.pem":
        return f"run `wsproxy ca {command} --dir {shlex.quote(str(file.parent.parent))}`"
    return (
        f"run `wsproxy ca {command} --dir DIR` (DIR: the CA's directory) and point the config "
        f"at DIR/ca/{kind}.pem"
    )
