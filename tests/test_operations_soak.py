"""Operations under load: 200 live sessions through reloads, API changes and a dying target.

Sessions on targets that stay must not lose or reorder a byte; sessions on a killed target end
promptly; no new connection is refused while listeners and target groups change.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.conftest import listener_address
from tests.helpers.knock import Knocker
from wsproxy.config import load_config
from wsproxy.demo import EchoTarget
from wsproxy.proxy import Proxy


def write(path: Path, port: int, targets: list[EchoTarget], idle: int = 350) -> None:
    listed = ", ".join(f'{{ address = "{t.address}" }}' for t in targets)
    path.write_text(
        f"""
[admin]
address = "127.0.0.1:0"
[listeners.edge]
address = "127.0.0.1:{port}"
websocket = true
idle_timeout_seconds = {idle}
default_target_group = "chat"
[target_groups.chat]
algorithm = "round_robin"
deregistration_delay_seconds = 0.5
targets = [{listed}]
"""
    )


async def test_200_sessions_through_reloads_api_changes_and_a_killed_target(
    tmp_path: Path, echo_targets: list[EchoTarget]
) -> None:
    a, b, c = echo_targets
    path = tmp_path / "wsproxy.toml"
    write(path, 0, [a, b])
    proxy = Proxy(load_config(path), path=str(path))
    await proxy.start()
    address = listener_address(proxy)
    assert proxy.admin is not None and proxy.admin.address is not None
    api = f"http://{proxy.admin.address}/v1/target-groups/chat/targets"
    knocker = Knocker(address)

    # aiohttp's default connector holds 100 connections; these 200 sessions need more.
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    knocker.start()
    try:
        sockets = [await session.ws_connect(f"ws://{address}/s{i}") for i in range(200)]
        on_b = set(range(1, 200, 2))  # round robin: odd sessions went to b
        counter = 0

        async def exchange(indices: list[int]) -> None:
            nonlocal counter
            for index in indices:
                counter += 1
                payload = f"{index}:{counter}:" + "x" * (counter % 300)
                await sockets[index].send_str(payload)
                assert await sockets[index].receive_str(timeout=5) == payload

        alive = list(range(200))
        await exchange(alive)
        for round_no in range(10):
            if round_no % 3 == 0:
                path.write_text(path.read_text() + "\nbroken = [\n")  # invalid: nothing changes
                assert await proxy.reload() != []
            else:
                write(path, address.port, [a, b], idle=300 + round_no)  # listener rebound
                assert await proxy.reload() == []
            if round_no == 4:
                async with session.post(api, json={"address": str(c.address)}) as response:
                    assert response.status == 201
            if round_no == 6:
                async with session.delete(f"{api}/{c.address}") as response:
                    assert response.status == 202
            if round_no == 7:
                await b.stop()  # killed: its sessions must end promptly
                for index in sorted(on_b):
                    message = await sockets[index].receive(timeout=5)
                    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                alive = [i for i in alive if i not in on_b]
            await exchange(alive)
        assert len(alive) == 100
        assert await knocker.stop() == 0
        # The surviving sessions live on listeners that reloads replaced (retired), still open.
        everyone = [*proxy.listeners.values(), *proxy.retired]
        assert sum(len(listener.flows) for listener in everyone) == 100
    finally:
        await knocker.stop()
        await session.close()
        await proxy.shutdown(grace=1)
