"""Integration calls against real HTTP(S) backends on loopback (wsproxy/api/integration.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.helpers.integration import Behaviour, Fault, IntegrationBackend, Reply
from tests.helpers.pki import Pki, make_pki
from tests.helpers.servers import closed_port, full_accept_queue
from wsproxy.address import Address
from wsproxy.api.integration import Answer, Integrations
from wsproxy.config import TargetGroupConfig, parse_config
from wsproxy.errors import ApiError, ConfigError, IntegrationFailed
from wsproxy.targets.balancer import make_balancer
from wsproxy.targets.target import TargetState
from wsproxy.targets.target_group import MAX_ATTEMPTS, TargetGroup
from wsproxy.tls import check_files
from wsproxy.wire.cloudevents import MESSAGE, Call, call_headers, verify_signature

SECRET = b"integration-test-secret"
NOW = dt.datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)

Backends = Callable[..., Awaitable[IntegrationBackend]]


@pytest.fixture
async def backends() -> AsyncIterator[Backends]:
    started: list[IntegrationBackend] = []

    async def start(ssl_context: ssl.SSLContext | None = None) -> IntegrationBackend:
        backend = IntegrationBackend(ssl=ssl_context)
        await backend.start()
        started.append(backend)
        return backend

    yield start
    for backend in started:
        await backend.stop()


@pytest.fixture
async def integrations() -> AsyncIterator[Integrations]:
    client = Integrations()
    yield client
    await client.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    pki.ca.issue_client("wsproxy")
    return pki


def make_group(*addresses: Address, algorithm: str = "round_robin", **extra: Any) -> TargetGroup:
    config = TargetGroupConfig.model_validate(
        {
            "protocol": "http",
            "algorithm": algorithm,
            "targets": [{"address": str(a)} for a in addresses],
            **extra,
        }
    )
    return TargetGroup("backend", config, make_balancer(config.algorithm, random.Random(1)))


def ce_headers(
    body: bytes, *, event_id: str = "ev-1", route: str = "sendmessage"
) -> list[tuple[str, str]]:
    call = Call(event_id, MESSAGE, "chat", "conn-1", route, "192.0.2.7", NOW)
    return [*call_headers(call, body, SECRET), ("Content-Type", "application/json")]


async def post(
    client: Integrations,
    group: TargetGroup,
    path: str = "/messages",
    body: bytes = b'{"action": "sendmessage"}',
    *,
    timeout: float = 10.0,
    max_body: int = 1024,
) -> Answer:
    return await client.call(
        group,
        path,
        ce_headers(body),
        body,
        client_ip="192.0.2.7",
        timeout=timeout,
        max_body=max_body,
    )


async def failure(call: Awaitable[Answer]) -> IntegrationFailed:
    with pytest.raises(IntegrationFailed) as caught:
        await call
    return caught.value


# --- answers --------------------------------------------------------------------------------


async def test_an_echo_answer_with_its_content_type_and_headers(
    backends: Backends, integrations: Integrations
) -> None:
    backend = await backends()
    group = make_group(backend.address)
    answer = await post(integrations, group, body=b'{"action": "sendmessage", "n": 1}')
    assert answer == Answer(200, "application/json", b'{"action": "sendmessage", "n": 1}',
                            answer.headers)  # fmt: skip
    assert answer.ok
    assert answer.headers["content-type"] == "application/json"
    assert group.targets[0].active == 0  # the call in flight was counted, and uncounted


@pytest.mark.parametrize(
    "reply",
    [
        Reply(400, b'{"message": "bad"}'),
        Reply(403, b"", content_type=None),
        Reply(404, b"not here", content_type="text/plain"),
        Reply(500, b"boom", content_type="text/plain", chunked=True),
        Reply(503, b"{}", headers=(("Retry-After", "1"),)),
        Reply(204, b"", content_type=None),
    ],
    ids=lambda r: str(r.status),
)
async def test_any_status_is_an_answer(
    backends: Backends, integrations: Integrations, reply: Reply
) -> None:
    backend = await backends()
    backend.answer("/messages", reply)
    answer = await post(integrations, make_group(backend.address))
    assert (answer.status, answer.body, answer.content_type) == (
        reply.status,
        reply.body,
        reply.content_type,
    )
    assert answer.ok is (reply.status < 300)
    for name, value in reply.headers:
        assert answer.headers[name] == value


async def test_connect_answer_headers_reach_the_caller(
    backends: Backends, integrations: Integrations
) -> None:
    backend = await backends()
    backend.answer("/connect", Reply(200, b"", headers=(("Sec-WebSocket-Protocol", "chat.v2"),)))
    answer = await post(integrations, make_group(backend.address), "/connect")
    assert answer.headers["sec-websocket-protocol"] == "chat.v2"


async def test_calls_share_one_pooled_connection(
    backends: Backends, integrations: Integrations
) -> None:
    backend = await backends()
    group = make_group(backend.address)
    for n in range(10):
        answer = await post(integrations, group, body=f'{{"n": {n}}}'.encode())
        assert answer.body == f'{{"n": {n}}}'.encode()
    assert len(backend.calls) == 10
    assert backend.connections == 1


async def test_the_sdk_reads_every_cloudevents_attribute(
    backends: Backends, integrations: Integrations
) -> None:
    backend = await backends()
    body = b'{"action": "sendmessage", "text": "h\xc3\xa9"}'
    call = Call("id 1/%", MESSAGE, "chat", "AbC_-1", "send message", "2001:db8::1", NOW)
    headers = [*call_headers(call, body, SECRET), ("Content-Type", "application/json")]
    await integrations.call(
        make_group(backend.address),
        "/messages",
        headers,
        body,
        client_ip="2001:db8::1",
        timeout=10,
        max_body=1024,
    )
    assert backend.errors == []
    [seen] = backend.calls
    attributes = seen.attributes
    assert attributes["specversion"] == "1.0"
    assert attributes["type"] == "wsproxy.message"
    assert attributes["id"] == "id 1/%"  # percent-encoded on the wire, decoded by the SDK
    assert attributes["source"] == "/apis/chat/connections/AbC_-1"
    assert attributes["connectionid"] == "AbC_-1"
    assert attributes["routekey"] == "send message"
    assert attributes["api"] == "chat"
    assert attributes["sourceip"] == "2001:db8::1"
    assert attributes["time"] == NOW
    assert seen.event_data == {"action": "sendmessage", "text": "h\u00e9"}
    assert seen.data == body
    assert await backend.wait_for_calls(1) == [seen]
    assert seen.headers["content-type"] == "application/json"
    assert verify_signature(SECRET, seen.headers, seen.data, NOW)
    assert not verify_signature(b"another secret", seen.headers, seen.data, NOW)


# --- connect failures: retried elsewhere ----------------------------------------------------


async def test_a_refused_connect_moves_the_call_to_the_next_target(
    backends: Backends, integrations: Integrations
) -> None:
    backend = await backends()
    down = await closed_port()
    group = make_group(down, backend.address)  # round robin: the closed port is tried first
    answer = await post(integrations, group)
    assert answer.status == 200
    assert len(backend.calls) == 1
    assert group.stats.connect_errors[(str(down), "refused")] == 1
    assert group.targets[0].connect_failures == 1


async def test_a_connect_timeout_moves_the_call_to_the_next_target(
    backends: Backends, integrations: Integrations
) -> None:
    backend = await backends()
    with full_accept_queue() as blackhole:
        group = make_group(blackhole, backend.address, connect_timeout_seconds=0.2)
        answer = await post(integrations, group)
    assert answer.status == 200
    assert group.stats.connect_errors[(str(blackhole), "timeout")] == 1


async def test_a_connect_timeout_past_the_calls_deadline_is_a_timeout(
    integrations: Integrations,
) -> None:
    with full_accept_queue() as blackhole:
        group = make_group(blackhole, connect_timeout_seconds=30)
        error = await failure(post(integrations, group, timeout=0.2))
    assert error.error is ApiError.INTEGRATION_TIMEOUT
    assert group.targets[0].active == 0


async def test_every_connect_refused_is_unavailable_and_marks_targets_unhealthy(
    integrations: Integrations,
) -> None:
    group = make_group(await closed_port(), await closed_port(), unhealthy_after_connect_failures=1)
    error = await failure(post(integrations, group))
    assert error.error is ApiError.UNAVAILABLE
    assert "refused" in str(error).lower() or "connect" in str(error).lower()
    assert [t.state for t in group.targets] == [TargetState.UNHEALTHY, TargetState.UNHEALTHY]
    # Two targets, three attempts (the group fails open to its unhealthy targets): as dial().
    assert sum(group.stats.connect_errors.values()) == MAX_ATTEMPTS


async def test_no_target_is_unavailable(integrations: Integrations) -> None:
    error = await failure(post(integrations, make_group()))
    assert error.error is ApiError.UNAVAILABLE
    assert "no registered targets" in str(error)


async def test_no_healthy_target_under_reject_is_unavailable(integrations: Integrations) -> None:
    group = make_group(await closed_port(), when_all_unhealthy="reject")
    group.targets[0].state = TargetState.UNHEALTHY
    error = await failure(post(integrations, group))
    assert error.error is ApiError.UNAVAILABLE


# --- sent requests: never retried ---------------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "max_body"),
    [
        (Fault.CLOSE, 1024),
        (Fault.RESET, 1024),
        (Fault.GARBAGE, 1024),
        (Fault.TRUNCATED, 1024),
        (Reply(200, b"x" * 1025), 1024),
        (Reply(200, b"x" * 1025, chunked=True), 1024),
        (Reply(500, b"x" * 2), 1),  # the bound holds whatever the status
    ],
    ids=["closed", "reset", "garbage", "truncated", "too-large", "too-large-chunked", "tiny-limit"],
)
async def test_a_bad_answer_is_an_integration_error_never_retried(
    backends: Backends, integrations: Integrations, behaviour: Behaviour, max_body: int
) -> None:
    bad, good = await backends(), await backends()
    bad.answer("/messages", behaviour)
    group = make_group(bad.address, good.address)
    error = await failure(post(integrations, group, max_body=max_body))
    assert error.error is ApiError.INTEGRATION_ERROR
    assert len(bad.calls) == 1  # the request reached the backend ...
    assert (good.connections, good.calls) == (0, [])  # ... and nobody else
    assert [t.active for t in group.targets] == [0, 0]
    assert [t.state for t in group.targets] == [TargetState.INITIAL, TargetState.INITIAL]


async def test_a_body_of_exactly_max_body_is_read(
    backends: Backends, integrations: Integrations
) -> None:
    backend = await backends()
    group = make_group(backend.address)
    for chunked in (False, True):
        backend.answer("/messages", Reply(200, b"y" * 1024, chunked=chunked))
        answer = await post(integrations, group, max_body=1024)
        assert answer.body == b"y" * 1024


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_connection_left_mid_body_is_not_reused(
    backends: Backends, integrations: Integrations, chunked: bool
) -> None:
    backend = await backends()
    group = make_group(backend.address)
    backend.answer("/big", Reply(200, b"x" * 4 * 1024 * 1024, chunked=chunked))
    await failure(post(integrations, group, "/big"))
    answer = await post(integrations, group)  # a fresh connection, a clean answer
    assert answer.body == b'{"action": "sendmessage"}'
    assert backend.connections == 2


@pytest.mark.parametrize(
    "behaviour", [Fault.HANG, Reply(200, b"late", delay=30)], ids=["never", "too-late"]
)
async def test_no_answer_in_time_is_a_timeout(
    backends: Backends, integrations: Integrations, behaviour: Behaviour
) -> None:
    slow, other = await backends(), await backends()
    slow.answer("/messages", behaviour)
    group = make_group(slow.address, other.address)
    error = await failure(post(integrations, group, timeout=0.2))
    assert error.error is ApiError.INTEGRATION_TIMEOUT
    assert "0.2 s" in str(error)
    assert (other.connections, other.calls) == (0, [])
    assert [t.active for t in group.targets] == [0, 0]


# --- balancing --------------------------------------------------------------------------------


async def test_least_connections_sees_calls_in_flight(
    backends: Backends, integrations: Integrations
) -> None:
    first, second = await backends(), await backends()
    for backend in (first, second):
        backend.answer("/hang", Fault.HANG)
    group = make_group(first.address, second.address, algorithm="least_connections")
    hanging = asyncio.create_task(post(integrations, group, "/hang"))
    try:
        await asyncio.wait_for(_any_called(first, second), 10)
        busy = first if first.calls else second
        idle = second if busy is first else first
        assert sorted(t.active for t in group.targets) == [0, 1]
        for _ in range(3):
            await post(integrations, group)
        assert len(idle.calls) == 3  # every new call went to the target without one in flight
        assert len(busy.calls) == 1
    finally:
        hanging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hanging
    assert [t.active for t in group.targets] == [0, 0]


async def _any_called(*backends: IntegrationBackend) -> None:
    waits = [asyncio.create_task(b.called.wait()) for b in backends]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


# --- https --------------------------------------------------------------------------------------


def backend_context(pki: Pki, ca_file: str | None = None) -> ssl.SSLContext:
    """A backend that requires a client certificate from ``ca_file`` (our CA by default)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca_file or pki.ca_file)
    context.load_cert_chain(*pki.files("edge"))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def https_group(pki: Pki, address: Address, **tls: str) -> TargetGroup:
    cert, key = pki.files("wsproxy")
    table = {"ca": pki.ca_file, "client_cert": cert, "client_key": key, **tls}
    return make_group(address, protocol="https", tls=table)


async def test_https_presents_the_proxys_certificate(
    backends: Backends, integrations: Integrations, pki: Pki
) -> None:
    backend = await backends(backend_context(pki))
    group = https_group(pki, backend.address, server_name="edge.internal")
    for _ in range(3):
        answer = await post(integrations, group)
        assert answer.status == 200
    assert [call.client_subject for call in backend.calls] == [{"commonName": "wsproxy"}] * 3
    assert backend.connections == 1


async def test_https_checks_the_server_name_against_the_target_host_by_default(
    backends: Backends, integrations: Integrations, pki: Pki
) -> None:
    backend = await backends(backend_context(pki))  # "edge" names 127.0.0.1 too
    answer = await post(integrations, https_group(pki, backend.address))
    assert answer.status == 200


@pytest.mark.parametrize(
    ("name", "tls_of"),
    [
        ("wrong name", lambda p: {"server_name": "wrong.internal"}),
        ("untrusted target", lambda p: {"ca": str(p.foreign.store.ca_cert)}),
    ],
)
async def test_https_target_that_fails_verification_is_unavailable(
    backends: Backends,
    integrations: Integrations,
    pki: Pki,
    name: str,
    tls_of: Callable[[Pki], dict[str, str]],
) -> None:
    backend = await backends(backend_context(pki))
    group = https_group(pki, backend.address, **tls_of(pki))
    error = await failure(post(integrations, group))
    assert error.error is ApiError.UNAVAILABLE
    assert "TLS failed" in str(error)
    assert group.stats.connect_errors[(str(backend.address), "tls")] == 1
    assert backend.calls == []


async def test_https_backend_refusing_the_proxys_certificate_gets_no_call(
    backends: Backends, integrations: Integrations, pki: Pki
) -> None:
    # The backend trusts only the foreign CA. Under TLS 1.3 the client learns of the refusal
    # after its handshake ended, when the request is already out: either failure is right.
    backend = await backends(backend_context(pki, str(pki.foreign.store.ca_cert)))
    error = await failure(post(integrations, https_group(pki, backend.address)))
    assert error.error in (ApiError.UNAVAILABLE, ApiError.INTEGRATION_ERROR)
    assert backend.calls == []


def test_check_files_reads_https_groups_tls_files(tmp_path: Any) -> None:
    missing = tmp_path / "nope.pem"
    text = f"""
[listeners.edge]
address = "127.0.0.1:0"
default_target_group = "backend"

[target_groups.backend]
protocol = "https"
targets = [{{ address = "127.0.0.1:9443" }}]
tls = {{ ca = "{missing}" }}
"""
    with pytest.raises(ConfigError) as caught:
        check_files(parse_config(text, "<test>"), "<test>")
    assert [issue.path for issue in caught.value.issues] == ["target_groups.backend.tls"]
    assert "not found" in str(caught.value)
