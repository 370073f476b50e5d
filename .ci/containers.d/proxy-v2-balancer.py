#!/usr/bin/env python3
"""Stand-in for the Kubernetes manifest's load balancer (an NLB with PROXY protocol v2).

    proxy-v2-balancer.py LISTEN_PORT=TARGET_IP:TARGET_PORT ...

Listens on 127.0.0.1:LISTEN_PORT for each pair; every connection is forwarded to the
target after a PROXY v2 header carrying the client's real address and the listening one.
Prints "ready" once every port listens. Only CI's .ci/containers uses it.
"""
import asyncio
import ipaddress
import struct
import sys

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def header(src, dst):
    # Version 2, PROXY command; TCP over IPv4; 12 address bytes.
    body = ipaddress.IPv4Address(src[0]).packed + ipaddress.IPv4Address(dst[0]).packed
    body += struct.pack("!HH", src[1], dst[1])
    return SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.write_eof()
        except (OSError, RuntimeError):
            writer.close()


def handler(target):
    async def handle(c_reader, c_writer):
        src = c_writer.get_extra_info("peername")[:2]
        dst = c_writer.get_extra_info("sockname")[:2]
        try:
            u_reader, u_writer = await asyncio.open_connection(*target)
        except OSError:
            c_writer.close()
            return
        u_writer.write(header(src, dst))
        await asyncio.gather(pipe(c_reader, u_writer), pipe(u_reader, c_writer))
        c_writer.close()
        u_writer.close()

    return handle


async def main(pairs):
    servers = []
    for pair in pairs:
        port, target = pair.split("=")
        host, tport = target.rsplit(":", 1)
        servers.append(await asyncio.start_server(handler((host, int(tport))), "127.0.0.1", int(port)))
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
