"""The CA's files on disk: layout, atomic writes, key permissions, the index.

Layout under the CA directory::

    ca/ca.pem  ca/ca.key  ca/index.json  ca/crl.pem  ca/settings.json  ca/lock
    issued/NAME.pem (leaf + chain)  issued/NAME.key  issued/NAME.p12

Every write goes to a temporary file in the same directory, is fsynced, then renamed over the
target, so a crash leaves either the old file or the new one. Private keys are created with mode
0600 from the first byte; a key readable by group or others is refused.

Every command that changes the directory holds ``ca/lock`` (an exclusive ``flock``) from its
first read to its last write: two commands that each read the index, add to it and write it back
would otherwise lose one's change (a certificate missing from the index cannot be revoked; a
revocation overwritten by a concurrent issue disappears from the next CRL). Readers take no lock:
each file is replaced whole, so they see the old version or the new one.

Anyone who can open ``ca/lock`` can hold it forever and block every command (the daily ``crl``
among them, until the CRL expires and every client certificate is refused), so it is created
0600 and a lock file that another user owns or may open is refused; it is opened without
following a symbolic link and must be a regular file with one link, so the holder line written
into it can never truncate another file. ``issued/`` (the leaf keys) is created 0700; ``ca/``
stays traversable because the proxy, often another uid, reads ``ca/ca.pem`` and ``ca/crl.pem``
in place.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import re
import shlex
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wsproxy.ca.names import check_printable
from wsproxy.errors import CAError, CAInputError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
INDEX_VERSION = 1
SETTINGS_VERSION = 1
# How long a command waits for another one changing the same CA. The longest hold is an issue
# (signing and three fsynced writes; keys are generated before the lock), well under a second.
LOCK_TIMEOUT_SECONDS = 30.0
LOCK_POLL_SECONDS = 0.02


def check_name(name: str) -> str:
    """A certificate's name, which becomes a file name under issued/; ``CAInputError`` if not."""
    check_printable(name, "certificate name")
    if not NAME_RE.fullmatch(name):
        raise CAInputError(
            f"certificate name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "(it becomes a file name under issued/)"
        )
    return name


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode``, all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh random name (mkstemp: O_EXCL, mode 0600): a temporary file left by a killed
    # command can never collide with a later one.
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temp = Path(temp_name)
    try:
        os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_private_key_file(path: Path) -> bytes:
    """Read a key file, refusing one that group or others may read."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CAError(f"{path} not found") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CAError(
            f"{path} is readable by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}"
        )
    return path.read_bytes()


@dataclass
class IndexEntry:
    name: str
    serial: str  # hex, as openssl prints it
    kind: str  # "server" | "client"
    subject: str
    not_before: str  # ISO 8601 UTC
    not_after: str
    key_type: str
    status: str = "valid"  # "valid" | "revoked"
    revoked_at: str | None = None
    revocation_reason: str | None = None


@dataclass
class Index:
    version: int = INDEX_VERSION
    crl_number: int = 0
    certificates: list[IndexEntry] = field(default_factory=list)

    def find(self, name_or_serial: str, ca_dir: str) -> IndexEntry:
        """The newest certificate with that name, or the one with that serial (hex); the error
        names ``ca_dir`` in its ``wsproxy ca list`` hint."""
        wanted = name_or_serial.lower().removeprefix("0x").replace(":", "")
        by_name = [e for e in self.certificates if e.name == name_or_serial]
        if by_name:
            return by_name[-1]
        for entry in self.certificates:
            if entry.serial == wanted:
                return entry
        raise CAError(
            f"no certificate named or with serial {name_or_serial!r}; "
            f"see `wsproxy ca list --dir {ca_dir}`"
        )


@dataclass
class Settings:
    """What the CA remembers between commands (``ca/settings.json``; absent: the defaults)."""

    version: int = SETTINGS_VERSION
    # Written as the CRL Distribution Points of every certificate issued afterwards.
    crl_urls: list[str] = field(default_factory=list)


class CAStore:
    """Paths and persistence for one CA directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.ca_dir = self.root / "ca"
        self.issued_dir = self.root / "issued"
        self.ca_cert = self.ca_dir / "ca.pem"
        self.ca_key = self.ca_dir / "ca.key"
        self.index_file = self.ca_dir / "index.json"
        self.crl_file = self.ca_dir / "crl.pem"
        self.settings_file = self.ca_dir / "settings.json"
        self.lock_file = self.ca_dir / "lock"

    @contextlib.contextmanager
    def lock(self, command: str, timeout_seconds: float = LOCK_TIMEOUT_SECONDS) -> Iterator[None]:
        """Hold ``ca/lock`` exclusively for a read-modify-write of the directory.

        Waits up to ``timeout_seconds`` for another holder, then raises ``CAError`` naming the
        file and the holder (pid, host, command, since when), which the holder writes into the
        file. The kernel releases an ``flock`` when its holder exits, even on SIGKILL, so a lock
        is never left stale. Creates ``ca/`` when missing (for ``init``). Raises ``CAError`` at
        once for a lock file another user could hold, or a link (``_open_lock_file``).
        """
        self.ca_dir.mkdir(parents=True, exist_ok=True)
        fd = self._open_lock_file()
        try:
            deadline = time.monotonic() + timeout_seconds
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    # Polled rather than blocking: flock has no timeout of its own.
                    if time.monotonic() >= deadline:
                        raise self._lock_timeout(fd, timeout_seconds) from None
                    time.sleep(LOCK_POLL_SECONDS)
            since = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            host = socket.gethostname()
            holder = f"pid {os.getpid()} on {host}, `wsproxy ca {command}` since {since}"
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.encode() + b"\n", 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)  # only a live holder is described
        finally:
            os.close(fd)  # releases the lock

    def _open_lock_file(self) -> int:
        """Open (or create, mode 0600) ``ca/lock``; ``CAError`` unless it is a regular file with
        one link, owned by this process's uid, that group and others cannot open."""
        path = self.lock_file
        unlink_hint = (
            f"remove it (rm {shlex.quote(str(path))}) while no `wsproxy ca` command runs on this "
            "CA; the next command creates it again, mode 0600"
        )
        try:
            # O_NOFOLLOW: a symbolic link planted at ca/lock would have its target truncated.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CAError(
                    f"{path} is a symbolic link, which is never followed; {unlink_hint}"
                ) from None
            raise CAError(f"cannot open {path}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            uid = os.geteuid()
            if not stat.S_ISREG(info.st_mode):
                raise CAError(f"{path} is not a regular file; {unlink_hint}")
            if info.st_nlink != 1:
                # A hard link makes it another file's name too, which the holder line truncates.
                raise CAError(f"{path} has {info.st_nlink} hard links; {unlink_hint}")
            if info.st_uid != uid:
                raise CAError(
                    f"{path} belongs to uid {info.st_uid}, not to uid {uid} running this command; "
                    "its owner could hold it and block every command changing this CA. Run: "
                    f"chown {uid} {shlex.quote(str(path))} && chmod 600 {shlex.quote(str(path))}"
                )
            if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                # Ours but open to others (made 0644 before wsproxy 0.1.1, or chmodded): closed
                # to them from now on, rather than refused, so the daily `ca crl` of a CA made
                # earlier keeps running. Someone who opened it before still holds their
                # descriptor; the lock's timeout then names them.
                os.fchmod(fd, 0o600)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _lock_timeout(self, fd: int, timeout_seconds: float) -> CAError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
        return CAError(
            f"{self.lock_file} is held by {holder} (another command changing this CA); gave "
            f"up after {timeout_seconds:g} s. Run the command again once that one has finished"
        )

    def leaf_cert(self, name: str) -> Path:
        return self.issued_dir / f"{check_name(name)}.pem"

    def leaf_key(self, name: str) -> Path:
        return self.issued_dir / f"{check_name(name)}.key"

    def leaf_p12(self, name: str) -> Path:
        return self.issued_dir / f"{check_name(name)}.p12"

    def exists(self) -> bool:
        return self.ca_cert.exists() or self.ca_key.exists()

    def require(self) -> None:
        if not self.ca_cert.exists() or not self.ca_key.exists():
            raise CAError(
                f"no CA in {self.root}; run `wsproxy ca init --dir {shlex.quote(str(self.root))}` "
                "first"
            )

    def load_index(self) -> Index:
        try:
            raw = json.loads(self.index_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CAError(
                f"{self.index_file} is missing; the CA directory is incomplete "
                "(restore it from a backup)"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CAError(
                f"{self.index_file} is corrupted ({exc}); restore it from a backup: the "
                "certificates under issued/ are intact and list what was issued"
            ) from None
        try:
            if raw.get("version") != INDEX_VERSION:
                raise CAError(f"{self.index_file}: unsupported version {raw.get('version')!r}")
            entries = [IndexEntry(**item) for item in raw["certificates"]]
            return Index(raw["version"], int(raw["crl_number"]), entries)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CAError(
                f"{self.index_file} does not have the expected fields ({exc}); restore it "
                "from a backup"
            ) from None

    def save_index(self, index: Index) -> None:
        data: dict[str, Any] = asdict(index)
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        write_atomic(self.index_file, text.encode(), 0o644)

    def load_settings(self) -> Settings:
        """The CA's settings; the defaults when the file is absent (a CA made before it existed)."""
        try:
            raw = json.loads(self.settings_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return Settings()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CAError(
                f"{self.settings_file} is corrupted ({exc}); restore it from a backup, or delete "
                f"it and set the CRL URL again: `wsproxy ca settings --dir {self.root} "
                "--crl-url URL`"
            ) from None
        try:
            if raw.get("version") != SETTINGS_VERSION:
                raise CAError(f"{self.settings_file}: unsupported version {raw.get('version')!r}")
            urls = raw["crl_urls"]
            if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
                raise TypeError("crl_urls must be a list of strings")
            return Settings(raw["version"], urls)
        except (KeyError, TypeError, AttributeError) as exc:
            raise CAError(
                f"{self.settings_file} does not have the expected fields ({exc}); set them "
                f"again: `wsproxy ca settings --dir {self.root} --crl-url URL`"
            ) from None

    def save_settings(self, settings: Settings) -> None:
        text = json.dumps(asdict(settings), indent=2, sort_keys=True) + "\n"
        write_atomic(self.settings_file, text.encode(), 0o644)
