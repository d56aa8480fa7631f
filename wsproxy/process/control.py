"""The channel between the supervisor and one worker: messages and listening sockets.

A Unix stream socket pair, driven by ``add_reader``/``add_writer`` rather than a transport:
descriptors ride as SCM_RIGHTS with the first bytes of their message, which asyncio transports
cannot send or receive. Either side can ``send`` a one-way message or ``request`` an answer;
``on_message`` answers requests (its return value is the reply).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable

from wsproxy.errors import MalformedControlMessage, WorkerUnavailable
from wsproxy.wire.control import Message, MessageDecoder, encode_message

log = logging.getLogger(__name__)

MAX_FDS_PER_READ = 256  # more than any reload sends (listeners x 1 socket per worker)
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS_PER_READ * array.array("i").itemsize)

Handler = Callable[[Message, list[socket.socket]], Awaitable[Message | None]]


class Channel:
    """One end of a supervisor-worker socket pair."""

    def __init__(self, sock: socket.socket, on_message: Handler) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._on_message = on_message
        self._loop = asyncio.get_running_loop()
        self._decoder = MessageDecoder()
        self._fds: deque[int] = deque()  # received, not yet claimed by a message
        self._outbox: deque[tuple[memoryview, list[int]]] = deque()
        self._writing = False
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._next_id = 1
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()
        self._loop.add_reader(sock.fileno(), self._readable)

    # --- sending --------------------------------------------------------------------------------

    def send(self, message: Message, socks: list[socket.socket] | tuple[()] = ()) -> None:
        """Queue a one-way message (with listening sockets: duplicated into the peer)."""
        if self.closed.is_set():
            raise WorkerUnavailable("control channel is closed")
        if socks:
            message = {**message, "fds": len(socks)}
        data = memoryview(encode_message(message))
        self._outbox.append((data, [s.fileno() for s in socks]))
        self._flush()

    async def request(
        self, message: Message, wait_seconds: float, socks: list[socket.socket] | tuple[()] = ()
    ) -> Message:
        """Send ``message`` and wait for its reply; ``WorkerUnavailable`` on timeout or close."""
        ident = self._next_id
        self._next_id += 1
        reply: asyncio.Future[Message] = self._loop.create_future()
        self._pending[ident] = reply
        try:
            self.send({**message, "id": ident}, socks)
            async with asyncio.timeout(wait_seconds):
                return await reply
        except TimeoutError:
            raise WorkerUnavailable(
                f"no answer to '{message.get('op')}' within {wait_seconds:g} s"
            ) from None
        finally:
            self._pending.pop(ident, None)

    def _flush(self) -> None:
        while self._outbox:
            data, fds = self._outbox[0]
            try:
                if fds:
                    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    sent = self._sock.sendmsg([data], ancillary)
                else:
                    sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._close(f"send failed: {exc}")
                return
            if sent < len(data):
                self._outbox[0] = (data[sent:], [])  # the descriptors went with the first byte
                break
            self._outbox.popleft()
        want_writer = bool(self._outbox)
        if want_writer != self._writing:
            self._writing = want_writer
            if want_writer:
                self._loop.add_writer(self._sock.fileno(), self._flush)
            else:
                self._loop.remove_writer(self._sock.fileno())

    # --- receiving ------------------------------------------------------------------------------

    def _readable(self) -> None:
        while not self.closed.is_set():
            try:
                data, ancillary, flags, _ = self._sock.recvmsg(65536, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._close(f"receive failed: {exc}")
                return
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self._fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                self._close("descriptors were truncated")
                return
            if not data:
                self._close("peer closed the channel")
                return
            try:
                messages = self._decoder.feed(data)
            except MalformedControlMessage as exc:
                self._close(str(exc))
                return
            for message in messages:
                self._dispatch(message)

    def _dispatch(self, message: Message) -> None:
        count = message.get("fds", 0)
        if not isinstance(count, int) or count > len(self._fds):
            self._close(f"message claims {count!r} descriptors; {len(self._fds)} arrived")
            return
        socks = [socket.socket(fileno=self._fds.popleft()) for _ in range(count)]
        reply_to = message.get("reply_to")
        if reply_to is not None:
            future = self._pending.get(reply_to)
            if future is not None and not future.done():
                future.set_result(message)
            for sock in socks:
                sock.close()
            return
        task = self._loop.create_task(self._answer(message, socks))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, message: Message, socks: list[socket.socket]) -> None:
        try:
            reply = await self._on_message(message, socks)
        except Exception as exc:  # the channel outlives one bad message; the peer hears why
            log.exception("control message '%s' failed", message.get("op"))
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        ident = message.get("id")
        if ident is not None and not self.closed.is_set():
            self.send({**(reply or {}), "reply_to": ident})

    # --- closing --------------------------------------------------------------------------------

    def _close(self, why: str) -> None:
        if self.closed.is_set():
            return
        log.debug("control channel closed: %s", why)
        self.closed.set()
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._sock.fileno())
            if self._writing:
                self._loop.remove_writer(self._sock.fileno())
        self._sock.close()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                socket.socket(fileno=fd).close()
        self._fds.clear()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(WorkerUnavailable(f"control channel closed: {why}"))
        for task in self._tasks:
            task.cancel()  # nobody is left to hear the answers

    def close(self) -> None:
        self._close("closed by this side")


def make_pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor end, worker end), neither inheritable: give the worker end to its child in
    ``pass_fds``, which makes it inheritable for that one spawn. An inheritable end would also
    reach a worker spawned while it is open (uvloop's spawn closes no inherited descriptor),
    and then the supervisor would not see the channel close when its own worker dies."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


__all__ = ["Channel", "Message", "make_pair"]
