"""An in-memory datagram network for the simulator: seeded loss and delay,
partitions, crashes and restarts, in virtual ticks.

Nothing here reads a clock or the global `random`: the one `random.Random`
passed in decides every loss and every delay, and delivery is ordered by
(tick, sequence number of the send), never by set or dict order, so a run is
a function of its seed. Every send draws exactly one loss number and one delay
number whatever the outcome, so the draws stay aligned between runs that
differ only in what happens to a packet.

A packet can go through the real codec (`agent.wire.encode_packet` /
`decode_packet`): that checks end to end that everything the core produces
encodes, decodes and fits `MAX_PACKET`. Without the codec the Packet object
itself is delivered (used for big meshes); then sizes are only counted with
`measure=True` (from `agent.wire.packet_size`, which costs about as much as
encoding).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.messages import Packet
from agent.wire import ENVELOPE_OVERHEAD, MAX_PACKET, decode_packet, encode_packet, packet_size

Addr = tuple[str, int]


@dataclass(slots=True)
class LinkStats:
    """What one node sent, for the traffic figures of the benchmark."""

    packets: int = 0
    payload: int = 0  #: encoded packet bytes, lost packets included

    def wire_bytes(self, overhead: int = ENVELOPE_OVERHEAD) -> int:
        """Datagram bytes: payload plus the sealed envelope around each packet
        (`agent.wire.ENVELOPE_OVERHEAD` is its worst case, 64-byte node ids)."""
        return self.payload + self.packets * overhead


@dataclass(slots=True)
class NetStats:
    sent: int = 0
    delivered: int = 0
    lost: int = 0  #: random loss
    cut: int = 0  #: dropped by a partition
    to_down: int = 0  #: the destination was down (or restarted since the send)
    unknown: int = 0  #: no node at that address
    oversize: list[tuple[int, str, int]] = field(default_factory=list)  #: (tick, sender, bytes) over MAX_PACKET
    max_packet: int = 0


class Network:
    """Datagrams between named nodes, each bound to one (addr, port).

    `send` queues a packet (or loses it); `pop(now)` hands out the next packet
    due at or before `now`, or None. A delay of 0 ticks delivers within the
    same tick, after the packet that caused it.
    """

    def __init__(
        self,
        rng,
        *,
        loss: float = 0.0,
        delay: tuple[int, int] = (0, 2),
        codec: bool = True,
        measure: bool | None = None,
    ):
        if not 0.0 <= loss <= 1.0:
            raise ValueError("loss must be within [0, 1]")
        if not 0 <= delay[0] <= delay[1]:
            raise ValueError("delay must be (lo, hi) ticks with 0 <= lo <= hi")
        self.rng = rng
        self.loss = loss
        self.delay = delay
        self.codec = codec
        #: without the codec, sizing every packet (packet_size) costs about as much
        #: as encoding it; so by default sizes, byte counts and the MAX_PACKET
        #: check are only kept with the codec on
        self.measure = codec if measure is None else measure
        self.now = 0
        self.stats = NetStats()
        self.sent_by: dict[str, LinkStats] = {}
        self._queue: list[tuple[int, int, str, Addr, object]] = []
        self._seq = 0
        self._node_at: dict[Addr, str] = {}
        self._addr_of: dict[str, Addr] = {}
        self._up_since: dict[str, int] = {}  #: node -> first send seq it may receive; absent = down
        self._group: dict[str, int] | None = None
        self._loss_of: dict[str, float] = {}

    # ------------------------------------------------------------- topology

    def attach(self, node: str, addr: Addr) -> None:
        self._node_at[addr] = node
        self._addr_of[node] = addr
        self.sent_by.setdefault(node, LinkStats())

    def addr_of(self, node: str) -> Addr:
        return self._addr_of[node]

    def node_at(self, addr: Addr) -> str | None:
        return self._node_at.get(addr)

    def up(self, node: str) -> None:
        """The node (re)starts: it receives only what is sent from now on."""
        self._up_since[node] = self._seq

    def down(self, node: str) -> None:
        """The node stops: what is queued for it, and anything sent later, is dropped."""
        self._up_since.pop(node, None)

    def is_up(self, node: str) -> bool:
        return node in self._up_since

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Only members of the same group can talk; nodes in no group form one more group.
        Packets already in flight across the cut are dropped on arrival."""
        self._group = {}
        for i, g in enumerate(groups):
            for node in g:
                self._group[node] = i
        # nodes not named share group -1

    def heal(self) -> None:
        self._group = None

    def reachable(self, a: str, b: str) -> bool:
        g = self._group
        return g is None or g.get(a, -1) == g.get(b, -1)

    def set_node_loss(self, node: str, loss: float) -> None:
        """Extra loss on everything `node` sends and receives (a flaky radio)."""
        if loss:
            self._loss_of[node] = loss
        else:
            self._loss_of.pop(node, None)

    # ------------------------------------------------------------- traffic

    def send(self, src: str, dst: Addr, packet: Packet) -> None:
        if self.codec:
            payload: object = encode_packet(packet)
            size = len(payload)  # type: ignore[arg-type]
        else:
            payload = packet
            size = packet_size(packet.sender, packet.messages) if self.measure else 0
        st = self.stats
        st.sent += 1
        if size > st.max_packet:
            st.max_packet = size
        if size > MAX_PACKET:
            st.oversize.append((self.now, src, size))
        link = self.sent_by[src]
        link.packets += 1
        link.payload += size
        r = self.rng.random()
        d = self.rng.randint(self.delay[0], self.delay[1])
        loss = self.loss
        if self._loss_of:
            dst_node = self._node_at.get(dst)
            for n in (src, dst_node):
                extra = self._loss_of.get(n) if n is not None else None
                if extra:
                    loss = 1 - (1 - loss) * (1 - extra)
        if r < loss:
            st.lost += 1
            return
        heapq.heappush(self._queue, (self.now + d, self._seq, src, dst, payload))
        self._seq += 1

    def pop(self, now: int) -> tuple[str, Packet, Addr] | None:
        """The next packet due by `now` as (destination node, packet, source address)."""
        q = self._queue
        st = self.stats
        while q and q[0][0] <= now:
            _, seq, src, dst, payload = heapq.heappop(q)
            node = self._node_at.get(dst)
            if node is None:
                st.unknown += 1
                continue
            since = self._up_since.get(node)
            if since is None or seq < since:
                st.to_down += 1
                continue
            if not self.reachable(src, node):
                st.cut += 1
                continue
            st.delivered += 1
            if self.codec:
                packet = decode_packet(payload)  # type: ignore[arg-type]
            else:
                packet = payload  # type: ignore[assignment]
            return node, packet, self._addr_of[src]
        return None

    def pending(self) -> int:
        return len(self._queue)
