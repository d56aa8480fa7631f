"""``ca/lock`` itself: who may open it, and what it may point at (issue 13, adversarial review).

A user who can open the lock file can hold its ``flock`` forever, and every command changing the
CA then gives up after 30 s: the daily ``wsproxy ca crl`` too, until the CRL expires and every
client certificate is refused. A symbolic or hard link at ``ca/lock`` made the holder line
truncate another file.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.as_user import shared_directory
from wsproxy.ca.authority import CertificateAuthority
from wsproxy.errors import CAError

OTHER_UID = 61235

# Opens the lock file read-only as another uid and holds it, as the review's attack does.
_HOLD_AS_OTHER_USER = """
import fcntl, os, sys, time
os.setgroups([])
os.setgid(int(sys.argv[1]))
os.setuid(int(sys.argv[1]))
try:
    fd = os.open(sys.argv[2], os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError as exc:
    print("refused", type(exc).__name__, flush=True)
    sys.exit(0)
print("held", flush=True)
time.sleep(600)
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def new_ca(directory: Path) -> CertificateAuthority:
    authority = CertificateAuthority(str(directory), lock_timeout_seconds=1)
    authority.init()
    return authority


def test_init_makes_the_lock_file_0600_and_issued_0700(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # the modes must not depend on the caller's umask being strict
    try:
        authority = new_ca(tmp_path / "certs")
    finally:
        os.umask(old_umask)
    assert mode(authority.store.lock_file) == 0o600
    assert mode(authority.store.issued_dir) == 0o700
    assert authority.store.lock_file.stat().st_uid == os.geteuid()


def test_another_user_cannot_hold_the_lock_and_block_the_crl() -> None:
    """A real process as another uid tries the review's attack: open ``ca/lock`` read-only and
    hold ``LOCK_EX``. It is refused, and ``crl`` (as root, the CA's owner) goes through."""
    with shared_directory() as root:
        authority = new_ca(root / "certs")
        attacker = subprocess.Popen(
            [sys.executable, "-c", _HOLD_AS_OTHER_USER, str(OTHER_UID),
             str(authority.store.lock_file)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert attacker.stdout is not None
            outcome = attacker.stdout.readline()
            authority.crl()  # a held lock: CAError after lock_timeout_seconds
            assert outcome == "refused PermissionError\n"
        finally:
            attacker.kill()
            attacker.wait(timeout=30)


def test_a_lock_file_others_may_open_is_closed_to_them(tmp_path: Path) -> None:
    """A lock file left 0644 (as made before the fix, or chmodded) is made 0600 by the next
    command, which goes on: a CA made earlier keeps its daily `ca crl` running."""
    authority = new_ca(tmp_path / "certs")
    lock = authority.store.lock_file
    lock.chmod(0o644)
    authority.issue_client("alice")
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    assert [entry.name for entry in authority.store.load_index().certificates] == ["alice"]


def test_a_lock_file_of_another_owner_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the lock file to another uid")
    authority = new_ca(tmp_path / "certs")
    lock = authority.store.lock_file
    os.chown(lock, OTHER_UID, OTHER_UID)
    with pytest.raises(CAError) as raised:
        authority.crl()
    message = str(raised.value)
    assert f"belongs to uid {OTHER_UID}" in message
    assert f"chown {os.geteuid()} {lock}" in message


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_a_symlink_at_the_lock_is_not_followed(tmp_path: Path, dangling: bool) -> None:
    authority = new_ca(tmp_path / "certs")
    lock = authority.store.lock_file
    victim = tmp_path / "precious"
    if not dangling:
        victim.write_text("keep me\n")
    lock.unlink()
    lock.symlink_to(victim)
    with pytest.raises(CAError) as raised:
        authority.issue_client("alice")
    message = str(raised.value)
    assert f"{lock} is a symbolic link" in message and f"rm {lock}" in message
    if dangling:
        assert not victim.exists()  # O_CREAT through the link would have made it
    else:
        assert victim.read_text() == "keep me\n"
    lock.unlink()
    authority.issue_client("alice")  # recreated as a plain file
    assert mode(lock) == 0o600


def test_a_hard_link_at_the_lock_is_refused(tmp_path: Path) -> None:
    authority = new_ca(tmp_path / "certs")
    lock = authority.store.lock_file
    victim = tmp_path / "precious"
    victim.write_text("keep me\n")
    victim.chmod(0o600)
    lock.unlink()
    os.link(victim, lock)
    with pytest.raises(CAError) as raised:
        authority.crl()
    assert f"{lock} has 2 hard links" in str(raised.value)
    assert victim.read_text() == "keep me\n"


def test_a_directory_at_the_lock_is_refused(tmp_path: Path) -> None:
    authority = new_ca(tmp_path / "certs")
    lock = authority.store.lock_file
    lock.unlink()
    lock.mkdir()
    with pytest.raises(CAError) as raised:
        authority.crl()
    assert f"cannot open {lock}" in str(raised.value)
