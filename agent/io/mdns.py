"""Finding mesh peers on the local link with mDNS / DNS-SD (python-zeroconf, asyncio API).

A freshly flashed Pi knows no seed addresses; mDNS lets it find its mesh on
the LAN. We advertise `<label>._meshagent._udp.local.` with our CoAP port in
SRV (never TXT) and TXT `id`, `v` (protocol version) and `mesh`, and browse
the same type. Peers of our mesh and protocol version are handed to the
runtime, which joins them through membership; mDNS only seeds membership, so
departures are left to SWIM failure detection and merely counted here.

The instance label is the node id when it is a valid single DNS label;
otherwise (over 63 bytes, or with dots, which python-zeroconf would split into
several labels) it is shortened and suffixed with a hash of the id. The full
id is always in TXT, and only TXT is trusted.

The SRV target host name is the instance name (zeroconf's own default):
`<id>.local.` would collide with the host name that avahi-daemon already
announces whenever the node id is the host name.

Every await on zeroconf is bounded, so a stuck network never hangs the
agent's start, address change or shutdown.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from zeroconf import (
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from agent import PROTOCOL_VERSION
from agent.io.addresses import local_ipv4_addresses

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICE_TYPE = "_meshagent._udp.local."
NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
MAX_NODE_ID_BYTES = 64
MAX_LABEL_BYTES = 63  # RFC 6763 §4.1.1: one DNS label
MAX_TXT_BYTES = 200  # RFC 6763 §6.2: keep the TXT record small

RESOLVE_TIMEOUT_MS = 3000  # one SRV/TXT/A lookup of a browsed peer
REGISTER_TIMEOUT_S = 12.0  # zeroconf start-up (≤ 9 s) plus probing (≈ 1.7 s)
STEP_TIMEOUT_S = 3.0  # any other single zeroconf await
MAX_PENDING_RESOLVES = 256  # a noisy LAN must not make us spawn tasks without bound


def valid_node_id(node_id: str) -> bool:
    return len(node_id.encode()) <= MAX_NODE_ID_BYTES and NODE_ID_RE.fullmatch(node_id) is not None


def instance_label(node_id: str) -> str:
    """The DNS-SD instance label for a node id: the id itself when it fits one label."""
    if len(node_id) <= MAX_LABEL_BYTES and "." not in node_id:
        return node_id
    digest = hashlib.sha256(node_id.encode()).hexdigest()[:8]
    return f"{node_id.replace('.', '-')[: MAX_LABEL_BYTES - len(digest) - 1]}-{digest}"


def txt_properties(node_id: str, mesh: str, version: int) -> dict[str, str]:
    """TXT key/values; ValueError if they would exceed MAX_TXT_BYTES on the wire."""
    props = {"id": node_id, "v": str(version), "mesh": mesh}
    size = sum(1 + len(f"{key}={value}".encode()) for key, value in props.items())
    if size > MAX_TXT_BYTES:
        raise ValueError(f"mDNS TXT record would be {size} bytes (max {MAX_TXT_BYTES}): shorten the mesh name")
    return props


async def _bounded(aw: Awaitable[T], what: str, timeout: float = STEP_TIMEOUT_S) -> T | None:
    """Await with a deadline; on timeout or error log and return None (used where we must go on)."""
    try:
        return await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        log.warning("mDNS: %s timed out after %.1f s", what, timeout)
    except Exception:
        log.exception("mDNS: %s failed", what)
    return None


class MdnsDiscovery:
    """Advertises this node and reports peers of the same mesh and protocol version.

    `on_peer(node_id, address, port)` is called from the event loop each time a
    matching peer is resolved (again after it changes its records); it must be
    quick and idempotent. Exceptions in it are logged and counted, never fatal.
    """

    def __init__(
        self,
        node_id: str,
        mesh: str,
        address: str,
        port: int,
        interfaces: list[str] | None,
        on_peer: Callable[[str, str, int], None],
        *,
        protocol_version: int = PROTOCOL_VERSION,
    ) -> None:
        if not valid_node_id(node_id):
            raise ValueError(f"invalid node id {node_id!r}")
        if not 0 < port < 65536:
            raise ValueError(f"invalid port {port}")
        self.node_id = node_id
        self.mesh = mesh
        self.address = address
        self.name = f"{instance_label(node_id)}.{SERVICE_TYPE}"
        self._port = port
        self._interfaces = interfaces
        self._on_peer = on_peer
        self._version = str(protocol_version)
        self._txt = txt_properties(node_id, mesh, protocol_version)
        self.counters = dict.fromkeys(
            ("discovered", "other_mesh", "other_version", "invalid", "unresolved", "removed", "dropped",
             "callback_errors"),
            0,
        )
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._pending: dict[str, asyncio.Task[None]] = {}

    def _zc_interfaces(self) -> list[str] | InterfaceChoice:
        """Zeroconf wants addresses, not names. Configured interfaces without an
        address yet give an empty list: zeroconf then has no sender until
        update_address() finds the link up."""
        if self._interfaces is None:
            return InterfaceChoice.All
        return local_ipv4_addresses(self._interfaces)

    def _service_info(self) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE,
            self.name,
            port=self._port,
            properties=self._txt,
            server=self.name,
            parsed_addresses=[self.address],
        )

    async def start(self) -> None:
        """Browse, then register (probing takes about 1.7 s). Raises if registration fails,
        RuntimeError if another live node already uses our instance name; cleans up first."""
        if self._zc is not None:
            raise RuntimeError("MdnsDiscovery already started")
        self._zc = AsyncZeroconf(interfaces=self._zc_interfaces(), ip_version=IPVersion.V4Only)
        try:
            self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
            info = self._service_info()
            announce = await asyncio.wait_for(self._zc.async_register_service(info), REGISTER_TIMEOUT_S)
            self._info = info
            await _bounded(announce, "announce")
        except NonUniqueNameException:
            await self.stop()
            raise RuntimeError(f"mDNS name {self.name!r} is already taken: duplicate node id?") from None
        except BaseException:
            await self.stop()
            raise

    async def update_address(self, address: str) -> None:
        """Advertise a new address (Wi-Fi reconnect, new lease) and pick up new links.

        The A record goes out with the cache-flush bit, so peers drop the old one.
        """
        self.address = address
        if self._zc is None or self._info is None:
            return
        self._info = self._service_info()
        announce = await _bounded(self._zc.async_update_service(self._info), "update service")
        # Zeroconf does not watch links itself; a reconnect may have brought a new one.
        interfaces = None if self._interfaces is None else self._zc_interfaces()
        await _bounded(self._zc.async_update_interfaces(interfaces), "update interfaces")
        if announce is not None:
            await _bounded(announce, "announce")

    async def stop(self) -> None:
        """Stop browsing, send goodbyes, close sockets. Idempotent; bounded (≈ 0.5 s normally)."""
        zc, self._zc = self._zc, None
        if zc is None:
            return
        if self._browser is not None:
            await _bounded(self._browser.async_cancel(), "cancel browser")
            self._browser = None
        tasks = list(self._pending.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await _bounded(asyncio.gather(*tasks, return_exceptions=True), "cancel lookups")
        if self._info is not None:
            goodbye = await _bounded(zc.async_unregister_service(self._info), "unregister")
            if goodbye is not None:
                await _bounded(goodbye, "goodbye")
            self._info = None
        try:
            await asyncio.wait_for(zc.async_close(), STEP_TIMEOUT_S)
        except Exception:  # includes TimeoutError
            log.exception("mDNS: close failed; closing sockets directly")
            zc.zeroconf.close()  # from inside the loop this only shuts the sockets down

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        """Browser callback (zeroconf passes these exact keyword names); only schedules work."""
        if state_change is ServiceStateChange.Removed:
            self.counters["removed"] += 1
            return
        if name in self._pending:
            return
        if len(self._pending) >= MAX_PENDING_RESOLVES:
            self.counters["dropped"] += 1
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._pending[name] = task
        task.add_done_callback(lambda _t: self._pending.pop(name, None))

    async def _resolve(self, name: str) -> None:
        zc = self._zc
        if zc is None:
            return
        try:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            found = await asyncio.wait_for(
                info.async_request(zc.zeroconf, RESOLVE_TIMEOUT_MS), RESOLVE_TIMEOUT_MS / 1000 + 1
            )
        except TimeoutError:
            found = False
        except Exception as exc:  # a malformed name from the network, or zeroconf closing
            log.debug("mDNS: cannot resolve %r: %s", name, exc)
            self.counters["invalid"] += 1
            return
        if not found:
            self.counters["unresolved"] += 1
            return
        self._consider(info)

    def _consider(self, info: AsyncServiceInfo) -> None:
        """Filter a resolved service by TXT and hand it to on_peer."""
        props: dict[str, Any] = info.decoded_properties
        peer_id = props.get("id")
        if not isinstance(peer_id, str) or not valid_node_id(peer_id) or not info.port:
            self.counters["invalid"] += 1
            return
        if peer_id == self.node_id:
            return
        if props.get("mesh") != self.mesh:
            self.counters["other_mesh"] += 1
            return
        if props.get("v") != self._version:
            self.counters["other_version"] += 1
            return
        addresses = info.parsed_addresses(IPVersion.V4Only) or info.parsed_scoped_addresses()
        if not addresses:
            self.counters["unresolved"] += 1
            return
        self.counters["discovered"] += 1
        try:
            self._on_peer(peer_id, addresses[0], info.port)
        except Exception:
            self.counters["callback_errors"] += 1
            log.exception("mDNS: on_peer(%s) failed", peer_id)
