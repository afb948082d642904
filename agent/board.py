"""`meshagent board`: which board profile this device runs with, why, and what the
board reads now (temperature, throttling, memory and CPU against the profile).

Everything is read under a `sysroot` (default "/") so the same code explains a
fake /proc and /sys tree in tests, or a mounted SD card image on a laptop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.config import MODEL_PATH, BoardProfile, Loaded, Thermal, known_boards
from agent.io.load import THERMAL_PATH, find_throttled, read_temp_c, read_throttled, throttle_flags

#: get_throttled bits 0-3 (now) and 16-19 (since boot).
NOW_MASK, PAST_MASK = 0xF, 0xF0000


@dataclass(frozen=True)
class Readings:
    temp_c: float | None
    throttled: int | None  #: the get_throttled word; None = no source or unreadable
    mem_total_mb: int | None
    cpu_count: int | None
    serial_present: bool


def model_text(sysroot: Path = Path("/")) -> str | None:
    """The whole device-tree model string, or None when there is none (not a
    device-tree board, or no /proc)."""
    try:
        raw = (sysroot / MODEL_PATH.relative_to("/")).read_bytes()
    except OSError:
        return None
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()


def why(loaded: Loaded, sysroot: Path = Path("/")) -> str:
    """One sentence: how the profile was chosen."""
    board = loaded.config.board
    how = loaded.sources.get("board.name", "default")
    model = model_text(sysroot)
    if how == "flag" or how.startswith("file:"):
        chosen = f"--board {board.name}" if how == "flag" else f"node.board = {board.name!r} in {how.removeprefix('file:')}"
        return f"chosen with {chosen}" + (f" (the device says {model!r})" if model else "")
    if how.startswith("detected:"):
        return f"{how.removeprefix('detected:')} reads {model!r}, which profile {board.name} lists"
    if model is None:
        return f"no {MODEL_PATH} (not a device-tree board), so the {board.name} profile"
    known = ", ".join(n for n in known_boards())
    return f"{MODEL_PATH} reads {model!r}, which no profile lists ({known}), so the {board.name} profile"


def read(board: BoardProfile, sysroot: Path = Path("/")) -> Readings:
    """What the board reports now; None where this host cannot tell."""
    mem = cpus = None
    if sysroot == Path("/"):
        mem = psutil.virtual_memory().total // 2**20
        cpus = psutil.cpu_count()
    else:
        mem = _meminfo_total_mb(sysroot)
    serial = board.serial_device
    return Readings(
        temp_c=read_temp_c(sysroot),
        throttled=read_throttled(find_throttled(board.throttle_source, sysroot)),
        mem_total_mb=mem,
        cpu_count=cpus,
        serial_present=bool(serial) and (sysroot / serial.lstrip("/")).exists(),
    )


def _meminfo_total_mb(sysroot: Path) -> int | None:
    try:
        for line in (sysroot / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def thermal_state(temp_c: float | None, thermal: Thermal) -> str:
    """"ok", "warn" (at or above warn_c), "critical" (at or above critical_c) or "unknown"."""
    if temp_c is None:
        return "unknown"
    if temp_c >= thermal.critical_c:
        return "critical"
    return "warn" if temp_c >= thermal.warn_c else "ok"


def throttle_state(word: int | None) -> str:
    """"unknown", "ok", "now: ..." (a flag set at this moment) or "since boot: ..."."""
    if word is None:
        return "unknown"
    if word & NOW_MASK:
        return "now: " + ", ".join(throttle_flags(word & NOW_MASK))
    if word & PAST_MASK:
        return "since boot: " + ", ".join(f.removesuffix("-occurred") for f in throttle_flags(word & PAST_MASK))
    return "ok"


def report(loaded: Loaded, sysroot: Path = Path("/")) -> dict:
    """Everything `meshagent board` prints, as a JSON-ready dict."""
    config = loaded.config
    board = config.board
    r = read(board, sysroot)
    return {
        "board": board.name,
        "why": why(loaded, sysroot),
        "model": model_text(sysroot),
        "models": list(board.models),
        "serial_device": board.serial_device or None,
        "serial_present": r.serial_present,
        "timing": {
            "membership_profile": config.membership_profile,
            "probe_interval_ms": config.membership.probe_interval_ms,
            "load_sample_interval_ms": config.load.sample_interval_ms,
        },
        "budgets": {"max_rss_mb": board.budgets.max_rss_mb, "max_cpu_pct": board.budgets.max_cpu_pct, "max_members": board.budgets.max_members},
        "thermal": {"warn_c": board.thermal.warn_c, "critical_c": board.thermal.critical_c, "temp_c": r.temp_c, "state": thermal_state(r.temp_c, board.thermal)},
        "throttle": {
            "source": board.throttle_source,
            "path": str(find_throttled(board.throttle_source, sysroot) or "") or None,
            "word": None if r.throttled is None else f"0x{r.throttled:x}",
            "state": throttle_state(r.throttled),
        },
        "memory_total_mb": r.mem_total_mb,
        "cpu_count": r.cpu_count,
    }


def format_report(d: dict) -> str:
    t, th = d["thermal"], d["throttle"]
    temp = "unreadable" if t["temp_c"] is None else f"{t['temp_c']:.1f} °C"
    serial = d["serial_device"] or "(none)"
    if d["serial_device"]:
        serial += "" if d["serial_present"] else " (not present now)"
    lines = [
        f"board        {d['board']}",
        f"why          {d['why']}",
        f"serial       {serial}",
        f"timing       membership preset {d['timing']['membership_profile']} (probe every {d['timing']['probe_interval_ms']} ms), load sampled every {d['timing']['load_sample_interval_ms']} ms",
        f"temperature  {temp}: {t['state']} (warn {t['warn_c']:g} °C, critical {t['critical_c']:g} °C; {THERMAL_PATH})",
        "throttling   " + ("not read on this board (throttle_source none)" if th["source"] == "none"
                             else th["state"] + (f" (get_throttled={th['word']}, {th['path']})" if th["word"] else " (no get_throttled file found)")),
        f"budgets      RSS {d['budgets']['max_rss_mb']} MiB, idle CPU {d['budgets']['max_cpu_pct']:g} % of a core, {d['budgets']['max_members']} members",
        f"memory       {d['memory_total_mb'] or '?'} MiB total, {d['cpu_count'] or '?'} CPUs",
    ]
    return "\n".join(lines)
