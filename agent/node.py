"""The one driver: wires the membership core to the network, mDNS, psutil and the disk.

Every `tick_ms` the loop ticks the core and sends what it has ready; every
datagram that arrives is opened (fleet key), decoded, stepped into the core,
and whatever the core answers is sent at once. Nothing here decides anything
about membership: that is `agent.core.membership`. What lives here is time
(monotonic clock, loop lag), I/O, and the views served at /status and /peers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import cbor2

from agent import PROTOCOL_VERSION, __version__
from agent.config import Config, Loaded, parse_seed
from agent.core.membership import Membership, Outgoing
from agent.counters import Counters
from agent.envelope import FleetKey, Opener, Sealer
from agent.io.addresses import AddressWatcher, pick_advertise
from agent.io.coap import CoapEndpoint
from agent.io.load import LoadSampler, changed_enough, find_throttled, own_rss_bytes, process_stats
from agent.io.mdns import MdnsDiscovery
from agent.io.sdnotify import Notifier
from agent.messages import Ack, BadMessage, Ping, Status
from agent.wire import decode_meta, decode_packet, encode_meta, encode_packet

log = logging.getLogger("meshagent")

MAX_PENDING_PINGS = 1024  #: pings awaiting an ack for RTT measurement
API_MAX_ANSWER = 256 * 1024  #: bytes of a sealed /status or /peers answer (block-wise over CoAP)
LAG_FACTOR = 4  #: a tick this many tick_ms late counts as local ill health (Lifeguard)
QUEUE_GOSSIP_S = 0.25  #: how often the task queue length is compared with what we last gossiped


@dataclass
class Identity:
    node_id: str
    boot: int  #: persisted start counter: incarnations and replay epochs grow across restarts


class Agent:
    def __init__(self, config: Config, identity: Identity, keys: list[FleetKey] | None, seeds: list[tuple[str, int]] | None = None,
                 *, notifier: Notifier | None = None, reload_config: Callable[[], Loaded] | None = None):
        """`notifier` speaks systemd's notify protocol (none outside systemd);
        `reload_config` re-reads the configuration on SIGHUP (None: reload refused)."""
        self.config = config
        self.config_sources: dict[str, str] = {}  #: dotted key -> where its value came from (`config show`)
        self.notifier = notifier or Notifier(None)
        self._reload_config = reload_config
        self.node_id = identity.node_id
        self.started = time.monotonic()
        self.drops = Counters()
        node = config.node
        self.addr_watch = AddressWatcher(node.bind, node.advertise, config.discovery.mdns_interfaces or None)
        self.address = self.addr_watch.check() or pick_advertise(node.bind, node.advertise, config.discovery.mdns_interfaces or None)
        self.sampler = LoadSampler(
            smoothing=config.load.smoothing, throttled_path=find_throttled(config.board.throttle_source), cpu_scope=config.load.cpu_scope,
        )
        self.tasks = None
        self.load = self.sampler.sample()
        self._thermal, self._over_rss = "ok", False
        self._meta_at = time.monotonic()
        self.core = Membership(
            config.membership, self.node_id, self.address, node.port, random.Random(),
            incarnation=identity.boot << 32, meta=self._meta(), counters=self.drops,
        )
        self.sealer = Sealer(node.mesh, keys, self.node_id, identity.boot)
        self.opener = Opener(node.mesh, keys, self.drops)
        self.insecure = keys is None
        self.endpoint = CoapEndpoint(node.bind, node.port, self._on_datagram)
        self.api_drops = Counters()
        self._api_opener = Opener(node.mesh, keys, self.api_drops, max_senders=256)
        self._api_sealer = Sealer(node.mesh, keys, self.node_id, identity.boot, max_packet=API_MAX_ANSWER)
        self.endpoint.add_read("status", "meshagent.status", lambda: cbor2.dumps(self.status()), self._public, self._keyed_read)
        self.endpoint.add_read("peers", "meshagent.peers", lambda: cbor2.dumps(self.peers()), self._public, self._keyed_read)
        self.consensus = None
        if config.consensus.enabled:
            self._start_consensus(config, identity, keys)
        if config.tasks.enabled:
            from agent.tasks import Tasks

            self.tasks = Tasks(config, self.node_id, identity.boot, keys, self.endpoint, self.core, self.drops)
            self._queued_bucket = 0
            self.core.set_meta(self._meta())
        self.api = None
        if self.consensus is not None or self.tasks is not None:
            self._start_api(config, identity, keys)
        self.mdns = (
            MdnsDiscovery(self.node_id, node.mesh, self.address, node.port, config.discovery.mdns_interfaces or None, self.core.discovered)
            if config.discovery.mdns else None
        )
        self.seeds = seeds if seeds is not None else [parse_seed(s) for s in config.discovery.seeds]
        self._pings: OrderedDict[int, tuple[str, float]] = OrderedDict()
        self.rtt_ms: dict[str, float] = {}
        self._stop = asyncio.Event()
        self._ticked = time.monotonic()
        self._tasks: list[asyncio.Task] = []
        self.ready = asyncio.Event()
        self.serial_console = None

    def _start_consensus(self, config: Config, identity: Identity, keys) -> None:
        from agent.consensus import Consensus

        self.consensus = Consensus(config, self.node_id, identity.boot, keys, self.endpoint, self.core, self.drops)

    def _start_api(self, config: Config, identity: Identity, keys) -> None:
        """POST /api for whichever of consensus and tasks runs here (and /proposals with consensus)."""
        from agent.api import Api, ApiResource, ProposalsResource

        self.api = Api(self.consensus, self.tasks, self.node_id, config.node.mesh, keys, self._public, identity.boot)
        self.endpoint.add_resource(("api",), ApiResource(self.api))
        if self.consensus is not None:
            proposals = ProposalsResource(self.api)
            self.endpoint.add_resource(("proposals",), proposals)
            self.consensus.listeners.append(proposals.changed)

    # --------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        """Serve until `stop()`; then leave the mesh gracefully."""
        await self.endpoint.start()
        log.info("node %s mesh %s listening on %s:%d (advertising %s), protocol %d, version %s",
                 self.node_id, self.config.node.mesh, self.config.node.bind, self.config.node.port, self.address, PROTOCOL_VERSION, __version__)
        if self.insecure:
            log.warning("INSECURE: running without a fleet key; anyone on the network can read and join this mesh (demo only)")
        if self.mdns is not None:
            try:
                await self.mdns.start()
            except Exception as exc:  # a host without multicast still has seeds
                log.error("mDNS discovery unavailable: %s", exc)
                self.mdns = None
        self.core.join(self.seeds)
        if self.consensus is not None:
            self.consensus.update_learners()
            await self.consensus.start()
        if self.tasks is not None:
            await self.tasks.start()
        self._tasks = [asyncio.create_task(self._tick_loop()), asyncio.create_task(self._housekeeping())]
        if self.notifier.watchdog_interval() is not None:
            self._tasks.append(asyncio.create_task(self._watchdog()))
        from agent.io.serial_console import start_console
        self.serial_console = await start_console(self)
        self.ready.set()
        self.notifier.ready(self._status_line())
        try:
            await self._stop.wait()
        finally:
            await self._shutdown()

    def stop(self) -> None:
        self._stop.set()

    async def _shutdown(self) -> None:
        log.info("leaving the mesh")
        if self.serial_console is not None:
            await self.serial_console.stop()
        self.notifier.stopping()
        self.core.leave()
        self._flush()
        await asyncio.sleep(0.1)  # let the leave datagrams go out
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.tasks is not None:
            await self.tasks.stop()
        if self.consensus is not None:
            await self.consensus.stop()
        if self.mdns is not None:
            await self.mdns.stop()
        await self.endpoint.stop()
        self.notifier.close()

    def reload(self) -> None:
        """SIGHUP: re-read the configuration; apply what can change live, log the rest."""
        from agent import reload
        from agent.config import ConfigError

        if self._reload_config is None:
            log.error("reload ignored: this agent was started without a way to re-read its configuration")
            return
        self.notifier.reloading()
        try:
            new = self._reload_config()
        except (ConfigError, OSError) as exc:
            log.error("reload refused, still running with the previous configuration: %s", exc)
        else:
            plan = reload.plan(self.config, new.config)
            self._apply(plan, new.config)
            self.config_sources = self.config_sources | {k: v for k, v in new.sources.items() if k in plan.live}
        self.notifier.ready(self._status_line())

    def _apply(self, plan, new: Config) -> None:
        from agent import reload

        for line in plan.describe():
            log.log(logging.WARNING if "restart" in line else logging.INFO, "%s", line)
        self.config = reload.apply(self.config, new, plan.live)
        if "log.level" in plan.live:
            logging.getLogger().setLevel(self.config.log.level.upper())
        if "discovery.seeds" in plan.live:
            self.seeds = [parse_seed(s) for s in self.config.discovery.seeds]
            self.core.join(self.seeds)
            self._flush()

    async def _watchdog(self) -> None:
        """WATCHDOG=1 every half WatchdogSec, from this event loop and only while
        the membership loop keeps ticking: a stuck loop or a dead tick task lets
        systemd's watchdog fire and restart us."""
        every = self.notifier.watchdog_interval()
        stalled_logged = False
        while True:
            stale = time.monotonic() - self._ticked
            if stale <= max(every, 4 * self.config.membership.tick_ms / 1000):
                self.notifier.watchdog()
                stalled_logged = False
            elif not stalled_logged:
                log.error("the membership loop has not ticked for %.1f s; no longer feeding the systemd watchdog", stale)
                stalled_logged = True
            self.notifier.status(self._status_line())
            await asyncio.sleep(every)

    def _status_line(self) -> str:
        """systemctl status' one line: who we are and what we see."""
        alive = sum(1 for m in self.core.members.values() if m.status is Status.ALIVE)
        return f"{self.node_id}: {alive} alive in mesh {self.config.node.mesh}"

    # ------------------------------------------------------------- the loop

    async def _tick_loop(self) -> None:
        tick_s = self.config.membership.tick_ms / 1000
        next_at = time.monotonic()
        lag_reported = 0.0
        while True:
            next_at += tick_s
            now = time.monotonic()
            if now - next_at > tick_s * LAG_FACTOR:
                # We fell behind (CPU starved, swapping): probe less eagerly rather
                # than blame peers for our own slowness, and do not try to catch up.
                if now - lag_reported > self.config.membership.probe_interval_ms / 1000:
                    self.core.degrade_health()
                    lag_reported = now
                next_at = now
            try:
                self._ticked = time.monotonic()
                self.core.tick()
                self._flush()
                self._log_events()
            except Exception:  # our bug: keep the loop (and the mesh) alive, loudly
                self.drops.inc("internal_error")
                log.exception("bug: a membership tick failed")
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def _housekeeping(self) -> None:
        """Load samples, queue-length gossip and address checks, each on its own period."""
        next_load = next_addr = next_queue = time.monotonic()
        while True:
            now = time.monotonic()
            load_every = self.config.load.sample_interval_ms / 1000  # read each pass: a reload may change them
            addr_every = self.config.discovery.address_check_ms / 1000
            next_load, next_addr = min(next_load, now + load_every), min(next_addr, now + addr_every)
            try:
                if now >= next_load:
                    next_load = now + load_every
                    self._sample_load(now)
                if now >= next_queue:
                    next_queue = now + QUEUE_GOSSIP_S
                    self._gossip_queue(now)
                if now >= next_addr:
                    next_addr = now + addr_every
                    await self._check_address()
            except Exception:  # e.g. zeroconf failing to re-announce: retry next period
                log.exception("housekeeping failed")
            await asyncio.sleep(max(0.05, min(next_load, next_addr, next_queue) - time.monotonic()))

    def _gossip_queue(self, now: float) -> None:
        """Tell the mesh our queue length when it changes scale (0, 1, 2-3, 4-7, ...):
        idle peers pick whom to steal from by it, and every change costs a broadcast."""
        if self.tasks is None:
            return
        bucket = self.tasks.engine.queued_count().bit_length()
        if bucket != self._queued_bucket:
            self._queued_bucket = bucket
            self._meta_at = now
            self.core.set_meta(self._meta())

    def _sample_load(self, now: float) -> None:
        new = self.sampler.sample()
        self._watch_board(new)
        if self.tasks is not None:
            self.tasks.set_load(new.cpu, new.mem)
        stale = now - self._meta_at >= self.config.load.meta_refresh_ms / 1000
        if stale or changed_enough(self.load, new, self.config.load.change_threshold_pct):
            self.load = new
            self._meta_at = now
            self.core.set_meta(self._meta())

    def _watch_board(self, load) -> None:
        """Log when the board crosses its profile's thermal thresholds or the
        agent its memory budget (once per crossing, not every sample)."""
        from agent.board import thermal_state

        thermal = thermal_state(load.temp_c, self.config.board.thermal)
        if thermal != self._thermal and thermal != "unknown":
            level = logging.WARNING if thermal != "ok" else logging.INFO
            log.log(level, "CPU temperature %.1f °C: %s (board %s: warn %g, critical %g)", load.temp_c, thermal,
                    self.config.board.name, self.config.board.thermal.warn_c, self.config.board.thermal.critical_c)
            self._thermal = thermal
        rss = own_rss_bytes()
        over = rss is not None and rss > self.config.board.budgets.max_rss_mb * 2**20
        if over and not self._over_rss:
            log.warning("resident memory %.1f MiB is over the board budget of %d MiB", rss / 2**20, self.config.board.budgets.max_rss_mb)
        self._over_rss = over

    async def _check_address(self) -> None:
        new = self.addr_watch.check()
        if new and new != self.address:
            log.info("our address changed from %s to %s; telling the mesh", self.address, new)
            self.address = new
            self.core.set_address(new, self.config.node.port)
            if self.mdns is not None:
                await self.mdns.update_address(new)

    def _meta(self) -> bytes:
        if self.tasks is None:
            return encode_meta(self.load.as_dict(), list(self.config.node.capabilities), __version__)
        kinds = [h.name for h in self.config.handlers]
        return encode_meta(self.load.as_dict(), list(self.config.node.capabilities), __version__, kinds, self.tasks.engine.queued_count())

    # ------------------------------------------------------------- datagrams

    def _on_datagram(self, data: bytes, src: tuple[str, int]) -> None:
        opened = self.opener.open(data)
        if opened is None:
            return
        sender, body = opened
        try:
            packet = decode_packet(body)
        except BadMessage as exc:
            self.drops.inc(exc.reason)
            return
        if packet.sender != sender:
            self.drops.inc("sender_mismatch")
            return
        self._note_acks(packet)
        try:
            self.core.step(packet, src)
        except Exception:  # our bug, not the peer's: keep serving, but loudly
            self.drops.inc("internal_error")
            log.exception("bug: the membership core failed on a packet from %s", packet.sender)
        self._flush()

    def _flush(self) -> None:
        for out in self.core.ready():
            self._note_pings(out)
            datagram = self.sealer.seal(encode_packet(out.packet))
            self.endpoint.send(out.addr, out.port, datagram)

    def _note_pings(self, out: Outgoing) -> None:
        """Remember when each direct ping left, to measure round-trip times."""
        for msg in out.packet.messages:
            if isinstance(msg, Ping):
                self._pings[msg.seq] = (msg.target, time.monotonic())
                if len(self._pings) > MAX_PENDING_PINGS:
                    self._pings.popitem(last=False)

    def _note_acks(self, packet) -> None:
        for msg in packet.messages:
            if isinstance(msg, Ack):
                sent = self._pings.pop(msg.seq, None)
                if sent is not None and sent[0] == packet.sender:
                    rtt = (time.monotonic() - sent[1]) * 1000
                    old = self.rtt_ms.get(sent[0])
                    self.rtt_ms[sent[0]] = rtt if old is None else 0.8 * old + 0.2 * rtt

    def _log_events(self) -> None:
        events = self.core.take_events()
        if events and self.consensus is not None:
            self.consensus.update_learners()
        for ev in events:
            old = ev.old.name.lower() if ev.old is not None else "new"
            level = logging.WARNING if ev.new in (Status.SUSPECT, Status.DEAD) else logging.INFO
            log.log(level, "member %s: %s -> %s (incarnation %d)", ev.node, old, ev.new.name.lower(), ev.incarnation)
            if ev.new in (Status.DEAD, Status.LEFT):
                self.rtt_ms.pop(ev.node, None)

    # ------------------------------------------------------------------ views

    def _public(self) -> bool:
        return self.config.api.public_read

    def _keyed_read(self, request: bytes, render) -> bytes | None:
        """A read sealed with the fleet key is answered sealed, public or not."""
        if self._api_opener.open(request) is None:
            return None
        answer = render()
        if len(answer) > API_MAX_ANSWER:
            answer = cbor2.dumps({"error": f"answer of {len(answer)} bytes exceeds {API_MAX_ANSWER}"})
        return self._api_sealer.seal(answer)

    def status(self) -> dict:
        counts = {s.name.lower(): 0 for s in Status}
        for m in self.core.members.values():
            counts[m.status.name.lower()] += 1
        proc = process_stats()
        load = self.load.as_dict()
        return {
            "node_id": self.node_id,
            "mesh": self.config.node.mesh,
            "address": self.address,
            "port": self.config.node.port,
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "insecure": self.insecure,
            "board": self.config.board.name,
            "incarnation": self.core.incarnation,
            "awareness": self.core.awareness,
            "members": counts,
            "load": {"cpu": load["cpu"], "mem": load["mem"], "load1": load["load1"], "temp_c": load["temp_c"], "throttled": load["throttled"]},
            "capabilities": list(self.config.node.capabilities),
            "process": proc,
            "traffic": {"sent_datagrams": self.endpoint.sent, "sent_bytes": self.endpoint.sent_bytes, "send_errors": self.endpoint.send_errors},
            "drops": self.drops.snapshot(),
            "api_drops": self.api_drops.snapshot(),
            "public_read": self.config.api.public_read,
            "mdns": self.mdns is not None,
            "raft": self.consensus.status() if self.consensus is not None else None,
            "tasks": self.tasks.status() if self.tasks is not None else None,
        }

    def peers(self) -> list[dict]:
        now = self.core.now
        tick_s = self.config.membership.tick_ms / 1000
        out = []
        for m in sorted(self.core.members.values(), key=lambda m: m.node):
            if m.node == self.node_id:
                continue
            meta = decode_meta(m.meta)
            out.append({
                "id": m.node,
                "address": m.addr,
                "port": m.port,
                "state": m.status.name.lower(),
                "incarnation": m.incarnation,
                "load": {k: meta.get(k) for k in ("cpu", "mem", "load1", "temp_c", "throttled")},
                "capabilities": meta.get("capabilities", []),
                "version": meta.get("version"),
                "rtt_ms": round(self.rtt_ms[m.node], 2) if m.node in self.rtt_ms else None,
                "last_seen_s": round((now - m.last_seen) * tick_s, 1) if m.last_seen is not None else None,
                "since_s": round((now - m.since) * tick_s, 1),
            })
        return out
