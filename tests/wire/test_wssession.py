"""The WebSocket session's rules, sans-I/O: close handshakes, keepalive, the rate limit, the
lifetime and violations, table-driven; and, with hypothesis, that any cutting of the same byte
streams into reads gives the same events and the same forwarded bytes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsproxy.errors import FrameError, Reason
from wsproxy.wire.wsframe import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    encode_close,
    encode_frame,
    parse_header,
    unmask,
)
from wsproxy.wire.wssession import (
    FRAMES_DUE,
    AbortSide,
    Boundary,
    CloseSide,
    Direction,
    DirectionState,
    Ending,
    Initiator,
    Send,
    Session,
    Side,
    State,
    Wake,
)

MASK = b"\x0a\x0b\x0c\x0d"
CLIENT, TARGET = Side.CLIENT, Side.TARGET
INF = float("inf")
# ("send", side, bytes), ("close" | "abort", side), ("ending", reason), ("wake", time)
Logged = tuple[Any, ...]


def c(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """A client frame (masked)."""
    return encode_frame(opcode, payload, fin=fin, mask=MASK)


def t(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """A target frame (unmasked)."""
    return encode_frame(opcode, payload, fin=fin)


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, unmasked payload) of every whole frame in ``data``."""
    out = []
    while data:
        header = parse_header(data)
        assert header is not None
        end = header.header_len + header.payload_len
        out.append((header.opcode, unmask(data[header.header_len : end], header.mask_key)))
        data = data[end:]
    return out


def counting_random() -> Callable[[int], bytes]:
    """Deterministic "random" bytes: two runs of the same script draw the same ones."""
    drawn = 0

    def random(size: int) -> bytes:
        nonlocal drawn
        drawn += 1
        return (drawn.to_bytes(4, "big") * 4)[:size]

    return random


@dataclass
class Run:
    """A session driven as the relay adapter drives it, with a log of what it asked for.

    Consecutive writes to the same side are merged in the log: how bytes are grouped into
    writes is not a rule, their order and what comes between them is."""

    session: Session[Direction]
    now: float = 0.0
    log: list[Logged] = field(default_factory=list)

    @classmethod
    def start(cls, **config: Any) -> Run:
        config.setdefault("max_frame_bytes", 1 << 20)
        return cls(Session(Direction, 0.0, random=counting_random(), **config))

    # --- inputs ---------------------------------------------------------------------------------

    def client(self, data: bytes, cuts: Iterable[int] = ()) -> Run:
        return self._feed(self.session.to_target, data, cuts)

    def target(self, data: bytes, cuts: Iterable[int] = ()) -> Run:
        return self._feed(self.session.to_client, data, cuts)

    def tick(self, seconds: float) -> Run:
        self.now += seconds
        self.session.tick(self.now)
        self._drain()
        return self

    def request_close(self, at: Boundary = Boundary.MESSAGE, timeout: float = 5.0) -> Run:
        self.session.request_close(
            client_code=1001,
            target_code=1001,
            at=at,
            reason=Reason.DRAINING,
            now=self.now,
            timeout=timeout,
        )
        self._drain()
        return self

    def _feed(self, direction: Direction, data: bytes, cuts: Iterable[int]) -> Run:
        points = sorted({cut for cut in cuts if 0 < cut < len(data)})
        for start, end in zip([0, *points], [*points, len(data)], strict=True):
            self._read(direction, data[start:end])
        return self

    def _read(self, direction: Direction, data: bytes) -> None:
        # What relay/websocket.py's _Pipe does with one read.
        session = self.session
        receiver = CLIENT if direction is session.to_client else TARGET
        if direction.plain:
            error = session.take(direction, data)
            if error is None:
                self._record(("send", receiver, data))
                return
            if isinstance(error, FrameError):
                session.violation(direction, data, error, self.now)
            else:  # a look at the frame budget is due, after the read is forwarded whole
                self._record(("send", receiver, data))
                session.charge_frames(direction, self.now)
        else:
            taken = session.receive(direction, data, self.now)
            if taken:
                self._record(("send", receiver, data[:taken]))
        self._drain()

    def eof(self, side: Side) -> bool:
        handled = self.session.eof(side)
        self._drain()
        return handled

    def lost(self, side: Side, error: bool = False) -> Run:
        self.session.lost(side, error)
        self._drain()
        return self

    # --- outputs --------------------------------------------------------------------------------

    def state(self) -> State:
        """The session's state, read afresh (mypy would narrow ``session.state`` for good)."""
        return self.session.state

    def _drain(self) -> None:
        for event in self.session.take_events():
            match event:
                case Send(side, data):
                    self._record(("send", side, data))
                case CloseSide(side):
                    self._record(("close", side))
                case AbortSide(side):
                    self._record(("abort", side))
                case Ending(reason):
                    self._record(("ending", reason))
                case Wake(at):
                    self._record(("wake", at))

    def _record(self, item: Logged) -> None:
        last = self.log[-1] if self.log else None
        if item[0] == "send" and last is not None and last[:2] == item[:2]:
            self.log[-1] = ("send", item[1], last[2] + item[2])
        else:
            self.log.append(item)

    def take_log(self) -> list[Logged]:
        log, self.log = self.log, []
        return log

    def sent(self, side: Side) -> bytes:
        """Everything written to ``side`` so far (and forget it)."""
        data = b"".join(entry[2] for entry in self.log if entry[:2] == ("send", side))
        self.log = [entry for entry in self.log if entry[:2] != ("send", side)]
        return data

    def events(self) -> list[Logged]:
        """What was asked for besides writes (and forget all of it)."""
        return [entry for entry in self.take_log() if entry[0] != "send"]


# --- plain traffic -----------------------------------------------------------------------------


def test_plain_traffic_passes_untouched_without_events() -> None:
    run = Run.start()
    up = c(OP_TEXT, b"hello") + c(OP_BINARY, b"x" * 300)
    down = t(OP_TEXT, b"hi", fin=False) + t(OP_PING, b"p") + t(OP_CONTINUATION, b" there")
    run.client(up).target(down)
    assert run.take_log() == [("send", TARGET, up), ("send", CLIENT, down)]
    session = run.session
    assert session.to_target.plain and session.to_client.plain
    assert (session.to_target.tracker.messages, session.to_client.tracker.messages) == (2, 1)
    assert (session.to_target.received, session.to_client.received) == (len(up), len(down))
    assert session.state is State.OPEN and session.next_deadline == INF


# --- close handshakes --------------------------------------------------------------------------


def test_a_close_the_client_starts_passes_both_ways_and_ends_at_the_fin() -> None:
    run = Run.start()
    run.client(c(OP_CLOSE, (1000).to_bytes(2, "big") + b"bye"))
    assert frames(run.sent(TARGET)) == [(OP_CLOSE, (1000).to_bytes(2, "big") + b"bye")]
    run.client(c(OP_TEXT, b"after close"))  # nothing follows a Close (RFC 6455 §5.5.1)
    run.target(t(OP_CLOSE, (1000).to_bytes(2, "big")))
    assert frames(run.sent(CLIENT)) == [(OP_CLOSE, (1000).to_bytes(2, "big"))]
    assert run.take_log() == []
    session = run.session
    assert run.state() is State.OPEN  # the peers' own handshake: no deadline of ours
    assert (session.close_initiator, session.close_code) == (Initiator.CLIENT, 1000)
    assert session.to_target.state is DirectionState.CLOSE_PASSED
    assert run.eof(TARGET) is True  # the server closes TCP first (§7.1.1): done
    assert run.events() == [("ending", Reason.CLOSED), ("close", CLIENT), ("close", TARGET)]
    assert run.state() is State.CLOSED


def test_a_close_whose_payload_comes_in_later_reads_passes_whole() -> None:
    run = Run.start()
    close = c(OP_CLOSE, (4000).to_bytes(2, "big") + b"bye")
    run.client(close, cuts=[6, 7])  # the header, one status byte, the rest
    assert run.sent(TARGET) == close
    session = run.session
    assert (session.close_initiator, session.close_code) == (Initiator.CLIENT, 4000)
    assert session.to_target.state is DirectionState.CLOSE_PASSED
    run.client(c(OP_TEXT, b"after close"))
    assert run.take_log() == []


def test_a_close_the_target_starts_is_counted_as_the_targets() -> None:
    run = Run.start()
    run.target(t(OP_CLOSE, (4000).to_bytes(2, "big")))
    assert (run.session.close_initiator, run.session.close_code) == (Initiator.TARGET, 4000)


@dataclass(frozen=True)
class Handshake:
    """A close handshake the proxy starts: who is mid-message, who answers, and what follows."""

    name: str
    client_mid_message: bool
    target_mid_message: bool
    client_answers: bool
    target_answers: bool
    events: list[Logged]


HANDSHAKES = [
    Handshake(
        "both answer",
        False,
        False,
        True,
        True,
        [("close", CLIENT), ("close", TARGET)],
    ),
    Handshake(
        "the client never answers",
        False,
        False,
        False,
        True,
        [("ending", Reason.CLOSE_TIMEOUT), ("close", CLIENT), ("close", TARGET)],
    ),
    Handshake(
        "the target never answers",
        False,
        False,
        True,
        False,
        [("ending", Reason.TARGET_CLOSE_TIMEOUT), ("close", CLIENT), ("close", TARGET)],
    ),
    Handshake(
        "the client finishes its message first",
        True,
        False,
        True,
        True,
        [("close", CLIENT), ("close", TARGET)],
    ),
    Handshake(
        "the target finishes its message first",
        False,
        True,
        True,
        True,
        [("close", CLIENT), ("close", TARGET)],
    ),
]


@pytest.mark.parametrize("row", HANDSHAKES, ids=[row.name for row in HANDSHAKES])
def test_close_handshakes_the_proxy_starts(row: Handshake) -> None:
    run = Run.start()
    if row.client_mid_message:
        run.client(c(OP_TEXT, b"half ", fin=False))
    if row.target_mid_message:
        run.target(t(OP_TEXT, b"half ", fin=False))
    run.take_log()
    run.request_close(Boundary.MESSAGE, timeout=5.0)
    # A Close goes at once to each side whose incoming stream is between messages.
    expected: list[Logged] = [("ending", Reason.DRAINING)]
    expected += [] if row.target_mid_message else [("send", CLIENT)]
    expected += [] if row.client_mid_message else [("send", TARGET)]
    assert [entry[:2] for entry in run.take_log()] == [*expected, ("wake", 5.0)]
    session = run.session
    assert run.state() is State.CLOSING and session.deadline == 5.0
    assert session.exact_deadline == 5.0
    # Each Close waits for a message boundary of its stream; the rest of the message passes.
    if row.client_mid_message:
        assert session.to_target.state is DirectionState.CLOSE_AT_MESSAGE
        run.client(c(OP_CONTINUATION, b"done"))
        sent = frames(run.sent(TARGET))
        assert [opcode for opcode, _ in sent] == [OP_CONTINUATION, OP_CLOSE]
    if row.target_mid_message:
        assert session.to_client.state is DirectionState.CLOSE_AT_MESSAGE
        run.target(t(OP_CONTINUATION, b"done"))
        sent = frames(run.sent(CLIENT))
        assert [opcode for opcode, _ in sent] == [OP_CONTINUATION, OP_CLOSE]
    assert session.to_target.state is DirectionState.CLOSE_SENT
    assert session.to_client.state is DirectionState.CLOSE_SENT
    run.take_log()
    # Once a Close went out, what the sender still sends is dropped; answers are followed.
    run.client(c(OP_TEXT, b"dropped"))
    if row.client_answers:
        run.client(c(OP_CLOSE, (1001).to_bytes(2, "big")))
    if row.target_answers:
        run.target(t(OP_CLOSE, (1001).to_bytes(2, "big")))
    if not (row.client_answers and row.target_answers):
        assert run.take_log() == []
        run.tick(4.9)
        assert run.take_log() == []
        run.tick(0.1)
    assert run.take_log() == row.events
    assert run.state() is State.CLOSED and session.next_deadline == INF
    assert (session.close_initiator, session.close_code) == (Initiator.PROXY, 1001)


def test_the_proxys_close_frames_are_masked_toward_the_target_only() -> None:
    run = Run.start()
    run.request_close(Boundary.FRAME)
    log = run.take_log()
    to_client = next(e for e in log if e[:2] == ("send", CLIENT))
    to_target = next(e for e in log if e[:2] == ("send", TARGET))
    client_header = parse_header(to_client[2])
    target_header = parse_header(to_target[2])
    assert client_header is not None and not client_header.masked
    assert target_header is not None and target_header.masked
    assert frames(to_client[2]) == [(OP_CLOSE, (1001).to_bytes(2, "big") + b"draining")]


def test_a_later_close_request_keeps_the_first_deadline() -> None:
    run = Run.start()
    run.request_close(timeout=2.0)
    run.tick(1.0)
    run.session.request_close(
        client_code=1008,
        target_code=1001,
        at=Boundary.FRAME,
        reason=Reason.SESSION_REVOKED,
        now=run.now,
        timeout=30.0,
    )
    assert run.session.deadline == 2.0
    run.tick(1.0)
    assert run.events()[-3:] == [
        ("ending", Reason.CLOSE_TIMEOUT),
        ("close", CLIENT),
        ("close", TARGET),
    ]


def test_a_target_that_hangs_up_while_the_client_owes_an_answer_leaves_the_client_open() -> None:
    run = Run.start()
    run.request_close(Boundary.FRAME)
    run.target(t(OP_CLOSE, (1001).to_bytes(2, "big")))
    run.take_log()
    assert run.eof(TARGET) is True  # hold: the client's answer is still due
    run.lost(TARGET)
    assert run.events() == []  # the client keeps its socket for its Close
    run.client(c(OP_CLOSE, (1001).to_bytes(2, "big")))
    assert run.events() == [("close", CLIENT)]


# --- the sockets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("side", "error", "events"),
    [
        (
            CLIENT,
            True,
            [("send", TARGET), ("ending", Reason.CLIENT_RESET), ("close", TARGET)],
        ),
        (
            CLIENT,
            False,
            [("send", TARGET), ("ending", Reason.CLIENT_CLOSED), ("close", TARGET)],
        ),
        (
            TARGET,
            True,
            [("send", CLIENT), ("ending", Reason.TARGET_RESET), ("close", CLIENT)],
        ),
        (
            TARGET,
            False,
            [("send", CLIENT), ("ending", Reason.TARGET_CLOSED), ("close", CLIENT)],
        ),
    ],
)
def test_a_side_that_vanishes_gets_the_other_a_1001(
    side: Side, error: bool, events: list[Logged]
) -> None:
    run = Run.start()
    run.lost(side, error)
    log = run.take_log()
    assert [entry[:2] for entry in log] == events
    goodbye = frames(log[0][2])
    assert goodbye[0][0] == OP_CLOSE and goodbye[0][1][:2] == (1001).to_bytes(2, "big")
    assert run.session.state is State.CLOSED
    assert (run.session.close_initiator, run.session.close_code) == (Initiator.PROXY, 1001)


def test_no_goodbye_cuts_into_a_frame() -> None:
    run = Run.start()
    run.target(t(OP_BINARY, b"x" * 100)[:50])  # mid-frame toward the client
    run.take_log()
    run.lost(TARGET)
    assert run.take_log() == [("ending", Reason.TARGET_CLOSED), ("close", CLIENT)]


@pytest.mark.parametrize(
    ("side", "reason"), [(CLIENT, Reason.CLIENT_CLOSED), (TARGET, Reason.TARGET_CLOSED)]
)
def test_a_fin_without_a_close_is_an_abnormal_end(side: Side, reason: Reason) -> None:
    run = Run.start()
    assert run.eof(side) is False  # pass the half-close on, as a stream would
    assert run.events() == [("ending", reason)]


@pytest.mark.parametrize(("side", "other"), [(CLIENT, TARGET), (TARGET, CLIENT)])
def test_nothing_is_written_after_a_half_close_was_passed_on(side: Side, other: Side) -> None:
    """The adapter passes an unhandled FIN on (write_eof): the other side's write end is shut,
    so the goodbye the session would send when the socket then goes (a TLS client's
    close_notify closes its transport at once) must not be written: it raised "Cannot call
    write() after write_eof()" in the relay."""
    run = Run.start()
    assert run.eof(side) is False
    run.take_log()
    run.lost(side)
    assert run.sent(other) == b""
    assert ("close", other) in run.take_log()
    assert run.session.state is State.CLOSED


def test_sockets_the_adapter_closes_end_the_session() -> None:
    run = Run.start(ping_interval=1.0)
    run.session.closing()
    assert run.session.state is State.CLOSED and run.session.next_deadline == INF
    run.tick(10.0)
    assert run.take_log() == []


# --- violations (RFC 6455 §7.1.7) --------------------------------------------------------------


def with_rsv1(frame: bytes) -> bytes:
    return bytes([frame[0] | 0x40]) + frame[1:]


# (name, sender, the bad frame, close code to the client, to the target, reason)
VIOLATIONS = [
    ("unmasked client frame", CLIENT, t(OP_TEXT, b"x"), 1002, 1001, Reason.WS_UNMASKED_FRAME),
    ("masked target frame", TARGET, c(OP_TEXT, b"x"), 1014, 1002, Reason.WS_MASKED_FRAME),
    ("reserved opcode", CLIENT, c(0x3, b"x"), 1002, 1001, Reason.WS_PROTOCOL_ERROR),
    ("rsv1, no extension", CLIENT, with_rsv1(c(OP_TEXT)), 1002, 1001, Reason.WS_PROTOCOL_ERROR),
    ("fragmented ping", TARGET, t(OP_PING, b"p", fin=False), 1014, 1002, Reason.WS_PROTOCOL_ERROR),
    ("stray continuation", CLIENT, c(OP_CONTINUATION), 1002, 1001, Reason.WS_PROTOCOL_ERROR),
    ("frame too large", CLIENT, c(OP_BINARY, b"x" * 2000), 1009, 1001, Reason.WS_FRAME_TOO_LARGE),
    (
        "too large downward",
        TARGET,
        t(OP_BINARY, b"x" * 2000),
        1014,
        1009,
        Reason.WS_FRAME_TOO_LARGE,
    ),
]


@pytest.mark.parametrize("row", VIOLATIONS, ids=[row[0] for row in VIOLATIONS])
def test_a_bad_frame_fails_the_connection(
    row: tuple[str, Side, bytes, int, int, Reason],
) -> None:
    _name, sender, bad, client_code, target_code, reason = row
    run = Run.start(max_frame_bytes=1024)
    good = c(OP_TEXT, b"good") if sender is CLIENT else t(OP_TEXT, b"good")
    feed = run.client if sender is CLIENT else run.target
    feed(good + bad + good)  # the good frame before it passes, nothing of it or after it
    receiver = TARGET if sender is CLIENT else CLIENT
    log = run.take_log()
    assert log[:2] == [("send", receiver, good), ("ending", reason)]
    to_receiver = frames(b"".join(entry[2] for entry in log if entry[:2] == ("send", receiver)))
    assert [opcode for opcode, _ in to_receiver] == [OP_TEXT, OP_CLOSE]  # nothing of it or after
    for side, code in ((CLIENT, client_code), (TARGET, target_code)):
        sent = b"".join(entry[2] for entry in log if entry[:2] == ("send", side))
        assert frames(sent)[-1][1][:2] == code.to_bytes(2, "big")
    # Failing: each side is done once its Close went out, without waiting for an answer.
    assert log[-2:] == [("close", CLIENT), ("close", TARGET)]
    session = run.session
    assert session.state is State.CLOSED
    assert (session.close_initiator, session.close_code) == (Initiator.PROXY, client_code)


def test_a_bad_frame_toward_a_side_mid_frame_waits_for_its_boundary() -> None:
    run = Run.start()
    frame = t(OP_BINARY, b"y" * 100)
    run.target(frame[:40])  # the target is mid-frame toward the client
    run.client(t(OP_TEXT, b"naked"))  # the client breaks the rules
    log = run.take_log()
    assert [entry[:2] for entry in log] == [
        ("send", CLIENT),
        ("ending", Reason.WS_UNMASKED_FRAME),
        ("send", TARGET),
        ("wake", 5.0),
    ]
    assert run.session.state is State.FAILING
    run.target(frame[40:])  # the frame ends: now the client's Close, and both sockets close
    log = run.take_log()
    assert [entry[:2] for entry in log] == [("send", CLIENT), ("close", CLIENT), ("close", TARGET)]
    assert frames(frame[:40] + log[0][2]) == [
        (OP_BINARY, b"y" * 100),
        (OP_CLOSE, (1002).to_bytes(2, "big") + b"ws unmasked frame"),
    ]


def test_a_bad_frame_whose_header_was_split_cuts_its_receiver() -> None:
    run = Run.start()
    bad = t(OP_TEXT, b"naked")  # unmasked from the client: bad, known once its 2nd byte comes
    run.client(bad, cuts=[1])
    log = run.take_log()
    # The first byte went out before the frame could be judged: the target gets no Close, only
    # its socket closed; the client gets its 1002.
    assert log[0] == ("send", TARGET, bad[:1])
    assert [entry[:2] for entry in log[1:]] == [
        ("close", TARGET),
        ("ending", Reason.WS_UNMASKED_FRAME),
        ("send", CLIENT),
        ("wake", 5.0),
        ("close", CLIENT),
    ]
    assert run.session.to_target.state is DirectionState.CUT


def test_a_bad_frame_after_the_session_closed_is_judged_once_however_it_is_cut() -> None:
    """Found by the cutting property below: once both sockets were closing, a bad frame's
    header ended the session (again) with its reason, and the bytes after it, in a later read,
    with another. A closed session's sockets read nothing more (a transport stops reading when
    it is closed), so a read that raced the close is neither forwarded nor judged."""
    hostile = c(OP_TEXT, b"before") + t(OP_TEXT, b"x") + c(OP_TEXT, b"after")
    logs = []
    for cuts in ([], [len(c(OP_TEXT, b"before")) + 2]):
        run = Run.start(target_ping_interval=10.0, ping_timeout=3.0)
        run.target(t(OP_CLOSE, (1000).to_bytes(2, "big")))
        run.tick(10.0).tick(10.0).tick(3.0)  # the target never answers our ping: closed
        assert run.state() is State.CLOSED
        run.take_log()
        run.client(hostile, cuts)
        logs.append(run.take_log())
    assert logs == [[], []]


def test_nonsense_after_a_close_counts_as_the_answer() -> None:
    run = Run.start()
    run.request_close(Boundary.FRAME)
    run.target(t(OP_CLOSE, (1001).to_bytes(2, "big")))
    run.take_log()
    run.client(b"\x0f\x00")  # a reserved opcode, where the client's Close was due
    assert run.events() == [("close", CLIENT), ("close", TARGET)]


# --- keepalive (RFC 6455 §5.5.2) ---------------------------------------------------------------


def test_a_silent_client_is_pinged_and_only_its_answer_is_taken_out() -> None:
    run = Run.start(ping_interval=10.0, ping_timeout=3.0)
    assert run.session.next_deadline == 10.0
    run.tick(10.0)  # the first check marks where the client's bytes stand
    assert run.take_log() == [] and run.session.next_deadline == 20.0
    run.tick(10.0)  # nothing since: a ping, and its pong is due in 3 s
    ping = frames(run.sent(CLIENT))
    assert len(ping) == 1 and ping[0][0] == OP_PING and ping[0][1].startswith(b"wsproxy:")
    session = run.session
    assert session.pings_sent == 1 and session.next_deadline == 23.0
    assert not session.to_target.plain  # pongs are filtered while it is outstanding
    payload = ping[0][1]
    up = c(OP_TEXT, b"a") + c(OP_PONG, b"not ours") + c(OP_PONG, payload) + c(OP_TEXT, b"b")
    run.now += 1.0
    run.client(up)
    # Any other Pong passes: the target may be waiting for it.
    assert frames(run.sent(TARGET)) == [(OP_TEXT, b"a"), (OP_PONG, b"not ours"), (OP_TEXT, b"b")]
    assert run.take_log() == [("wake", 31.0)]  # the next check: an interval after the pong
    assert session.to_target.plain and session.to_target.ping_payload is None
    assert session.next_deadline == 31.0


@pytest.mark.parametrize("cut", range(1, 14))
def test_our_pong_is_recognised_wherever_a_read_cuts_it(cut: int) -> None:
    run = Run.start(ping_interval=10.0, ping_timeout=3.0)
    run.tick(10.0).tick(10.0)
    ((_, payload),) = frames(run.sent(CLIENT))
    pong = c(OP_PONG, payload)
    up = c(OP_TEXT, b"a") + pong + c(OP_TEXT, b"b")
    run.client(up, cuts=[len(c(OP_TEXT, b"a")) + cut])
    assert frames(run.sent(TARGET)) == [(OP_TEXT, b"a"), (OP_TEXT, b"b")]
    assert run.session.to_target.ping_payload is None
    assert run.take_log() == [("wake", 30.0)]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([CLIENT, TARGET]), st.data())
def test_our_pong_is_taken_out_under_any_chunking_in_either_direction(
    side: Side, data: st.DataObject
) -> None:
    """Issue 13, item 6: whichever side we ping, its answer is recognised however the reads cut
    it (its header in two segments, or one byte at a time, amid frames of any kind)."""
    interval = {"ping_interval": 10.0} if side is CLIENT else {"target_ping_interval": 10.0}
    run = Run.start(ping_timeout=3.0, **interval)
    run.tick(10.0).tick(10.0)
    (ping,) = frames(run.sent(side))
    mask = MASK if side is CLIENT else b""
    before, open_message = data.draw(side_frames(side is CLIENT, False))
    after, _ = data.draw(side_frames(side is CLIENT, open_message))
    pong = encode_frame(OP_PONG, ping[1], mask=mask)
    stream = before + pong + after
    # Cuts anywhere, always some inside the pong's header (2 bytes, 6 when masked).
    start = len(before)
    cuts = data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=20))
    cuts += data.draw(st.lists(st.integers(start + 1, start + len(pong) - 1), min_size=1))
    run.now += 1.0
    (run.client if side is CLIENT else run.target)(stream, cuts)
    assert run.sent(TARGET if side is CLIENT else CLIENT) == before + after
    direction = run.session.to_target if side is CLIENT else run.session.to_client
    assert direction.ping_payload is None and direction.plain
    run.tick(5.0)  # past the pong's deadline: nothing happens
    assert run.events() == [("wake", 31.0)] and run.session.state is State.OPEN


def test_bytes_behind_our_pong_count_as_activity_however_the_read_is_cut() -> None:
    """Found by the cutting property below: silence was counted from the end of the read that
    held our pong, so a frame behind it in the same read went unnoticed (the client was pinged
    at the next check) but in the next read did not."""
    logs = []
    for cut in (False, True):
        run = Run.start(ping_interval=10.0, ping_timeout=3.0)
        run.tick(10.0).tick(10.0)
        ((_, payload),) = frames(run.sent(CLIENT))
        pong = c(OP_PONG, payload)
        run.client(pong + c(OP_TEXT, b"behind it"), [len(pong)] if cut else [])
        run.tick(10.0)  # 30.0: the first check after the pong
        logs.append(run.take_log())
        assert run.session.pings_sent == 1  # the client was not silent
    assert logs[0] == logs[1]


def test_a_silent_target_is_pinged_with_a_masked_frame() -> None:
    run = Run.start(target_ping_interval=10.0, ping_timeout=3.0)
    run.target(t(OP_TEXT, b"alive"))
    run.tick(10.0)
    run.take_log()
    run.tick(10.0)
    (entry,) = run.take_log()
    assert entry[:2] == ("send", TARGET)
    header = parse_header(entry[2])
    assert header is not None and header.masked and header.opcode == OP_PING


def test_an_active_side_is_not_pinged() -> None:
    run = Run.start(ping_interval=10.0)
    for _ in range(5):
        run.client(c(OP_TEXT, b"still here"))
        run.tick(10.0)
    assert run.session.pings_sent == 0


@pytest.mark.parametrize(
    ("silent", "reason", "code"),
    [(CLIENT, Reason.PING_TIMEOUT, 1006), (TARGET, Reason.TARGET_PING_TIMEOUT, 1001)],
)
def test_a_side_that_does_not_answer_in_time_is_cut(
    silent: Side, reason: Reason, code: int
) -> None:
    interval = {"ping_interval": 10.0} if silent is CLIENT else {"target_ping_interval": 10.0}
    run = Run.start(ping_timeout=3.0, **interval)
    run.tick(10.0).tick(10.0)
    assert run.session.pings_sent == 1
    run.take_log()
    run.tick(2.9)
    assert run.take_log() == []
    run.tick(0.1)
    other = TARGET if silent is CLIENT else CLIENT
    log = run.take_log()
    # The silent side is dropped, the other told why (1001) and closed.
    assert [entry[:2] for entry in log] == [
        ("ending", reason),
        ("send", other),
        ("abort", silent),
        ("close", other),
    ]
    goodbye = frames(log[1][2])
    assert goodbye[0][0] == OP_CLOSE and goodbye[0][1][:2] == (1001).to_bytes(2, "big")
    assert (run.session.close_initiator, run.session.close_code) == (Initiator.PROXY, code)
    assert run.session.state is State.CLOSED


@pytest.mark.parametrize(
    ("side", "reason"), [(CLIENT, Reason.PING_TIMEOUT), (TARGET, Reason.TARGET_PING_TIMEOUT)]
)
def test_traffic_after_a_ping_proves_the_sender_alive_until_it_falls_silent(
    side: Side, reason: Reason
) -> None:
    """Issue 13, item 6: a peer busy sending, whose Pong is slow (behind a large frame, a slow
    link), is alive: every ping_timeout with bytes from it since the ping, or since the last such
    check, waits one more. Only ping_timeout of silence with the ping unanswered cuts it."""
    interval = {"ping_interval": 10.0} if side is CLIENT else {"target_ping_interval": 10.0}
    run = Run.start(ping_timeout=3.0, **interval)
    send = run.client if side is CLIENT else run.target
    frame = c if side is CLIENT else t
    run.tick(10.0).tick(10.0)  # 20.0: the ping; its pong due at 23.0
    ((_, payload),) = frames(run.sent(side))
    for _ in range(4):  # 12 s of messages and no pong: four deadlines pass
        run.now += 2.0
        send(frame(OP_TEXT, b"busy"))
        run.tick(1.0)
    assert run.session.state is State.OPEN and run.session.pings_sent == 1
    receiver = TARGET if side is CLIENT else CLIENT
    assert run.take_log() == [("send", receiver, frame(OP_TEXT, b"busy") * 4)]  # nothing else
    run.now += 1.0
    send(frame(OP_PONG, payload))  # the late answer is still ours: taken out
    assert run.take_log() == [("wake", 43.0)]
    # Silent since its pong: pinged again; one message, then silence: one more wait, then cut.
    run.tick(10.0)  # 43.0: the second ping, due 46.0
    assert run.session.pings_sent == 2
    run.take_log()
    send(frame(OP_TEXT, b"last words"))
    run.tick(3.0)  # 46.0: bytes since the ping, wait until 49.0
    assert run.events() == []
    run.tick(3.0)
    assert ("ending", reason) in run.events() and run.state() is State.CLOSED


def test_no_ping_cuts_into_a_frame_and_none_goes_out_while_closing() -> None:
    run = Run.start(ping_interval=10.0)
    frame = t(OP_BINARY, b"x" * 100)
    run.target(frame[:30])  # mid-frame toward the client
    run.tick(10.0).tick(10.0)
    assert run.session.pings_sent == 0  # silent client, but its stream is mid-frame: next time
    run.target(frame[30:])
    run.tick(10.0)
    assert run.session.pings_sent == 1
    run = Run.start(ping_interval=10.0)
    run.request_close(Boundary.MESSAGE, timeout=100.0)
    run.tick(10.0).tick(10.0).tick(10.0)
    assert run.session.pings_sent == 0


# --- the rate limit and the lifetime -----------------------------------------------------------


def test_the_message_rate_has_a_burst_then_closes_1008() -> None:
    run = Run.start(max_messages_per_second=10.0, messages_burst=5)
    assert not run.session.to_target.plain  # charged per read
    for _ in range(5):
        run.client(c(OP_TEXT, b"m"))
    assert run.events() == []
    run.now += 0.1  # one token back
    run.client(c(OP_TEXT, b"m"))
    assert run.events() == []
    run.client(c(OP_TEXT, b"m"))  # overdrawn: Close 1008 at the next frame boundary
    log = run.take_log()
    assert [entry[:2] for entry in log] == [
        ("send", TARGET),
        ("ending", Reason.MESSAGE_RATE_EXCEEDED),
        ("send", CLIENT),
        ("send", TARGET),
        ("wake", 5.1),
    ]
    assert frames(log[2][2])[0][1][:2] == (1008).to_bytes(2, "big")
    assert frames(log[3][2])[0][1][:2] == (1001).to_bytes(2, "big")


def test_a_read_that_overdraws_passes_whole() -> None:
    run = Run.start(max_messages_per_second=1.0, messages_burst=2)
    burst = c(OP_TEXT, b"1") + c(OP_TEXT, b"2") + c(OP_TEXT, b"3")
    run.client(burst)
    log = run.take_log()
    assert log[0] == ("send", TARGET, burst)
    assert ("ending", Reason.MESSAGE_RATE_EXCEEDED) in log


FLOODS = {
    "pings": c(OP_PING),
    "pongs": c(OP_PONG),
    "empty continuations": c(OP_CONTINUATION, fin=False),
    "empty messages": c(OP_TEXT),
}


@pytest.mark.parametrize("kind", list(FLOODS))
def test_every_frame_counts_against_the_frame_budget(kind: str) -> None:
    """Issue 13, item 8: control frames and continuations are charged too (the message rate
    counts neither); the read that overdraws passes whole, then Close 1008 / 1001."""
    run = Run.start(max_frames_per_second=10.0, frames_burst=5, max_messages_per_second=0)
    opening = c(OP_TEXT, b"open", fin=False) if kind == "empty continuations" else b""
    frame = FLOODS[kind]
    run.client(opening + frame * 4)  # 5 frames: the burst
    assert run.events() == [] and run.session.to_target.plain  # the hot path throughout
    run.now += 0.1  # one frame's worth back
    run.client(frame)
    assert run.events() == []
    run.client(frame * 3)  # overdrawn
    log = run.take_log()
    # A flood: the connection is failed, both sockets closed once the Close frames went out,
    # without waiting for answers (the rest of the flood would be parsed meanwhile).
    assert [entry[:2] for entry in log] == [
        ("send", TARGET),
        ("ending", Reason.FRAME_RATE_EXCEEDED),
        ("send", CLIENT),
        ("send", TARGET),
        ("wake", 5.1),
        ("close", CLIENT),
        ("close", TARGET),
    ]
    assert log[0][2] == frame * 3
    assert frames(log[2][2]) == [(OP_CLOSE, (1008).to_bytes(2, "big") + b"frame rate exceeded")]
    assert frames(log[3][2])[0][1][:2] == (1001).to_bytes(2, "big")
    assert run.state() is State.CLOSED
    assert (run.session.close_initiator, run.session.close_code) == (Initiator.PROXY, 1008)


def test_the_frame_budget_is_looked_at_only_when_it_could_be_overdrawn() -> None:
    """No clock on the hot path: ``take`` asks for the time only once the frames counted pass
    what the budget held at its last look."""
    run = Run.start(max_frames_per_second=100.0, frames_burst=50)
    session = run.session
    direction = session.to_target
    assert direction.frames_free == 50
    assert session.take(direction, c(OP_PING) * 50) is None
    assert session.take(direction, c(OP_PING)) is FRAMES_DUE
    session.charge_frames(direction, 0.2)  # 20 frames back, 51 spent: 19 left
    assert direction.frames_free == 51 + 19
    assert run.take_log() == []
    # No budget toward the client (targets are the operator's own services).
    down = session.to_client
    assert down.frame_budget is None
    assert session.take(down, t(OP_PING) * 100_000) is None
    # A billion frames on: one look, which finds nothing to charge and moves the mark as far.
    down.tracker.frames = down.frames_free
    assert session.take(down, t(OP_PING)) is FRAMES_DUE
    session.charge_frames(down, 1.0)
    assert session.take(down, t(OP_PING)) is None and run.take_log() == []


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 30), st.sampled_from([0.0, 0.01, 0.1, 0.5, 2.0])), max_size=40
    ),
    st.sampled_from([0, 1, 2, 7]),
)
def test_the_lazy_frame_budget_cuts_no_sender_within_the_rate_and_lets_none_past_it(
    reads: list[tuple[int, float]], pongs_every: int
) -> None:
    """Looking at the budget only when it could be overdrawn (rate 20/s, burst 30): the session
    never closes before a token bucket charged at every read would be overdrawn, and while it
    stays open the client has sent at most ``burst + rate * seconds`` frames."""
    rate, burst = 20.0, 30
    run = Run.start(max_frames_per_second=rate, frames_burst=burst)
    tokens, mark, total = float(burst), 0.0, 0
    overdrawn = False
    for index, (count, pause) in enumerate(reads):
        run.now += pause
        frame = c(OP_PONG) if pongs_every and index % pongs_every == 0 else c(OP_BINARY, b"m")
        run.client(frame * count)
        total += count
        tokens = min(float(burst), tokens + (run.now - mark) * rate) - count
        mark = run.now
        overdrawn = overdrawn or tokens < 0
        if ("ending", Reason.FRAME_RATE_EXCEEDED) in run.events():
            assert overdrawn, index  # never before the strict bucket
            return
        assert total <= burst + rate * run.now, index  # never past the envelope


def test_the_lifetime_ends_the_session_at_message_boundaries() -> None:
    run = Run.start(max_session_seconds=60.0)
    assert run.session.exact_deadline == 60.0
    run.client(c(OP_TEXT, b"first", fin=False))
    run.take_log()
    run.tick(60.0)
    log = run.take_log()
    assert [entry[:2] for entry in log] == [
        ("ending", Reason.MAX_SESSION_DURATION),
        ("send", CLIENT),
        ("wake", 65.0),
    ]
    run.client(c(OP_CONTINUATION, b" and last"))
    sent = frames(run.sent(TARGET))
    assert [opcode for opcode, _ in sent] == [OP_CONTINUATION, OP_CLOSE]
    assert sent[1][1][:2] == (1001).to_bytes(2, "big")


# --- any cutting of the same streams ------------------------------------------------------------

SIZES = st.sampled_from([0, 1, 5, 125, 126, 300, 70000])


@st.composite
def side_frames(draw: st.DrawFn, masked: bool, open_message: bool) -> tuple[bytes, bool]:
    """Valid frames of one side: whole or fragmented messages, control frames between
    fragments; returns them and whether a message is left open."""
    mask = MASK if masked else b""
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        fragments = draw(st.integers(1, 3))
        for index in range(fragments):
            if draw(st.booleans()):
                control = draw(st.sampled_from([OP_PING, OP_PONG]))
                out += encode_frame(control, b"c" * draw(st.integers(0, 10)), mask=mask)
            first = index == 0 and not open_message
            opcode = draw(st.sampled_from([OP_TEXT, OP_BINARY])) if first else OP_CONTINUATION
            fin = index == fragments - 1
            out += encode_frame(opcode, b"p" * draw(SIZES), fin=fin, mask=mask)
            open_message = not fin
    if draw(st.booleans()):
        opcode = OP_CONTINUATION if open_message else draw(st.sampled_from([OP_TEXT, OP_BINARY]))
        out += encode_frame(opcode, b"o" * draw(st.integers(0, 40)), fin=False, mask=mask)
        open_message = True
    return out, open_message


Step = tuple[str, Any]


@st.composite
def scripts(draw: st.DrawFn) -> list[Step]:
    """Reads from either side, pongs to our pings, ticks, a drain, Close frames: a session's
    life as the adapter would feed it."""
    steps: list[Step] = []
    open_message = {CLIENT: False, TARGET: False}
    closed = {CLIENT: False, TARGET: False}
    for _ in range(draw(st.integers(1, 10))):
        kind = draw(st.sampled_from(["client", "target", "pong", "tick", "drain", "close"]))
        side = draw(st.sampled_from([CLIENT, TARGET]))
        if kind in ("client", "target"):
            side = CLIENT if kind == "client" else TARGET
            if closed[side]:
                continue
            data, open_message[side] = draw(side_frames(side is CLIENT, open_message[side]))
            steps.append(("bytes", (side, data)))
        elif kind == "pong":
            if not closed[side]:
                steps.append(("pong", side))
        elif kind == "tick":
            steps.append(("tick", draw(st.sampled_from([0.5, 3.0, 10.0, 13.0]))))
        elif kind == "drain":
            steps.append(("drain", draw(st.sampled_from(list(Boundary)))))
        elif not closed[side] and not open_message[side]:
            mask = MASK if side is CLIENT else b""
            steps.append(("bytes", (side, encode_close(1000, "bye", mask=mask))))
            closed[side] = True
    return steps


def play(script: list[Step], cut: Callable[[bytes], list[int]]) -> Run:
    run = Run.start(ping_interval=10.0, target_ping_interval=10.0, ping_timeout=3.0)
    for kind, value in script:
        if kind == "bytes":
            side, data = value
            feed = run.client if side is CLIENT else run.target
            feed(data, cut(data))
        elif kind == "pong":
            # The side answers our ping, if one is outstanding, with more around it.
            direction = run.session.to_target if value is CLIENT else run.session.to_client
            payload = direction.ping_payload
            if payload is not None and direction.state is DirectionState.OPEN:
                mask = MASK if value is CLIENT else b""
                data = (
                    encode_frame(OP_PONG, b"other", mask=mask)
                    + encode_frame(OP_PONG, payload, mask=mask)
                    + encode_frame(OP_PING, b"", mask=mask)
                )
                feed = run.client if value is CLIENT else run.target
                feed(data, cut(data))
        elif kind == "tick":
            run.tick(value)
        else:
            run.request_close(value)
    return run


def summary(run: Run) -> tuple[object, ...]:
    session = run.session
    counts = [
        (d.tracker.frames, d.tracker.messages, d.tracker.closes, d.received, d.state)
        for d in (session.to_target, session.to_client)
    ]
    return (session.state, session.close_code, session.close_initiator, session.pings_sent, counts)


@settings(max_examples=300, deadline=None)
@given(scripts(), st.data())
def test_any_cutting_of_the_same_streams_gives_the_same_events_and_bytes(
    script: list[Step], data: st.DataObject
) -> None:
    whole = play(script, lambda _: [])

    def cut(chunk: bytes) -> list[int]:
        if not chunk:
            return []
        return data.draw(st.lists(st.integers(1, max(1, len(chunk) - 1)), max_size=12))

    pieces = play(script, cut)
    bytewise = play(script, lambda chunk: list(range(1, len(chunk))) if len(chunk) < 400 else [])
    assert pieces.log == whole.log
    assert bytewise.log == whole.log
    assert summary(pieces) == summary(whole) == summary(bytewise)


@settings(max_examples=200, deadline=None)
@given(
    scripts(),
    st.sampled_from([row for row in VIOLATIONS if row[1] is CLIENT]),
    st.data(),
)
def test_any_cutting_that_keeps_a_bad_header_whole_gives_the_same_failure(
    script: list[Step],
    row: tuple[str, Side, bytes, int, int, Reason],
    data: st.DataObject,
) -> None:
    bad = row[2]
    header = parse_header(bad)
    assert header is not None
    before = c(OP_TEXT, b"before")
    hostile = before + bad + c(OP_TEXT, b"after")
    start, end = len(before), len(before) + header.header_len
    # The client sends nothing else, so the bad frame comes between its messages.
    script = [step for step in script if step[0] != "bytes" or step[1][0] is not CLIENT]
    script.append(("bytes", (CLIENT, hostile)))

    def cut(chunk: bytes) -> list[int]:
        cuts = data.draw(st.lists(st.integers(1, max(1, len(chunk) - 1)), max_size=8))
        if chunk is hostile:
            cuts = [point for point in cuts if not start < point < end]
        return cuts

    whole = play(script, lambda _: [])
    pieces = play(script, cut)
    assert pieces.log == whole.log
    # (After the bad frame the tracker has lost its place: what it still counts may differ.)
    assert summary(pieces)[:4] == summary(whole)[:4]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from([CLIENT, TARGET]), st.binary(max_size=60)),
            st.sampled_from([0.5, 10.0, 40.0]),
            st.just("drain"),
        ),
        max_size=20,
    )
)
def test_any_input_raises_nothing_and_closed_is_final(steps: list[Any]) -> None:
    run = Run.start(ping_interval=10.0, target_ping_interval=10.0, ping_timeout=3.0)
    closed = False
    for step in steps:
        if isinstance(step, tuple):
            side, data = step
            if data:
                (run.client if side is CLIENT else run.target)(data)
        elif step == "drain":
            run.request_close(Boundary.FRAME)
        else:
            run.tick(step)
        if closed:
            assert run.state() is State.CLOSED
            assert not [entry for entry in run.take_log() if entry[0] == "close"]
        closed = run.state() is State.CLOSED
        run.take_log()
