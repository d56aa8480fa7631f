"""A stand-in WebSocket echo server on the sans-I/O ``ServerProtocol`` of ``websockets``.

It does what an API listener in front of an echo integration (``$default``, ``respond = true``)
does to each message, with the same library and the same limits: permessage-deflate when offered,
``max_frame_bytes`` and ``max_message_bytes`` (over either: Close 1009), fragments reassembled,
text checked as UTF-8 as it arrives (1007), and each whole message echoed back as one message of
the same type. It proves the Autobahn harness until a real API listener takes its place.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
from typing import cast

from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

# API Gateway's defaults, which [apis.NAME] takes as its own.
MAX_FRAME_BYTES = 32 * 1024
MAX_MESSAGE_BYTES = 128 * 1024

# After the server's Close, how long the peer has to answer before the socket is dropped
# (RFC 6455 §7.1.1 leaves the wait to the endpoint; websockets' own default is 10 s).
CLOSE_TIMEOUT_SECONDS = 5.0

_TEXT_ERROR = "invalid UTF-8 in a text message"


class _ServerProtocol(ServerProtocol):
    """``ServerProtocol``, but a Close between the fragments of a message closes normally."""

    def recv_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.CLOSE:
            # RFC 6455 §5.4: control frames, Close among them, may come between the fragments
            # of a message; the unfinished message is dropped and the Close echoed (Autobahn
            # 7.1.5). websockets instead fails the connection with 1002 "incomplete fragmented
            # message".
            self.current_size = None
        super().recv_frame(frame)


class EchoConnection(asyncio.Protocol):
    """One client: bytes in, the sans-I/O protocol's events, echoed messages out."""

    def __init__(self, max_frame_bytes: int | None, max_message_bytes: int | None) -> None:
        self.protocol = _ServerProtocol(
            extensions=[ServerPerMessageDeflateFactory()],
            max_size=(max_message_bytes, max_frame_bytes),
        )
        self.transport: asyncio.Transport | None = None
        self.handshake_done = False
        self.message_opcode: Opcode | None = None
        self.fragments: list[bytes] = []
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.close_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.protocol.receive_data(data)
        self._process()

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._process()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_timer is not None:
            self.close_timer.cancel()

    def _process(self) -> None:
        for event in self.protocol.events_received():
            if isinstance(event, Request):
                response = self.protocol.accept(event)
                self.protocol.send_response(response)
                self.handshake_done = response.status_code == 101
            elif isinstance(event, Frame):
                self._frame(event)
        self._flush()

    def _frame(self, frame: Frame) -> None:
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
            self.message_opcode = frame.opcode
            self.fragments = []
            self.decoder.reset()
        elif frame.opcode is not Opcode.CONT or self.message_opcode is None:
            return  # control frames: the protocol answers Ping and Close itself
        self.fragments.append(bytes(frame.data))
        if self.message_opcode is Opcode.TEXT:
            # Checked frame by frame, so a bad byte fails the connection at once
            # (RFC 6455 §8.1), not only when the message ends.
            try:
                self.decoder.decode(frame.data, final=frame.fin)
            except UnicodeDecodeError:
                self.protocol.fail(1007, _TEXT_ERROR)
                return
        if not frame.fin:
            return
        message = b"".join(self.fragments)
        opcode, self.message_opcode, self.fragments = self.message_opcode, None, []
        if self.protocol.state is not State.OPEN:
            return  # a Close arrived first: nothing more is sent after ours
        if opcode is Opcode.TEXT:
            self.protocol.send_text(message)
        else:
            self.protocol.send_binary(message)

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        for data in self.protocol.data_to_send():
            if data:
                transport.write(data)
            else:
                # End of stream: a server closes the TCP connection first (RFC 6455 §7.1.1);
                # close() still sends what is buffered.
                transport.close()
                return
        if self.protocol.close_expected() and self.close_timer is None:
            loop = asyncio.get_running_loop()
            self.close_timer = loop.call_later(CLOSE_TIMEOUT_SECONDS, transport.abort)


class EchoServer:
    """Listens on 127.0.0.1, port 0 unless told; ``url`` once started."""

    def __init__(
        self,
        *,
        port: int = 0,
        max_frame_bytes: int | None = MAX_FRAME_BYTES,
        max_message_bytes: int | None = MAX_MESSAGE_BYTES,
    ) -> None:
        self.port = port
        self.max_frame_bytes = max_frame_bytes
        self.max_message_bytes = max_message_bytes
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: EchoConnection(self.max_frame_bytes, self.max_message_bytes),
            "127.0.0.1",
            self.port,
        )
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)


async def _serve_forever(
    port: int, max_frame_bytes: int | None, max_message_bytes: int | None
) -> None:
    server = EchoServer(
        port=port, max_frame_bytes=max_frame_bytes, max_message_bytes=max_message_bytes
    )
    await server.start()
    print(server.url, flush=True)
    await asyncio.Event().wait()


def main() -> None:
    """By hand: ``python -m tests.autobahn.echo_server [--port N] [--max-frame-bytes N] ...``;
    a limit of 0 turns it off (to show which Autobahn cases fail only because of a limit)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--max-frame-bytes", type=int, default=MAX_FRAME_BYTES)
    parser.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES)
    args = parser.parse_args()
    asyncio.run(
        _serve_forever(args.port, args.max_frame_bytes or None, args.max_message_bytes or None)
    )


if __name__ == "__main__":
    main()
