"""The agent's one CoAP endpoint (aiocoap, UDP): mesh datagrams in and out, and the
read-only API resources.

Mesh traffic is a non-confirmable POST to `/mesh` carrying one sealed datagram
and the No-Response option (RFC 7967), so nothing is answered at the CoAP
layer: SWIM has its own acks and timeouts, and a probe must not wait on CoAP's
2-second confirmable retransmission timer. aiocoap's `Context.request()` keeps
a token and a pending response for every request, which for fire-and-forget
messages would only pile up; so outgoing mesh messages are handed to the
message layer (`MessageManager.send_message`) of the same UDP transport the
server listens on. They therefore leave from the server's port, which is the
address peers see and answer to.

Incoming mesh datagrams are taken off the message layer before aiocoap's
deduplication: it remembers every (peer, Message ID) for EXCHANGE_LIFETIME
(247 s) with a timer each, which caps a peer pair at 65,536 messages per 247 s
(after that, new messages are silently dropped as duplicates) and lets a
flood of forged requests grow memory for minutes. The envelope's replay
window already does that job for the mesh, bounded. Everything else (the
API's GETs, a confirmable POST /mesh) takes aiocoap's normal path.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import secrets
import socket
from collections import OrderedDict
from collections.abc import Callable

import aiocoap
import aiocoap.resource as resource
from aiocoap import NON, Message
from aiocoap.numbers.codes import Code

log = logging.getLogger("meshagent.coap")

CBOR = 60  #: CoAP content-format application/cbor
NO_RESPONSE_ALL = 26  #: RFC 7967: suppress 2.xx, 4.xx and 5.xx responses
MESH_PATH = ("mesh",)
RAFT_PATH = ("raft",)  #: Raft datagrams: the same handling as /mesh, up to RAFT_MAX_DATAGRAM
#: aiocoap's UDP transport reads at most 4096 bytes per datagram (its recvmsg
#: buffer), CoAP header included; a Raft datagram stays under that. On a
#: 1500-byte MTU it travels as up to 3 IP fragments; Raft retries a lost one.
RAFT_MAX_DATAGRAM = 4000
MAX_REMOTES = 1024  #: resolved peer addresses cached


def uri_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


def plain_addr(remote) -> tuple[str, int] | None:
    """(ip, port) of an aiocoap remote, with IPv4-mapped IPv6 turned back into IPv4."""
    try:
        sockaddr = remote.sockaddr
        return _plain_sockaddr(sockaddr[0], sockaddr[1])
    except (AttributeError, ValueError, IndexError, TypeError):
        return None


@functools.lru_cache(maxsize=MAX_REMOTES)
def _plain_sockaddr(host: str, port: int) -> tuple[str, int]:
    """Cached: every datagram needs it, and parsing an address costs ~15 µs."""
    ip = ipaddress.ip_address(host.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(port)


class _MeshResource(resource.Resource):
    """POST /mesh: one sealed datagram. Never answered (No-Response)."""

    rt = "meshagent.mesh"
    ct = 60

    def __init__(self, on_datagram: Callable[[bytes, tuple[str, int]], None]):
        super().__init__()
        self._on_datagram = on_datagram

    async def render_post(self, request):
        src = plain_addr(request.remote)
        if src is not None:
            self._on_datagram(request.payload, src)
        return Message(code=Code.CHANGED, no_response=NO_RESPONSE_ALL)


COSE = 16  #: CoAP content-format application/cose (a sealed keyed read or its answer)


class ReadResource(resource.Resource):
    """The API's read-only views. GET returns CBOR from `render()` unless public
    reads are off; POST with a sealed request (fleet key) always works and is
    answered sealed: `keyed(request payload)` returns the sealed answer or None."""

    ct = CBOR

    def __init__(self, rt: str, render: Callable[[], bytes], allowed: Callable[[], bool],
                 keyed: Callable[[bytes, Callable[[], bytes]], bytes | None]):
        super().__init__()
        self.rt = rt
        self._render = render
        self._allowed = allowed
        self._keyed = keyed

    async def render_get(self, request):
        if not self._allowed():
            return Message(code=Code.UNAUTHORIZED, payload=b"reads need the fleet key (api.public_read = false)")
        return Message(code=Code.CONTENT, payload=self._render(), content_format=CBOR)

    async def render_post(self, request):
        answer = self._keyed(request.payload, self._render)
        if answer is None:
            return Message(code=Code.UNAUTHORIZED, payload=b"the request is not sealed with this mesh's fleet key")
        return Message(code=Code.CONTENT, payload=answer, content_format=COSE)


class CoapEndpoint:
    """One aiocoap server context: receive mesh datagrams, serve the API, send datagrams."""

    def __init__(self, bind: str, port: int, on_datagram: Callable[[bytes, tuple[str, int]], None]):
        self.bind = bind
        self.port = port
        self.site = resource.Site()
        self.site.add_resource([".well-known", "core"], resource.WKCResource(self.site.get_resources_as_linkheader))
        self._channels: dict[tuple[str, ...], Callable[[bytes, tuple[str, int]], None]] = {}
        self.add_channel(MESH_PATH, on_datagram)
        self._ctx: aiocoap.Context | None = None
        self._mman = None
        self._remotes: OrderedDict[tuple[str, int], object] = OrderedDict()
        self._resolving: set[asyncio.Task] = set()
        self.sent = 0
        self.sent_bytes = 0
        self.send_errors = 0

    def add_channel(self, path: tuple[str, ...], on_datagram: Callable[[bytes, tuple[str, int]], None], rt: str = "meshagent.mesh") -> None:
        """Datagrams POSTed NON to `path` go to `on_datagram(payload, (addr, port))`."""
        self._channels[path] = on_datagram
        res = _MeshResource(on_datagram)
        res.rt = rt
        self.site.add_resource(list(path), res)

    def add_resource(self, path: tuple[str, ...], res: resource.Resource) -> None:
        self.site.add_resource(list(path), res)

    def add_read(self, path: str, rt: str, render: Callable[[], bytes], allowed: Callable[[], bool],
                 keyed: Callable[[bytes, Callable[[], bytes]], bytes | None] = lambda payload, render: None) -> None:
        self.site.add_resource([path], ReadResource(rt, render, allowed, keyed))

    async def start(self) -> None:
        """Bind and serve; PortInUse (naming the holder) when the port is taken."""
        from agent.io.ports import check_free

        check_free(self.bind, self.port)
        self._ctx = await aiocoap.Context.create_server_context(self.site, bind=(self.bind, self.port), transports=["udp6"])
        self._mman = self._ctx.request_interfaces[0].token_interface
        self._mman.dispatch_message = self._dispatcher(self._mman.dispatch_message)
        _ignore_icmp_errors(self._mman.message_interface.transport.get_extra_info("socket"))

    def _dispatcher(self, inner):
        """Wrap the message layer's entry point: NON POST to a channel goes straight to us."""

        def dispatch(message):
            if message.mtype is NON and message.code is Code.POST:
                handler = self._channels.get(tuple(message.opt.uri_path))
                if handler is not None:
                    src = plain_addr(message.remote)
                    if src is not None:
                        handler(message.payload, src)
                    return
            inner(message)

        return dispatch

    async def stop(self) -> None:
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            await asyncio.wait_for(ctx.shutdown(), timeout=5)

    def send(self, addr: str, port: int, payload: bytes, path: tuple[str, ...] = MESH_PATH) -> None:
        """Send one datagram as a NON POST to `path` with No-Response. Errors are counted, never raised.

        A peer's aiocoap remote is resolved once (asynchronously) and cached;
        after that a send is a synchronous hand-off to the socket."""
        if self._ctx is None:
            return
        remote = self._remotes.get((addr, port))
        if remote is None:
            task = asyncio.get_running_loop().create_task(self._resolve_and_send(addr, port, payload, path))
            self._resolving.add(task)
            task.add_done_callback(self._resolving.discard)
            return
        self._remotes.move_to_end((addr, port))
        self._send_to(remote, payload, path)

    async def _resolve_and_send(self, addr: str, port: int, payload: bytes, path: tuple[str, ...]) -> None:
        msg = Message(code=Code.POST, uri=f"coap://{uri_host(addr)}:{port}/mesh")
        try:
            if not await self._mman.fill_or_recognize_remote(msg):
                raise OSError("no transport can reach it")
        except Exception as exc:
            self.send_errors += 1
            log.debug("cannot address %s:%s: %s", addr, port, exc)
            return
        self._remember(addr, port, msg.remote)
        self._send_to(msg.remote, payload, path)

    def _send_to(self, remote, payload: bytes, path: tuple[str, ...]) -> None:
        if self._ctx is None:
            return
        msg = Message(code=Code.POST, payload=payload, no_response=NO_RESPONSE_ALL, transport_tuning=aiocoap.Unreliable)
        msg.opt.uri_path = path
        msg.token = secrets.token_bytes(2)
        msg.remote = remote
        try:
            self._mman.send_message(msg, None)
        except Exception as exc:  # an unreachable network must not stop the agent
            self.send_errors += 1
            log.debug("send failed: %s", exc)
            return
        self.sent += 1
        self.sent_bytes += len(payload)

    def _remember(self, addr: str, port: int, remote) -> None:
        self._remotes[(addr, port)] = remote
        if len(self._remotes) > MAX_REMOTES:
            self._remotes.popitem(last=False)


def _ignore_icmp_errors(sock) -> None:
    """Switch off IP(V6)_RECVERR, which aiocoap turns on.

    With it, an ICMP "port unreachable" from a peer that just died is stored
    on the socket and makes the *next* sendmsg() fail, whatever its address;
    aiocoap then drops that datagram and blames its receiver. A member that
    sends to a dead peer and then to a live one (a Raft candidate asking every
    voter in turn) lost every message to the live one. Without RECVERR Linux
    reports no ICMP errors on an unconnected UDP socket, which is what a
    datagram protocol with its own timeouts wants."""
    for level, name, number in ((socket.IPPROTO_IPV6, "IPV6_RECVERR", 25), (socket.IPPROTO_IP, "IP_RECVERR", 11)):
        try:
            sock.setsockopt(level, getattr(socket, name, number), 0)
        except OSError:
            pass  # not Linux, or no such option for this family


async def coap_get(host: str, port: int, path: str, timeout: float = 5.0, payload: bytes | None = None,
                   content_format: int | None = None) -> tuple[str, bytes]:
    """One confirmable GET (or, with a payload, POST) from a throw-away client
    context: (response code, payload). Large answers arrive block-wise."""
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        code = Code.GET if payload is None else Code.POST
        req = Message(code=code, uri=f"coap://{uri_host(host)}:{port}/{path}", payload=payload or b"")
        if content_format is not None:
            req.opt.content_format = content_format
        resp = await asyncio.wait_for(ctx.request(req).response, timeout=timeout)
        return str(resp.code), resp.payload
    finally:
        await asyncio.wait_for(ctx.shutdown(), timeout=5)
