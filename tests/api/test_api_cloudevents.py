"""An API listener's integration calls, read by the official CloudEvents SDK, end to end:
$connect, a message and $disconnect, signed, from a client with a certificate of our CA."""

from __future__ import annotations

import datetime as dt
import json
import ssl
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ProxyFactory, listener_address, wait_for
from tests.helpers.integration import IntegrationBackend, Reply
from tests.helpers.pki import Pki, make_pki
from wsproxy.wire.cloudevents import verify_signature

SECRET = b"an HMAC key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def test_the_sdk_reads_every_call_and_the_signature_checks(
    make_proxy: ProxyFactory, pki: Pki, tmp_path: Path
) -> None:
    key_file = tmp_path / "chat.key"
    key_file.write_bytes(SECRET + b"\n")
    cert, key = pki.files("edge")
    async with IntegrationBackend() as backend:
        backend.answer("/connect", Reply(200, b'{"user": "alice", "groups": ["room"]}'))
        proxy = await make_proxy(f"""
[listeners.edge]
address = "127.0.0.1:0"
protocol = "tls"
api = "chat"

[listeners.edge.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
client_auth = "required"
client_ca = "{pki.ca_file}"

[apis.chat]
signing_secret_file = "{key_file}"

[[apis.chat.routes]]
key = "$connect"
target_group = "backend"
path = "/connect"

[[apis.chat.routes]]
key = "$disconnect"
target_group = "backend"
path = "/disconnect"

[[apis.chat.routes]]
key = "sendmessage"
target_group = "backend"
path = "/messages"
respond = true

[target_groups.backend]
protocol = "http"
targets = [{{ address = "{backend.address}" }}]
""")
        address = listener_address(proxy)
        context = ssl.create_default_context(cafile=pki.ca_file)
        context.load_cert_chain(*pki.files("alice"))
        url = f"wss://localhost:{address.port}/chat?room=7"
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(url, ssl=context, headers={"Origin": "https://app"}) as ws,
        ):
            await ws.send_str('{"action": "sendmessage", "text": "héllo"}')
            answer = json.loads(await ws.receive_str(timeout=5))
            assert answer == {"action": "sendmessage", "text": "héllo"}
        await wait_for(lambda: len(backend.calls_to("/disconnect")) == 1)
        assert not backend.errors
        connect, message, disconnect = (
            backend.calls_to(path)[0] for path in ("/connect", "/messages", "/disconnect")
        )
    cid = connect.attributes["connectionid"]
    assert len(cid) == 24
    for call, kind, route in (
        (connect, "wsproxy.connect", "$connect"),
        (message, "wsproxy.message", "sendmessage"),
        (disconnect, "wsproxy.disconnect", "$disconnect"),
    ):
        attributes = call.attributes
        assert attributes["specversion"] == "1.0"
        assert attributes["type"] == kind
        assert attributes["source"] == f"/apis/chat/connections/{cid}"
        assert attributes["connectionid"] == cid
        assert attributes["routekey"] == route
        assert attributes["api"] == "chat"
        assert attributes["sourceip"] == "127.0.0.1"
        assert attributes["clientsubject"] == "CN=alice"
        assert len(attributes["clientfingerprint"]) == 64
        assert verify_signature(SECRET, call.headers, call.data, dt.datetime.now(dt.UTC))
    ids = {call.attributes["id"] for call in (connect, message, disconnect)}
    assert len(ids) == 3
    assert connect.event_data["path"] == "/chat"
    assert connect.event_data["query"] == "room=7"
    assert connect.event_data["headers"]["origin"] == "https://app"
    assert connect.event_data["identity"]["subject"] == "CN=alice"
    assert json.loads(message.data) == {"action": "sendmessage", "text": "héllo"}
    assert message.headers["content-type"] == "application/json"
    assert disconnect.event_data["closedBy"] == "client"
    assert disconnect.event_data["closeCode"] == 1000
