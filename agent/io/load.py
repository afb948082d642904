"""This host's load, read cheaply from psutil and the Raspberry Pi firmware files.

The runtime samples every sample interval from the event loop, so nothing here
may block: CPU is psutil's delta since the previous call (interval=None), and
the rest are single small reads. If psutil fails (/proc hidden by the unit's
sandbox), cpu, mem and load1 keep their last good value (None if there never
was one); temperature and throttling are None where the files are missing or
unreadable (any non-Pi host). A degraded host reports less instead of
crashing the agent. CPU is smoothed (EWMA) so one busy tick does not make
task placement flap.

CPU scope "host" is the whole host's CPU (what a device in a fleet should
report). Scope "tree" is only this agent and the processes it started (its
task handlers), as percent of one core: several agents on one lab host or CI
runner then each see their own load, so balancing can be tested there.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil

log = logging.getLogger(__name__)
T = TypeVar("T")

THERMAL_PATH = Path("/sys/class/thermal/thermal_zone0/temp")
THROTTLED_PATH = Path("/sys/devices/platform/soc/soc:firmware/get_throttled")
#: Where else the firmware device may sit (Pi 5: soc@107c000000/soc@107c000000:firmware).
_THROTTLED_GLOB = "sys/devices/platform/*/*firmware/get_throttled"

#: Bits of the firmware's get_throttled word (same as `vcgencmd get_throttled`).
THROTTLE_BITS = {
    0: "under-voltage",
    1: "freq-capped",
    2: "throttled",
    3: "soft-temp-limit",
    16: "under-voltage-occurred",
    17: "freq-capped-occurred",
    18: "throttled-occurred",
    19: "soft-temp-limit-occurred",
}

#: psutil sensor groups that mean "the CPU", best first (Pi, Intel, AMD).
_CPU_SENSORS = ("cpu_thermal", "cpu-thermal", "coretemp", "k10temp", "soc_thermal")
#: Readings outside this range (°C) are sensor glitches, not temperatures.
_SANE_TEMP = (-40.0, 150.0)


@dataclass(frozen=True)
class Load:
    """One sample. cpu and mem are percent (0..100); None means unreadable here."""

    cpu: float | None
    mem: float | None
    load1: float | None
    temp_c: float | None
    throttled: int | None

    def as_dict(self) -> dict[str, float | int | None]:
        return dataclasses.asdict(self)


def throttle_flags(value: int | None) -> list[str]:
    """Names of the bits set in a get_throttled word, lowest bit first."""
    if value is None:
        return []
    return [name for bit, name in THROTTLE_BITS.items() if value >> bit & 1]


def find_throttled(source: str, sysroot: Path = Path("/")) -> Path | None:
    """The get_throttled file for a board's throttle_source ("firmware" or "none"),
    found once at start; None when the board has none or the firmware driver
    does not expose it (then throttling reads as unknown, not as fine)."""
    if source != "firmware":
        return None
    usual = sysroot / THROTTLED_PATH.relative_to("/")
    if usual.exists():
        return usual
    return next(iter(sorted(sysroot.glob(_THROTTLED_GLOB))), None)


def read_temp_c(sysroot: Path = Path("/")) -> float | None:
    """CPU temperature in °C: thermal_zone0, else (on the real root) psutil's sensors."""
    temp = _read_thermal_file(sysroot / THERMAL_PATH.relative_to("/"))
    if temp is None and sysroot == Path("/"):
        return _read_psutil_temp()
    return temp


def read_throttled(path: Path | None) -> int | None:
    """The get_throttled word, or None (no such file, unreadable, not hex)."""
    return None if path is None else _read_throttled(path)


def changed_enough(old: Load, new: Load, threshold_pct: float) -> bool:
    """True if cpu or mem moved by more than threshold_pct points (or became (un)known).

    Lets the runtime gossip its load only when it matters.
    """
    for a, b in ((old.cpu, new.cpu), (old.mem, new.mem)):
        if (a is None) != (b is None):
            return True
        if a is not None and b is not None and abs(b - a) > threshold_pct:
            return True
    return False


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_thermal_file(path: Path) -> float | None:
    text = _read_text(path)
    try:
        value = int(text) / 1000.0 if text else None
    except ValueError:
        return None
    return value if value is not None and _SANE_TEMP[0] <= value <= _SANE_TEMP[1] else None


def _read_psutil_temp() -> float | None:
    """First sane CPU reading from psutil's hwmon scan; None on hosts without sensors."""
    try:
        groups = psutil.sensors_temperatures()
    except (OSError, AttributeError, RuntimeError):  # AttributeError: platform without sensors
        return None
    names = [n for n in _CPU_SENSORS if n in groups] + [n for n in groups if n not in _CPU_SENSORS]
    for name in names:
        for reading in groups[name]:
            # Unconnected hwmon inputs read exactly 0 or far out of range.
            if _SANE_TEMP[0] <= reading.current <= _SANE_TEMP[1] and reading.current != 0.0:
                return float(reading.current)
    return None


def _read_throttled(path: Path) -> int | None:
    text = _read_text(path)
    try:
        return int(text, 16) if text else None
    except ValueError:
        return None


CPU_SCOPES = ("host", "tree")


class TreeCpu:
    """CPU used by a process and all its descendants, as percent of one core
    since the previous call; None on the first call, which sets the baseline.

    Each process's user + system time is compared with its own previous
    reading: a process seen for the first time counts from that sighting, one
    that exited is dropped (its last interval's time is lost, which at worst
    under-reports a handler that just ended). Processes are keyed by pid and
    start time, so a reused pid is a new process. Raises psutil.Error or
    OSError if the root itself cannot be read; the sampler keeps its last value then."""

    def __init__(self, pid: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._pid = pid
        self._root: psutil.Process | None = None
        self._clock = clock
        self._times: dict[psutil.Process, float] = {}
        self._at: float | None = None

    def _tree_times(self) -> dict[psutil.Process, float]:
        if self._root is None:
            self._root = psutil.Process(self._pid)
        out = {self._root: _cpu_seconds(self._root)}
        for proc in self._root.children(recursive=True):
            try:
                out[proc] = _cpu_seconds(proc)
            except psutil.Error:  # exited (or hidden) since the listing: drop it
                continue
        return out

    def percent(self) -> float | None:
        times = self._tree_times()
        now = self._clock()
        used = sum(max(0.0, t - self._times[p]) for p, t in times.items() if p in self._times)
        since, self._at, self._times = self._at, now, times
        if since is None or now <= since:
            return None
        return max(0.0, min(100.0, 100.0 * used / (now - since)))


def _cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


class LoadSampler:
    """Produces `Load` samples; keep one per process (psutil's CPU delta is per caller state).

    `cpu_scope`: "host" (whole host) or "tree" (this process and its descendants,
    percent of one core); see the module doc."""

    def __init__(
        self,
        smoothing: float = 0.3,
        thermal_path: Path = THERMAL_PATH,
        throttled_path: Path | None = THROTTLED_PATH,
        *,
        cpu_scope: str = "host",
    ) -> None:
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        if cpu_scope not in CPU_SCOPES:
            raise ValueError(f"cpu_scope must be one of {', '.join(CPU_SCOPES)}, got {cpu_scope!r}")
        self._smoothing = smoothing
        self._thermal_path = thermal_path
        self._throttled_path = throttled_path
        self._last = Load(cpu=None, mem=None, load1=None, temp_c=None, throttled=None)
        self._warned: set[str] = set()
        if cpu_scope == "tree":
            self._cpu: Callable[[], float | None] = TreeCpu(os.getpid()).percent
        else:
            self._cpu = lambda: psutil.cpu_percent(None)
        # The first non-blocking call only sets the baseline (0.0 or None: no reading yet).
        self._call("cpu", self._cpu)

    def _call(self, what: str, fn: Callable[..., T], *args: object) -> T | None:
        """fn(*args), or None (logged once per field) when the OS refuses."""
        try:
            return fn(*args)
        except (OSError, psutil.Error, RuntimeError) as exc:
            if what not in self._warned:
                self._warned.add(what)
                log.warning("cannot read %s, keeping last value: %s", what, exc)
            return None

    def sample(self) -> Load:
        """Read everything once; never blocks, never raises."""
        last = self._last
        raw_cpu = self._call("cpu", self._cpu)
        if raw_cpu is None:
            cpu = last.cpu
        elif last.cpu is None:
            cpu = float(raw_cpu)
        else:
            cpu = self._smoothing * raw_cpu + (1.0 - self._smoothing) * last.cpu
        vm = self._call("mem", psutil.virtual_memory)
        loadavg = self._call("load1", os.getloadavg)
        temp = _read_thermal_file(self._thermal_path)
        self._last = Load(
            cpu=cpu,
            mem=float(vm.percent) if vm is not None else last.mem,
            load1=float(loadavg[0]) if loadavg is not None else last.load1,
            temp_c=temp if temp is not None else _read_psutil_temp(),
            throttled=read_throttled(self._throttled_path),
        )
        return self._last


@functools.lru_cache(maxsize=1)
def _own_process(pid: int) -> psutil.Process:
    """One Process object per pid: its cpu_percent() is a delta since the previous call on it."""
    return psutil.Process(pid)


def process_stats() -> dict[str, float | int | None]:
    """This process's resident memory and CPU percent since the previous call, for /status."""
    try:
        proc = _own_process(os.getpid())
        with proc.oneshot():
            return {"rss_bytes": proc.memory_info().rss, "cpu_percent": proc.cpu_percent(interval=None)}
    except (OSError, psutil.Error) as exc:
        log.debug("process stats unavailable: %s", exc)
        return {"rss_bytes": None, "cpu_percent": None}


def own_rss_bytes() -> int | None:
    """This process's resident memory (without touching process_stats' CPU delta)."""
    try:
        return _own_process(os.getpid()).memory_info().rss
    except (OSError, psutil.Error):
        return None
