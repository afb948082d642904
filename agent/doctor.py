"""`meshagent doctor`: check, on a device, what keeps an agent from working, and name it.

Each check gives one line that says what is wrong and what to do, with a
status: "ok", "warn" (worth a look, the agent still works) or "fail" (the
agent cannot work as configured). The checks run against the same
configuration `meshagent run` would load, so they test what the agent would do:

- each seed answers a CoAP ping on UDP (a firewall that drops UDP while TCP
  passes is the classic hours-long hunt in gossip fleets);
- mDNS: a multicast-capable interface is up, and a browse on 224.0.0.251:5353
  for our service type gets answers;
- the clock is plausible and synchronised;
- the fleet key file is private, owned by root or us, and loads;
- the data dir is writable (a real create + fsync + remove) and not full;
- temperature and throttling against the board profile;
- the UDP port is free, or held by the running agent (then: its RSS and CPU
  against the board's budgets, from its /status).

Everything the host answers is read under `Host.sysroot` or through `Host`'s
callables, so tests use fake /proc, /sys and /run trees; network checks use
real sockets. The whole run is bounded (about two seconds): the network checks
run in parallel with short timeouts, name lookups in daemon threads (a hung DNS
must not hold the process), the local checks in a worker thread meanwhile.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import grp
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import cbor2
import psutil

from agent import board as boardmod
from agent.config import BoardProfile, Config, NodeConfig, parse_seed
from agent.envelope import KeyFileError, load_keys
from agent.io.ports import bind_error, udp_holders
from agent.io.coap_ping import coap_ping

OK, WARN, FAIL = "ok", "warn", "fail"

MIN_YEAR = 2025  #: this package was built no earlier; a clock before it was never set (no RTC, no NTP yet)
TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")  #: systemd-timesyncd touches it once synchronised
MIN_FREE_MB = 64  #: less free space in the data dir than this is a warning (Raft log, snapshots, results)
RESOLVE_TIMEOUT_S = 1.0  #: one seed's name lookup
PING_TIMEOUT_S, PING_ATTEMPTS = 0.5, 2  #: per seed: two CoAP pings of 0.5 s
BROWSE_S = 1.5  #: how long the mDNS browse listens for answers
STATUS_TIMEOUT_S = 1.0  #: the local agent's /status
DEADLINE_S = 4.0  #: all network checks together; a check still running then fails as "did not finish"
MDNS_GROUP = "224.0.0.251:5353"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  #: OK, WARN or FAIL
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "message": self.message}


def _timedatectl_synchronized() -> bool | None:
    """systemd's NTPSynchronized (True/False), None when timedatectl cannot tell."""
    try:
        out = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
                             capture_output=True, text=True, timeout=1.0, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"yes": True, "no": False}.get(out.stdout.strip()) if out.returncode == 0 else None


def _multicast_interfaces() -> dict[str, list[str]]:
    """IPv4 addresses of interfaces that are up, not loopback, and do multicast."""
    addrs, stats = psutil.net_if_addrs(), psutil.net_if_stats()
    out = {}
    for name, st in sorted(stats.items()):
        flags = getattr(st, "flags", "multicast").split(",")  # psutil < 5.9.3 has no flags: assume yes
        v4 = [a.address for a in addrs.get(name, ()) if a.family == socket.AF_INET]
        if st.isup and v4 and "multicast" in flags and "loopback" not in flags:
            out[name] = v4
    return out


@dataclass(frozen=True)
class Host:
    """Where doctor looks. Tests replace the sysroot and the OS queries."""

    sysroot: Path = Path("/")
    now: Callable[[], float] = time.time
    ntp_synchronized: Callable[[], bool | None] = _timedatectl_synchronized
    interfaces: Callable[[], dict[str, list[str]]] = _multicast_interfaces
    euid: int = field(default_factory=os.geteuid)


# ------------------------------------------------------------------ seeds


async def _resolve(host: str, port: int) -> str:
    """The first address of host, looked up in a daemon thread so that a hung
    resolver neither blocks the loop nor keeps the process alive at exit.
    OSError (socket.gaierror) when it does not resolve, TimeoutError when too slow."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(result: object) -> None:
        if not done.done():
            done.set_result(result)

    def work() -> None:
        try:
            result: object = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][4][0]
        except OSError as exc:
            result = exc
        try:
            loop.call_soon_threadsafe(settle, result)
        except RuntimeError:  # the loop is gone: nobody is waiting any more
            pass

    threading.Thread(target=work, name="doctor-resolve", daemon=True).start()
    result = await asyncio.wait_for(done, RESOLVE_TIMEOUT_S)
    if isinstance(result, OSError):
        raise result
    return result


async def check_seed(seed: str) -> Check:
    host, port = parse_seed(seed)
    name = f"seed {seed}"
    try:
        address = await _resolve(host, port)
    except TimeoutError:
        return Check(name, FAIL, f"{host} does not resolve (lookup timed out after {RESOLVE_TIMEOUT_S:g} s): check DNS (/etc/resolv.conf) or use an address")
    except OSError as exc:
        return Check(name, FAIL, f"{host} does not resolve ({exc.strerror or exc}): fix the name or use an address")
    try:
        rtt = await coap_ping(address, port, timeout=PING_TIMEOUT_S, attempts=PING_ATTEMPTS)
    except ConnectionRefusedError:
        return Check(name, FAIL, f"{host} answers ICMP port unreachable on UDP {port}: the host is up but no agent listens on that port (is meshagent running there, on this port?)")
    except OSError as exc:
        if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return Check(name, FAIL, f"no route to {address} ({exc.strerror}): check this host's network and routes")
        return Check(name, FAIL, f"cannot send to {address}:{port} ({exc.strerror or exc})")
    at = address if address == host else f"{host} ({address})"
    if rtt is None:
        return Check(name, FAIL, f"{at} does not answer a CoAP ping on UDP {port} within {PING_ATTEMPTS * PING_TIMEOUT_S:g} s: "
                                 f"is the agent running there? If it is, a firewall dropping UDP port {port} (on either host or between) is the likely cause")
    return Check(name, OK, f"{at} answers a CoAP ping on UDP {port} ({rtt:.1f} ms)")


def no_seeds(config: Config) -> Check:
    if config.discovery.mdns:
        return Check("seeds", OK, "none configured: this node finds its mesh by mDNS only")
    return Check("seeds", WARN, "none configured and mDNS is off: this node joins only when another names it as a seed (set discovery.seeds)")


# ------------------------------------------------------------------- mDNS


async def browse_mdns(addresses: list[str], seconds: float = BROWSE_S) -> set[str]:
    """Instance names answering a browse for the agents' DNS-SD type on these
    interface addresses. OSError when the multicast socket cannot be opened."""
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

    from agent.io.mdns import SERVICE_TYPE

    names: set[str] = set()

    def seen(name: str, **_: object) -> None:
        if len(names) < 1024:  # a noisy LAN must not grow this without bound
            names.add(name)

    zc = AsyncZeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
    try:
        browser = AsyncServiceBrowser(zc.zeroconf, SERVICE_TYPE, handlers=[seen])
        await asyncio.sleep(seconds)
        await asyncio.wait_for(browser.async_cancel(), 1.0)
    finally:
        try:
            await asyncio.wait_for(zc.async_close(), 1.0)
        except (TimeoutError, OSError):
            zc.zeroconf.close()
    return names


def mdns_interfaces(config: Config, host: Host) -> tuple[Check | None, list[str]]:
    """(a finished check when there is no usable interface, else None; the addresses to browse on)."""
    wanted = config.discovery.mdns_interfaces
    try:
        found = host.interfaces()
    except OSError as exc:
        return Check("mdns", WARN, f"cannot list network interfaces ({exc.strerror or exc}); mDNS not checked"), []
    if wanted:
        found = {n: a for n, a in found.items() if n in wanted}
    if found:
        return None, [a for addrs in found.values() for a in addrs]
    where = f" among discovery.mdns_interfaces ({', '.join(wanted)})" if wanted else ""
    status = WARN if config.discovery.seeds else FAIL
    return Check("mdns", status, f"no interface is up with an IPv4 address and multicast{where}: connect the network, or fix discovery.mdns_interfaces"), []


async def check_mdns(config: Config, host: Host, exclude: Callable[[], Awaitable[set[str]]] | None = None) -> Check:
    """`exclude()` is awaited after the browse: names not to count (the local agent's own)."""
    if not config.discovery.mdns:
        return Check("mdns", OK, "off (discovery.mdns = false)")
    early, addresses = mdns_interfaces(config, host)
    if early is not None:
        return early
    try:
        names = await browse_mdns(addresses)
    except (OSError, RuntimeError) as exc:
        return Check("mdns", FAIL, f"cannot use {MDNS_GROUP} on {', '.join(addresses)} ({getattr(exc, 'strerror', None) or exc}): is UDP 5353 taken without SO_REUSEADDR, or multicast routing missing?")
    others = names - (await exclude() if exclude is not None else set())
    if others:
        return Check("mdns", OK, f"{len(others)} agent(s) answered a browse on {MDNS_GROUP} within {BROWSE_S:g} s ({', '.join(addresses)})")
    why = "no other agent is up on this link, or the network drops multicast (Wi-Fi client isolation, IGMP snooping without a querier, a firewall on UDP 5353)"
    if config.discovery.seeds:
        return Check("mdns", WARN, f"no agent answered on {MDNS_GROUP} within {BROWSE_S:g} s: {why}; with seeds configured, that is not fatal")
    return Check("mdns", FAIL, f"no agent answered on {MDNS_GROUP} within {BROWSE_S:g} s and no seeds are configured: {why}; or set discovery.seeds")


# ------------------------------------------------------------------ clock


def check_clock(host: Host) -> Check:
    now = host.now()
    when = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    if when.year < MIN_YEAR:
        return Check("clock", FAIL, f"reads {when:%Y-%m-%d %H:%M} UTC, before {MIN_YEAR}: the clock was never set (no RTC and no NTP yet); check network time (systemd-timesyncd, UDP 123 out)")
    if (host.sysroot / TIMESYNC_FLAG.relative_to("/")).exists():
        return Check("clock", OK, f"{when:%Y-%m-%d %H:%M} UTC, synchronised ({TIMESYNC_FLAG})")
    synced = host.ntp_synchronized()
    if synced is None:
        return Check("clock", WARN, f"{when:%Y-%m-%d %H:%M} UTC; cannot tell whether it is synchronised (no {TIMESYNC_FLAG}, timedatectl does not say)")
    if not synced:
        return Check("clock", WARN, f"{when:%Y-%m-%d %H:%M} UTC, not synchronised (NTPSynchronized=no): check systemd-timesyncd and that UDP 123 out is allowed")
    return Check("clock", OK, f"{when:%Y-%m-%d %H:%M} UTC, synchronised (timedatectl)")


# --------------------------------------------------------------- key file


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def check_key(node: NodeConfig, host: Host) -> Check:
    if node.insecure:
        return Check("key", WARN, "node.insecure: no fleet key, anyone on the network can join or read the mesh (demos only)")
    path = Path(node.fleet_key_file)
    try:
        st = path.stat()
    except FileNotFoundError:
        return Check("key", FAIL, f"{path}: no such file: create one with `meshagent keygen --out {path}` (once per fleet) and copy it here")
    except OSError as exc:
        return Check("key", FAIL, f"{path}: cannot stat ({exc.strerror}): run doctor as root")
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        return Check("key", FAIL, f"{path}: not a regular file")
    if mode & 0o007:
        return Check("key", FAIL, f"{path}: mode {mode:04o} lets every user read the fleet key: chmod 600 {path} (and rotate the key if others had access)")
    if st.st_uid not in (0, host.euid):
        return Check("key", FAIL, f"{path}: owned by {_owner(st.st_uid)}, who can read and replace the fleet key: chown root {path}")
    if mode & 0o070:
        return Check("key", WARN, f"{path}: mode {mode:04o} lets group {_group(st.st_gid)} read it; `meshagent run` refuses such a file "
                                  f"(the systemd unit reads a private copy through LoadCredential): chmod 600 {path}; its contents are checked then")
    if not os.access(path, os.R_OK):
        return Check("key", WARN, f"{path}: mode {mode:04o}, owner {_owner(st.st_uid)}; cannot read it as {_owner(host.euid)} to check its contents: run doctor as root")
    try:
        keys = load_keys(path)
    except KeyFileError as exc:
        return Check("key", FAIL, str(exc))
    return Check("key", OK, f"{path}: mode {mode:04o}, owner {_owner(st.st_uid)}, {len(keys)} key(s)")


# --------------------------------------------------------------- data dir


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def check_data_dir(path: Path, host: Host) -> Check:
    name, who = "data dir", _owner(host.euid)
    if not path.exists():
        parent = _nearest_existing(path)
        if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
            return _free_space(path, parent, f"{path} does not exist yet; the agent creates it ({parent} is writable)")
        return Check(name, FAIL, f"{path} does not exist and cannot be created ({parent} is not writable by {who}): create it, or set node.data_dir")
    if not path.is_dir():
        return Check(name, FAIL, f"{path} is not a directory: set node.data_dir to a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".doctor-", dir=path)
        try:
            os.write(fd, b"meshagent doctor\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as exc:
        hint = "the file system is read-only: remount it or set node.data_dir (under systemd the unit's StateDirectory is writable)" if exc.errno == errno.EROFS else "chown or chmod it for the agent's user"
        return Check(name, FAIL, f"cannot write in {path} as {who} ({exc.strerror}): {hint}")
    return _free_space(path, path, f"{path} is writable")


def _free_space(path: Path, measured: Path, said: str) -> Check:
    try:
        free_mb = shutil.disk_usage(measured).free // 2**20
    except OSError as exc:
        return Check("data dir", WARN, f"{said}; free space unknown ({exc.strerror or exc})")
    if free_mb < MIN_FREE_MB:
        return Check("data dir", WARN, f"{said}, but only {free_mb} MiB free (under {MIN_FREE_MB}): free space on {measured}")
    return Check("data dir", OK, f"{said}, {free_mb} MiB free")


# ------------------------------------------------------ temperature, power


def check_temperature(board: BoardProfile, temp_c: float | None) -> Check:
    t = board.thermal
    state = boardmod.thermal_state(temp_c, t)
    if state == "unknown":
        return Check("temperature", OK, "no temperature reading on this host")
    limits = f"board {board.name}: warn {t.warn_c:g} °C, critical {t.critical_c:g} °C"
    if state == "critical":
        return Check("temperature", FAIL, f"{temp_c:.1f} °C, at or over critical ({limits}): cool the device (heatsink, fan, airflow in the case)")
    if state == "warn":
        return Check("temperature", WARN, f"{temp_c:.1f} °C, at or over the warning level ({limits}): the firmware slows the CPU soon; improve cooling")
    return Check("temperature", OK, f"{temp_c:.1f} °C ({limits})")


def check_throttling(board: BoardProfile, word: int | None) -> Check:
    if board.throttle_source == "none":
        return Check("throttling", OK, f"not read on board {board.name} (throttle_source none)")
    if word is None:
        return Check("throttling", WARN, "no readable get_throttled file under /sys/devices/platform (firmware driver missing?): power and throttling unknown")
    state = boardmod.throttle_state(word)
    said = f"{state} (get_throttled=0x{word:x})"
    if word & 0x1:
        return Check("throttling", FAIL, f"{said}: the supply sags under load; use a proper 5 V supply (the official one, a short thick cable)")
    if word & boardmod.NOW_MASK:
        return Check("throttling", WARN, f"{said}: the CPU is slowed now; check cooling and the supply")
    if word & boardmod.PAST_MASK:
        return Check("throttling", WARN, f"{said}: it happened since boot; check the supply and cooling")
    return Check("throttling", OK, f"no throttling or under-voltage since boot (get_throttled=0x{word:x})")


# ------------------------------------------------------------------- port


def _local_address(bind: str) -> str:
    """Where to reach an agent bound to `bind` from this host."""
    if bind in ("", "0.0.0.0"):
        return "127.0.0.1"
    return "::1" if bind == "::" else bind


def port_state(node: NodeConfig) -> tuple[Check | None, bool]:
    """Try the bind the agent makes (without SO_REUSEADDR, so that any holder
    shows). (a finished check, or None when the port is in use; in use)."""
    name, where = "port", f"UDP {node.bind}:{node.port}"
    exc = bind_error(node.bind, node.port)
    if exc is not None:
        if exc.errno == errno.EADDRINUSE:
            return None, True
        if exc.errno == errno.EADDRNOTAVAIL:
            return Check(name, FAIL, f"{where}: {node.bind} is not an address of this host: fix node.bind (or bring its interface up)"), False
        if exc.errno == errno.EACCES:
            return Check(name, FAIL, f"{where}: binding a port under 1024 needs a privilege the agent does not have: use port 5683 or another over 1023"), False
        return Check(name, FAIL, f"{where}: cannot bind ({exc.strerror or exc})"), False
    return Check(name, OK, f"{where} is free (no agent running here)"), False


async def fetch_status(node: NodeConfig) -> tuple[str, dict | None]:
    """The local agent's answer: ("ok", status), ("refused", None) where public
    reads are off, ("none", None) when nothing answered like an agent."""
    from agent.io.coap import coap_get

    try:
        code, payload = await coap_get(_local_address(node.bind), node.port, "status", timeout=STATUS_TIMEOUT_S)
    except Exception:  # timeout, network error, aiocoap trouble: all mean "no agent answer"
        return "none", None
    if code.startswith("4.01"):
        return "refused", None
    try:
        status = cbor2.loads(payload) if code.startswith("2.05") else None
    except Exception:
        status = None
    return ("ok", status) if isinstance(status, dict) and isinstance(status.get("node_id"), str) else ("none", None)


def check_port(node: NodeConfig, answer: str, status: dict | None) -> Check:
    """The port is in use: by the agent (it answers /status, or its command line says so) or by what?"""
    where = f"UDP {node.bind}:{node.port}"
    holders = udp_holders(node.bind, node.port)
    agents = [h for h in holders if h[2]]
    named = ", ".join(h[1] for h in (agents or holders)) or "a process we may not see (run as root)"
    if answer == "ok":
        return Check("port", OK, f"{where} is held by the agent, which is running (node {status['node_id']}; {named})")
    if answer == "refused" or agents:
        return Check("port", OK, f"{where} is held by the meshagent agent, which is running ({named})")
    return Check("port", FAIL, f"{where} is in use by {named}, not by the agent: stop it, or set node.port")


def check_agent(board: BoardProfile, in_use: bool, answer: str, status: dict | None) -> Check:
    """The running agent's resident memory and CPU against the board's budgets."""
    if not in_use:
        return Check("agent", OK, "not running here; nothing to measure")
    if answer == "refused":
        return Check("agent", OK, "running; its /status is closed to public reads (api.public_read = false): budgets not checked")
    if answer != "ok":
        return Check("agent", WARN, f"no answer to GET /status within {STATUS_TIMEOUT_S:g} s: is it stuck? (journalctl -u meshagent)")
    proc, b = status.get("process") or {}, board.budgets
    rss, cpu = proc.get("rss_bytes"), proc.get("cpu_percent")
    rss_mb = None if rss is None else rss / 2**20
    said = f"RSS {'?' if rss_mb is None else f'{rss_mb:.0f}'} MiB of {b.max_rss_mb}, CPU {'?' if cpu is None else f'{cpu:.1f}'} % of {b.max_cpu_pct:g} (board {board.name})"
    over = [what for what, value, limit in (("memory", rss_mb, b.max_rss_mb), ("CPU", cpu, b.max_cpu_pct)) if value is not None and value > limit]
    if over:
        return Check("agent", WARN, f"{said}: {' and '.join(over)} over budget; look at `meshagent status` (members, tasks) and the log")
    return Check("agent", OK, said)


# -------------------------------------------------------------------- run


def local_checks(config: Config, host: Host) -> list[Check]:
    """The checks that only read this host (run in a worker thread)."""
    readings = boardmod.read(config.board, host.sysroot)
    return [
        check_clock(host),
        check_key(config.node, host),
        check_data_dir(Path(config.node.data_dir), host),
        check_temperature(config.board, readings.temp_c),
        check_throttling(config.board, readings.throttled),
    ]


async def _bounded(name: str, aw) -> Check:
    try:
        return await asyncio.wait_for(aw, DEADLINE_S)
    except TimeoutError:
        return Check(name, FAIL, f"did not finish within {DEADLINE_S:g} s")


async def run_checks(config: Config, host: Host | None = None) -> list[Check]:
    """All checks, in display order; bounded in time (see the module doc)."""
    host = host or Host()
    from agent.io.mdns import SERVICE_TYPE, instance_label

    early, in_use = port_state(config.node)
    status_task = asyncio.ensure_future(fetch_status(config.node) if in_use else _no_status())

    async def own_name() -> set[str]:
        answer, status = await asyncio.shield(status_task)
        return {f"{instance_label(status['node_id'])}.{SERVICE_TYPE}"} if answer == "ok" else set()

    seeds = config.discovery.seeds
    seed_checks = [_bounded(f"seed {s}", check_seed(s)) for s in seeds]
    local = asyncio.to_thread(local_checks, config, host)
    mdns = _bounded("mdns", check_mdns(config, host, own_name))
    *pinged, mdns_check, local_list = await asyncio.gather(*seed_checks, mdns, local)
    answer, status = await status_task
    port = early if early is not None else check_port(config.node, answer, status)
    return [*(pinged or [no_seeds(config)]), mdns_check, *local_list, port, check_agent(config.board, in_use, answer, status)]


async def _no_status() -> tuple[str, None]:
    return "none", None


def config_check(path: Path, sources: dict[str, str], board: str) -> Check:
    how = sources.get("board.name", "default")
    return Check("config", OK, f"{path if path.exists() else f'{path} (absent: defaults)'}; board {board} ({how})")


def summary(checks: list[Check]) -> dict:
    failed = sum(c.status == FAIL for c in checks)
    return {"ok": failed == 0, "failed": failed, "warnings": sum(c.status == WARN for c in checks),
            "checks": [c.as_dict() for c in checks]}


def format_checks(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    label = {OK: "ok  ", WARN: "warn", FAIL: "FAIL"}
    lines = [f"{label[c.status]}  {c.name:<{width}}  {c.message}" for c in checks]
    s = summary(checks)
    lines.append(f"{s['failed']} failed, {s['warnings']} warning(s)" if s["failed"] or s["warnings"] else "all checks passed")
    return "\n".join(lines)
