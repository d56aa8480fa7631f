"""Sans-I/O protocol code: bytes in, values or events out.

Nothing in this package imports asyncio, socket, ssl or time; a test proves it.
"""
