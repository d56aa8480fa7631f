"""The server side of an API listener's WebSocket: ``websockets``' sans-I/O ``ServerProtocol``,
with one correction.

RFC 6455 §5.4 lets control frames, Close among them, arrive between the fragments of a
message; a Close then drops the unfinished message and is answered like any other (Autobahn
case 7.1.5). ``ServerProtocol`` instead fails the connection with 1002 "incomplete fragmented
message".
"""

from __future__ import annotations

from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol


class ApiServerProtocol(ServerProtocol):
    """See the module docstring."""

    def recv_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.CLOSE:
            self.current_size = None  # the unfinished message is dropped, not an error
        super().recv_frame(frame)
