"""The flow conformance suite: the same properties, run against every flow kind.

After trio's stream conformance suite: each property is written once against ``Side`` (the
client and the target's accepted connection, tests/helpers/sides.py), and a flow kind joins by
one adapter (a ``FlowKind``) in ``KINDS``: how its listener is configured, how a client connects,
what the target runs, and what the kind cannot do (with the reason). The properties:

- bytes arrive intact and in order both ways (large random payloads, randomly chunked; message
  boundaries kept where the kind has messages);
- half-close: one side ends its sending direction, the other still answers, then closes;
- backpressure: a large transfer into a slow reader completes while the proxy buffers a bounded
  number of bytes (its transports' buffers, measured, not timed);
- idle timeout: a short ``idle_timeout_seconds`` ends an idle connection with the kind's clean
  close (Close 1001 for WebSocket, FIN for a stream) on both sides;
- drain: ``Proxy.drain`` ends WebSocket sessions with Close 1001 at a message boundary, and lets
  stream connections run until the grace period ends, then closes them;
- abort: one side resets; the proxy closes the other side cleanly.

A property a kind cannot have is skipped with the adapter's reason (TLS cannot half-close).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.helpers.pki import Pki, make_pki
from tests.helpers.servers import RawServer
from tests.helpers.sides import Side, StreamSide, WebSocketSide
from tests.helpers.wsraw import RawWebSocket, accept_upgrade
from wsproxy.address import Address
from wsproxy.proxy import Proxy
from wsproxy.relay.relay import WRITE_HIGH_WATER

INTACT_BYTES = 4 * 1024 * 1024  # each way
BACKPRESSURE_BYTES = 16 * 1024 * 1024
BACKPRESSURE_CHUNK = 256 * 1024
READ_CHUNK = 256 * 1024  # the most uvloop reads from a socket at once
TLS_RECORD = 16 * 1024  # the most plaintext one TLS record carries (RFC 8446 §5.1)
# What the proxy may hold for one connection while the far side does not read: the transport
# toward the slow reader fills to its high-water mark, takes the one read that arrives before
# reading pauses, and stops (relay.py). Behind TLS, that read may also finish a record begun in
# the previous one. A proxy that kept reading would hold the whole transfer.
BUFFER_BOUND = WRITE_HIGH_WATER + READ_CHUNK + TLS_RECORD
SENDER_HIGH_WATER = 64 * 1024  # asyncio's default: above it, our sender's drain() waits
GRACE_SECONDS = 2.0


# --- the flow kinds ------------------------------------------------------------------------------


class FlowKind(Protocol):
    """What the suite needs to know about one kind of flow."""

    @property
    def name(self) -> str:
        """The test id."""

    @property
    def peer_close(self) -> str:
        """How one side's clean close reaches the other (``Side.ending``)."""

    @property
    def proxy_close(self) -> str:
        """How the proxy ends a connection itself (idle timeout, drain, a peer gone): the
        ending both sides see."""

    @property
    def messages(self) -> bool:
        """Whether a chunk is a message whose boundaries the proxy keeps."""

    @property
    def no_half_close(self) -> str | None:
        """Why this kind cannot carry a half-close, or None if it can."""

    def listener(self, pki: Pki) -> str:
        """TOML keys of ``[listeners.edge]`` (besides address and default group), then any of
        its sub-tables."""

    def target_tls(self, pki: Pki) -> ssl.SSLContext | None:
        """The target's TLS server context, or None for a plain TCP target."""

    async def target_side(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Side:
        """The target's end of an accepted connection, after what the kind does first."""

    async def connect(self, address: Address, pki: Pki) -> Side:
        """A client's connection through the listener at ``address``."""


def client_tls(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=pki.ca_file)


def terminating(pki: Pki) -> str:
    """The ``[listeners.edge.tls]`` table of a listener that ends TLS itself."""
    cert, key = pki.files("edge")
    return f'[listeners.edge.tls]\ncertificates = [{{ cert = "{cert}", key = "{key}" }}]\n'


def server_tls(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*pki.files("edge"))
    return context


async def tls_client(address: Address, pki: Pki) -> Side:
    reader, writer = await asyncio.open_connection(
        address.host, address.port, ssl=client_tls(pki), server_hostname="edge.internal"
    )
    return StreamSide(reader, writer)


class Stream:
    """``protocol = "tcp"``, ``websocket = false``: opaque bytes, TCP half-close passed on."""

    name = "stream"
    peer_close = "eof"
    proxy_close = "eof"
    messages = False
    no_half_close = None

    def listener(self, pki: Pki) -> str:
        return 'protocol = "tcp"\nwebsocket = false\n'

    def target_tls(self, pki: Pki) -> ssl.SSLContext | None:
        return None

    async def target_side(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Side:
        return StreamSide(reader, writer)

    async def connect(self, address: Address, pki: Pki) -> Side:
        reader, writer = await asyncio.open_connection(address.host, address.port)
        return StreamSide(reader, writer)


class TlsPassthrough:
    """``protocol = "tls_passthrough"``: the client's TLS session ends at the target."""

    name = "tls_passthrough"
    peer_close = "eof"
    proxy_close = "eof"
    messages = False
    no_half_close = (
        "the client's TLS session runs end to end, and its ends here (asyncio TLS transports) "
        "cannot half-close: no write_eof, and a received close_notify closes the transport. "
        "The proxy relays a TCP half-close under it as in stream mode."
    )

    def listener(self, pki: Pki) -> str:
        return 'protocol = "tls_passthrough"\n'

    def target_tls(self, pki: Pki) -> ssl.SSLContext | None:
        return server_tls(pki)

    async def target_side(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Side:
        return StreamSide(reader, writer)

    async def connect(self, address: Address, pki: Pki) -> Side:
        return await tls_client(address, pki)


class WebSocket:
    """``websocket = true``: the upgrade, then frames; a Close frame is the half-close."""

    name = "websocket"
    peer_close = "close 1000"
    proxy_close = "close 1001"
    messages = True
    no_half_close = None

    def listener(self, pki: Pki) -> str:
        return "websocket = true\n"

    def target_tls(self, pki: Pki) -> ssl.SSLContext | None:
        return None

    async def target_side(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Side:
        await accept_upgrade(reader, writer)
        return WebSocketSide(RawWebSocket(reader, writer, client=False))

    async def connect(self, address: Address, pki: Pki) -> Side:
        return WebSocketSide(await RawWebSocket.connect(address))


class TlsStream:
    """``protocol = "tls"``, ``websocket = false``: the proxy ends TLS, the target gets bytes."""

    name = "tls_stream"
    peer_close = "eof"
    proxy_close = "eof"
    messages = False
    no_half_close = (
        "the proxy ends the client's TLS itself, and its TLS transport cannot half-close: "
        "asyncio's has no write_eof and closes on a received close_notify, so the client's "
        "close ends its side and the proxy then closes the target's too"
    )

    def listener(self, pki: Pki) -> str:
        return 'protocol = "tls"\nwebsocket = false\n' + terminating(pki)

    def target_tls(self, pki: Pki) -> ssl.SSLContext | None:
        return None

    async def target_side(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Side:
        return StreamSide(reader, writer)

    async def connect(self, address: Address, pki: Pki) -> Side:
        return await tls_client(address, pki)


class SecureWebSocket(WebSocket):
    """``protocol = "tls"``, ``websocket = true``: the proxy ends TLS, then frames as above."""

    name = "secure_websocket"

    def listener(self, pki: Pki) -> str:
        return 'protocol = "tls"\nwebsocket = true\n' + terminating(pki)

    async def connect(self, address: Address, pki: Pki) -> Side:
        ws = await RawWebSocket.connect(
            address, tls=client_tls(pki), server_hostname="edge.internal"
        )
        return WebSocketSide(ws)


KINDS: list[FlowKind] = [Stream(), TlsPassthrough(), WebSocket(), TlsStream(), SecureWebSocket()]


# --- the harness ---------------------------------------------------------------------------------


@dataclass
class Flows:
    """A proxy with one listener of ``kind`` in front of one target that hands over every
    connection it accepts."""

    kind: FlowKind
    proxy: Proxy
    pki: Pki
    accepted: asyncio.Queue[Side]
    opened: list[Side] = field(default_factory=list)

    async def open(self) -> tuple[Side, Side]:
        """A client connection through the proxy, and the target's end of it."""
        client = await self.kind.connect(listener_address(self.proxy), self.pki)
        self.opened.append(client)
        target = await asyncio.wait_for(self.accepted.get(), 10)
        self.opened.append(target)
        return client, target

    async def all_closed(self) -> None:
        """The proxy holds no connection of this listener any more."""
        stats = self.proxy.listeners["edge"].stats
        await wait_for(lambda: stats.active == 0, timeout=10)

    def buffered(self) -> int:
        """Bytes the proxy's transports hold unsent, over every connection of the listener.

        A TLS transport counts what waits to be encrypted and sent; the TCP transport beneath
        it (not reachable from here) has its own high-water mark."""
        total = 0
        for flow in self.proxy.listeners["edge"].flows:
            for endpoint in (flow.client, flow.target_endpoint):
                if endpoint is not None and endpoint.transport is not None:
                    total += endpoint.transport.get_write_buffer_size()
        return total


FlowsFactory = Callable[..., Awaitable[Flows]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=KINDS, ids=lambda kind: kind.name)
async def flows(
    request: pytest.FixtureRequest, make_proxy: ProxyFactory, pki: Pki
) -> AsyncIterator[FlowsFactory]:
    """``await flows(listener_extra="")``: a proxy and target for this kind of flow."""
    kind: FlowKind = request.param
    servers: list[RawServer] = []
    made: list[Flows] = []
    done = asyncio.Event()  # lets the target's handlers return

    async def start(listener_extra: str = "") -> Flows:
        accepted: asyncio.Queue[Side] = asyncio.Queue()

        async def hand_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await accepted.put(await kind.target_side(reader, writer))
            await done.wait()  # the test drives the connection meanwhile

        server = RawServer(hand_over, ssl=kind.target_tls(pki))
        await server.start()
        servers.append(server)
        proxy = await make_proxy(
            f"""
[listeners.edge]
address = "127.0.0.1:0"
default_target_group = "target"
{listener_extra}
{kind.listener(pki)}
[target_groups.target]
targets = [{{ address = "{server.address}" }}]
"""
        )
        made.append(Flows(kind, proxy, pki, accepted))
        return made[-1]

    yield start
    for harness in made:
        for side in harness.opened:
            side.abort()
    done.set()
    for server in servers:
        await server.stop()


# --- helpers -------------------------------------------------------------------------------------


def digest(chunks: list[bytes]) -> str:
    """SHA-256 of the chunks joined: a short stand-in for megabytes in an assertion."""
    return hashlib.sha256(b"".join(chunks)).hexdigest()


def random_chunks(rng: random.Random, total: int) -> list[bytes]:
    """Random bytes in chunks of 1 B to 256 KiB, log-uniform so small and large both occur."""
    chunks = []
    left = total
    while left:
        size = min(left, int(2 ** rng.uniform(0, 18)))
        chunks.append(os.urandom(size))
        left -= size
    return chunks


async def receive_exactly(side: Side, size: int) -> list[bytes]:
    """Chunks until ``size`` bytes arrived; fails if the connection ends first."""
    received: list[bytes] = []
    got = 0
    while got < size:
        data = await side.receive()
        assert data, f"the connection ended after {got} of {size} bytes"
        received.append(data)
        got += len(data)
    return received


async def receive_to_end(side: Side) -> bytes:
    received = []
    while data := await side.receive():
        received.append(data)
    return b"".join(received)


async def send_all(side: Side, chunks: list[bytes]) -> None:
    for chunk in chunks:
        await side.send(chunk)


async def transfer(sender: Side, receiver: Side, chunks: list[bytes]) -> list[bytes]:
    """Send ``chunks`` one way; what arrived, chunk by chunk."""
    sending = asyncio.create_task(send_all(sender, chunks))
    received = await receive_exactly(receiver, sum(map(len, chunks)))
    await sending
    return received


async def endings(client: Side, target: Side) -> tuple[str, str]:
    """How the connection ended on each side, read on both at once."""
    client_end, target_end = await asyncio.gather(client.ending(), target.ending())
    return client_end, target_end


async def exchange(client: Side, target: Side) -> None:
    """A few bytes each way: the relay runs."""
    await client.send(b"ping")
    assert b"".join(await receive_exactly(target, 4)) == b"ping"
    await target.send(b"pong")
    assert b"".join(await receive_exactly(client, 4)) == b"pong"


# --- the properties ------------------------------------------------------------------------------


async def test_bytes_arrive_intact_and_in_order_both_ways(flows: FlowsFactory) -> None:
    flow = await flows()
    client, target = await flow.open()
    rng = random.Random(6455)
    up, down = random_chunks(rng, INTACT_BYTES), random_chunks(rng, INTACT_BYTES)
    got_up, got_down = await asyncio.gather(
        transfer(client, target, up), transfer(target, client, down)
    )
    for sent, got, way in ((up, got_up, "client→target"), (down, got_down, "target→client")):
        assert digest(got) == digest(sent), f"{way}: the bytes differ"
        if flow.kind.messages:
            assert [len(m) for m in got] == [len(c) for c in sent], f"{way}: boundaries moved"
    client.close()
    assert await target.ending() == flow.kind.peer_close
    await flow.all_closed()


@pytest.mark.parametrize("first", ["client", "target"])
async def test_half_close_keeps_the_other_direction_open(flows: FlowsFactory, first: str) -> None:
    flow = await flows()
    if flow.kind.no_half_close is not None:
        pytest.skip(flow.kind.no_half_close)
    client, target = await flow.open()
    closer, answerer = (client, target) if first == "client" else (target, client)
    request, answer = os.urandom(100_000), os.urandom(300_000)
    await closer.send(request)
    closer.send_eof()
    assert await receive_to_end(answerer) == request  # then the end of the closer's direction
    await answerer.send(answer)  # the other direction still flows
    answerer.close()
    assert await receive_to_end(closer) == answer
    closer.close()
    await flow.all_closed()


@pytest.mark.parametrize("slow", ["client", "target"])
async def test_a_slow_reader_gets_everything_while_the_proxy_buffers_little(
    flows: FlowsFactory, slow: str
) -> None:
    flow = await flows()
    client, target = await flow.open()
    reader, sender = (client, target) if slow == "client" else (target, client)
    payload = os.urandom(BACKPRESSURE_BYTES)
    chunks = [
        payload[i : i + BACKPRESSURE_CHUNK] for i in range(0, len(payload), BACKPRESSURE_CHUNK)
    ]
    sending = asyncio.create_task(send_all(sender, chunks))
    # Nothing is read until the pressure has come back through the proxy to the sender.
    await wait_for(lambda: sender.send_buffered() > SENDER_HIGH_WATER, timeout=10)
    peak = flow.buffered()
    got = hashlib.sha256()
    received = 0
    while received < len(payload):
        data = await reader.receive()
        assert data, f"the connection ended after {received} bytes"
        got.update(data)
        received += len(data)
        peak = max(peak, flow.buffered())
        await asyncio.sleep(0.001)  # a reader slower than the sender, so pressure stays on
    await sending
    assert got.hexdigest() == digest([payload])
    print(f"\n{flow.kind.name}, slow {slow}: proxy buffered at most {peak} bytes of {len(payload)}")
    assert peak <= BUFFER_BOUND, f"the proxy buffered {peak} bytes (bound {BUFFER_BOUND})"


async def test_an_idle_connection_is_closed_cleanly_at_its_timeout(flows: FlowsFactory) -> None:
    flow = await flows("idle_timeout_seconds = 0.5")
    client, target = await flow.open()
    await exchange(client, target)
    assert await endings(client, target) == (flow.kind.proxy_close,) * 2
    await flow.all_closed()


async def test_drain_closes_at_a_message_boundary_or_when_the_grace_ends(
    flows: FlowsFactory,
) -> None:
    flow = await flows()
    client, target = await flow.open()
    await exchange(client, target)
    if flow.kind.messages:
        await client.send(b"first half, ", more=True)
        draining = asyncio.create_task(flow.proxy.drain(GRACE_SECONDS))
        # The client hears at once: nothing is under way toward it.
        assert await client.receive() == b""
        # It may finish its message (RFC 6455 §5.5.1); the target gets it whole, then the
        # Close: the proxy waited for the boundary.
        await client.send(b"second half")
        assert await target.receive() == b"first half, second half"
    else:
        draining = asyncio.create_task(flow.proxy.drain(GRACE_SECONDS))
        await wait_for(lambda: flow.proxy.draining)
        # Opaque bytes have no clean cut: the connection runs on through the grace period.
        await exchange(client, target)
    assert await endings(client, target) == (flow.kind.proxy_close,) * 2
    await draining
    await flow.all_closed()


@pytest.mark.parametrize("resetting", ["client", "target"])
async def test_a_reset_on_one_side_closes_the_other(flows: FlowsFactory, resetting: str) -> None:
    flow = await flows()
    client, target = await flow.open()
    await exchange(client, target)
    gone, other = (client, target) if resetting == "client" else (target, client)
    gone.abort()
    assert await other.ending() == flow.kind.proxy_close
    await flow.all_closed()
