"""Our own IPv4 addresses: which one to advertise, and noticing when it changes.

Peers must be told an address they can reach us at. A wildcard bind (0.0.0.0)
says nothing, so we pick the host's address on the interface of the default
route (the one the LAN sees), falling back to any non-loopback address. On a
Pi the address changes when Wi-Fi reconnects with a new DHCP lease; nothing
tells us, so the runtime polls `AddressWatcher.check()`.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

ROUTE_PATH = Path("/proc/net/route")
WILDCARDS = frozenset({"", "0.0.0.0", "::"})
FALLBACK = "127.0.0.1"
_RTF_UP = 0x1


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def _ipv4_by_interface(interfaces: list[str] | None) -> dict[str, list[str]]:
    """IPv4 addresses per interface name, names sorted so the order is stable."""
    try:
        table = psutil.net_if_addrs()
    except OSError as exc:  # netlink denied (sandboxed unit) or similar
        log.warning("cannot list interface addresses: %s", exc)
        return {}
    wanted = None if interfaces is None else set(interfaces)
    return {
        name: [a.address for a in table[name] if a.family == socket.AF_INET]
        for name in sorted(table)
        if wanted is None or name in wanted
    }


def local_ipv4_addresses(interfaces: list[str] | None = None) -> list[str]:
    """IPv4 addresses of the given interfaces (all if None), sorted by interface name.

    Loopback addresses are left out unless they are all there is, so that a
    single-host test setup (interfaces=["lo"]) still gets an address.
    """
    addresses = [a for addrs in _ipv4_by_interface(interfaces).values() for a in addrs]
    outside = [a for a in addresses if not _is_loopback(a)]
    return outside or addresses


def default_route_interface(route_path: Path = ROUTE_PATH) -> str | None:
    """Name of the interface carrying the IPv4 default route (lowest metric), if any."""
    try:
        lines = route_path.read_text().splitlines()[1:]
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for line in lines:
        fields = line.split()
        try:
            iface, dest, flags, metric, mask = fields[0], fields[1], int(fields[3], 16), int(fields[6]), fields[7]
        except (IndexError, ValueError):
            continue
        if dest == "00000000" and mask == "00000000" and flags & _RTF_UP:
            if best is None or metric < best[0]:
                best = (metric, iface)
    return None if best is None else best[1]


def pick_advertise(
    bind: str, configured: str, interfaces: list[str] | None, route_path: Path = ROUTE_PATH
) -> str:
    """The address peers should use to reach us.

    Order: the configured address; the bind address unless it is a wildcard;
    the first non-loopback IPv4 of the default route's interface; the first
    non-loopback IPv4 of any allowed interface (sorted by name); 127.0.0.1.
    """
    if configured:
        return configured
    if bind not in WILDCARDS:
        return bind
    by_iface = _ipv4_by_interface(interfaces)
    default_iface = default_route_interface(route_path)
    candidates = by_iface.get(default_iface, []) if default_iface else []
    candidates = candidates + [a for addrs in by_iface.values() for a in addrs]
    return next((a for a in candidates if not _is_loopback(a)), FALLBACK)


class AddressWatcher:
    """Remembers the advertised address and reports when it changes.

    The runtime calls `check()` every address_check_ms; a changed address
    must be re-announced over mDNS and to peers.
    """

    def __init__(
        self, bind: str, configured: str, interfaces: list[str] | None, route_path: Path = ROUTE_PATH
    ) -> None:
        self._bind = bind
        self._configured = configured
        self._interfaces = interfaces
        self._route_path = route_path
        self.current = pick_advertise(bind, configured, interfaces, route_path)

    def check(self) -> str | None:
        """The new address if it changed since the last call, else None."""
        address = pick_advertise(self._bind, self._configured, self._interfaces, self._route_path)
        if address == self.current:
            return None
        log.info("advertise address changed: %s -> %s", self.current, address)
        self.current = address
        return address
