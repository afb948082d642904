"""A seeded mesh of unchanged `Membership` cores on the simulated network, the
observers that check it, and the named scenarios that tests, the benchmark and
`python -m agent.sim` all run.

Determinism (after TigerBeetle's VOPR and FoundationDB's simulator): one root
seed makes four child `random.Random`s, in this order: scenario parameters
(mesh size, loss, which nodes fail), the network (loss and delay), faults
(partition groups), and node cores (each core's rng is drawn from it when the
node starts). All nodes tick in lockstep, in name order; packets are delivered
in (tick, send sequence) order after the ticks; events are recorded as they
come out of each core. The event trace therefore depends only on the seed and
the parameters, which `Report.replay()` prints as a command line.

Virtual time is counted in ticks of `settings.tick_ms` (50 ms for "lan");
bounds are stated in probe periods (`probe_interval_ms`, 1 s for "lan").
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from agent.core.membership import Event, Membership
from agent.core.settings import PROFILES, MembershipSettings, profile
from agent.counters import Counters
from agent.messages import MAX_STATES, MemberState, Packet, PushPull, Status
from agent.sim.network import Addr, Network

PORT = 5683
LIVE = (Status.ALIVE, Status.SUSPECT)  #: "listed as alive", as memberlist's Members() counts them


def node_name(i: int) -> str:
    return f"n{i:04d}"


def node_addr(i: int) -> str:
    return f"10.0.{(i + 1) >> 8}.{(i + 1) & 255}"


def split_seed(seed: int) -> dict[str, random.Random]:
    """The child rngs of one root seed, always drawn in the same order."""
    root = random.Random(seed)
    return {name: random.Random(root.getrandbits(64)) for name in ("params", "net", "faults", "nodes")}


@dataclass
class SimNode:
    name: str
    index: int
    addr: str
    port: int = PORT
    core: Membership | None = None
    boot: int = 0  #: persisted start counter; the core starts at incarnation boot << 32
    up: bool = False
    left: bool = False
    counters: Counters = field(default_factory=Counters)

    @property
    def base_incarnation(self) -> int:
        return self.boot << 32

    @property
    def live(self) -> bool:
        return self.up and not self.left


class Cluster:
    """Nodes, network and observers. Drive it with `tick()` / `run_until()`;
    inject faults with `crash`, `restart`, `leave`, `partition`, `heal`."""

    def __init__(
        self,
        seed: int,
        *,
        settings: MembershipSettings | None = None,
        loss: float = 0.0,
        delay: tuple[int, int] = (0, 2),
        codec: bool = True,
        keep_trace: bool = True,
    ):
        self.seed = seed
        self.settings = settings if settings is not None else PROFILES["lan"]
        rngs = split_seed(seed)
        self.rng_faults = rngs["faults"]
        self._rng_nodes = rngs["nodes"]
        self.net = Network(rngs["net"], loss=loss, delay=delay, codec=codec)
        self.now = 0
        self.nodes: dict[str, SimNode] = {}
        self._order: list[SimNode] = []
        self.seed_addrs: list[Addr] = []
        # observers
        self.trace: list[tuple] | None = [] if keep_trace else None
        self._digest = hashlib.blake2b(digest_size=16)
        self.events = 0
        self.first_alive: dict[str, dict[str, int]] = {}  #: node -> observer -> tick first listed ALIVE
        self.first_dead: dict[str, dict[str, int]] = {}  #: node -> observer -> tick first marked DEAD
        self.first_left: dict[str, dict[str, int]] = {}  #: node -> observer -> tick first marked LEFT
        self.false_deaths: list[tuple[int, str, str, int]] = []  #: (tick, observer, node, incarnation)
        self._excused_until = 0  #: deaths before this tick are not false (just after a heal)
        self.excused_deaths = 0
        self.listeners: list[Callable[[int, str, Event], None]] = []

    # ------------------------------------------------------------ nodes

    def add_nodes(self, n: int, *, seeds: int = 0, warm: bool = False) -> list[str]:
        """Create and start n nodes; the first `seeds` ever created are the seed
        nodes, and every node joins through the seed nodes other than itself.

        warm=True starts them as a converged mesh instead (for big benchmarks,
        where the join storm costs minutes): each core gets, through `step`, the
        full state of all n as PushPull packets from one of them, and its gossip
        queue is then drained (as if long since sent), so the mesh starts quiet."""
        names = []
        for _ in range(n):
            i = len(self._order)
            sn = SimNode(node_name(i), i, node_addr(i))
            self.nodes[sn.name] = sn
            self._order.append(sn)
            self.net.attach(sn.name, (sn.addr, sn.port))
            if i < seeds:
                self.seed_addrs.append((sn.addr, sn.port))
            names.append(sn.name)
        for name in names:
            self.start(name)
        if warm:
            self._warm(names)
        return names

    def _warm(self, names: list[str]) -> None:
        nodes = [self.nodes[x] for x in names]
        states = [MemberState(x.name, x.base_incarnation, Status.ALIVE, x.addr, x.port) for x in nodes]
        parts = [tuple(states[i:i + MAX_STATES]) for i in range(0, len(states), MAX_STATES)]
        for sn in nodes:
            src = nodes[1] if sn is nodes[0] else nodes[0]
            for part in parts:
                sn.core.step(Packet(src.name, (PushPull(part),)), (src.addr, src.port))  # type: ignore[union-attr]
            q = sn.core.broadcasts  # type: ignore[union-attr]
            q.take(1 << 60, lambda m: 1, 1)  # each item "sent" its last time: the queue is empty
            self._flush(sn)

    def start(self, name: str) -> None:
        """(Re)start a node: boot + 1, a fresh core at incarnation boot << 32, join via the seeds."""
        sn = self.nodes[name]
        if sn.up:
            raise RuntimeError(f"{name} is already up")
        sn.boot += 1
        sn.left = False
        sn.counters = Counters()
        sn.core = Membership(
            self.settings, sn.name, sn.addr, sn.port, random.Random(self._rng_nodes.getrandbits(64)),
            incarnation=sn.base_incarnation, counters=sn.counters,
        )
        sn.up = True
        self.net.up(name)
        sn.core.join([a for a in self.seed_addrs if a != (sn.addr, sn.port)])
        self._flush(sn)

    def crash(self, name: str) -> None:
        """Stop a node at once: no leave message; packets on their way to it are lost."""
        sn = self.nodes[name]
        sn.up = False
        self.net.down(name)

    restart = start

    def leave(self, name: str) -> None:
        """Graceful leave: the core says goodbye, its packets go out, the node stops."""
        sn = self.nodes[name]
        assert sn.core is not None and sn.up
        sn.core.leave()
        self._flush(sn)
        sn.left = True
        sn.up = False
        self.net.down(name)

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        self.net.partition([list(g) for g in groups])

    def heal(self, excuse_ticks: int = 0) -> None:
        """Reconnect everyone. For `excuse_ticks` after this no death counts as
        false (they are counted in `excused_deaths`): each side's Dead gossip about
        the other side now crosses over and briefly marks live nodes dead on their
        own side too, until their refutation arrives, and a suspicion begun during
        the partition may still run out before it does."""
        self._excused_until = self.now + excuse_ticks
        self.net.heal()

    def live_nodes(self) -> list[SimNode]:
        return [sn for sn in self._order if sn.live]

    def names(self) -> list[str]:
        return [sn.name for sn in self._order]

    # ------------------------------------------------------------- time

    def tick(self) -> None:
        self.now += 1
        self.net.now = self.now
        for sn in self._order:
            if sn.up:
                sn.core.tick()  # type: ignore[union-attr]
                self._flush(sn)
        pop = self.net.pop
        while (item := pop(self.now)) is not None:
            dst, packet, src = item
            sn = self.nodes[dst]
            sn.core.step(packet, src)  # type: ignore[union-attr]
            self._flush(sn)

    def run(self, ticks: int) -> None:
        for _ in range(ticks):
            self.tick()

    def run_until(self, pred: Callable[[], bool], limit: int, every: int = 1) -> int | None:
        """Tick until pred() holds (checked every `every` ticks and at the limit);
        the ticks it took, or None if it still fails after `limit` ticks."""
        start = self.now
        if pred():
            return 0
        while self.now - start < limit:
            self.tick()
            if (self.now - start) % every == 0 or self.now - start >= limit:
                if pred():
                    return self.now - start
        return None

    def _flush(self, sn: SimNode) -> None:
        core = sn.core
        send = self.net.send
        for out in core.ready():  # type: ignore[union-attr]
            send(sn.name, (out.addr, out.port), out.packet)
        evs = core.take_events()  # type: ignore[union-attr]
        if evs:
            self._record(sn.name, evs)

    # -------------------------------------------------------- observers

    def _record(self, observer: str, evs: list[Event]) -> None:
        now = self.now
        for ev in evs:
            rec = (now, observer, ev.node, None if ev.old is None else int(ev.old), int(ev.new), ev.incarnation)
            self.events += 1
            self._digest.update(repr(rec).encode())
            if self.trace is not None:
                self.trace.append(rec)
            if ev.new == Status.ALIVE:
                self.first_alive.setdefault(ev.node, {}).setdefault(observer, now)
            elif ev.new == Status.DEAD:
                self.first_dead.setdefault(ev.node, {}).setdefault(observer, now)
                if self._is_false_death(observer, ev):
                    self.false_deaths.append((now, observer, ev.node, ev.incarnation))
            elif ev.new == Status.LEFT:
                self.first_left.setdefault(ev.node, {}).setdefault(observer, now)
            for f in self.listeners:
                f(now, observer, ev)

    def _is_false_death(self, observer: str, ev: Event) -> bool:
        """A node that is up, at its current boot's incarnation, marked dead by
        someone who can reach it (and was not cut off from it by a partition
        healed moments ago)."""
        x = self.nodes.get(ev.node)
        if x is None or not x.live or ev.incarnation < x.base_incarnation:
            return False
        if not self.net.reachable(observer, ev.node):
            return False
        if self.now < self._excused_until:
            self.excused_deaths += 1
            return False
        return True

    def forget(self, node: str) -> None:
        """Reset the first-alive/dead/left records of `node` (before measuring it again)."""
        for d in (self.first_alive, self.first_dead, self.first_left):
            d.pop(node, None)

    def digest(self) -> str:
        return self._digest.hexdigest()

    def status(self, observer: str, node: str) -> Status | None:
        m = self.nodes[observer].core.members.get(node)  # type: ignore[union-attr]
        return None if m is None else m.status

    def disagreements(self, limit: int = 5) -> list[tuple[str, str, str]]:
        """(observer, node, what it sees) for live nodes that do not list a live
        node as alive at its current boot; at most `limit`."""
        out = []
        live = self.live_nodes()
        for o in live:
            members = o.core.members  # type: ignore[union-attr]
            for x in live:
                if x is o:
                    continue
                m = members.get(x.name)
                if m is None or m.status not in LIVE or m.incarnation < x.base_incarnation:
                    out.append((o.name, x.name, "unknown" if m is None else f"{m.status.name.lower()}@{m.incarnation}"))
                    if len(out) >= limit:
                        return out
        return out

    def converged(self) -> bool:
        """Every live node lists every other live node as alive (or suspect), at its current boot."""
        return not self.disagreements(1)

    def all_mark(self, node: str, statuses: tuple[Status, ...], observers: Iterable[SimNode] | None = None) -> bool:
        obs = self.live_nodes() if observers is None else observers
        for o in obs:
            m = o.core.members.get(node)  # type: ignore[union-attr]
            if m is None or m.status not in statuses:
                return False
        return True

    def bytes_sent(self) -> dict[str, int]:
        return {n: s.payload for n, s in self.net.sent_by.items()}


# ---------------------------------------------------------------- bounds


@dataclass(frozen=True)
class Bounds:
    """Liveness bounds in ticks for a mesh of n nodes, derived from the settings.

    period     one probe period (probe_interval_ms).
    spread     dissemination of one broadcast: gossip reaches everyone in about
               log3(n) rounds of gossip_interval_ms (Karp et al.); allow
               2*ceil(log3 n)+4 rounds, at least 4 periods, for lost packets.
    converge   a fresh mesh: join retries (at most 0.5+1+2+4 s before a seed
               answers under 10% loss), then gossip, and push-pull anti-entropy
               (every push_pull_interval_ms, up to 1.5x with jitter) to repair what
               gossip missed: 2 full push-pull intervals + spread.
    detect     crash to DEAD at every survivor: time to the first failed probe of
               the victim (first_probe periods; each of n-1 members probes one
               member per period, so someone probes the victim within ~1.58
               periods on average; allow 8 periods for the tail and for Lifeguard
               stretching probers' intervals under loss) + 1 period until that
               probe ends in a suspicion + the maximum suspicion timeout (no
               confirmations at all) + spread of the Dead.
    reconnect  a dead member seen alive again (heal, restart through reconnect):
               one reconnect interval with jitter (1.5x) + one push-pull interval
               with jitter + 2*spread.
    """

    period: int
    spread: int
    converge: int
    detect: int
    reconnect: int
    suspicion_max: int

    def periods(self, ticks: int | None) -> float | None:
        return None if ticks is None else ticks / self.period


def bounds(s: MembershipSettings, n: int, first_probe: int = 8) -> Bounds:
    period = s.ticks(s.probe_interval_ms)
    rounds = 2 * math.ceil(math.log(max(n, 3), 3)) + 4
    spread = max(4 * period, rounds * s.ticks(s.gossip_interval_ms))
    pp = s.ticks(s.push_pull_interval_ms) * 3 // 2
    susp_max = s.ticks(s.suspicion_bounds_ms(n)[1])
    join = s.ticks(s.join_retry_min_ms) * 15  # 0.5+1+2+4 s of retries
    converge = join + 2 * pp + spread
    detect = first_probe * period + period + susp_max + spread
    reconnect = s.ticks(s.reconnect_interval_ms) * 3 // 2 + pp + 2 * spread
    return Bounds(period, spread, converge, detect, reconnect, susp_max)


# ---------------------------------------------------------------- scenarios


@dataclass
class Params:
    """Everything a run depends on. Fields left None are drawn from the seed."""

    scenario: str
    seed: int
    nodes: int | None = None
    loss: float | None = None
    seeds: int | None = None  #: seed nodes (1-3)
    faults: int | None = None  #: nodes crashed / leaving / restarted (1-3)
    periods: int | None = None  #: length of a timed phase (scenario "lossy", "idle")
    delay: tuple[int, int] = (0, 2)
    codec: bool | None = None
    profile: str = "lan"
    overrides: tuple[tuple[str, int], ...] = ()  #: settings fields replaced in the profile
    warm: bool | None = None  #: start converged (default above WARM_MIN_NODES nodes)

    def settings(self) -> MembershipSettings:
        return profile(self.profile, **dict(self.overrides))

    def replay(self) -> str:
        cmd = f"python -m agent.sim --scenario {self.scenario} --seed {self.seed} --nodes {self.nodes} --loss {self.loss}"
        cmd += f" --seeds {self.seeds} --faults {self.faults}"
        if self.periods is not None:
            cmd += f" --periods {self.periods}"
        if self.delay != (0, 2):
            cmd += f" --delay {self.delay[0]}:{self.delay[1]}"
        default_codec = (self.nodes or 0) <= CODEC_MAX_NODES
        if self.codec is not None and self.codec != default_codec:
            cmd += " --codec" if self.codec else " --no-codec"
        if self.profile != "lan":
            cmd += f" --profile {self.profile}"
        for k, v in self.overrides:
            cmd += f" --set {k}={v}"
        if self.warm is not None and self.warm != ((self.nodes or 0) > WARM_MIN_NODES):
            cmd += " --warm" if self.warm else " --cold"
        return cmd


#: per scenario: (nodes range, loss range, default periods)
DEFAULTS: dict[str, tuple[tuple[int, int], tuple[float, float], int | None]] = {
    "converge": ((10, 50), (0.0, 0.10), None),
    "crash": ((10, 50), (0.0, 0.10), None),
    "lossy": ((20, 20), (0.20, 0.20), 600),
    "partition": ((10, 30), (0.0, 0.05), None),
    "leave": ((10, 40), (0.0, 0.10), None),
    "restart": ((10, 40), (0.0, 0.10), None),
    "join": ((100, 100), (0.0, 0.0), None),
    "idle": ((20, 20), (0.0, 0.0), 60),
}
WARM_MIN_NODES = 300  #: a cold start of more nodes (join storm) costs minutes: start them converged
CODEC_MAX_NODES = 100  #: above this the codec is off by default (it costs ~2.7x run time at 200 nodes)


@dataclass
class Report:
    params: Params
    violations: list[str] = field(default_factory=list)
    metrics: dict[str, float | int | str | None] = field(default_factory=dict)
    digest: str = ""
    events: int = 0
    ticks: int = 0
    cluster: Cluster | None = field(default=None, repr=False)

    def replay(self) -> str:
        return self.params.replay()

    def failure(self) -> str:
        """The assertion message: what went wrong, the seed, and the replay command."""
        lines = [f"scenario {self.params.scenario} seed {self.params.seed}: {len(self.violations)} violation(s)"]
        lines += [f"  - {v}" for v in self.violations[:10]]
        lines.append(f"replay: {self.replay()}")
        return "\n".join(lines)

    def summary(self) -> str:
        p = self.params
        lines = [
            f"scenario {p.scenario}  seed {p.seed}  nodes {p.nodes}  loss {p.loss}  seeds {p.seeds}  faults {p.faults}"
            f"  delay {p.delay[0]}-{p.delay[1]} ticks  codec {'on' if p.codec else 'off'}  profile {p.profile}"
            + "".join(f" {k}={v}" for k, v in p.overrides) + ("  warm start" if p.warm else ""),
            f"virtual time {self.ticks} ticks  events {self.events}  trace digest {self.digest}",
        ]
        for k, v in self.metrics.items():
            lines.append(f"  {k}: {v:.2f}" if isinstance(v, float) else f"  {k}: {v}")
        lines.append("OK" if not self.violations else "FAILED")
        lines += [f"  - {v}" for v in self.violations]
        if self.violations:
            lines.append(f"replay: {self.replay()}")
        return "\n".join(lines)


def expect(report: Report) -> None:
    """Assert that a run kept every property; the message names the seed and the
    command that replays the run (tests call this instead of a bare assert)."""
    if report.violations:
        raise AssertionError(report.failure())


class replay_on_failure:
    """Context manager for extra asserts about a run: any AssertionError inside
    gets the seed and the replay command appended."""

    def __init__(self, report: Report):
        self.report = report

    def __enter__(self) -> Report:
        return self.report

    def __exit__(self, typ, exc, tb) -> bool:
        if typ is not None and issubclass(typ, AssertionError):
            p = self.report.params
            raise AssertionError(f"{exc}\nscenario {p.scenario} seed {p.seed}\nreplay: {self.report.replay()}") from exc
        return False


def resolve(params: Params) -> tuple[Params, dict[str, random.Random]]:
    """Draw every parameter from the seed (always, so overriding one does not
    shift the others), then apply the explicit ones."""
    rngs = split_seed(params.seed)
    r = rngs["params"]
    (nlo, nhi), (llo, lhi), periods = DEFAULTS[params.scenario]
    drawn = {
        "nodes": r.randint(nlo, nhi),
        "loss": round(r.uniform(llo, lhi), 3),
        "seeds": r.randint(1, 3),
        "faults": r.randint(1, 3),
    }
    p = Params(**{**asdict(params)})
    for k, v in drawn.items():
        if getattr(p, k) is None:
            setattr(p, k, v)
    if p.periods is None:
        p.periods = periods
    if p.codec is None:
        p.codec = p.nodes <= CODEC_MAX_NODES
    if p.warm is None:
        p.warm = p.nodes > WARM_MIN_NODES
    p.overrides = tuple(p.overrides)
    return p, rngs


def run_scenario(scenario: str, seed: int, **overrides) -> Report:
    """Run one named scenario; see SCENARIOS. Never raises for a property
    violation: it is listed in `Report.violations`."""
    p, rngs = resolve(Params(scenario, seed, **overrides))
    settings = p.settings()
    if settings.problems():
        raise ValueError(f"bad settings: {settings.problems()}")
    c = Cluster(p.seed, settings=settings, loss=p.loss, delay=p.delay, codec=p.codec,
                keep_trace=p.nodes <= CODEC_MAX_NODES)
    rep = Report(p, cluster=c)
    b = bounds(settings, p.nodes)
    rep.metrics["period_ticks"] = b.period
    SCENARIOS[scenario](c, p, rngs["params"], b, rep)
    for tick, sender, size in c.net.stats.oversize[:3]:
        rep.violations.append(f"{sender} sent a {size}-byte packet at tick {tick} (MAX_PACKET exceeded)")
    rep.metrics["max_packet_bytes"] = c.net.stats.max_packet if c.net.measure else None
    rep.digest, rep.events, rep.ticks = c.digest(), c.events, c.now
    return rep


def _converge(c: Cluster, p: Params, b: Bounds, rep: Report) -> bool:
    c.add_nodes(p.nodes, seeds=p.seeds, warm=bool(p.warm))  # type: ignore[arg-type]
    every = 1 if p.nodes <= 100 else max(1, b.period // 4)  # type: ignore[operator]
    t = c.run_until(c.converged, b.converge, every)
    rep.metrics["converge_periods"] = b.periods(t)
    if t is None:
        rep.violations.append(
            f"not converged within {b.converge} ticks ({b.periods(b.converge):.0f} periods): {c.disagreements()}")
        return False
    return True


def _check_false_deaths(c: Cluster, rep: Report) -> None:
    rep.metrics["false_deaths"] = len(c.false_deaths)
    for tick, obs, node, inc in c.false_deaths[:5]:
        rep.violations.append(f"false death: {obs} marked live {node} dead at tick {tick} (incarnation {inc})")


def _detect(c: Cluster, victims: list[str], survivors: list[SimNode], t0: int, limit: int) -> dict[str, tuple[int | None, int | None]]:
    """Per victim: (ticks until the first survivor marked it DEAD, until all did)."""
    names = [s.name for s in survivors]

    def done() -> bool:
        return all(len(c.first_dead.get(v, ())) >= len(names) and all(o in c.first_dead[v] for o in names) for v in victims)

    c.run_until(done, limit - (c.now - t0))
    out = {}
    for v in victims:
        seen = [c.first_dead.get(v, {}).get(o) for o in names]
        times = [t - t0 for t in seen if t is not None]
        out[v] = (min(times) if times else None, max(times) if len(times) == len(names) else None)
    return out


def scenario_converge(c: Cluster, p: Params, r: random.Random, b: Bounds, rep: Report) -> None:
    """N nodes start at once and join through 1-3 seed nodes; every node must list
    every other as alive within Bounds.converge; nobody is ever marked dead."""
    if _converge(c, p, b, rep):
        c.run(2 * b.period)
    _check_false_deaths(c, rep)


def _victims(p: Params, r: random.Random) -> list[str]:
    """The nodes a fault scenario strikes, drawn before convergence so the draw is
    the same whatever convergence consumed from other rngs."""
    return sorted(r.sample([node_name(i) for i in range(p.nodes)], p.faults))  # type: ignore[arg-type]


def scenario_crash(c: Cluster, p: Params, r: random.Random, b: Bounds, rep: Report) -> None:
    """After convergence 1-3 nodes crash together; every survivor must mark each
    DEAD within Bounds.detect; no live node is marked dead."""
    victims = _victims(p, r)
    if not _converge(c, p, b, rep):
        return
    for v in victims:
        c.forget(v)
        c.crash(v)
    t0 = c.now
    survivors = c.live_nodes()
    res = _detect(c, victims, survivors, t0, b.detect)
    firsts = [f for f, _ in res.values() if f is not None]
    alls = [a for _, a in res.values() if a is not None]
    rep.metrics["victims"] = ",".join(victims)
    rep.metrics["detect_first_periods"] = b.periods(min(firsts)) if firsts else None
    rep.metrics["detect_all_periods"] = b.periods(max(alls)) if len(alls) == len(victims) else None
    rep.metrics["detect_bound_periods"] = b.periods(b.detect)
    for v, (first, last) in res.items():
        if last is None:
            missing = [s.name for s in survivors if s.name not in c.first_dead.get(v, {})][:5]
            rep.violations.append(
                f"crashed {v} not marked dead by every survivor within {b.detect} ticks "
                f"({b.periods(b.detect):.1f} periods); missing e.g. {missing}")
    _check_false_deaths(c, rep)


def scenario_lossy(c: Cluster, p: Params, r: random.Random, b: Bounds, rep: Report) -> None:
    """Converge, then run `periods` probe periods at the given loss: no live node
    may be marked dead by anyone."""
    if not _converge(c, p, b, rep):
        return
    t0 = c.now
    fd0 = len(c.false_deaths)
    c.run(p.periods * b.period)  # type: ignore[operator]
    hours = p.nodes * (c.now - t0) * c.settings.tick_ms / 3_600_000  # type: ignore[operator]
    n = len(c.false_deaths) - fd0
    rep.metrics["false_deaths_per_node_hour"] = n / hours if hours else 0.0
    suspects = sum(1 for e in (c.trace or ()) if e[4] == Status.SUSPECT and e[0] > t0)
    if c.trace is not None:
        rep.metrics["suspicions_per_node_hour"] = suspects / hours if hours else 0.0
    _check_false_deaths(c, rep)


def scenario_partition(c: Cluster, p: Params, r: random.Random, b: Bounds, rep: Report) -> None:
    """Converge; split into two groups (each at least a quarter of the mesh);
    each side must mark every node of the other side DEAD; heal; everyone must
    list everyone alive again within Bounds.reconnect. No node may be marked dead
    by a node of its own side during the cut (after the heal, see Cluster.heal).

    Bound for the split: during the cut, probes of the far side fail, and so do
    indirect probes through far-side relays, which do not even nack. Lifeguard
    reads that as our own ill health and stretches the probe interval up to
    awareness_max times (a small side sits at the maximum, since most of its
    relays are far away). Every node probes each of its n-1 members once per
    round-robin cycle, so within (n-1)*awareness_max periods every far node has
    had a failed probe; + 1 period + maximum suspicion + spread, as for a crash."""
    n = p.nodes
    assert n is not None
    a = r.randint(max(2, n // 4), n - max(2, n // 4))
    if not _converge(c, p, b, rep):
        return
    names = c.names()
    c.rng_faults.shuffle(names)
    ga, gb = sorted(names[:a]), sorted(names[a:])
    c.partition([ga, gb])
    rep.metrics["groups"] = f"{len(ga)}+{len(gb)}"
    t0 = c.now
    limit = bounds(c.settings, n, first_probe=(n - 1) * c.settings.awareness_max).detect
    rep.metrics["split_bound_periods"] = b.periods(limit)

    def split_seen() -> bool:
        for side, other in ((ga, gb), (gb, ga)):
            for o in side:
                members = c.nodes[o].core.members  # type: ignore[union-attr]
                for x in other:
                    m = members.get(x)
                    if m is not None and m.status not in (Status.DEAD, Status.LEFT):
                        return False
        return True

    t = c.run_until(split_seen, limit, every=b.period // 4 or 1)
    rep.metrics["split_periods"] = b.periods(t)
    if t is None:
        rep.violations.append(f"sides did not mark each other dead within {limit} ticks ({b.periods(limit):.0f} periods)")
    c.heal(excuse_ticks=b.suspicion_max + b.spread)
    t = c.run_until(c.converged, b.reconnect, every=1)
    rep.metrics["heal_periods"] = b.periods(t)
    rep.metrics["heal_bound_periods"] = b.periods(b.reconnect)
    rep.metrics["deaths_just_after_heal"] = c.excused_deaths
    if t is None:
        rep.violations.append(
            f"not converged within {b.reconnect} ticks ({b.periods(b.reconnect):.0f} periods) after heal: {c.disagreements()}")
    _check_false_deaths(c, rep)


def scenario_leave(c: Cluster, p: Params, r: random.Random, b: Bounds, rep: Report) -> None:
    """Converge; 1-3 nodes leave gracefully; every survivor must see each LEFT
    within Bounds.spread + 1 push-pull interval, and nobody may ever mark them DEAD."""
    victims = _victims(p, r)
    if not _converge(c, p, b, rep):
        return
    for v in victims:
        c.forget(v)
        c.leave(v)
    limit = b.spread + c.settings.ticks(c.settings.push_pull_interval_ms) * 3 // 2
    t = c.run_until(lambda: all(c.all_mark(v, (Status.LEFT,)) for v in victims), limit)
    rep.metrics["victims"] = ",".join(victims)
    rep.metrics["left_seen_periods"] = b.periods(t)
    if t is None:
        rep.violations.append(f"leave not seen by all within {limit} ticks: "
                              + str([(v, [s.name for s in c.live_nodes() if c.status(s.name, v) != Status.LEFT][:5]) for v in victims]))
    c.run(b.suspicion_max + b.spread)  # long enough for any stray suspicion to run out
    for v in victims:
        dead = c.first_dead.get(v, {})
        if dead:
            rep.violations.append(f"left {v} was marked DEAD by {sorted(dead)[:5]}")
        wrong = [s.name for s in c.live_nodes() if c.status(s.name, v) != Status.LEFT]
        if wrong:
            rep.violations.append(f"left {v} not LEFT at the end for {wrong[:5]}")
    _check_false_deaths(c, rep)


def scenario_restart(c: Cluster, p: Params, r: random.Random, b: Bounds, rep: Report) -> None:
    """Converge; crash 1-3 nodes; once every survivor has them DEAD (Bounds.detect),
    restart them (boot + 1, incarnation boot << 32) joining through the seeds;
    everyone must list everyone alive at the new incarnation within Bounds.reconnect
    (a restarted seed node has no other seed to join through when there is one
    seed: it is found again by the others' reconnect to dead members)."""
    victims = _victims(p, r)
    if not _converge(c, p, b, rep):
        return
    for v in victims:
        c.crash(v)
    survivors = c.live_nodes()
    t = c.run_until(lambda: all(c.all_mark(v, (Status.DEAD,), survivors) for v in victims), b.detect)
    rep.metrics["victims"] = ",".join(victims)
    rep.metrics["dead_periods"] = b.periods(t)
    if t is None:
        rep.violations.append(f"crashed {victims} not dead everywhere within {b.detect} ticks")
        return
    for v in victims:
        c.forget(v)
        c.restart(v)
    t = c.run_until(c.converged, b.reconnect)
    rep.metrics["rejoin_periods"] = b.periods(t)
    rep.metrics["rejoin_bound_periods"] = b.periods(b.reconnect)
    if t is None:
        rep.violations.append(
            f"restarted nodes not alive everywhere within {b.reconnect} ticks: {c.disagreements()}")
    _check_false_deaths(c, rep)


def scenario_join(c: Cluster, p: Params, r: random.Random, b: Bounds, rep: Report) -> None:
    """Benchmark: converge, let the broadcast queues drain, add one node; then crash
    one old node. Measures the periods until 99.9% of nodes list the newcomer
    alive and until 99.9% mark the crashed one dead."""
    if not _converge(c, p, b, rep):
        return
    c.run(b.spread)
    n = p.nodes
    assert n is not None
    need = math.ceil(0.999 * n)
    (new,) = c.add_nodes(1)
    t0 = c.now
    t = c.run_until(lambda: len(c.first_alive.get(new, ())) >= need, b.converge, every=1)
    rep.metrics["join_999_periods"] = b.periods(t)
    if t is None:
        rep.violations.append(f"newcomer {new} listed by fewer than {need} within {b.converge} ticks")
    c.run(b.spread)
    victim = node_name(r.randrange(p.seeds, n))  # type: ignore[arg-type]
    c.forget(victim)
    c.crash(victim)
    t0 = c.now
    t = c.run_until(lambda: len(c.first_dead.get(victim, ())) >= need, b.detect, every=1)
    rep.metrics["death_999_periods"] = b.periods(t)
    times = sorted(c.first_dead.get(victim, {}).values())
    rep.metrics["death_first_periods"] = b.periods(times[0] - t0) if times else None
    if t is None:
        rep.violations.append(f"crashed {victim} marked dead by fewer than {need} within {b.detect} ticks")
    _check_false_deaths(c, rep)


def scenario_idle(c: Cluster, p: Params, r: random.Random, b: Bounds, rep: Report) -> None:
    """Benchmark: converge, drain, then measure bytes sent per node per second
    over `periods` probe periods of a quiet mesh."""
    if not _converge(c, p, b, rep):
        return
    c.run(2 * b.spread)
    before = {n: (s.packets, s.payload) for n, s in c.net.sent_by.items()}
    t0 = c.now
    c.run(p.periods * b.period)  # type: ignore[operator]
    secs = (c.now - t0) * c.settings.tick_ms / 1000
    pk = sum(s.packets - before[n][0] for n, s in c.net.sent_by.items())
    by = sum(s.payload - before[n][1] for n, s in c.net.sent_by.items())
    from agent.wire import ENVELOPE_OVERHEAD
    rep.metrics["packets_per_node_s"] = pk / p.nodes / secs  # type: ignore[operator]
    rep.metrics["payload_bytes_per_node_s"] = by / p.nodes / secs  # type: ignore[operator]
    rep.metrics["wire_bytes_per_node_s"] = (by + pk * ENVELOPE_OVERHEAD) / p.nodes / secs  # type: ignore[operator]
    _check_false_deaths(c, rep)


SCENARIOS: dict[str, Callable[[Cluster, Params, random.Random, Bounds, Report], None]] = {
    "converge": scenario_converge,
    "crash": scenario_crash,
    "lossy": scenario_lossy,
    "partition": scenario_partition,
    "leave": scenario_leave,
    "restart": scenario_restart,
    "join": scenario_join,
    "idle": scenario_idle,
}
