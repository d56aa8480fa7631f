"""The supervisor-worker channel over a real socket pair: requests, replies, listening sockets
passed as SCM_RIGHTS, messages larger than a socket buffer, and a peer that goes away."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

from wsproxy.errors import WorkerUnavailable
from wsproxy.process.control import Channel, Message, make_pair


async def test_requests_replies_and_sockets() -> None:
    received: list[tuple[Message, list[socket.socket]]] = []

    async def worker_side(message: Message, socks: list[socket.socket]) -> Message | None:
        received.append((message, socks))
        return {"names": [s.getsockname()[1] for s in socks], "echo": message.get("blob", "")}

    async def supervisor_side(message: Message, socks: list[socket.socket]) -> Message | None:
        return None

    mine, theirs = make_pair()
    supervisor = Channel(mine, supervisor_side)
    worker = Channel(theirs, worker_side)
    listening = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    ports = [s.getsockname()[1] for s in listening]
    try:
        reply = await supervisor.request({"op": "init"}, 5, listening)
        assert reply["names"] == ports
        # The worker's copies accept connections made to the supervisor's sockets.
        passed = received[0][1][0]
        client = socket.create_connection(("127.0.0.1", ports[0]))
        accepted, _ = passed.accept()
        accepted.close()
        client.close()
        # 3 MB: many partial sends, reassembled in order; several in flight at once.
        blob = "x" * 3_000_000
        replies = await asyncio.gather(
            *(supervisor.request({"op": "report", "blob": blob + str(i)}, 10) for i in range(3))
        )
        assert [r["echo"][-1] for r in replies] == ["0", "1", "2"]
        assert all(len(r["echo"]) == 3_000_001 for r in replies)
    finally:
        for sock in listening:
            sock.close()
        for _, socks in received:
            for sock in socks:
                sock.close()
        worker.close()
        supervisor.close()


async def test_a_closed_peer_fails_waiting_requests() -> None:
    async def never(message: Message, socks: list[socket.socket]) -> Message | None:
        await asyncio.sleep(60)
        return None

    mine, theirs = make_pair()
    supervisor = Channel(mine, never)
    worker = Channel(theirs, never)
    waiting = asyncio.ensure_future(supervisor.request({"op": "report"}, 10))
    await asyncio.sleep(0.05)
    worker.close()
    with pytest.raises(WorkerUnavailable, match="closed"):
        await waiting
    with pytest.raises(WorkerUnavailable):
        supervisor.send({"op": "targets"})
    await supervisor.closed.wait()


async def test_garbage_on_the_channel_closes_it() -> None:
    async def ignore(message: Message, socks: list[socket.socket]) -> Message | None:
        return None

    mine, theirs = make_pair()
    supervisor = Channel(mine, ignore)
    theirs.sendall(b"\x00\x00\x00\x05hello")
    async with asyncio.timeout(5):
        await supervisor.closed.wait()
    theirs.close()


async def test_a_worker_end_reaches_only_the_child_it_is_passed_to() -> None:
    """The supervisor starts its workers at the same moment, each pair made before the other's
    spawn: a worker must not inherit the other's end, or the supervisor never sees the other's
    channel close when it dies (it waited out the 30 s start timeout for a worker killed while
    starting). uvloop's spawn does not close inherited descriptors (no close_fds)."""

    async def ignore(message: Message, socks: list[socket.socket]) -> Message | None:
        return None

    pairs = [make_pair() for _ in range(2)]
    children = []
    for _, theirs in pairs:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys; sys.stdin.read()",
            stdin=asyncio.subprocess.PIPE, pass_fds=[theirs.fileno()],
        )  # fmt: skip
        children.append(child)
    for _, theirs in pairs:
        theirs.close()
    channels = [Channel(mine, ignore) for mine, _ in pairs]
    try:
        children[0].kill()
        await children[0].wait()
        async with asyncio.timeout(5):
            await channels[0].closed.wait()
        assert not channels[1].closed.is_set()
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()
        for channel in channels:
            channel.close()
