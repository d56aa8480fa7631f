"""The relay: memory stays flat when a fast target streams into a slow client (crossed
backpressure).

The proxy runs as its own process so its resident memory can be read from /proc.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from tests.helpers.servers import RawServer

TRANSFER = 200 * 1024 * 1024
CHUNK = 256 * 1024


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1)) * 1024


async def test_200_mib_into_a_slow_reader_keeps_memory_flat(tmp_path: Path) -> None:
    block = b"\xa5" * CHUNK

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(TRANSFER // CHUNK):
            writer.write(block)
            await writer.drain()
        writer.write_eof()
        await reader.read()

    server = RawServer(firehose)
    await server.start()
    config = tmp_path / "proxy.toml"
    config.write_text(
        f"""
[admin]
enabled = false
[listeners.edge]
address = "127.0.0.1:0"
default_target_group = "fast"
[target_groups.fast]
targets = [{{ address = "{server.address}" }}]
"""
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wsproxy", "run", "-c", str(config),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        port = 0
        async with asyncio.timeout(15):
            while not port:
                raw = await process.stderr.readline()
                assert raw, "wsproxy exited before listening"
                line = raw.decode()
                found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
                port = int(found.group(1)) if found else 0
        baseline = rss_bytes(process.pid)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        received = 0
        peak = baseline
        async with asyncio.timeout(120):
            while True:
                data = await reader.read(64 * 1024)
                if not data:
                    break
                received += len(data)
                if received % (4 * 1024 * 1024) < len(data):
                    peak = max(peak, rss_bytes(process.pid))
                await asyncio.sleep(0.001)  # ~60 MB/s at most: far slower than the target
        writer.close()
        assert received == TRANSFER
        growth = peak - baseline
        print(
            f"proxy RSS baseline {baseline / 2**20:.1f} MiB, peak growth {growth / 2**20:.2f} MiB"
        )
        assert growth < 16 * 1024 * 1024, f"proxy memory grew by {growth / 2**20:.1f} MiB"
    finally:
        process.terminate()
        await process.wait()
        await server.stop()
