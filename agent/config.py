"""Configuration: every field with its unit, default and check; board profiles; sources.

A value comes from, lowest first: the built-in default (for [membership]
fields: the preset named by `membership.profile`), the board profile
(boards/NAME.toml), the file (/etc/meshagent/agent.toml or --config), and
command-line flags. Everything is checked at load, so a typo or an
out-of-range number stops the agent at start with a message naming the key,
the value, where it came from and what is allowed, instead of surfacing later
as odd behaviour on one device of a fleet. Nothing is silently ignored.

FIELDS is the one place each field is described (membership fields come from
`agent.core.settings.FIELD_DOCS`); docs/configuration.md is generated from it
with `python -m agent.config --markdown > docs/configuration.md`.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import shlex
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from functools import reduce
from importlib.resources import files
from pathlib import Path

from agent.core.settings import FIELD_DOCS, PROFILES, MembershipSettings
from agent.core.taskctx import BUILTIN_KINDS as BUILTIN_HANDLERS  # run in-process by agent.io.runner; reserved names
from agent.core.taskspec import KIND_RE, STRATEGIES
from agent.identity import NODE_ID_RULE
from agent.messages import BadMessage, check_node_id

DEFAULT_PATH = Path("/etc/meshagent/agent.toml")
MODEL_PATH = Path("/proc/device-tree/model")
DEFAULT_PORT = 5683
DEFAULT_PROFILE = "lan"
GENERIC_BOARD = "generic"
THROTTLE_SOURCES = ("firmware", "none")
MAX_HANDLERS = 32


@dataclass(frozen=True)
class NodeConfig:
    id: str = ""
    mesh: str = "default"
    data_dir: Path = Path("/var/lib/meshagent")
    bind: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    advertise: str = ""
    fleet_key_file: Path = Path("/etc/meshagent/fleet.key")
    insecure: bool = False
    capabilities: tuple[str, ...] = ()
    board: str = "auto"


@dataclass(frozen=True)
class DiscoveryConfig:
    seeds: tuple[str, ...] = ()
    mdns: bool = True
    mdns_interfaces: tuple[str, ...] = ()
    address_check_ms: int = 5000


@dataclass(frozen=True)
class LoadConfig:
    sample_interval_ms: int = 2000
    smoothing: float = 0.3
    meta_refresh_ms: int = 10_000
    change_threshold_pct: float = 5.0
    cpu_scope: str = "host"


@dataclass(frozen=True)
class ApiConfig:
    public_read: bool = True


@dataclass(frozen=True)
class ConsensusConfig:
    enabled: bool = True
    voters: str | tuple[str, ...] = "auto"
    tick_ms: int = 100
    heartbeat_ticks: int = 2
    learner_heartbeat_ticks: int = 20
    election_ticks: int = 8
    snapshot_entries: int = 10_000
    keep_entries: int = 1000
    stabilization_ms: int = 10_000
    dead_voter_ms: int = 60_000
    vote_policy: str = "manual"
    proposal_deadline_s: int = 3600
    request_timeout_ms: int = 5000


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    memory_lines: int = 500


@dataclass(frozen=True)
class ConsoleConfig:
    device: str = "board"


@dataclass(frozen=True)
class TasksConfig:
    enabled: bool = True
    slots: int = 0
    strategy: str = "capability"
    replicas: int = 3
    vnodes: int = 64
    match_threshold: float = 0.7
    bid_weights: tuple[float, ...] = (0.4, 0.3, 0.2, 0.1)
    bid_timeout_ms: int = 300
    bid_rounds: int = 3
    steal: bool = True
    steal_interval_ms: int = 500
    overload: float = 0.8
    idle: float = 0.3
    overload_samples: int = 3
    min_stay_ms: int = 10_000
    check_ms: int = 2000
    resend_ms: int = 1000
    keep_results: int = 5000
    max_queue: int = 10_000
    request_timeout_ms: int = 2000


@dataclass(frozen=True)
class HandlerConfig:
    """A task kind this node runs as a program: [handlers.NAME] in the file."""

    name: str
    command: tuple[str, ...]  #: argv; never a shell string
    env: tuple[tuple[str, str], ...] = ()
    cwd: str = ""  #: "" = the data dir
    timeout_s: int = 300
    concurrency: int = 1


@dataclass(frozen=True)
class Budgets:
    max_rss_mb: int
    max_members: int
    max_cpu_pct: float


@dataclass(frozen=True)
class Thermal:
    warn_c: float
    critical_c: float


@dataclass(frozen=True)
class BoardProfile:
    """The hardware we run on; its values live only in boards/NAME.toml."""

    name: str
    models: tuple[str, ...]
    serial_device: str
    throttle_source: str
    budgets: Budgets
    thermal: Thermal


@dataclass(frozen=True)
class Config:
    """Everything the agent runs with, checked; `membership_profile` names the preset
    that `membership` started from. Build it with load_config."""

    board: BoardProfile
    node: NodeConfig = field(default_factory=NodeConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    membership: MembershipSettings = field(default_factory=MembershipSettings)
    membership_profile: str = DEFAULT_PROFILE
    load: LoadConfig = field(default_factory=LoadConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    consensus: ConsensusConfig = field(default_factory=ConsensusConfig)
    log: LogConfig = field(default_factory=LogConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    handlers: tuple[HandlerConfig, ...] = ()


@dataclass(frozen=True)
class Loaded:
    """A checked configuration and, per dotted key, where its value came from:
    "default", "profile:NAME" (membership preset), "board:NAME", "file:PATH" or
    "flag"; `board.name` says "flag", "file:PATH" (node.board), "detected:MODEL_PATH" or "default"."""

    config: Config
    sources: dict[str, str]


class ConfigError(Exception):
    """A configuration value is not allowed. The message names the key, the value,
    where it came from and what is allowed, so the operator can fix it at once."""

    def __init__(self, key: str, value: object, allowed: str, source: str = "", problem: str = ""):
        self.key, self.value, self.allowed, self.source = key, value, allowed, source
        shown = "" if value is None else f" = {_show(value)}"
        where = f" (from {source})" if source else ""
        super().__init__(f"config error: {key}{shown}{where}: {problem or 'expected ' + allowed}")


# ---------------------------------------------------------------------------
# Rules: what a field accepts.


class _Invalid(Exception):
    """Raised by a rule; `why` adds detail, `part` is the bad entry of a list."""

    def __init__(self, why: str = "", part: object = None):
        super().__init__(why)
        self.why, self.part = why, part


@dataclass(frozen=True)
class Rule:
    """`kind` is the TOML type, `allowed` the words shown in errors and docs,
    `convert` returns the value to store or raises _Invalid."""

    kind: str
    allowed: str
    convert: Callable[[object], object]


@dataclass(frozen=True)
class Field:
    unit: str
    rule: Rule
    meaning: str


def _integer(lo: int, hi: int) -> Rule:
    def convert(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise _Invalid()
        return v

    return Rule("integer", f"an integer from {lo} to {hi}", convert)


def _number(lo: float, hi: float, *, above_lo: bool = False) -> Rule:
    """A float; TOML's `1` is accepted as 1.0, `true`, nan and inf are not."""

    def convert(v: object) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise _Invalid()
        if not ((lo < v) if above_lo else (lo <= v)) or not v <= hi:
            raise _Invalid()
        return float(v)

    low = f"above {lo:g} and at most" if above_lo else f"from {lo:g} to"
    return Rule("float", f"a number {low} {hi:g}", convert)


def _boolean() -> Rule:
    def convert(v: object) -> bool:
        if not isinstance(v, bool):
            raise _Invalid()
        return v

    return Rule("boolean", "true or false", convert)


def _choice(names: Iterable[str]) -> Rule:
    names = tuple(names)

    def convert(v: object) -> str:
        if not isinstance(v, str) or v not in names:
            raise _Invalid()
        return v

    return Rule("string", "one of " + ", ".join(names), convert)


def _text(pattern: str, allowed: str) -> Rule:
    regex = re.compile(pattern)

    def convert(v: object) -> str:
        if not isinstance(v, str) or not regex.fullmatch(v):
            raise _Invalid()
        return v

    return Rule("string", allowed, convert)


def _node_id() -> Rule:
    """Empty (derive one, see agent.identity) or what the wire accepts as a node id."""

    def convert(v: object) -> str:
        if v == "":
            return v
        try:
            return check_node_id(v)
        except BadMessage:
            raise _Invalid() from None

    return Rule("string", f"empty, or {NODE_ID_RULE}", convert)


def _ip(v: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address `v` spells, or None when it is not an IP literal."""
    if not isinstance(v, str):
        return None
    try:
        return ipaddress.ip_address(v)
    except ValueError:
        return None


def _voters() -> Rule:
    """"auto", or an explicit list of node ids (1 to 7, an odd count is advised)."""
    ids = _strings(_node_id(), 7)

    def convert(v: object) -> str | tuple[str, ...]:
        if v == "auto":
            return "auto"
        if isinstance(v, str):
            raise _Invalid('a string other than "auto"')
        out = ids.convert(v)
        if not out or "" in out:
            raise _Invalid("an empty list or an empty id")
        return out

    return Rule("string or array", '"auto" or a list of 1-7 node ids', convert)


def _bind_address() -> Rule:
    def convert(v: object) -> str:
        if _ip(v) is None:
            raise _Invalid()
        return v

    return Rule("string", "an IPv4 or IPv6 address (0.0.0.0 or :: = every address)", convert)


def _advertise_address() -> Rule:
    """Others send to this address, so 0.0.0.0, :: and multicast make no sense."""

    def convert(v: object) -> str:
        if v == "":
            return v
        ip = _ip(v)
        if ip is None or ip.is_unspecified or ip.is_multicast:
            raise _Invalid()
        return v

    return Rule("string", "empty, or a unicast IPv4 or IPv6 address", convert)


def _abs_path() -> Rule:
    """Absolute only: the agent runs from systemd, where a relative path has no meaning."""

    def convert(v: object) -> Path:
        if not isinstance(v, str | os.PathLike) or not os.path.isabs(v):
            raise _Invalid()
        return Path(v)

    return Rule("path", "an absolute path", convert)


def _strings(item: Rule, most: int) -> Rule:
    """A list stored as a tuple; a repeated entry is an error (it would mean a typo)."""

    def convert(v: object) -> tuple[str, ...]:
        if not isinstance(v, list | tuple) or len(v) > most:
            raise _Invalid()
        for i, x in enumerate(v):
            try:
                item.convert(x)
            except _Invalid as e:
                raise _Invalid(e.why, part=x) from None
            if x in v[:i]:
                raise _Invalid("listed twice", part=x)
        return tuple(v)

    return Rule("list of strings", f"at most {most} distinct entries, each {item.allowed}", convert)


def _weights(count: int) -> Rule:
    """`count` weights that share one whole: stored as a tuple of floats."""

    def convert(v: object) -> tuple[float, ...]:
        if not isinstance(v, list | tuple) or len(v) != count:
            raise _Invalid()
        for x in v:
            if isinstance(x, bool) or not isinstance(x, int | float) or not 0 <= x <= 1:
                raise _Invalid(part=x)
        if abs(sum(v) - 1) > 0.001:
            raise _Invalid(f"they sum to {sum(v):g}")
        return tuple(float(x) for x in v)

    return Rule("list of floats", f"{count} numbers from 0 to 1 that sum to 1 (±0.001)", convert)


def _argv() -> Rule:
    """The program and its arguments, run without a shell, so a task's
    arguments can never be read as shell syntax."""

    def convert(v: object) -> tuple[str, ...]:
        if isinstance(v, str):
            try:
                words = shlex.split(v)
            except ValueError:
                words = []
            raise _Invalid(f"write it as {_show(words)}" if words else "")
        if not isinstance(v, list | tuple) or not 1 <= len(v) <= 64:
            raise _Invalid()
        for x in v:
            if not isinstance(x, str) or "\0" in x:
                raise _Invalid(part=x)
        if not v[0]:
            raise _Invalid("the program is empty", part=v[0])
        return tuple(v)

    return Rule("list of strings", "a list of strings (argv), never a shell string: the program, then up to 63 arguments", convert)


_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")


def _env() -> Rule:
    """Variables added to the handler's environment, in table order."""

    def convert(v: object) -> tuple[tuple[str, str], ...]:
        if not isinstance(v, dict) or len(v) > 32:
            raise _Invalid()
        for name, value in v.items():
            if not _ENV_NAME.fullmatch(name):
                raise _Invalid("a bad variable name", part=name)
            if not isinstance(value, str) or len(value) > 1024 or "\0" in value:
                raise _Invalid(f"the value of {name}", part=value)
        return tuple(v.items())

    return Rule("table", "a table of at most 32 NAME = \"value\", NAME matching [A-Z_][A-Z0-9_]{0,63}, each value a string of at most 1024 characters", convert)


def _cwd() -> Rule:
    def convert(v: object) -> str:
        if not isinstance(v, str) or "\0" in v or (v and not os.path.isabs(v)):
            raise _Invalid()
        return v

    return Rule("path", "empty (the data dir), or an absolute path", convert)


_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _is_dns_name(host: str) -> bool:
    """RFC 1123 host name; an all-digit last label would be a mistyped IPv4 address."""
    labels = host.split(".")
    return len(host) <= 253 and all(_DNS_LABEL.fullmatch(x) for x in labels) and not labels[-1].isdigit()


def _seed_port(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= 65535:
        raise _Invalid("the port must be 1-65535")
    return int(text)


def _seed(text: object) -> tuple[str, int]:
    if not isinstance(text, str):
        raise _Invalid()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not isinstance(_ip(host), ipaddress.IPv6Address):
            raise _Invalid("not an IPv6 address inside [ ]")
        if rest and not rest.startswith(":"):
            raise _Invalid()
        return host, _seed_port(rest[1:]) if rest else DEFAULT_PORT
    if text.count(":") > 1:
        raise _Invalid(f"an IPv6 address needs brackets: [{text}]")
    host, colon, port = text.partition(":")
    if not (isinstance(_ip(host), ipaddress.IPv4Address) or _is_dns_name(host)):
        raise _Invalid()
    return host, _seed_port(port) if colon else DEFAULT_PORT


_SEED = Rule(
    "string",
    f"HOST[:PORT] with HOST an IPv4 address, an [IPv6] address in brackets or a DNS name, PORT 1-65535 (default {DEFAULT_PORT})",
    _seed,
)


def parse_seed(text: str) -> tuple[str, int]:
    """`HOST[:PORT]` to (host, port), brackets removed; ConfigError if malformed."""
    try:
        return _seed(text)
    except _Invalid as e:
        raise ConfigError("discovery.seeds", text, _SEED.allowed, problem=_expected(_SEED, e)) from None


def _expected(rule: Rule, e: _Invalid) -> str:
    return f"expected {rule.allowed}" + (f" ({e.why})" if e.why else "")


# ---------------------------------------------------------------------------
# The fields. Defaults live on the dataclasses above (and on MembershipSettings
# and PROFILES); unit, allowed values and meaning live here.

_SECTIONS: dict[str, type] = {
    "node": NodeConfig,
    "discovery": DiscoveryConfig,
    "membership": MembershipSettings,
    "load": LoadConfig,
    "api": ApiConfig,
    "consensus": ConsensusConfig,
    "log": LogConfig,
    "console": ConsoleConfig,
    "tasks": TasksConfig,
}

_OWN_FIELDS: dict[str, Field] = {
    "node.id": Field("", _node_id(), "this node's name in the mesh; empty = derive `<hostname>-<8 hex>` once and keep it in data_dir/node-id"),
    "node.mesh": Field("", _text(r"[a-z0-9-]{1,32}", "1-32 lowercase letters, digits and -"), "name of the mesh; nodes only talk to nodes of the same mesh"),
    "node.data_dir": Field("", _abs_path(), "where the node id and boot counter are kept (created with mode 0750)"),
    "node.bind": Field("", _bind_address(), "address the CoAP endpoint listens on"),
    "node.port": Field("UDP port", _integer(1, 65535), "port the CoAP endpoint listens on, and that others use to reach us"),
    "node.advertise": Field("", _advertise_address(), "address others use to reach us; empty = detect it"),
    "node.fleet_key_file": Field("", _abs_path(), "file holding the fleet key(s) that authenticate and encrypt every packet"),
    "node.insecure": Field("", _boolean(), "run without a fleet key (packets in the clear, anyone can join): for a lab only"),
    "node.board": Field("", _text(r"auto|[a-z0-9-]{1,32}", '"auto" or a board profile name'), 'board profile: "auto" = detect it from /proc/device-tree/model (else generic), or a name from boards/ (`--board` wins)'),
    "node.capabilities": Field("", _strings(_text(r"[a-z0-9_=.-]{1,32}", "1-32 of a-z 0-9 _ = . -"), 16), "labels gossiped with our load, for placing work (e.g. `camera`, `arch=arm64`)"),
    "discovery.seeds": Field("", _strings(_SEED, 32), "members to contact when joining; empty = rely on mDNS"),
    "discovery.mdns": Field("", _boolean(), "announce and find members of the mesh on the local link with mDNS/DNS-SD"),
    "discovery.mdns_interfaces": Field("", _strings(_text(r"[^/:\s]{1,15}", "an interface name (1-15 characters, no / : or spaces)"), 16), "interfaces mDNS uses; empty = all"),
    "discovery.address_check_ms": Field("ms", _integer(500, 600_000), "how often we re-read our own addresses (DHCP, Wi-Fi roaming)"),
    "membership.profile": Field("", _choice(PROFILES), "the preset that gives every membership field not set elsewhere"),
    "load.sample_interval_ms": Field("ms", _integer(200, 600_000), "how often CPU, memory and temperature are sampled"),
    "load.smoothing": Field("weight", _number(0, 1, above_lo=True), "EWMA weight of the newest sample (1 = no smoothing)"),
    "load.meta_refresh_ms": Field("ms", _integer(1000, 3_600_000), "longest time between load updates in gossip"),
    "load.change_threshold_pct": Field("percentage points", _number(0, 100), "a CPU or memory change beyond this is gossiped at once, but not more often than every sample"),
    "load.cpu_scope": Field("", _choice(("host", "tree")), "what counts as this node's CPU load: the whole host, or only this agent and the handlers it started (for labs and tests where several agents share one host; then percent of one core)"),
    "api.public_read": Field("", _boolean(), "serve /status, /peers and /.well-known/core to CoAP GETs without the fleet key"),
    "consensus.enabled": Field("", _boolean(), "take part in the Raft-replicated state (key-value store, proposals); off = membership only"),
    "consensus.voters": Field("", _voters(), '"auto": the mesh keeps 3 or 5 voters chosen from healthy members; or the node ids of the voters, the same list on every node'),
    "consensus.tick_ms": Field("ms", _integer(10, 1000), "resolution of the Raft clock; heartbeats and election timeouts are counted in these ticks"),
    "consensus.heartbeat_ticks": Field("ticks", _integer(1, 100), "leader heartbeat period to voters (4 or more per election timeout; default 200 ms)"),
    "consensus.learner_heartbeat_ticks": Field("ticks", _integer(1, 1000), "leader heartbeat period to non-voting members; a learner takes the leader for gone after max(election_ticks, this + 1) ticks (default 2 s: at 20 members most of the leader's idle traffic goes to learners)"),
    "consensus.election_ticks": Field("ticks", _integer(3, 1000), "a follower that has not heard a leader for a random time in [E, 2E) ticks campaigns (default 0.8-1.6 s)"),
    "consensus.snapshot_entries": Field("entries", _integer(100, 10_000_000), "snapshot the state and compact the log after this many applied entries"),
    "consensus.keep_entries": Field("entries", _integer(0, 1_000_000), "entries kept behind a snapshot so a briefly lagging follower needs no snapshot"),
    "consensus.stabilization_ms": Field("ms", _integer(0, 3_600_000), "auto voters: a member must be healthy this long before it is promoted (Consul: 10 s)"),
    "consensus.dead_voter_ms": Field("ms", _integer(1000, 7 * 86_400_000), "auto voters: a voter dead this long is replaced"),
    "consensus.vote_policy": Field("", _choice(("manual", "approve", "reject", "alive-assignee")), "how this node votes on proposals when it is a voter: by hand (`meshagent vote`), always approve, always reject, or approve when the value's `assigned_to` names an alive member"),
    "consensus.proposal_deadline_s": Field("s", _integer(0, 30 * 86_400), "deadline of a proposal submitted without --deadline (0 = none)"),
    "consensus.request_timeout_ms": Field("ms", _integer(100, 600_000), "a write not committed within this time is answered \"outcome unknown\" (it may still commit)"),
    "log.level": Field("", _choice(("debug", "info", "warning", "error")), "least severe log message written"),
    "log.memory_lines": Field("lines", _integer(0, 10_000), "recent log lines kept in memory for the serial console's `log` (0 = none)"),
    "console.device": Field("", _text(r"board|off|/dev/\S{1,64}", '"board", "off", or a path under /dev'), 'serial port of the line console (115200 8N1): "board" = the board profile\'s serial_device (none on generic), "off", or a device such as /dev/ttyGS0; a port a getty owns is never opened'),
    "tasks.enabled": Field("", _boolean(), "run tasks on this node and take part in placing them"),
    "tasks.slots": Field("tasks", _integer(0, 256), "tasks run at once on this node; 0 = the CPU count"),
    "tasks.strategy": Field("", _choice(STRATEGIES), "placement for a task submitted without --strategy"),
    "tasks.replicas": Field("members", _integer(1, 7), "home members that keep each task's record and result (R)"),
    "tasks.vnodes": Field("points", _integer(1, 1024), "virtual nodes per member on the hash ring"),
    "tasks.match_threshold": Field("fraction", _number(0, 1), "members matching less of a task's required capabilities are not considered"),
    "tasks.bid_weights": Field("", _weights(4), "weights of an auction bid's capability match, load, past performance and free resources"),
    "tasks.bid_timeout_ms": Field("ms", _integer(10, 60_000), "an auction closes when every bidder answered or after this"),
    "tasks.bid_rounds": Field("rounds", _integer(1, 10), 'auction rounds without a bid before the task fails "no bid"'),
    "tasks.steal": Field("", _boolean(), "idle nodes take queued tasks from backlogged peers"),
    "tasks.steal_interval_ms": Field("ms", _integer(50, 600_000), "how often an idle node looks for a backlogged peer to steal from"),
    "tasks.overload": Field("fraction of CPU", _number(0, 1), "above this for overload_samples load samples, queued tasks migrate away"),
    "tasks.idle": Field("fraction of CPU", _number(0, 1), "only members below this receive migrated tasks or steal"),
    "tasks.overload_samples": Field("samples", _integer(1, 100), "consecutive load samples above overload before tasks migrate"),
    "tasks.min_stay_ms": Field("ms", _integer(0, 3_600_000), "a task that moved is not moved again before this (hysteresis)"),
    "tasks.check_ms": Field("ms", _integer(100, 600_000), "a coordinator asks each executor this often whether its tasks are still there"),
    "tasks.resend_ms": Field("ms", _integer(50, 600_000), "unacknowledged records and results are resent this often"),
    "tasks.keep_results": Field("records", _integer(10, 1_000_000), "finished task records kept per node (oldest dropped first)"),
    "tasks.max_queue": Field("tasks", _integer(1, 1_000_000), "queued tasks this node accepts; beyond, placements to it are refused"),
    "tasks.request_timeout_ms": Field("ms", _integer(100, 600_000), "a submit, query or cancel not answered within this fails with a clear error"),
}

#: The fields of a [handlers.NAME] table; `command` is required, the rest have
#: the defaults of HandlerConfig.
HANDLER_FIELDS: dict[str, Field] = {
    "command": Field("", _argv(), "the program and its arguments, run without a shell"),
    "env": Field("", _env(), "environment variables set for the handler"),
    "cwd": Field("", _cwd(), "working directory of the handler"),
    "timeout_s": Field("s", _integer(1, 86_400), "run time limit: a run still going after this is killed with its whole process tree; a task's own timeout_s replaces it"),
    "concurrency": Field("tasks", _integer(1, 64), "runs of this handler at once on this node (within tasks.slots)"),
}


def _all_fields() -> dict[str, Field]:
    """_OWN_FIELDS plus one entry per MembershipSettings field, in section order."""
    membership = {f"membership.{n}": Field(unit, _integer(lo, hi), meaning) for n, (unit, lo, hi, meaning) in FIELD_DOCS.items()}
    merged = _OWN_FIELDS | membership
    return {key: merged[key] for section in _SECTIONS for key in merged if key.startswith(section + ".")}


#: Every config key (dotted), in the order shown by `config show` and the docs.
FIELDS: dict[str, Field] = _all_fields()

#: The [board] table of a board file (never set by the config file or flags).
BOARD_FIELDS: dict[str, Field] = {
    "board.name": Field("", _text(r"[a-z0-9-]{1,32}", "the file name without .toml"), "the profile's name, chosen with --board"),
    "board.models": Field("", _strings(_text(r"[^\n]{1,100}", "1-100 characters"), 8), 'texts of /proc/device-tree/model before " Rev" that select this profile; empty = never detected'),
    "board.serial_device": Field("", _text(r"(/dev/\S+)?", "empty, or a path under /dev"), "the serial console the agent opens when console.device is \"board\"; empty = none"),
    "board.throttle_source": Field("", _choice(THROTTLE_SOURCES), 'where under-voltage and throttling flags are read: "firmware" = the Raspberry Pi firmware\'s get_throttled in sysfs (the bits of `vcgencmd get_throttled`), "none" = not on this board'),
    "board.thermal.warn_c": Field("°C", _number(20, 120), "CPU temperature at which the agent and `meshagent doctor` warn (where the firmware starts capping the clock)"),
    "board.thermal.critical_c": Field("°C", _number(20, 120), "CPU temperature reported as critical (hard throttling or shutdown near)"),
    "board.budgets.max_rss_mb": Field("MiB", _integer(16, 65_536), "resident memory the agent should stay under on this board (warned in the log, checked by doctor)"),
    "board.budgets.max_cpu_pct": Field("% of one core", _number(0.1, 100), "CPU the idle agent should stay under on this board (checked by doctor)"),
    "board.budgets.max_members": Field("members", _integer(*FIELD_DOCS["max_members"][1:3]), "largest membership.max_members this board accepts"),
}


# ---------------------------------------------------------------------------
# Reading layers.


def _convert(key: str, value: object, source: str, rule: Rule) -> object:
    try:
        return rule.convert(value)
    except _Invalid as e:
        bad = value if e.part is None else e.part
        raise ConfigError(key, bad, rule.allowed, source, _expected(rule, e)) from None


def _children(prefix: str, known: Iterable[str]) -> list[str]:
    """Names directly under `prefix` ("" = the sections), in table order."""
    start = prefix + "." if prefix else ""
    return list(dict.fromkeys(k[len(start):].split(".")[0] for k in known if k.startswith(start)))


def _unknown(key: str, value: object, source: str, known: Iterable[str]) -> ConfigError:
    """An error for a key no table has, suggesting a close name or the section it belongs in."""
    prefix, _, name = key.rpartition(".")
    children = _children(prefix, known)
    close = difflib.get_close_matches(name, children, n=1)
    elsewhere = [k for k in known if k.endswith("." + name)]
    if close:
        hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}?"
    elif elsewhere:
        hint = f"did you mean {elsewhere[0]}?"
    else:
        hint = "known: " + ", ".join(children)
    what = "key" if prefix else "section"
    shown = None if isinstance(value, dict) else value
    return ConfigError(key, shown, "one of " + ", ".join(children), source, f"unknown {what}; {hint}")


def _read_table(doc: Mapping[str, object], source: str, known: Mapping[str, Field], prefix: str = "") -> dict[str, object]:
    """Dotted key -> checked value for every leaf of a TOML document."""
    out: dict[str, object] = {}
    for name, value in doc.items():
        key = prefix + name
        if key in known:
            out[key] = _convert(key, value, source, known[key].rule)
        elif isinstance(value, dict) and any(k.startswith(key + ".") for k in known):
            out |= _read_table(value, source, known, key + ".")
        else:
            raise _unknown(key, value, source, known)
    return out


def _read_flags(flags: Mapping[str, object]) -> dict[str, object]:
    """Checked flag values; None means "flag not given" (argparse's default)."""
    out = {}
    for key, value in flags.items():
        if value is None:
            continue
        if key not in FIELDS:
            raise _unknown(key, value, "flag", FIELDS)
        out[key] = _convert(key, value, "flag", FIELDS[key].rule)
    return out


def _parse(text: str, source: str) -> dict[str, object]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("file", None, "valid TOML", source, f"not valid TOML: {e}") from None


_HANDLER_NAME = f"a handler name: 1-32 of a-z 0-9 _ . -, other than the built-ins {', '.join(BUILTIN_HANDLERS)}"
#: Lets a misplaced handler key or a [handler.NAME] typo get a did-you-mean.
_HANDLER_HINTS = {f"handlers.NAME.{name}": f for name, f in HANDLER_FIELDS.items()}


def _read_handler(name: str, table: object, source: str) -> tuple[HandlerConfig, list[str]]:
    """One [handlers.NAME] table, checked: the handler and the dotted keys the table set."""
    prefix = f"handlers.{name}"
    if not KIND_RE.fullmatch(name):
        raise ConfigError(prefix, name, _HANDLER_NAME, source)
    if name in BUILTIN_HANDLERS:
        raise ConfigError(prefix, name, _HANDLER_NAME, source, f"reserved: {name} is a built-in handler; choose another name")
    if not isinstance(table, dict):
        raise ConfigError(prefix, table, f"a table [{prefix}] with " + ", ".join(HANDLER_FIELDS), source)
    values = _read_table(table, source, {f"{prefix}.{k}": f for k, f in HANDLER_FIELDS.items()}, prefix + ".")
    if f"{prefix}.command" not in values:
        raise ConfigError(f"{prefix}.command", None, HANDLER_FIELDS["command"].rule.allowed, source, "missing: every handler needs a command")
    return HandlerConfig(name, **{k[len(prefix) + 1:]: v for k, v in values.items()}), list(values)


def _read_handlers(tables: object, source: str) -> tuple[tuple[HandlerConfig, ...], dict[str, str]]:
    """All [handlers.NAME] tables and the source of each of their keys (unset ones: "default")."""
    if not isinstance(tables, dict):
        raise ConfigError("handlers", tables, "tables [handlers.NAME]", source)
    if len(tables) > MAX_HANDLERS:
        raise ConfigError("handlers", None, f"at most {MAX_HANDLERS} handlers", source, f"{len(tables)} handlers, at most {MAX_HANDLERS} allowed")
    handlers, sources = [], {}
    for name, table in tables.items():
        handler, given = _read_handler(name, table, source)
        handlers.append(handler)
        sources |= {key: source if key in given else "default" for key in _handler_keys(handler)}
    return tuple(handlers), sources


def _handler_keys(h: HandlerConfig) -> list[str]:
    return [f"handlers.{h.name}.{name}" for name in HANDLER_FIELDS]


def _read_file(path: Path, explicit: bool) -> tuple[dict[str, object], tuple[tuple[HandlerConfig, ...], dict[str, str]]]:
    """The file's checked values, and its handlers with their keys' sources;
    none when the default file is absent (defaults are enough)."""
    source = f"file:{path}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError("file", str(path), "an existing file", "flag", "no such file") from None
        return {}, ((), {})
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("file", str(path), "a readable UTF-8 file", source, f"cannot read it: {e}") from None
    doc = _parse(text, source)
    handlers = _read_handlers(doc.pop("handlers", {}), source)
    return _read_table(doc, source, FIELDS | _HANDLER_HINTS), handlers


# ---------------------------------------------------------------------------
# Board profiles.


def _boards_dir():
    """The board profiles: packaged as agent.boards in a wheel; in a source
    checkout (`python -m agent` from the repository root, where the local
    agent/ shadows the installed package) the top-level boards/ beside it."""
    try:
        return files("agent.boards")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "boards"


def known_boards() -> list[str]:
    """Names of the shipped board profiles (boards/*.toml)."""
    return sorted(p.name.removesuffix(".toml") for p in _boards_dir().iterdir() if p.name.endswith(".toml"))


def _load_board(name: str) -> tuple[BoardProfile, dict[str, object]]:
    """A shipped profile and its checked overrides of config fields."""
    source = f"board:{name}"
    text = _boards_dir().joinpath(f"{name}.toml").read_text(encoding="utf-8")
    values = _read_table(_parse(text, source), source, FIELDS | BOARD_FIELDS)
    for key, f in BOARD_FIELDS.items():
        if key not in values:
            raise ConfigError(key, None, f.rule.allowed, source, "missing from the board file")
    if values["board.name"] != name:
        raise ConfigError("board.name", values["board.name"], f'"{name}", the file name', source)
    thermal = Thermal(values.pop("board.thermal.warn_c"), values.pop("board.thermal.critical_c"))
    if thermal.warn_c >= thermal.critical_c:
        raise ConfigError("board.thermal.warn_c", thermal.warn_c, f"less than board.thermal.critical_c ({thermal.critical_c})", source)
    board = BoardProfile(
        values.pop("board.name"),
        tuple(values.pop("board.models")),
        values.pop("board.serial_device"),
        values.pop("board.throttle_source"),
        Budgets(values.pop("board.budgets.max_rss_mb"), values.pop("board.budgets.max_members"), values.pop("board.budgets.max_cpu_pct")),
        thermal,
    )
    return board, values


def _model(model_path: Path) -> str:
    """The device-tree model before " Rev" (NUL-terminated in /proc); "" if unreadable."""
    try:
        raw = model_path.read_bytes()
    except OSError:
        return ""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip().partition(" Rev")[0]


def _select_board(name: str | None, model_path: Path, source: str = "flag") -> tuple[BoardProfile, dict[str, object], str]:
    """(profile, its overrides, how it was chosen): --board or node.board (`source`
    says which), else the model, else generic."""
    boards = {n: _load_board(n) for n in known_boards()}
    if name is not None:
        if name not in boards:
            close = difflib.get_close_matches(name, boards, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            allowed = "one of " + ", ".join(boards)
            key = "board" if source == "flag" else "node.board"
            raise ConfigError(key, name, allowed, source, f"expected {allowed}{hint}")
        return *boards[name], source
    model = _model(model_path)
    for board, overrides in boards.values():
        if model and model in board.models:
            return board, overrides, f"detected:{model_path}"
    return *boards[GENERIC_BOARD], "default"


# ---------------------------------------------------------------------------
# Loading.


def _defaults() -> dict[str, object]:
    """Built-in defaults; membership fields are left to the preset."""
    out: dict[str, object] = {"membership.profile": DEFAULT_PROFILE}
    for section, cls in _SECTIONS.items():
        if cls is not MembershipSettings:
            out |= {f"{section}.{f.name}": f.default for f in fields(cls)}
    return out


def _fill_from_preset(values: dict[str, object], sources: dict[str, str]) -> None:
    """Membership fields no layer set take the chosen preset's value."""
    name = values["membership.profile"]
    for f in fields(MembershipSettings):
        key = f"membership.{f.name}"
        if key not in values:
            values[key], sources[key] = getattr(PROFILES[name], f.name), f"profile:{name}"


def _build(values: Mapping[str, object], board: BoardProfile, handlers: tuple[HandlerConfig, ...]) -> Config:
    def section(name: str, cls: type):
        return cls(**{f.name: values[f"{name}.{f.name}"] for f in fields(cls)})

    sections = {name: section(name, cls) for name, cls in _SECTIONS.items()}
    return Config(board=board, membership_profile=values["membership.profile"], handlers=handlers, **sections)


def _cross_check(config: Config, sources: Mapping[str, str]) -> None:
    """Rules between fields; each single field was checked when read."""
    problems = [(f"membership.{name}", value, allowed) for name, value, allowed in config.membership.problems()]
    budget = config.board.budgets.max_members
    if config.membership.max_members > budget:
        problems.append(("membership.max_members", config.membership.max_members, f"at most {budget}, the budget of board {config.board.name}"))
    c = config.consensus
    if c.heartbeat_ticks >= c.election_ticks:
        problems.append(("consensus.heartbeat_ticks", c.heartbeat_ticks, f"less than consensus.election_ticks ({c.election_ticks})"))
    if config.load.meta_refresh_ms < config.load.sample_interval_ms:
        problems.append(("load.meta_refresh_ms", config.load.meta_refresh_ms, f"at least load.sample_interval_ms ({config.load.sample_interval_ms})"))
    if config.tasks.idle >= config.tasks.overload:
        problems.append(("tasks.idle", config.tasks.idle, f"less than tasks.overload ({config.tasks.overload})"))
    if problems:
        key, value, allowed = problems[0]
        raise ConfigError(key, value, allowed, sources[key])


def load_config(
    path: Path | None = None,
    *,
    board: str | None = None,
    flags: dict[str, object] | None = None,
    model_path: Path = MODEL_PATH,
    explicit_path: bool = False,
) -> Loaded:
    """Defaults < board profile < file < flags, all checked; ConfigError on the first problem.

    `path` None means DEFAULT_PATH. A missing file is fine unless `explicit_path`
    (the operator named it with --config). `flags` are keyed by dotted names
    ("node.port"); a None value is a flag that was not given.
    """
    values = _defaults()
    sources = dict.fromkeys(values, "default")
    path = DEFAULT_PATH if path is None else path
    file_values, (handlers, handler_sources) = _read_file(path, explicit_path)
    if board is None and file_values.get("node.board", "auto") != "auto":
        board, board_source = file_values["node.board"], f"file:{path}"
    else:
        board_source = "flag"
    profile, overrides, chosen = _select_board(board, model_path, board_source)
    layers = [
        (f"board:{profile.name}", overrides),
        (f"file:{path}", file_values),
        ("flag", _read_flags(flags or {})),
    ]
    for source, layer in layers:
        values |= layer
        sources |= dict.fromkeys(layer, source)
    _fill_from_preset(values, sources)
    sources |= dict.fromkeys(BOARD_FIELDS, f"board:{profile.name}") | {"board.name": chosen}
    config = _build(values, profile, handlers)
    _cross_check(config, sources)
    return Loaded(config, {key: sources[key] for key in _KEYS} | handler_sources)


# ---------------------------------------------------------------------------
# Showing.

_KEYS = [*BOARD_FIELDS, *FIELDS]  #: display order: the board first, then the file's sections


def _show(value: object) -> str:
    """A value as TOML spells it, so `config show` reads like the file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(_show, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _handler_values(h: HandlerConfig) -> dict[str, object]:
    """A handler's fields as the file spells them (env as a table)."""
    return {name: dict(h.env) if name == "env" else getattr(h, name) for name in HANDLER_FIELDS}


def flat_values(config: Config) -> dict[str, object]:
    """Every value by dotted key (board, sections, handlers), as `config show` lists them."""
    def value(key: str) -> object:
        return config.membership_profile if key == "membership.profile" else reduce(getattr, key.split("."), config)

    out = {key: value(key) for key in _KEYS}
    for h in config.handlers:
        out |= {f"handlers.{h.name}.{name}": v for name, v in _handler_values(h).items()}
    return out


def _group(key: str) -> str:
    """What format_config keeps together: a section, or one handler."""
    return key.rpartition(".")[0] if key.startswith("handlers.") else key.split(".")[0]


def format_config(loaded: Loaded) -> str:
    """`section.key = value   # source` per key, a blank line between sections and handlers."""
    items = [(key, f"{key} = {_show(v)}") for key, v in flat_values(loaded.config).items()]
    width = min(48, max(len(text) for _, text in items))
    lines: list[str] = []
    for i, (key, text) in enumerate(items):
        if i and _group(key) != _group(items[i - 1][0]):
            lines.append("")
        lines.append(f"{text.ljust(width)}   # {loaded.sources[key]}")
    return "\n".join(lines) + "\n"


def _json_value(value: object) -> object:
    return str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value


def config_as_dict(loaded: Loaded) -> dict[str, object]:
    """{"config": sections as in the file (JSON-ready), "sources": dotted key -> source}."""
    tree: dict[str, object] = {}
    for key, value in flat_values(loaded.config).items():
        if not key.startswith("handlers."):  # handler names may hold dots
            *parents, leaf = key.split(".")
            reduce(lambda d, p: d.setdefault(p, {}), parents, tree)[leaf] = _json_value(value)
    if loaded.config.handlers:
        tree["handlers"] = {h.name: {k: _json_value(v) for k, v in _handler_values(h).items()} for h in loaded.config.handlers}
    return {"config": tree, "sources": dict(loaded.sources)}


# ---------------------------------------------------------------------------
# The reference document.

_DOC_INTRO = f"""\
# Configuration

<!-- Generated by `python -m agent.config --markdown > docs/configuration.md` from
     agent/config.py, agent/core/settings.py and boards/*.toml: edit those, not this file. -->

meshagent reads one TOML file: `{DEFAULT_PATH}`, or the file named by `--config FILE`.
The default file may be absent (then the defaults apply); a file named with `--config` must exist.

Each value comes from the last of these that sets it:

1. the built-in default (for `[membership]` fields: the preset named by `membership.profile`);
2. the board profile, `boards/NAME.toml` (see [Board profiles](#board-profiles));
3. the file;
4. command-line flags.

`meshagent config show` prints every value and where it came from: `default`, `profile:NAME`,
`board:NAME`, `file:PATH` or `flag`.

Everything is checked at start, and nothing is silently ignored: an unknown section or key (with
a suggestion when a known one is close), a wrong type (`true` is not an integer, `"5683"` is not a
number) or a value out of range stops the agent with a message like

    config error: node.port = 70000 (from file:/etc/meshagent/agent.toml): expected an integer from 1 to 65535

Example:

```toml
[node]
mesh = "greenhouse"
capabilities = ["camera", "arch=arm64"]

[discovery]
seeds = ["10.0.0.2", "[fd00::2]:5684", "hub.local"]

[membership]
profile = "lan"
probe_interval_ms = 2000
```
"""

_DOC_RULES = """\
Values are also checked against each other:

- `[membership]`: the rules of `MembershipSettings.problems()` (e.g. `probe_timeout_ms` must be
  below `probe_interval_ms`), and `max_members` may not exceed the board's `budgets.max_members`;
- `load.meta_refresh_ms` must be at least `load.sample_interval_ms`;
- `tasks.idle` must be below `tasks.overload`.
"""

_DOC_HANDLERS = f"""\
## [handlers.NAME]

A handler is a program this node runs for tasks of kind `NAME`. The node offers (gossips) the
kinds it has a handler for; {', '.join(f"`{n}`" for n in BUILTIN_HANDLERS)} are built in (run inside the
agent) and are reserved names. NAME is 1-32 of `a-z 0-9 _ . -`; at most {MAX_HANDLERS} handlers. Handlers
come from the file only (not from board profiles or flags); `config show` prints each field as
`handlers.NAME.FIELD`.

`command` is the argv list, run without a shell, in its own session: a task's arguments can never
be read as shell syntax, and a timeout kills the handler's whole process tree. A string such as
`command = "transcode --preset fast"` is refused; write `command = ["transcode", "--preset", "fast"]`.

```toml
[handlers.transcode]
command = ["/usr/local/bin/transcode", "--preset", "fast"]
env = {{ TRANSCODE_THREADS = "2" }}
cwd = "/srv/media"
timeout_s = 600
concurrency = 2
```
"""

_DOC_BOARDS = f"""\
## Board profiles

A board profile holds what depends on the hardware. It is chosen with `--board NAME`; without
it, the text of `{MODEL_PATH}` before " Rev" (e.g. `Raspberry Pi 4 Model B` from
`Raspberry Pi 4 Model B Rev 1.4`) selects the profile that lists it in `models`, else `generic`.
`meshagent board` shows the chosen profile, why, and what the board reads now (temperature,
throttling, memory against the budgets).
A profile file has a `[board]` table and may override any field of the sections above, with the
same checks; `config show` marks such values `board:NAME`. That is how a board sets its timing
preset (`membership.profile`, `load.sample_interval_ms`).
"""

_DOC_IDENTITY = """\
## Node identity

With `node.id` empty, the node derives `<hostname>-<8 hex>` on first start and keeps it in
`data_dir/node-id`, so it is unique even when every device is called `raspberrypi`, and stable
across restarts and renames. The hex is a keyed SHA-256 of `/etc/machine-id` (random when there is
none). An SD card cloned after first boot copies the machine id and the node-id file, so clones
share an id: give each clone a new machine id (`rm /etc/machine-id && systemd-machine-id-setup`)
and delete `data_dir/node-id`, or set `node.id`. `data_dir/boot-count` counts starts.
"""


def _cell(text: str) -> str:
    """Escape what Markdown would read as a column break or emphasis."""
    return text.replace("|", "\\|").replace("*", "\\*")


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _section_doc(section: str) -> str:
    defaults = _defaults()
    rows = [
        [f"`{key.split('.', 1)[1]}`", f.rule.kind, f.unit, f"`{_show(defaults[key])}`", f.rule.allowed, f.meaning]
        for key, f in FIELDS.items()
        if key.startswith(section + ".")
    ]
    return f"## [{section}]\n\n" + _table(["key", "type", "unit", "default", "allowed", "meaning"], rows)


def _handlers_doc() -> str:
    defaults = {f.name: f.default for f in fields(HandlerConfig)} | {"env": {}}
    rows = [
        [f"`{name}`", f.rule.kind, f.unit, "required" if name == "command" else f"`{_show(defaults[name])}`", f.rule.allowed, f.meaning]
        for name, f in HANDLER_FIELDS.items()
    ]
    return _DOC_HANDLERS + "\n" + _table(["key", "type", "unit", "default", "allowed", "meaning"], rows)


def _membership_doc() -> str:
    names = list(PROFILES)
    profile = FIELDS["membership.profile"]
    rows = [
        [f"`{key.split('.', 1)[1]}`", f.unit, f.rule.allowed, *(f"`{getattr(PROFILES[p], key.split('.', 1)[1])}`" for p in names), f.meaning]
        for key, f in FIELDS.items()
        if key.startswith("membership.") and key != "membership.profile"
    ]
    header = ["key", "unit", "allowed", *(f"{p} (default)" if p == DEFAULT_PROFILE else p for p in names), "meaning"]
    return (
        "## [membership]\n\n"
        f'`profile` ({profile.rule.allowed}; default `"{DEFAULT_PROFILE}"`): {profile.meaning}. '
        "A field set by the board, the file or a flag wins over the preset, whichever preset is chosen.\n\n"
        + _table(header, rows)
    )


def _boards_doc() -> str:
    fields_rows = [[f"`{key.split('.', 1)[1]}`", f.rule.kind, f.unit, f.rule.allowed, f.meaning] for key, f in BOARD_FIELDS.items()]
    shipped = []
    for name in known_boards():
        board, overrides = _load_board(name)
        changes = ", ".join(f"`{k} = {_show(v)}`" for k, v in overrides.items()) or "none"
        b = board.budgets
        shipped.append([f"`{name}`", "<br>".join(board.models) or "(never detected)", board.serial_device or "(none)", board.throttle_source,
                        f"{board.thermal.warn_c:g} / {board.thermal.critical_c:g}", f"{b.max_rss_mb} MiB, {b.max_cpu_pct:g} %, {b.max_members}", changes])
    return (
        _DOC_BOARDS
        + "\n"
        + _table(["key", "type", "unit", "allowed", "meaning"], fields_rows)
        + "\nShipped profiles:\n\n"
        + _table(["name", "models", "serial_device", "throttle_source", "warn / critical °C", "budgets: RSS, idle CPU, members", "overrides (timing presets)"], shipped)
    )


def markdown_reference() -> str:
    """docs/configuration.md: every field with unit, default, allowed values and meaning."""
    parts = [_DOC_INTRO]
    parts += [_membership_doc() if section == "membership" else _section_doc(section) for section in _SECTIONS]
    parts += [_handlers_doc(), _DOC_RULES, _boards_doc(), _DOC_IDENTITY]
    return "\n".join(parts)


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m agent.config --markdown > docs/configuration.md")
    sys.stdout.write(markdown_reference())
