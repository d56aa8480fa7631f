"""TLS passthrough: read the ClientHello without decrypting, route on its SNI, replay it untouched.

The client's TLS session ends at the target, byte for byte; the proxy never holds a key. Draining
can only wait, then close (like stream mode).
"""

from __future__ import annotations

import asyncio

from wsproxy.errors import ClientHelloTimeout
from wsproxy.flows.base import Flow
from wsproxy.ops.termination import Phase
from wsproxy.relay.relay import Endpoint, Relay
from wsproxy.wire.clienthello import ClientHello, ClientHelloReader


class PassthroughFlow(Flow):
    __slots__ = (
        "_hello",
        "_reader",
    )

    def begin(self) -> None:
        config = self.context.config
        self._reader = ClientHelloReader(config.max_client_hello_bytes)
        self._hello: asyncio.Future[ClientHello] = self.read_prelude(
            self._reader.feed, "ClientHello"
        )
        self.spawn(self.guarded(self._run()))

    async def _run(self) -> None:
        config = self.context.config
        try:
            async with asyncio.timeout(config.client_hello_timeout_seconds):
                hello = await self._hello
        except TimeoutError:
            raise ClientHelloTimeout(
                f"no complete ClientHello within {config.client_hello_timeout_seconds:g} s"
            ) from None
        self.sni = hello.server_name
        group = self.context.target_group(self.context.sni_router.route(hello.server_name))
        self.group = group
        self.phase = Phase.CONNECT
        target, self.target_endpoint = await group.dial(
            self.client_ip, Endpoint, self.proxy_header_for(group, hello.server_name)
        )
        self.take_target(target)
        replay = bytes(self._reader.buffered) + self.client.take_held()
        del self._reader, self._hello  # the session may last hours; the ClientHello is replayed
        self.handshake_bytes_in -= len(replay)  # the relay counts them
        self.phase = Phase.DATA
        self.relay = Relay(
            self.client,
            self.target_endpoint,
            idle_timeout=config.idle_timeout_seconds,
            owner=self,
            ticker=self.context.ticker,
        )
        self.relay.start(to_target=replay)
        if self.draining:
            self.drain_relay(self.drain_remaining())
