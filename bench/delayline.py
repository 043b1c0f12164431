#!/usr/bin/env python3
"""A userspace TCP delay line: listens on LISTEN_PORT and relays to TARGET_PORT on loopback,
delaying every chunk by DELAY_MS in each direction (so the round trip grows by 2 x DELAY_MS)
and, with MBIT, limiting each direction to MBIT megabits per second across all connections.
Chunks are scheduled, not slept on, so the delay alone does not reduce bandwidth. netem is
missing from this kernel; this stands in for it. It listens on loopback unless LISTEN names
an address (HOST:PORT, e.g. the host end of a veth pair to a network namespace); it always
relays to loopback.

usage: delayline.py [HOST:]LISTEN_PORT TARGET_PORT DELAY_MS [MBIT]
"""
import asyncio
import sys


class Link:
    """One direction's shared bandwidth: when the link is next free."""

    def __init__(self, mbit):
        self.bytes_per_s = mbit * 1e6 / 8 if mbit else None
        self.free_at = 0.0

    def schedule(self, now, delay, size):
        if self.bytes_per_s is None:
            return now + delay
        start = max(now, self.free_at)
        self.free_at = start + size / self.bytes_per_s
        return self.free_at + delay


async def pump(reader, writer, delay, link):
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def sender():
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                break
            writer.write(data)
            await writer.drain()
        writer.close()

    task = asyncio.create_task(sender())
    try:
        while True:
            data = await reader.read(65536)
            due = link.schedule(loop.time(), delay, len(data))
            await queue.put((due, data if data else None))
            if not data:
                break
    except ConnectionError:
        await queue.put((loop.time(), None))
    await task


async def main(listen_host, listen, target, delay_ms, mbit):
    delay = delay_ms / 1000.0
    up, down = Link(mbit), Link(mbit)

    async def handle(client_reader, client_writer):
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            pump(client_reader, up_writer, delay, up),
            pump(up_reader, client_writer, delay, down),
            return_exceptions=True,
        )

    server = await asyncio.start_server(handle, listen_host, listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    mbit = float(sys.argv[4]) if len(sys.argv) > 4 else None
    host, _, port = sys.argv[1].rpartition(":")
    asyncio.run(main(host or "127.0.0.1", int(port), int(sys.argv[2]), float(sys.argv[3]), mbit))
