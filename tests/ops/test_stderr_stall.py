"""Nothing the proxy does on its event loop writes to stderr directly: with stderr stalled (a pipe
nobody reads), client input that makes Python report an error must not freeze the loop."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import operator
import os
import re
import select
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ProxyFactory, listener_address
from tests.helpers.pki import Pki, make_pki
from tests.helpers.process import WSPROXY, parse_metrics
from wsproxy.demo import EchoTarget
from wsproxy.ops.logs import JsonFormatter, NonBlockingHandler, install_hooks

# A host name of the same length as the one patched in, so no length field of the ClientHello
# changes: the hello stays well-formed, only the server name holds a byte that is not ASCII.
PLACEHOLDER = b"zzzz.edge.internal"
BAD_NAME = b"\xffzzz.edge.internal"


def hello_with_bad_server_name() -> bytes:
    """A real ClientHello (Python's own TLS stack) whose SNI host name starts with byte 0xff."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=PLACEHOLDER.decode())
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello.count(PLACEHOLDER) == 1
    return hello.replace(PLACEHOLDER, BAD_NAME)


@dataclass
class StalledProxy:
    """``wsproxy run`` whose stderr is a pipe the test holds and (after startup) never reads."""

    process: asyncio.subprocess.Process
    stderr: int  # the read end
    ports: dict[str, int]

    def fill_stderr(self) -> int:
        """Fill the pipe to the brim (through the proxy's own fd 2); returns the bytes written."""
        writer = os.open(f"/proc/{self.process.pid}/fd/2", os.O_WRONLY | os.O_NONBLOCK)
        written = 0
        try:
            # Pages first, then single bytes: a write of up to PIPE_BUF bytes is all or nothing,
            # so the last page could otherwise keep room for a short traceback.
            for size in (4096, 1):
                with contextlib.suppress(BlockingIOError):
                    while True:
                        written += os.write(writer, b"#" * size)
            return written
        finally:
            os.close(writer)

    def drain_stderr(self, until: re.Pattern[str], timeout: float = 10.0) -> str:
        """Read the pipe again until a line matches ``until``; returns what was read as text."""
        os.set_blocking(self.stderr, False)
        received = b""
        deadline = time.monotonic() + timeout
        while not until.search(received.decode(errors="replace")):
            remaining = deadline - time.monotonic()
            assert remaining > 0, received[-2000:]
            select.select([self.stderr], [], [], remaining)
            with contextlib.suppress(BlockingIOError):
                chunk = os.read(self.stderr, 1 << 16)
                assert chunk, received[-2000:]
                received += chunk
        return received.decode(errors="replace")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def stalled_proxy(tmp_path: Path, pki: Pki, echo: EchoTarget) -> AsyncIterator[StalledProxy]:
    cert, key = pki.files("edge")
    config = tmp_path / "proxy.toml"
    config.write_text(
        f"""
[admin]
address = "127.0.0.1:0"
[listeners.edge]
address = "127.0.0.1:0"
protocol = "tls"
websocket = true
default_target_group = "echo"
[listeners.edge.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
[target_groups.echo]
targets = [{{ address = "{echo.address}" }}]
"""
    )
    read_end, write_end = os.pipe()
    process = await asyncio.create_subprocess_exec(
        *WSPROXY, "--log-format", "json", "run", "-c", str(config), stderr=write_end
    )
    os.close(write_end)  # the proxy holds the only write end: EOF if it dies
    reader = os.fdopen(read_end, "rb", buffering=0)
    ports: dict[str, int] = {}
    seen = b""
    try:
        async with asyncio.timeout(15):
            while len(ports) < 2:
                chunk = await asyncio.to_thread(reader.read, 1 << 16)
                assert chunk, seen.decode(errors="replace")
                seen += chunk
                text = seen.decode(errors="replace")
                if found := re.search(r"listener 'edge' listening on 127\.0\.0\.1:(\d+)", text):
                    ports["edge"] = int(found.group(1))
                if found := re.search(r"admin listening on http://127\.0\.0\.1:(\d+)", text):
                    ports["admin"] = int(found.group(1))
        yield StalledProxy(process, read_end, ports)
    finally:
        if process.returncode is None:
            process.kill()  # a proxy frozen in a write to stderr would not drain on SIGTERM
            await process.wait()
        reader.close()


async def wss_round_trip(port: int, pki: Pki) -> None:
    """Open a new WebSocket session through the TLS listener and echo one message."""
    context = ssl.create_default_context(cafile=pki.ca_file)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
        session.ws_connect(
            f"wss://127.0.0.1:{port}/canary",
            headers={"Host": "edge.internal"},
            server_hostname="edge.internal",
        ) as ws,
    ):
        await ws.send_bytes(b"canary" * 100)
        assert await ws.receive_bytes(timeout=5) == b"canary" * 100


async def send_hello(port: int, hello: bytes) -> bytes:
    """Send ``hello`` on a fresh connection; return all the proxy sent back before closing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(hello)
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()


async def test_a_server_name_with_byte_ff_is_refused_without_touching_a_stalled_stderr(
    stalled_proxy: StalledProxy, pki: Pki
) -> None:
    """CPython cannot decode such a name for the SNI callback and reports it as an "unraisable"
    error; its default hook writes a traceback straight to stderr, and a full pipe then blocks
    the event loop for good. Now the report goes through the non-blocking log handler, the
    client gets a fatal alert, and unrelated sessions keep opening."""
    port = stalled_proxy.ports["edge"]
    await wss_round_trip(port, pki)
    assert stalled_proxy.fill_stderr() > 0
    hello = hello_with_bad_server_name()
    for _ in range(5):
        async with asyncio.timeout(10):
            answer = await send_hello(port, hello)
        # A TLS alert record (content type 21), fatal (level 2): refused, not just dropped.
        assert answer[:1] == b"\x15" and answer[5:6] == b"\x02", answer
    async with asyncio.timeout(15):  # a frozen loop never answers: this would time out
        await wss_round_trip(port, pki)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{stalled_proxy.ports['admin']}/metrics") as response,
        ):
            metrics = parse_metrics(await response.text())
    failed = {
        labels["result"]: value
        for labels, value in metrics["wsproxy_tls_handshakes_total"]
        if labels["listener"] == "edge"
    }
    assert failed.get("tls_bad_server_name") == 5, failed
    # Once stderr is read again, the report is there as one JSON line, and nothing else of it.
    text = await asyncio.to_thread(
        stalled_proxy.drain_stderr, re.compile(r'"event":"unraisable".*\n')
    )
    lines = [line.lstrip("#") for line in text.splitlines()]
    report = json.loads(next(line for line in lines if '"event":"unraisable"' in line))
    assert report["level"] == "warning"
    assert "UnicodeDecodeError" in report["exception"]
    assert not any(line.startswith(("Exception ignored", "Traceback")) for line in lines)


@pytest.fixture
def hooks() -> Iterator[None]:
    """``install_hooks`` for one test; Python's (and pytest's) hooks back afterwards."""
    saved = sys.unraisablehook, threading.excepthook
    install_hooks()
    try:
        yield
    finally:
        sys.unraisablehook, threading.excepthook = saved
        logging.captureWarnings(False)


class RaisesWhenCollected:
    def __del__(self) -> None:
        raise RuntimeError("raised in __del__")


def test_unraisable_and_thread_exceptions_are_logged_not_printed(
    hooks: None, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Python's own reports go to the log handler (one record each, with the traceback), never
    to stderr from the thread that raised."""
    with caplog.at_level(logging.WARNING, logger="wsproxy.python"):
        RaisesWhenCollected()  # collected at once: its __del__ raises where nobody can catch
        thread = threading.Thread(target=operator.truediv, args=(1, 0), name="doomed")
        thread.start()
        thread.join()
    assert capsys.readouterr().err == ""
    events = {record.__dict__["event"]: record for record in caplog.records}
    unraisable = events["unraisable"]
    assert unraisable.levelno == logging.WARNING and unraisable.exc_info is not None
    assert unraisable.exc_info[0] is RuntimeError
    assert "RaisesWhenCollected" in unraisable.getMessage()
    ended = events["thread_exception"]
    assert ended.levelno == logging.ERROR and ended.exc_info is not None
    assert ended.exc_info[0] is ZeroDivisionError
    assert ended.__dict__["fields"] == {"thread": "doomed"}
    entry = json.loads(JsonFormatter().format(ended))
    assert entry["event"] == "thread_exception" and "ZeroDivisionError" in entry["exception"]


def test_a_record_that_cannot_be_formatted_is_counted_not_printed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """logging's default handleError prints a traceback to stderr on the caller's thread."""
    stream = io.StringIO()
    handler = NonBlockingHandler(stream)
    logger = logging.getLogger("tests.unformattable")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("%d connections", "many")  # a log call whose argument does not fit
        logger.warning("next line")
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert capsys.readouterr().err == ""
    assert handler.dropped == 1
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("logging error: cannot format a record of tests.unformattable")
    assert lines[1] == "next line"


async def test_an_exception_in_the_sni_callback_refuses_that_handshake_only(
    make_proxy: ProxyFactory,
    echo: EchoTarget,
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Whatever goes wrong while choosing the certificate stays inside the callback: a fatal
    alert to that client, a count, a log line; the next handshake is served."""
    cert, key = pki.files("edge")
    proxy = await make_proxy(
        f"""
[listeners.edge]
address = "127.0.0.1:0"
protocol = "tls"
websocket = true
default_target_group = "echo"
[listeners.edge.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
[target_groups.echo]
targets = [{{ address = "{echo.address}" }}]
"""
    )
    listener = proxy.listeners["edge"]
    assert listener.tls is not None
    select_certificate = listener.tls.select
    calls = 0

    def fails_once(server_name: str | None) -> ssl.SSLContext:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise LookupError("certificate table changed under the handshake")
        return select_certificate(server_name)

    monkeypatch.setattr(listener.tls, "select", fails_once)
    port = listener_address(proxy).port
    with caplog.at_level(logging.ERROR, logger="wsproxy.tls"):
        answer = await send_hello(port, hello_with_bad_server_name().replace(BAD_NAME, PLACEHOLDER))
        await wss_round_trip(port, pki)
    assert answer[:1] == b"\x15" and answer[5:7] == b"\x02\x50", answer  # fatal internal_error
    assert listener.stats.tls_handshakes["tls_bad_server_name"] == 1
    assert listener.stats.tls_handshakes["ok"] == 1
    (record,) = [r for r in caplog.records if r.name == "wsproxy.tls"]
    assert record.exc_info is not None and record.exc_info[0] is LookupError
    assert "zzzz.edge.internal" in record.getMessage()
    assert "Exception ignored" not in capsys.readouterr().err
