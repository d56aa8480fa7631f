"""``wsproxy ca …``: the CA's command line."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from cryptography import x509

from wsproxy.ca.authority import (
    CA_DAYS,
    CLIENT_DAYS,
    CRL_DAYS,
    CRL_REFRESH_HOURS,
    KEY_TYPES,
    REASONS,
    SERVER_DAYS,
    CertificateAuthority,
)
from wsproxy.errors import CAError, CAInputError


def add_parser(commands: Any) -> None:
    """``wsproxy ca ...`` under ``commands`` (the top parser's subparsers)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default="certs", help="the CA's directory (default: %(default)s)")
    ca = commands.add_parser(
        "ca",
        help="wsproxy's own certificate authority",
        description="wsproxy's own certificate authority: a root, server and client "
        "certificates, revocation and a CRL, all kept under --dir (see certs/README.md).",
    )
    actions = ca.add_subparsers(dest="ca_command", required=True, title="commands")

    init = actions.add_parser(
        "init", parents=[common], help=f"create the root (ECDSA P-256, {CA_DAYS} days)"
    )
    init.add_argument(
        "--name", default="wsproxy CA", help="the root's common name (default: %(default)s)"
    )
    crl_url_help = (
        "http URL where clients fetch the CRL, written into every certificate issued from now on "
        "(repeatable), e.g. http://wsproxy.internal:9900/v1/crl"
    )
    init.add_argument("--crl-url", action="append", default=[], help=crl_url_help)

    issue = actions.add_parser("issue", help="issue a server or client certificate")
    kinds = issue.add_subparsers(dest="kind", required=True, title="kinds")
    name_help = "certificate name: writes issued/NAME.pem and issued/NAME.key under --dir"
    key_help = "key algorithm (default: %(default)s)"
    server = kinds.add_parser("server", parents=[common], help="serverAuth certificate with SANs")
    server.add_argument("--name", required=True, help=name_help)
    server.add_argument("--dns", action="append", default=[], help="DNS SAN (repeatable)")
    server.add_argument("--ip", action="append", default=[], help="IP SAN (repeatable)")
    server.add_argument(
        "--days",
        type=int,
        default=SERVER_DAYS,
        help="validity in days, at most the CA's own (default: %(default)s)",
    )
    server.add_argument("--key-type", choices=KEY_TYPES, default="ec-p256", help=key_help)
    client = kinds.add_parser("client", parents=[common], help="clientAuth certificate")
    client.add_argument("--name", required=True, help=name_help)
    client.add_argument("--cn", help="subject common name (default: the name)")
    client.add_argument(
        "--days",
        type=int,
        default=CLIENT_DAYS,
        help="validity in days, at most the CA's own (default: %(default)s)",
    )
    client.add_argument("--key-type", choices=KEY_TYPES, default="ec-p256", help=key_help)

    revoke = actions.add_parser(
        "revoke", parents=[common], help="revoke by name or serial and publish a CRL"
    )
    revoke.add_argument("certificate", help="name or serial (hex)")
    revoke.add_argument(
        "--reason",
        choices=list(REASONS),
        default="unspecified",
        help="the reason recorded in the CRL (RFC 5280 §5.3.1) (default: %(default)s)",
    )

    actions.add_parser(
        "crl",
        parents=[common],
        help=f"publish a fresh CRL (valid {CRL_DAYS} days; run it daily, e.g. from "
        "deploy/systemd/wsproxy-crl.timer)",
    )
    settings = actions.add_parser(
        "settings", parents=[common], help="show or change what the CA writes into certificates"
    )
    urls = settings.add_mutually_exclusive_group()
    urls.add_argument("--crl-url", action="append", help=crl_url_help)
    urls.add_argument(
        "--no-crl-url", action="store_true", help="issue certificates without a CRL location"
    )
    actions.add_parser("list", parents=[common], help="every certificate issued, with its status")

    export = actions.add_parser(
        "export-p12", parents=[common], help="PKCS#12 bundle for browsers and curl"
    )
    export.add_argument("name", help="the certificate's name; writes issued/NAME.p12 under --dir")
    export.add_argument("--password", help="protect the bundle (default: none)")


def run(args: argparse.Namespace) -> int:
    authority = CertificateAuthority(args.dir)
    try:
        return _dispatch(authority, args)
    except CAInputError as exc:  # a malformed value: usage, as argparse's own errors
        print(f"wsproxy ca: {exc}", file=sys.stderr)
        return 2
    except CAError as exc:
        print(f"wsproxy ca: {exc}", file=sys.stderr)
        return 1


def _crl_validity(
    authority: CertificateAuthority, crl: x509.CertificateRevocationList | None = None
) -> str:
    """When the CRL just published expires, and how to publish it again before then."""
    if crl is None:
        crl = x509.load_pem_x509_crl(authority.store.crl_file.read_bytes())
    until = f"{crl.next_update_utc:%Y-%m-%d %H:%M:%S} UTC" if crl.next_update_utc else "never"
    every = "daily" if CRL_REFRESH_HOURS == 24 else f"every {CRL_REFRESH_HOURS} hours"
    directory = shlex.quote(str(authority.store.root))
    return (
        f"  CRL valid until {until} ({CRL_DAYS} days); once it expires, listeners that check it "
        f"refuse every client certificate\n  publish it again {every}: `wsproxy ca crl --dir "
        f"{directory}` from cron or deploy/systemd/wsproxy-crl.timer"
    )


def _dispatch(authority: CertificateAuthority, args: argparse.Namespace) -> int:
    store = authority.store
    command = args.ca_command
    if command == "init":
        cert = authority.init(args.name, args.crl_url)
        until = f"{cert.not_valid_after_utc:%Y-%m-%d}"
        print(f"created CA '{args.name}' in {store.ca_dir} (valid until {until})")
        print(_crl_validity(authority))
        for url in args.crl_url:
            print(f"  CRL distribution point of the certificates it issues: {url}")
        return 0
    if command == "settings":
        if args.no_crl_url or args.crl_url:
            current = authority.set_crl_urls(args.crl_url or [])
        else:
            current = authority.settings
        shown = " ".join(current.crl_urls) or "none (certificates name no CRL location)"
        print(f"crl_urls: {shown}\n  ({store.settings_file})")
        return 0
    if command == "issue":
        if args.kind == "server":
            issued = authority.issue_server(args.name, args.dns, args.ip, args.days, args.key_type)
        else:
            issued = authority.issue_client(args.name, args.cn, args.days, args.key_type)
        print(
            f"issued {args.kind} certificate '{issued.name}' serial {issued.serial:x}, "
            f"valid until {issued.not_after:%Y-%m-%d}\n  {issued.cert_path}\n  {issued.key_path}"
        )
        for url in issued.crl_urls:
            print(f"  CRL distribution point: {url}")
        return 0
    if command == "revoke":
        entry = authority.revoke(args.certificate, args.reason)
        print(
            f"revoked '{entry.name}' serial {entry.serial} ({args.reason}); CRL: {store.crl_file}"
        )
        print(_crl_validity(authority))
        return 0
    if command == "crl":
        crl = authority.crl()
        print(f"wrote {store.crl_file}: {len(list(crl))} revoked")
        print(_crl_validity(authority, crl))
        return 0
    if command == "list":
        rows = authority.list()
        print(f"{'NAME':<24} {'SERIAL':<41} {'KIND':<7} {'NOT AFTER':<21} STATUS")
        for row in rows:
            print(f"{row.name:<24} {row.serial:<41} {row.kind:<7} {row.not_after:<21} {row.status}")
        return 0
    if command == "export-p12":
        path = authority.export_p12(args.name, args.password)
        print(f"wrote {path}")
        return 0
    raise CAError(f"unknown command {command!r}")
