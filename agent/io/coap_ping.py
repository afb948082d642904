"""CoAP ping (RFC 7252 §4.3): an empty confirmable message, answered by a Reset.

Any CoAP endpoint answers it, whatever its resources, keys or read policy, so
it tells "this UDP port is reachable and a CoAP stack listens there" apart
from everything above that layer. The serial console's `net` and `ping` and
`meshagent doctor` use it on seeds and peers: a firewall that drops UDP while
TCP passes shows up here as a timeout.

A plain UDP socket rather than aiocoap: one datagram out, one back, no
exchange state kept in a shared context.
"""

from __future__ import annotations

import asyncio
import errno
import secrets
import socket
import time

CON_EMPTY = 0x40  #: version 1, type CON, token length 0
RST_EMPTY = 0x70  #: version 1, type RST, token length 0


def ping_datagram(mid: int) -> bytes:
    return bytes([CON_EMPTY, 0x00, mid >> 8, mid & 0xFF])


def is_reset_for(data: bytes, mid: int) -> bool:
    return len(data) >= 4 and data[0] == RST_EMPTY and data[1] == 0 and (data[2] << 8 | data[3]) == mid


async def coap_ping(host: str, port: int, timeout: float = 1.0, attempts: int = 2) -> float | None:
    """Round-trip time in ms of a CoAP ping to host:port, or None when no Reset
    came back within `timeout` seconds per attempt (silence: the host is down,
    or a firewall drops UDP). Raises ConnectionRefusedError when the host
    answered ICMP port unreachable (it is up, nothing listens on that UDP
    port), and other OSErrors when the address cannot be used at all (no
    route, unresolvable name)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, sockaddr)
        refused = False
        for _ in range(max(1, attempts)):
            mid = secrets.randbelow(0x10000)
            started = time.monotonic()
            try:
                await loop.sock_sendall(sock, ping_datagram(mid))
                if await _wait_reset(loop, sock, mid, started + timeout):
                    return (time.monotonic() - started) * 1000
            except ConnectionRefusedError:
                refused = True  # try again: the agent may be starting
    if refused:
        raise ConnectionRefusedError(errno.ECONNREFUSED, f"port unreachable: {host} is up but nothing listens on UDP port {port}")
    return None


async def _wait_reset(loop, sock: socket.socket, mid: int, deadline: float) -> bool:
    """True when the Reset for `mid` arrives before `deadline`; other datagrams
    (a late answer to an earlier attempt) are skipped. ICMP port unreachable
    raises ConnectionRefusedError (the socket is connected)."""
    for _ in range(64):  # bounded: at most this many stray datagrams per attempt
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 64), left)
        except (TimeoutError, asyncio.TimeoutError):
            return False
        if is_reset_for(data, mid):
            return True
    return False
