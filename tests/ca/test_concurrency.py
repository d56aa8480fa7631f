"""Concurrent ``wsproxy ca`` commands on one CA directory: real processes, no lost updates.

Every command that changes the directory holds ``ca/lock`` (an exclusive ``flock``) from its
first read to its last write, so concurrent runs are serialised and none overwrites another's
index or CRL. The races below are the ones the adversarial review (issue 13, item 3) found;
the killed-holder test is a guard that passed before the lock existed too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from wsproxy.ca import authority as authority_module
from wsproxy.ca import store as store_module
from wsproxy.ca.authority import CertificateAuthority
from wsproxy.errors import CAError

# RSA-3072 key generation takes tens to hundreds of milliseconds: without the lock it widens the
# window between an issue's read of the index and its write, so the race shows on every run.
SLOW_KEY = ("--key-type", "rsa-3072")


def start(directory: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "wsproxy", "ca", *args, "--dir", str(directory)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(process: subprocess.Popen[str]) -> str:
    out, err = process.communicate(timeout=90)
    assert process.returncode == 0, err
    return out


def index_entries(directory: Path) -> list[dict[str, str]]:
    entries: list[dict[str, str]] = json.loads(
        (directory / "ca" / "index.json").read_text(encoding="utf-8")
    )["certificates"]
    return entries


def crl_serials(directory: Path) -> tuple[int, set[int]]:
    """The CRL's number and the serials it lists."""
    crl = x509.load_pem_x509_crl((directory / "ca" / "crl.pem").read_bytes())
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    return number, {revoked.serial_number for revoked in crl}


def test_eight_concurrent_issues_all_reach_the_index(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    CertificateAuthority(str(directory)).init()
    names = [f"c{n}" for n in range(8)]
    processes = [start(directory, "issue", "client", "--name", name, *SLOW_KEY) for name in names]
    for process in processes:
        finish(process)
    entries = index_entries(directory)
    assert sorted(entry["name"] for entry in entries) == names
    on_disk = {}
    for path in sorted((directory / "issued").glob("*.pem")):
        leaf = x509.load_pem_x509_certificates(path.read_bytes())[0]
        on_disk[path.stem] = f"{leaf.serial_number:x}"
    assert on_disk == {entry["name"]: entry["serial"] for entry in entries}


def test_a_revocation_racing_an_issue_stays_in_every_later_crl(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    authority = CertificateAuthority(str(directory))
    authority.init()
    authority.issue_client("n0")
    revoked: set[int] = set()
    last_number = 0
    for n in range(1, 5):
        # Issue n while revoking n-1: the issue reads the index before the revocation and
        # writes it after, unless the two are serialised.
        issue = start(directory, "issue", "client", "--name", f"n{n}", *SLOW_KEY)
        revoke = start(directory, "revoke", f"n{n - 1}")
        finish(issue)
        finish(revoke)
        revoked.add(int(authority.store.load_index().find(f"n{n - 1}", "").serial, 16))
        number, listed = crl_serials(directory)
        assert number > last_number
        assert listed == revoked, f"round {n}: the CRL lost {revoked - listed}"
        statuses = {entry["name"]: entry["status"] for entry in index_entries(directory)}
        assert statuses == {f"n{k}": "revoked" for k in range(n)} | {f"n{n}": "valid"}
        last_number = number
    # The cron job's re-publication keeps every revocation (the un-revocation of the review).
    finish(start(directory, "crl"))
    assert crl_serials(directory)[1] == revoked


def test_a_held_lock_times_out_naming_the_file_and_holder(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    holder = CertificateAuthority(str(directory))
    holder.init()
    waiter = CertificateAuthority(str(directory), lock_timeout_seconds=0.2)
    with holder.store.lock("revoke", timeout_seconds=1):
        with pytest.raises(CAError) as raised:
            waiter.issue_client("alice")
        message = str(raised.value)
        assert str(holder.store.lock_file) in message
        assert "`wsproxy ca revoke`" in message and "pid" in message
        assert "0.2 s" in message
    assert index_entries(directory) == []  # nothing was written while it waited
    waiter.issue_client("alice")  # and the lock is free again once the holder is done
    assert holder.store.lock_file.read_text(encoding="utf-8") == ""


def test_a_failed_certificate_write_takes_its_entry_back_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index is written before the leaf files (so no certificate on disk is missing from it),
    and a failed leaf write removes the entry again."""
    authority = CertificateAuthority(str(tmp_path / "certs"))
    authority.init()
    real_write = store_module.write_atomic

    def full_disk(path: Path, data: bytes, mode: int) -> None:
        if path.parent.name == "issued" and path.suffix == ".pem":
            assert [e["name"] for e in index_entries(tmp_path / "certs")] == ["alice"]
            raise OSError("disk full")
        real_write(path, data, mode)

    monkeypatch.setattr(authority_module, "write_atomic", full_disk)
    with pytest.raises(OSError, match="disk full"):
        authority.issue_client("alice")
    monkeypatch.undo()
    assert index_entries(tmp_path / "certs") == []
    authority.issue_client("alice")  # the name is free: nothing claims it


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    """The kernel drops an flock with its holder, so a command killed mid-write (SIGKILL, OOM)
    blocks nobody afterwards.

    A guard, not a regression test: it passed before the fix too, since it checks the kernel's
    flock behaviour. It fails if the lock is ever moved to something that outlives its holder
    (a pid file, a lock directory, an O_EXCL marker)."""
    directory = tmp_path / "certs"
    authority = CertificateAuthority(str(directory), lock_timeout_seconds=10)
    authority.init()
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys, time\n"
            "from wsproxy.ca.store import CAStore\n"
            "with CAStore(sys.argv[1]).lock('issue client'):\n"
            "    print('locked', flush=True)\n"
            "    time.sleep(600)\n",
            str(directory),
        ],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert "`wsproxy ca issue client`" in authority.store.lock_file.read_text()
        holder.kill()
        holder.wait(timeout=30)
        authority.issue_client("alice")
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert [entry["name"] for entry in index_entries(directory)] == ["alice"]


def test_concurrent_inits_make_one_root(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    processes = [start(directory, "init", "--name", f"CA {n}") for n in range(4)]
    results = [(process.communicate(timeout=90), process.returncode) for process in processes]
    assert sorted(code for _, code in results) == [0, 1, 1, 1], results
    assert all("already exists" in err for (_, err), code in results if code)
    authority = CertificateAuthority(str(directory))
    authority.issue_client("alice")  # the key on disk matches the certificate on disk
    winner = next(out for (out, _), code in results if code == 0)
    assert f"created CA '{authority.ca_certificate.subject.rfc4514_string()[3:]}'" in winner
