"""``wsproxy demo``: two WebSocket echo targets and the proxy in front of them, in one process."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from wsproxy.address import Address
from wsproxy.config import parse_config
from wsproxy.proxy import Proxy

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

[target_groups.echo]
algorithm = "round_robin"
targets = [{{ address = "{echo1}" }}, {{ address = "{echo2}" }}]

[target_groups.echo-v2]
targets = [{{ address = "{echo2}" }}]
"""


async def _self_check(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        greeting = await ws.receive_str(timeout=5)
        await ws.send_str("ping")
        echo = await ws.receive_str(timeout=5)
        if echo != "ping":
            raise RuntimeError(f"self-check: expected the echo 'ping', got {echo!r}")
        return greeting


async def run_demo(listen: Address, admin: Address, duration: float, stop: asyncio.Event) -> None:
    targets = [EchoTarget("echo-1"), EchoTarget("echo-2")]
    addresses = [await target.start() for target in targets]
    config = parse_config(
        DEMO_CONFIG.format(
            grace=2,
            admin=admin,
            listen=listen,
            echo1=addresses[0],
            echo2=addresses[1],
        ),
        "<demo>",
    )
    proxy = Proxy(config)
    try:
        await proxy.start()
        listener = proxy.listeners["demo"]
        base = f"ws://{listener.address}"
        greeting = await _self_check(f"{base}/chat")
        admin_url = f"http://{proxy.admin.address}" if proxy.admin else "(admin disabled)"
        print(
            f"""wsproxy demo is running.

  listener 'demo'   {base}/          -> target group 'echo' (round_robin over
                                        echo-1 {addresses[0]} and echo-2 {addresses[1]})
  rule              {base}/v2/...    -> target group 'echo-v2' (echo-2 only)
  admin             {admin_url}/metrics  /healthz  /readyz  /v1/target-groups

Self-check passed: {greeting}

Try it (type lines, each comes back; Ctrl-D to quit):
  wsproxy connect {base}/chat
  wsproxy connect {base}/v2/chat

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
