"""``wsproxy demo``: two WebSocket echo targets and the proxy in front of them, in one process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import ssl
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from wsproxy.address import Address
from wsproxy.ca.authority import CertificateAuthority
from wsproxy.config import parse_config
from wsproxy.demo_chat import ChatIntegration
from wsproxy.proxy import Proxy
from wsproxy.tls import check_files

log = logging.getLogger(__name__)


@dataclass
class EchoTarget:
    """A WebSocket echo server on 127.0.0.1; greets each session with its name when asked."""

    name: str
    greeting: bool = True
    protocols: tuple[str, ...] = ()
    ssl_context: ssl.SSLContext | None = None  # serve wss:// (TLS targets)
    bound: Address | None = None
    sessions: int = 0  # WebSocket sessions accepted
    active: int = 0  # WebSocket sessions open now
    last_headers: dict[str, list[str]] | None = None
    _runner: web.AppRunner | None = None

    async def start(self, port: int = 0) -> Address:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A short shutdown_timeout: stopping must not wait a minute for open sessions.
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=self.ssl_context).start()
        host, bound_port = self._runner.addresses[0][:2]
        self.bound = Address(str(host), int(bound_port))
        return self.bound

    @property
    def address(self) -> Address:
        if self.bound is None:
            raise RuntimeError(f"echo target {self.name} is not started")
        return self.bound

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        headers: dict[str, list[str]] = {}
        for name, value in request.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        self.last_headers = headers
        if request.headers.get("Upgrade", "").lower() != "websocket":
            body = await request.read()
            return web.Response(
                text=f"{self.name}: plain HTTP {request.method} {request.path} "
                f"body={len(body)} bytes\n"
            )
        ws = web.WebSocketResponse(max_msg_size=0, protocols=self.protocols)
        await ws.prepare(request)
        self.sessions += 1
        self.active += 1
        try:
            await self._echo(ws, request)
        finally:
            self.active -= 1
        return ws

    async def _echo(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        if self.greeting:
            await ws.send_str(
                f"connected to {self.name} ({self.address}) for {request.path}; "
                f"X-Forwarded-For: {request.headers.get('X-Forwarded-For')}"
            )
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data)


DEMO_CONFIG = """
# The embedded demo configuration (see deploy/wsproxy.example.toml for every key).
[proxy]
shutdown_grace_seconds = {grace}

[admin]
address = "{admin}"

[listeners.demo]
address = "{listen}"
websocket = true
default_target_group = "echo"

[[listeners.demo.rules]]
path_prefix = "/v2/"
target_group = "echo-v2"

# wss:// with client certificates from the demo CA (mTLS), revocations honoured.
[listeners.demo-mtls]
address = "{listen_tls}"
protocol = "tls"
websocket = true
default_target_group = "echo"

[listeners.demo-mtls.tls]
certificates = [{{ cert = "{ca}/issued/demo-edge.pem", key = "{ca}/issued/demo-edge.key" }}]
client_auth = "required"
client_ca = "{ca}/ca/ca.pem"
crl = "{ca}/ca/crl.pem"

# TLS passthrough: the proxy routes on SNI and never decrypts; TLS ends at the target.
[listeners.demo-passthrough]
address = "{listen_passthrough}"
protocol = "tls_passthrough"
default_target_group = "echo-tls"

# A WebSocket API: the proxy ends the WebSocket and routes each message by its "action" to
# the chat integration, a plain HTTP service (wsproxy/demo_chat.py; docs/api.md).
[listeners.demo-api]
address = "{listen_api}"
api = "chat"

[apis.chat]
route_selection_expression = "$request.body.action"

[[apis.chat.routes]]
key = "$connect"
target_group = "chat"
path = "/connect"

[[apis.chat.routes]]
key = "$disconnect"
target_group = "chat"
path = "/disconnect"

[[apis.chat.routes]]
key = "sendmessage"
target_group = "chat"
path = "/messages"

[[apis.chat.routes]]
key = "whoami"
target_group = "chat"
path = "/whoami"
respond = true

[[apis.chat.routes]]
key = "$default"
target_group = "chat"
path = "/default"
respond = true

[target_groups.chat]
protocol = "http"
targets = [{{ address = "{chat}" }}]

[target_groups.echo]
algorithm = "round_robin"
targets = [{{ address = "{echo1}" }}, {{ address = "{echo2}" }}]

[target_groups.echo-v2]
targets = [{{ address = "{echo2}" }}]

[target_groups.echo-tls]
targets = [{{ address = "{echo_tls}" }}]
"""

DEMO_CERTIFICATES = {
    "demo-edge": "server",
    "demo-target": "server",
    "demo-client": "client",
}


def prepare_ca(directory: Path) -> CertificateAuthority:
    """A CA with the demo's certificates in ``directory``, reusing what is already there."""
    authority = CertificateAuthority(str(directory))
    if not authority.store.exists():
        authority.init("wsproxy demo CA")
    valid = {row.name for row in authority.list() if row.status == "valid"}
    for name, kind in DEMO_CERTIFICATES.items():
        if name in valid:
            continue
        if kind == "server":
            authority.issue_server(name, ["localhost"], ["127.0.0.1", "::1"])
        else:
            authority.issue_client(name)
    return authority


async def _self_check(url: str, context: ssl.SSLContext | None = None) -> str:
    connector = aiohttp.TCPConnector(ssl=context) if context else None
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.ws_connect(url) as ws,
    ):
        greeting = await ws.receive_str(timeout=5)
        await ws.send_str("ping")
        echo = await ws.receive_str(timeout=5)
        if echo != "ping":
            raise RuntimeError(f"self-check: expected the echo 'ping', got {echo!r}")
        return greeting


async def _self_check_api(url: str) -> str:
    """whoami answers with a route response, and sendmessage comes back through the group."""
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        await ws.send_str('{"action": "whoami"}')
        who = json.loads(await ws.receive_str(timeout=5))
        await ws.send_str('{"action": "sendmessage", "text": "self-check"}')
        said = json.loads(await ws.receive_str(timeout=5))
        if said != {"from": who["user"], "text": "self-check"}:
            raise RuntimeError(f"self-check: expected the broadcast back, got {said!r}")
        return f"API 'chat': {who['user']} is connection {who['connectionId']}; the lobby echoed"


def _demo_ca(
    ca_dir: str | None,
) -> tuple[tempfile.TemporaryDirectory[str] | None, Path, CertificateAuthority]:
    temporary = None if ca_dir else tempfile.TemporaryDirectory(prefix="wsproxy-demo-")
    directory = Path(ca_dir or (temporary.name if temporary else ".")).resolve()
    return temporary, directory, prepare_ca(directory)


def program() -> str:
    """This program as a shell command that works from any directory, venv activated or not.

    The absolute path of the ``wsproxy`` script when it was started that way (a venv's
    ``bin/wsproxy`` finds its packages through its own interpreter line), else this interpreter
    with ``-m wsproxy`` (``python -m wsproxy``).
    """
    script = Path(sys.argv[0])
    if script.name == "wsproxy" and script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script.absolute()))
    return shlex.join([sys.executable, "-m", "wsproxy"])


def _with_port(address: Address, offset: int) -> Address:
    return Address(address.host, address.port + offset if address.port else 0)


async def run_demo(
    listen: Address,
    admin: Address,
    duration: float,
    stop: asyncio.Event,
    ca_dir: str | None = None,
) -> None:
    """Run the demo until ``stop`` is set (or ``duration`` seconds pass)."""
    temporary, directory, authority = _demo_ca(ca_dir)
    store = authority.store
    target_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    target_tls.load_cert_chain(store.leaf_cert("demo-target"), store.leaf_key("demo-target"))
    targets = [
        EchoTarget("echo-1"),
        EchoTarget("echo-2"),
        EchoTarget("echo-tls", ssl_context=target_tls),
    ]
    addresses = [await target.start() for target in targets]
    chat = ChatIntegration()
    chat_address = await chat.start()
    config = parse_config(
        DEMO_CONFIG.format(
            grace=2,
            admin=admin,
            listen=listen,
            listen_tls=_with_port(listen, 363),  # 8080 -> 8443
            listen_passthrough=_with_port(listen, 364),
            listen_api=_with_port(listen, 365),
            chat=chat_address,
            ca=directory.as_posix(),
            echo1=addresses[0],
            echo2=addresses[1],
            echo_tls=addresses[2],
        ),
        "<demo>",
    )
    proxy = Proxy(check_files(config, "<demo>"))
    try:
        await proxy.start()
        chat.admin = f"http://{proxy.admin.address}" if proxy.admin else ""
        base = f"ws://{proxy.listeners['demo'].address}"
        api = f"ws://{proxy.listeners['demo-api'].address}"
        mtls = f"wss://{proxy.listeners['demo-mtls'].address}"
        passthrough = f"wss://{proxy.listeners['demo-passthrough'].address}"
        ca_file = store.ca_cert
        client = ssl.create_default_context(cafile=ca_file)
        client.load_cert_chain(store.leaf_cert("demo-client"), store.leaf_key("demo-client"))
        checks = [
            await _self_check(f"{base}/chat"),
            await _self_check(f"{mtls}/chat", client),
            await _self_check(f"{passthrough}/chat", ssl.create_default_context(cafile=ca_file)),
            await _self_check_api(f"{api}/?user=self-check"),
        ]
        admin_url = f"http://{proxy.admin.address}" if proxy.admin else "(admin disabled)"
        tls_flags = f"--cacert {shlex.quote(str(ca_file))}"
        mtls_flags = (
            f"{tls_flags} --cert {shlex.quote(str(store.leaf_cert('demo-client')))} "
            f"--key {shlex.quote(str(store.leaf_key('demo-client')))}"
        )
        wsproxy = program()
        curl = (
            f"\n\nThe target groups and their targets' health, from the admin API:\n"
            f"  curl -s {admin_url}/v1/target-groups"
            if proxy.admin
            else ""
        )
        checked = "\n  ".join(checks)
        print(
            f"""wsproxy demo is running.

  listener 'demo'              {base}/        -> 'echo' (round_robin: echo-1, echo-2)
  rule                         {base}/v2/...  -> 'echo-v2' (echo-2 only)
  listener 'demo-mtls'         {mtls}/       -> 'echo', client certificate required
  listener 'demo-passthrough'  {passthrough}/       -> 'echo-tls', TLS ends at the target
  listener 'demo-api'          {api}/        -> API 'chat': messages routed by "action"
  admin                        {admin_url}/metrics  /healthz  /readyz  /v1/target-groups
  CA and certificates          {directory}

Self-check passed:
  {checked}

Try it in another terminal (type lines, each comes back; Ctrl-D to quit):
  {wsproxy} connect {base}/chat
  {wsproxy} connect {base}/v2/chat
  {wsproxy} connect {mtls}/chat {mtls_flags}
  {wsproxy} connect {passthrough}/chat {tls_flags}

The WebSocket API: type {{"action": "sendmessage", "text": "hi"}} and everyone in the lobby
gets it (open two), or {{"action": "whoami"}} for your connection id; a backend pushes to a
connection (POST /@connections/ID) or, here, to the whole lobby in one call:
  {wsproxy} connect {api}/?user=alice
  curl -s -d 'hello from a backend' {admin_url}/@groups/lobby{curl}

Revoke the demo client and its session on 'demo-mtls' ends within a second:
  {wsproxy} ca revoke demo-client --dir {shlex.quote(str(directory))}

Stop with Ctrl-C.""",
            flush=True,
        )
        if duration > 0:
            try:
                async with asyncio.timeout(duration):
                    await stop.wait()
            except TimeoutError:
                pass
        else:
            await stop.wait()
    finally:
        await proxy.shutdown()
        for target in targets:
            await target.stop()
        await chat.stop()
        if temporary is not None:
            temporary.cleanup()
