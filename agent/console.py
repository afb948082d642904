"""The line console's commands: one line of text in, one bounded answer out.

This is what an operator types on the serial console when the network is down,
so every command reads the running agent's own state (nothing here needs the
network, except `net` and `ping`, whose CoAP pings are async with short
timeouts, a few at a time). The transport (agent.io.serial_console) frames
lines and answers; this module only interprets them, so it is tested without
a serial port.

Every answer is text of at most MAX_ANSWER_CHARS characters; a bad command or
argument gets one line starting with "error:" that says what is allowed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import platform
import socket
from dataclasses import dataclass
from typing import Awaitable, Callable

from agent import PROTOCOL_VERSION, __version__, logbuffer, tables
from agent.io.coap import uri_host

log = logging.getLogger("meshagent.console")

MAX_ANSWER_CHARS = 16_000  #: about 1.4 s at 115200 baud
LOG_DEFAULT = 20  #: lines shown by a bare `log`
LOG_MOST = 1000  #: the largest N of `log N`
PING_TIMEOUT_S = 0.5  #: per attempt; a LAN answers in a few ms
PING_ATTEMPTS = 2
PING_PARALLEL = 4  #: seeds pinged at once by `net`
NET_MOST_SEEDS = 16  #: seeds pinged by `net`; the rest are listed as not pinged
NET_MOST_INTERFACES = 32
NET_MOST_ADDRESSES = 8  #: per interface
TASKS_MOST_ROWS = 20


class UsageError(Exception):
    """A bad argument: the message says what is allowed."""


@dataclass(frozen=True)
class Command:
    run: Callable[[list[str]], Awaitable[str]]
    usage: str
    text: str
    most_args: int = 0


class Console:
    """The commands of the line console, bound to a running agent.node.Agent."""

    def __init__(self, agent):
        self.agent = agent
        self.commands: dict[str, Command] = {
            "help": Command(self.help, "help", "this list"),
            "status": Command(self.status, "status", "this node: mesh, address, members, load, raft, tasks"),
            "peers": Command(self.peers, "peers", "the members this node knows, with state, load and RTT"),
            "load": Command(self.load, "load", "CPU, memory, temperature and throttling here, and the agent's own use"),
            "leader": Command(self.leader, "leader", "Raft leader, term, voters and whether this node can write"),
            "tasks": Command(self.tasks, "tasks", "tasks queued and running on this node"),
            "log": Command(self.log, "log [N]", f"the last N log lines kept in memory (default {LOG_DEFAULT}, 1-{LOG_MOST})", 1),
            "net": Command(self.net, "net", "interfaces, addresses, mDNS, and whether each seed answers a CoAP ping"),
            "config": Command(self.config, "config [SECTION]", "the effective configuration (or one section) and where each value came from", 1),
            "ping": Command(self.ping, "ping PEER", "CoAP ping a member (by node id) or HOST[:PORT]", 1),
            "version": Command(self.version, "version", "agent, protocol and Python versions"),
        }

    async def handle(self, line: str) -> str:
        """The answer to one command line ("" for an empty line)."""
        if not line.replace("\t", " ").isprintable() or "\ufffd" in line:
            bad = next((c for c in line if not c.isprintable() and c != "\t"), "\ufffd")
            return f"error: the line holds {_char(bad)}; commands are printable text (try `help`)"
        words = line.split()
        if not words:
            return ""
        name, args = words[0].lower(), words[1:]
        cmd = self.commands.get(name)
        if cmd is None:
            return f"error: unknown command {_shown(words[0])}; commands: {', '.join(self.commands)}"
        if len(args) > cmd.most_args:
            return f"error: too many arguments to {name}; usage: {cmd.usage}"
        try:
            answer = await cmd.run(args)
        except UsageError as exc:
            return f"error: {exc}; usage: {cmd.usage}"
        except Exception as exc:  # our bug: answer it, log it, keep serving
            log.exception("console command %r failed", name)
            return f"error: {name} failed: {type(exc).__name__}: {exc}"[:500]
        return bound(answer, keep_end=(name == "log"))

    # -------------------------------------------------------------- commands

    async def help(self, args: list[str]) -> str:
        width = max(len(c.usage) for c in self.commands.values())
        rows = [f"  {c.usage.ljust(width)}  {c.text}" for c in self.commands.values()]
        return "commands:\n" + "\n".join(rows)

    async def status(self, args: list[str]) -> str:
        return tables.format_status(self.agent.status())

    async def peers(self, args: list[str]) -> str:
        return tables.format_peers(self.agent.peers())

    async def load(self, args: list[str]) -> str:
        s = self.agent.status()
        ld, proc = s.get("load") or {}, s.get("process") or {}
        throttled = ld.get("throttled")
        rows = [
            ("cpu", _num(ld.get("cpu"), "{:.1f} %")),
            ("memory", _num(ld.get("mem"), "{:.1f} %")),
            ("load1", _num(ld.get("load1"), "{:.2f}")),
            ("temperature", _num(ld.get("temp_c"), "{:.1f} C")),
            ("throttled", "unknown" if throttled is None else str(throttled)),
            ("agent", f"rss {_num((proc.get('rss_bytes') or 0) / 1e6, '{:.1f} MB')}  cpu {_num(proc.get('cpu_percent'), '{:.1f} %')}"),
        ]
        return _rows(rows)

    async def leader(self, args: list[str]) -> str:
        consensus = self.agent.consensus
        if consensus is None:
            return "consensus is off on this node (consensus.enabled = false)"
        r = consensus.status()
        me = self.agent.node_id
        leader = r.get("leader")
        rows = [
            ("leader", "none known" if not leader else leader + (" (this node)" if leader == me else "")),
            ("this node", f"{r.get('role')}, term {r.get('term')}"),
            ("mode", r.get("mode")),
            ("voters", ", ".join(r.get("voters") or []) or "none yet"),
            ("commit", f"{r.get('commit_index')} (applied {r.get('applied_index')})"),
        ]
        if r.get("why"):
            rows.append(("why", r["why"]))
        return _rows(rows)

    async def tasks(self, args: list[str]) -> str:
        tasks = self.agent.tasks
        if tasks is None:
            return "tasks are off on this node (tasks.enabled = false)"
        st = tasks.status()
        head = ("  ".join(f"{k} {st.get(k, 0)}" for k in ("queued", "running", "done", "failed", "pending"))
                + f"  (slots {st.get('slots')}; kinds {', '.join(st.get('kinds') or [])})")
        local = tasks.engine.local_tasks()
        if not local:
            return head + "\nnothing queued or running here"
        rows = [[t["id"], t["kind"], t["state"], str(t["attempt"]), str(t["priority"]), str(t.get("via") or "-")]
                for t in local[:TASKS_MOST_ROWS]]
        more = f"\n... and {len(local) - TASKS_MOST_ROWS} more" if len(local) > TASKS_MOST_ROWS else ""
        return head + "\n" + tables.format_table(["ID", "KIND", "STATE", "ATTEMPT", "PRIORITY", "VIA"], rows) + more

    async def log(self, args: list[str]) -> str:
        n = _count(args[0], 1, LOG_MOST, "N") if args else LOG_DEFAULT
        buffer = logbuffer.current()
        if buffer is None:
            return "no log lines are kept in memory (log.memory_lines = 0)"
        lines = buffer.tail(n)
        return "\n".join(lines) if lines else "nothing logged yet"

    async def net(self, args: list[str]) -> str:
        a, cfg = self.agent, self.agent.config
        seeds = list(a.seeds)
        pinged = await _ping_all(seeds[:NET_MOST_SEEDS])
        lines = ["interfaces:", *_interfaces()]
        lines.append(f"agent: bound to {cfg.node.bind}:{cfg.node.port}, advertising {a.address}")
        lines.append(f"mdns: {_mdns_state(a)}")
        if not seeds:
            lines.append("seeds: none configured (discovery.seeds)")
        else:
            lines.append(f"seeds (CoAP ping, {PING_ATTEMPTS} x {PING_TIMEOUT_S:g} s):")
            width = max(len(_hostport(*s)) for s in seeds[:NET_MOST_SEEDS])
            lines += [f"  {_hostport(*s).ljust(width)}  {r}" for s, r in zip(seeds, pinged)]
            if len(seeds) > NET_MOST_SEEDS:
                lines.append(f"  ... and {len(seeds) - NET_MOST_SEEDS} more, not pinged")
        return "\n".join(lines)

    async def config(self, args: list[str]) -> str:
        from agent.config import Loaded, format_config

        sources = _Sources(getattr(self.agent, "config_sources", None) or {})
        text = format_config(Loaded(self.agent.config, sources))
        if not args:
            return text.rstrip("\n")
        section = args[0].lower()
        lines = [ln for ln in text.splitlines() if ln.startswith(section + ".")]
        if not lines:
            known = sorted({ln.split(".")[0] for ln in text.splitlines() if "." in ln.split(" ")[0]})
            raise UsageError(f"no config section {_shown(args[0])}; sections: {', '.join(known)}")
        return "\n".join(lines)

    async def ping(self, args: list[str]) -> str:
        if not args:
            raise UsageError("ping needs a PEER: a member's node id or HOST[:PORT]")
        target = args[0]
        member = self.agent.core.members.get(target)
        if member is not None:
            host, port = member.addr, member.port
            name = f"{target} ({_hostport(host, port)})"
        else:
            host, port = _host_port(target)
            name = _hostport(host, port)
        return f"{name}: {await _ping_one(host, port)}"

    async def version(self, args: list[str]) -> str:
        a = self.agent
        return (f"meshagent {__version__} (protocol {PROTOCOL_VERSION}), Python {platform.python_version()}, "
                f"board {a.config.board.name}, node {a.node_id}")


# ------------------------------------------------------------------ helpers


class _Sources(dict):
    """config_sources with "source unknown" for keys it lacks (it may be empty)."""

    def __missing__(self, key: str) -> str:
        return "source unknown"


def bound(text: str, keep_end: bool = False) -> str:
    """At most MAX_ANSWER_CHARS characters, saying what was cut; `keep_end` keeps
    the newest lines of a log instead of the first lines of a table."""
    if len(text) <= MAX_ANSWER_CHARS:
        return text
    cut = len(text) - MAX_ANSWER_CHARS
    if keep_end:
        return f"(... {cut} earlier characters cut)\n" + text[cut:]
    return text[:MAX_ANSWER_CHARS] + f"\n(... {cut} more characters cut)"


def _rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _num(value, fmt: str) -> str:
    return "unknown" if value is None else fmt.format(value)


def _shown(word: str) -> str:
    return repr(word if len(word) <= 40 else word[:40] + "...")


def _char(c: str) -> str:
    return "bytes that are not UTF-8 text" if c == "\ufffd" else f"the control character {ord(c):#04x}"


def _count(text: str, lo: int, hi: int, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or not lo <= int(text) <= hi:
        raise UsageError(f"{what} must be a whole number from {lo} to {hi}, not {_shown(text)}")
    return int(text)


def _host_port(text: str) -> tuple[str, int]:
    from agent.config import ConfigError, parse_seed

    try:
        return parse_seed(text)
    except ConfigError as exc:
        raise UsageError(f"{_shown(text)} is neither a known member's node id nor HOST[:PORT] ({exc.allowed})") from None


def _hostport(host: str, port: int) -> str:
    return f"{uri_host(host)}:{port}"


async def _ping_one(host: str, port: int) -> str:
    from agent.io.coap_ping import coap_ping

    budget = PING_TIMEOUT_S * PING_ATTEMPTS + 1.5  # + name resolution
    try:
        rtt = await asyncio.wait_for(coap_ping(host, port, timeout=PING_TIMEOUT_S, attempts=PING_ATTEMPTS), budget)
    except (asyncio.TimeoutError, TimeoutError):
        return f"no answer within {budget:g} s (name resolution too slow?)"
    except ConnectionRefusedError:
        return "port unreachable: the host is up, no agent listens on that UDP port"
    except (OSError, UnicodeError) as exc:
        return f"cannot ping: {getattr(exc, 'strerror', None) or exc}"
    if rtt is None:
        return f"no answer to a CoAP ping ({PING_ATTEMPTS} x {PING_TIMEOUT_S:g} s): agent down, or UDP blocked on the way"
    return f"answers a CoAP ping in {rtt:.2f} ms"


async def _ping_all(targets: list[tuple[str, int]]) -> list[str]:
    """Each target's ping result, at most PING_PARALLEL in flight."""
    gate = asyncio.Semaphore(PING_PARALLEL)

    async def one(host: str, port: int) -> str:
        async with gate:
            return await _ping_one(host, port)

    return list(await asyncio.gather(*(one(h, p) for h, p in targets)))


def _mdns_state(agent) -> str:
    if not agent.config.discovery.mdns:
        return "off (discovery.mdns = false)"
    if agent.mdns is None:
        return "off: it failed to start (see `log`)"
    return "on"


def _interfaces() -> list[str]:
    """One line per interface: up/down, speed, addresses with prefix length."""
    import psutil

    try:
        addrs, stats = psutil.net_if_addrs(), psutil.net_if_stats()
    except OSError as exc:
        return [f"  cannot list interfaces: {exc}"]
    names = sorted(addrs)
    lines = []
    for name in names[:NET_MOST_INTERFACES]:
        st = stats.get(name)
        state = "unknown" if st is None else ("up" if st.isup else "down") + (f" {st.speed} Mb/s" if st.isup and st.speed else "")
        ips = [_prefixed(a.address, a.netmask) for a in addrs[name] if a.family in (socket.AF_INET, socket.AF_INET6)]
        shown = ", ".join(ips[:NET_MOST_ADDRESSES]) + (f" (+{len(ips) - NET_MOST_ADDRESSES})" if len(ips) > NET_MOST_ADDRESSES else "")
        lines.append(f"  {name:<12} {state:<14} {shown or 'no address'}")
    if len(names) > NET_MOST_INTERFACES:
        lines.append(f"  ... and {len(names) - NET_MOST_INTERFACES} more")
    return lines


def _prefixed(address: str, netmask: str | None) -> str:
    """"192.168.1.23/24", "fe80::1/64" (psutil gives masks, IPv6 ones as addresses too)."""
    address = address.split("%")[0]  # fe80::1%eth0
    try:
        return f"{address}/{bin(int(ipaddress.ip_address(netmask))).count('1')}" if netmask else address
    except ValueError:
        return address
