"""Stream mode: pick a target, dial, relay opaque bytes (an NLB TCP listener).

The proxy does not wait for the client to speak before dialing (a server-first protocol would
hang). Bytes the client sends meanwhile are held by the endpoint, which pauses reading on the first
chunk; reading is not paused up front because ``begin`` runs inside ``connection_made``, where
uvloop 0.23 crashed under connection churn on a ``pause_reading()`` (tests/test_churn.py).
"""

from __future__ import annotations

from wsproxy.flows.base import Flow
from wsproxy.ops.termination import Phase
from wsproxy.relay.relay import Endpoint, Relay


class TcpFlow(Flow):
    __slots__ = ()

    def begin(self) -> None:
        self.phase = Phase.CONNECT
        self.spawn(self.guarded(self._run()))

    async def _run(self) -> None:
        group = self.group = self.context.target_group(self.context.config.default_target_group)
        target, self.target_endpoint = await group.dial(
            self.client_ip, Endpoint, self.proxy_header_for(group, self.sni)
        )
        self.take_target(target)
        self.phase = Phase.DATA
        self.relay = Relay(
            self.client,
            self.target_endpoint,
            idle_timeout=self.context.config.idle_timeout_seconds,
            owner=self,
            ticker=self.context.ticker,
        )
        self.relay.start()
        if self.draining:
            self.drain_relay(self.drain_remaining())
