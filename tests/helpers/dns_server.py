"""A DNS server on loopback for discovery tests: dnslib builds and parses the messages, asyncio
serves them over UDP (dnspython's resolver asks over UDP; its answers here are far below 512
bytes, so it never retries over TCP).

Answers change at run time (``set_a``, ``set_aaaa``, ``set_srv``); ``mode`` makes the server
answer SERVFAIL or stop answering; ``close`` frees the port (then nothing listens there).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal, cast

from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A, DNSRecord

Mode = Literal["answer", "servfail", "silent"]


def _key(name: str) -> str:
    return name.rstrip(".").lower()


class DnsServer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[RR]] = {}
        self.mode: Mode = "answer"
        self.queries = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    @property
    def nameserver(self) -> str:
        """As ``nameservers`` takes it."""
        return f"127.0.0.1:{self.port}"

    def set_a(self, name: str, *addresses: str) -> None:
        self.records[(_key(name), "A")] = [
            RR(name, QTYPE.A, rdata=A(address), ttl=1) for address in addresses
        ]

    def set_aaaa(self, name: str, *addresses: str) -> None:
        self.records[(_key(name), "AAAA")] = [
            RR(name, QTYPE.AAAA, rdata=AAAA(address), ttl=1) for address in addresses
        ]

    def set_srv(self, name: str, *answers: tuple[int, int, int, str]) -> None:
        """(priority, weight, port, target) per answer."""
        self.records[(_key(name), "SRV")] = [
            RR(name, QTYPE.SRV, rdata=SRV(priority, weight, port, target), ttl=1)
            for priority, weight, port, target in answers
        ]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not always an asyncio.DatagramTransport subclass (the selector loop's is not).
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.queries += 1
        if self.mode == "silent" or self.transport is None:
            return
        request = DNSRecord.parse(data)
        reply = request.reply()
        name = _key(str(request.q.qname))
        if self.mode == "servfail":
            reply.header.rcode = RCODE.SERVFAIL
        elif not any(key[0] == name for key in self.records):
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            for record in self.records.get((name, QTYPE[request.q.qtype]), []):
                reply.add_answer(record)
        self.transport.sendto(reply.pack(), addr)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


@asynccontextmanager
async def dns_server() -> AsyncIterator[DnsServer]:
    """A server on 127.0.0.1, port 0 (read back as ``port``); closed at the end."""
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(DnsServer, local_addr=("127.0.0.1", 0))
    server.port = transport.get_extra_info("sockname")[1]
    try:
        yield server
    finally:
        server.close()
