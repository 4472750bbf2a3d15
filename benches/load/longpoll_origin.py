#!/usr/bin/env python3
"""Long-poll origin for benches/load.sh: answers every request with "ok" after a delay.

stdlib only. HTTP/1.1 with keep-alive and Content-Length; listens on 127.0.0.1 only.

    python3 longpoll_origin.py PORT [DELAY_SECONDS]
"""
import asyncio
import sys

BODY = b"ok"
HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n"
)
MAX_HEAD = 64 * 1024


async def handle(reader, writer, delay):
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            version = lines[0].rsplit(" ", 1)[-1] if lines and lines[0] else "HTTP/1.1"
            length = 0
            close = version == "HTTP/1.0"
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                value = value.strip().lower()
                if name == "content-length":
                    length = int(value or 0)
                elif name == "connection":
                    if "close" in value:
                        close = True
                    elif "keep-alive" in value:
                        close = False
                elif name == "transfer-encoding" and "chunked" in value:
                    # Not needed by the benchmark; refuse rather than mis-frame.
                    close = True
            if length:
                await reader.readexactly(length)
            await asyncio.sleep(delay)
            writer.write(HEAD + (b"Connection: close\r\n" if close else b"") + b"\r\n" + BODY)
            await writer.drain()
            if close:
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def main():
    port = int(sys.argv[1])
    delay = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, delay), "127.0.0.1", port, backlog=4096, limit=MAX_HEAD
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
