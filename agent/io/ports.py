"""Who holds a UDP port, and a bind check that sees them.

aiocoap binds its server socket with SO_REUSEPORT, so a second agent started
by the same user on the same address and port would bind too, and the kernel
would share the datagrams between the two: both half-deaf, no error anywhere.
`check_free` binds once without SO_REUSEPORT first, which fails with
EADDRINUSE whenever any socket holds the port, and names the holder. Doctor
uses the same listing to say what is in the way.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import psutil

from agent.io.addresses import WILDCARDS


class PortInUse(OSError):
    """The agent's UDP port is taken; the message names by whom."""


def is_agent(cmdline: list[str]) -> bool:
    """`meshagent run ...` (console script) or `python -m agent run ...`."""
    script = any(Path(a).name == "meshagent" for a in cmdline[:2])
    module = any(a == "agent" and b == "-m" for b, a in zip(cmdline, cmdline[1:]))
    return (script or module) and "run" in cmdline


def udp_holders(bind: str, port: int) -> list[tuple[int | None, str, bool]]:
    """(pid, how to name it, is it a meshagent agent) of every UDP socket in the
    way of binding bind:port; pid None where we may not see it (another user's
    process, and we are not root)."""
    clash = None if bind in WILDCARDS else WILDCARDS | {bind, f"::ffff:{bind}"}
    try:
        conns = [c for c in psutil.net_connections(kind="udp")
                 if c.laddr and c.laddr.port == port and (clash is None or c.laddr.ip in clash)]
    except (psutil.Error, OSError):
        return []
    out = []
    for pid in sorted({c.pid for c in conns}, key=lambda p: p or 0):
        try:
            proc = psutil.Process(pid) if pid else None
            cmd = proc.cmdline() if proc else []
            out.append((pid, f"pid {pid} ({proc.name()})" if proc else "a process we may not see (run as root)", is_agent(cmd)))
        except psutil.Error:
            out.append((pid, f"pid {pid}", False))
    return out


def bind_error(bind: str, port: int) -> OSError | None:
    """The error a plain bind of bind:port (no SO_REUSEADDR/REUSEPORT) gets, or
    None when it would succeed: any socket holding the port shows as EADDRINUSE."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((bind, port))
    except OSError as exc:
        return exc
    return None


def check_free(bind: str, port: int) -> None:
    """Raise PortInUse (naming the holders) when bind:port is taken, even by a
    socket with SO_REUSEPORT; other bind errors are left to the real bind."""
    exc = bind_error(bind, port)
    if exc is None or exc.errno != errno.EADDRINUSE:
        return
    holders = udp_holders(bind, port)
    named = ", ".join(label for _, label, _ in holders) or "a process we may not see"
    agent = " (another meshagent agent: stop it first, or give this one another node.port)" if any(a for *_, a in holders) else ""
    raise PortInUse(errno.EADDRINUSE, f"UDP {bind}:{port} is already in use by {named}{agent}")
