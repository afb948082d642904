"""Runs the task handlers this node's own config names: a task's `kind` picks one by name.

The agent never runs a command that came over the network. A task brings only
a kind and arguments; the argv comes from `[handlers.NAME]` in the local config
(or is a built-in). Arguments reach a handler three ways, none through a shell:
`{name}` placeholders in argv elements after argv[0], the MESHAGENT_ARGS
environment variable, and stdin (both the same JSON, bytes as base64 text).

Placeholders: `{name}` (name: 1-64 of A-Z a-z 0-9 _ . -) is replaced by the
argument's text: integers and text as they are, booleans as true/false, bytes
as base64, lists and maps as compact JSON. `{{` and `}}` are literal braces;
any other brace is literal too (so `{print $1}` in an awk program stays as it
is, but `{{x}}` is the way to write a literal `{x}`). A missing argument ends the
run as "error" before anything starts.

Process handling. Each handler runs in its own session (so its own process
group) with a minimal environment. On timeout or kill() the whole tree goes:
the descendants are snapshotted with psutil first (a grandchild that called
setsid is still found), the group and those descendants get SIGTERM, and after
`kill_grace_s` whatever is left gets SIGKILL. When the handler exits by itself,
what is left of its process group is ended the same way: a task's processes do
not outlive the task (and cannot keep its output pipes open).

If the agent itself is SIGKILLed, PR_SET_PDEATHSIG (Linux) kills the handler
with it. That covers the handler process only, and it fires when the thread
that started the handler exits: the event loop's thread, which lives as long
as the agent. Grandchildren are covered by systemd's KillMode=control-group:
the unit's whole cgroup is killed when the agent's service stops or dies.

Output: stdout and stderr are read while the handler runs; the first
MAX_STDOUT bytes of stdout and the last MAX_STDERR bytes of stderr are kept
and every byte is counted, so memory stays bounded whatever a handler writes.

The runner does not queue: the task engine starts only what fits each kind's
concurrency. start() still refuses (outcome "error") a kind at its limit, so
such a caller bug shows up in a result instead of overloading the node.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import functools
import json
import logging
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import PIPE

import psutil

from agent.core.taskctx import BUILTIN_KINDS
from agent.core.taskspec import MAX_REASON, MAX_STDERR, MAX_STDOUT

log = logging.getLogger(__name__)

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NO_EXIT = 127  #: exit_code of a run that never got (or kept) a process: an "error"
READ_CHUNK = 64 << 10
EXIT_DRAIN_S = 0.5  #: after the handler exits, how long its pipes may take to reach EOF
POLL_S = 0.05
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class HandlerSpec:
    """One handler from the config. An empty `command` is a built-in (its name must be one);
    a configured handler with a built-in's name and no command tunes that built-in's limits."""

    name: str
    command: tuple[str, ...] = ()  #: argv; empty for built-ins
    env: tuple[tuple[str, str], ...] = ()
    cwd: str = ""  #: "" = the agent's data dir passed to Runner; relative = under it
    timeout_s: int = 300
    concurrency: int = 1


@dataclass(frozen=True)
class RunResult:
    outcome: str  #: "ok" | "failed" | "timeout" | "error" | "cancelled"
    exit_code: int  #: process exit status; -N when killed by signal N; 0/1 for built-ins; 127 when no process ran
    stdout: bytes
    stderr: bytes
    stdout_bytes: int
    stderr_bytes: int
    started_ms: int  #: wall clock ms since the epoch
    finished_ms: int
    reason: str = ""  #: short (<= 120 chars): why error/timeout/cancelled/failed


BUILTINS: dict[str, HandlerSpec] = {name: HandlerSpec(name, timeout_s=3600, concurrency=64) for name in BUILTIN_KINDS}


# ----------------------------------------------------------------- arguments


def _json_default(value: object) -> str:
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not a task argument type")


def args_json(args: Mapping) -> str:
    """The compact, key-sorted JSON of a task's arguments (bytes as base64 text)."""
    return json.dumps(args, sort_keys=True, separators=(",", ":"), default=_json_default)


def _arg_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)
    return str(value)


_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z0-9_.-]{1,64})\}")


class MissingArgument(KeyError):
    """An argv placeholder names an argument the task did not bring."""


def substitute(command: tuple[str, ...], args: Mapping) -> list[str]:
    """argv with `{name}` placeholders after argv[0] filled from `args` (see module doc);
    MissingArgument(name) when one is missing."""

    def one(m: re.Match) -> str:
        name = m.group(1)
        if name is None:
            return m.group(0)[0]
        if name not in args:
            raise MissingArgument(name)
        return _arg_text(args[name])

    return [command[0], *(_PLACEHOLDER.sub(one, a) for a in command[1:])]


# ----------------------------------------------------------------- output


class _Head:
    """Keeps the first `limit` bytes, counts all."""

    def __init__(self, limit: int):
        self.limit, self.kept, self.count = limit, bytearray(), 0

    def add(self, chunk: bytes) -> None:
        self.count += len(chunk)
        room = self.limit - len(self.kept)
        if room > 0:
            self.kept += chunk[:room]


class _Tail(_Head):
    """Keeps the last `limit` bytes, counts all."""

    def add(self, chunk: bytes) -> None:
        self.count += len(chunk)
        self.kept += chunk[-self.limit :]
        del self.kept[: -self.limit]


async def _pump(stream: asyncio.StreamReader, keep: _Head) -> None:
    while chunk := await stream.read(READ_CHUNK):
        keep.add(chunk)


async def _feed(stdin: asyncio.StreamWriter, data: bytes) -> None:
    """Write the arguments and close stdin; a handler that never reads it is fine."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        stdin.write(data)
        await stdin.drain()
    stdin.close()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        await stdin.wait_closed()


# ----------------------------------------------------------------- child setup (Linux)


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # loaded before any fork: nothing to look up in the child


def _die_with_parent(parent: int) -> None:
    """In the child before exec: SIGKILL when the agent dies; if it already did, die now."""
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------- built-ins


Builtin = Callable[[dict, Path], Awaitable[tuple[int, bytes, bytes]]]


async def _echo(args: dict, workdir: Path) -> tuple[int, bytes, bytes]:
    return 0, args_json(args).encode(), b""


_SECONDS = re.compile(r"[0-9]{1,5}(\.[0-9]{1,6})?")


async def _sleep(args: dict, workdir: Path) -> tuple[int, bytes, bytes]:
    value = args.get("seconds")
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and _SECONDS.fullmatch(value):
        seconds = float(value)
    else:
        return 1, b"", f"sleep: argument 'seconds' must be an integer or a decimal string like \"0.5\", got {value!r}\n"[:200].encode()
    if not 0 <= seconds <= 86_400:
        return 1, b"", f"sleep: 'seconds' must be from 0 to 86400, got {value!r}\n".encode()
    await asyncio.sleep(seconds)
    return 0, b"", b""


async def _sysinfo(args: dict, workdir: Path) -> tuple[int, bytes, bytes]:
    uname = os.uname()
    load1, load5, load15 = os.getloadavg()
    mem = psutil.virtual_memory()
    info = {
        "hostname": socket.gethostname(), "platform": f"{uname.sysname}-{uname.release}", "machine": uname.machine,
        "python": platform.python_version(), "cpu_count": os.cpu_count() or 0,
        "load1": round(load1, 2), "load5": round(load5, 2), "load15": round(load15, 2),
        "mem_total_mb": mem.total >> 20, "mem_available_mb": mem.available >> 20,
        "disk_free_mb": psutil.disk_usage(str(workdir)).free >> 20, "boot_time": int(psutil.boot_time()),
    }
    return 0, json.dumps(info, sort_keys=True, separators=(",", ":")).encode(), b""


_BUILTIN_CODE: dict[str, Builtin] = {"echo": _echo, "sleep": _sleep, "sysinfo": _sysinfo}


# ----------------------------------------------------------------- the runner


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _short(text: str) -> str:
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def _alive(p: psutil.Process) -> bool:
    """Running and not a zombie (a zombie is dead; only its parent's wait is missing)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _signal_tree(pgid: int, procs: list[psutil.Process], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)  # psutil refuses a pid reused since the snapshot


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's stream protocol plus `exited`, set when the process exits. (Python 3.11's
    Process.wait() also waits for the pipes to close, which a leftover grandchild can hold open.)"""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__(limit=READ_CHUNK, loop=loop)
        self.exited: asyncio.Future = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


@dataclass(eq=False)
class _Run:
    task_id: str
    attempt: int
    kind: str
    killed: asyncio.Event = field(default_factory=asyncio.Event)
    kill_reason: str = ""


class Runner:
    """Runs handlers as asyncio tasks and reports each end through `on_done(task_id, attempt, result)`,
    called from the event loop (never from inside start()). It never raises into the loop: any
    exception in a run ends that run as "error"."""

    def __init__(self, handlers: Mapping[str, HandlerSpec], on_done: Callable[[str, int, RunResult], None], *,
                 workdir: Path, kill_grace_s: float = 2.0):
        self._handlers = {**BUILTINS, **handlers}
        for name, spec in self._handlers.items():
            if not spec.command and name not in _BUILTIN_CODE:
                raise ValueError(f"handler {name!r} has no command and is not a built-in ({', '.join(BUILTINS)})")
            if spec.concurrency < 1:
                raise ValueError(f"handler {name!r}: concurrency must be >= 1, got {spec.concurrency!r}")
        self._on_done = on_done
        self.workdir = Path(workdir)
        self.kill_grace_s = kill_grace_s
        self._runs: dict[str, _Run] = {}
        self._tasks: set[asyncio.Task] = set()
        self._stopped = False

    def kinds(self) -> dict[str, int]:
        """kind -> concurrency, built-ins included."""
        return {name: spec.concurrency for name, spec in self._handlers.items()}

    def running(self) -> dict[str, int]:
        """task_id -> attempt of every run not finished yet."""
        return {r.task_id: r.attempt for r in self._runs.values()}

    def start(self, task_id: str, attempt: int, kind: str, args: dict, timeout_s: int) -> None:
        """Start attempt `attempt` of a task; returns at once (call from the running loop).
        `timeout_s` 0 means the handler's own. Every refusal ends in on_done(..., "error")."""
        loop = asyncio.get_running_loop()
        spec = self._handlers.get(kind)
        problem = self._refusal(task_id, kind, spec)
        argv: list[str] = []
        if problem is None and spec.command:
            try:
                argv = substitute(spec.command, args)
            except MissingArgument as e:
                problem = f"missing argument {e.args[0]!r}"
        if problem is not None:
            log.warning("task %s attempt %d (%s) not started: %s", task_id, attempt, kind, problem)
            result = self._error(_now_ms(), problem)
            coro = self._report(task_id, attempt, result)
        else:
            run = _Run(task_id, attempt, kind)
            self._runs[task_id] = run
            coro = self._main(run, spec, argv, args, timeout_s or spec.timeout_s)
        task = loop.create_task(coro, name=f"task {task_id}/{attempt} {kind}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def kill(self, task_id: str, attempt: int, reason: str = "cancelled") -> bool:
        """Kill that run (its outcome becomes "cancelled" with `reason`); False if it is not running.
        A run that was finishing anyway when killed may still end with its own outcome."""
        run = self._runs.get(task_id)
        if run is None or run.attempt != attempt:
            return False
        if not run.killed.is_set():
            run.kill_reason = _short(reason)
            run.killed.set()
        return True

    async def stop(self) -> None:
        """Kill everything running (reason "agent stopping") and wait until every run has reported."""
        self._stopped = True
        for run in list(self._runs.values()):
            self.kill(run.task_id, run.attempt, "agent stopping")
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------ one run

    def _refusal(self, task_id: str, kind: str, spec: HandlerSpec | None) -> str | None:
        if self._stopped:
            return "runner stopped"
        if spec is None:
            return f"no handler for kind {kind!r} on this node"
        if task_id in self._runs:
            return "task already running here"
        if sum(r.kind == kind for r in self._runs.values()) >= spec.concurrency:
            return "kind at its concurrency limit"
        return None

    async def _main(self, run: _Run, spec: HandlerSpec, argv: list[str], args: dict, timeout_s: int) -> None:
        started = _now_ms()
        try:
            if run.killed.is_set():
                result = self._cancelled(started, run.kill_reason)
            elif spec.command:
                result = await self._process(run, spec, argv, args, timeout_s, started)
            else:
                result = await self._builtin(run, spec, args, timeout_s, started)
        except Exception as e:  # a bug or an unexpected OS error: this run ends, the loop goes on
            log.exception("task %s attempt %d (%s) failed in the runner", run.task_id, run.attempt, run.kind)
            result = self._error(started, f"runner: {type(e).__name__}: {e}")
        finally:
            self._runs.pop(run.task_id, None)
        await self._report(run.task_id, run.attempt, result)

    async def _report(self, task_id: str, attempt: int, result: RunResult) -> None:
        try:
            self._on_done(task_id, attempt, result)
        except Exception:
            log.exception("on_done for task %s attempt %d raised", task_id, attempt)

    async def _until_done(self, run: _Run, work: asyncio.Future, timeout_s: int) -> tuple[str, str] | None:
        """None when `work` finished; else ("timeout"|"cancelled", reason)."""
        killer = asyncio.ensure_future(run.killed.wait())
        try:
            await asyncio.wait({work, killer}, timeout=timeout_s or None, return_when=asyncio.FIRST_COMPLETED)
        finally:
            killer.cancel()
        if work.done():
            return None
        if run.killed.is_set():
            return "cancelled", run.kill_reason
        return "timeout", f"timed out after {timeout_s} s"

    async def _builtin(self, run: _Run, spec: HandlerSpec, args: dict, timeout_s: int, started: int) -> RunResult:
        work = asyncio.ensure_future(_BUILTIN_CODE[run.kind](args, self.workdir))
        stopped = await self._until_done(run, work, timeout_s)
        if stopped is not None:
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            return RunResult(stopped[0], 1, b"", b"", 0, 0, started, _now_ms(), _short(stopped[1]))
        code, out_data, err_data = work.result()
        out, err = _Head(MAX_STDOUT), _Tail(MAX_STDERR)
        out.add(out_data)
        err.add(err_data)
        return self._ended(code, out, err, started)

    async def _process(self, run: _Run, spec: HandlerSpec, argv: list[str], args: dict, timeout_s: int,
                       started: int) -> RunResult:
        text = args_json(args)
        env = {"PATH": BASE_PATH, "LANG": "C.UTF-8", "HOME": str(self.workdir), **dict(spec.env),
               "MESHAGENT_TASK_ID": run.task_id, "MESHAGENT_ATTEMPT": str(run.attempt), "MESHAGENT_ARGS": text}
        loop = asyncio.get_running_loop()
        try:
            transport, proto = await loop.subprocess_exec(
                lambda: _Protocol(loop), *argv, stdin=PIPE, stdout=PIPE, stderr=PIPE, cwd=self.workdir / spec.cwd,
                env=env, start_new_session=True,
                preexec_fn=functools.partial(_die_with_parent, os.getpid()) if _PRCTL else None)
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            # OSError.filename is the cwd when chdir failed, else the executable
            bad_cwd = getattr(e, "filename", None) not in (None, argv[0])
            where = f" (cwd {spec.cwd or self.workdir})" if bad_cwd else ""
            return self._error(started, f"cannot start {argv[0]}: {getattr(e, 'strerror', None) or e}{where}")
        pid = transport.get_pid()
        out, err = _Head(MAX_STDOUT), _Tail(MAX_STDERR)
        io = asyncio.gather(_pump(proto.stdout, out), _pump(proto.stderr, err), _feed(proto.stdin, text.encode()))
        try:
            stopped = await self._until_done(run, proto.exited, timeout_s)
            if stopped is not None:
                await self._kill_tree(pid, proto.exited)
            await self._finish_io(pid, io, leftovers=stopped is None)
        finally:
            io.cancel()
            if not proto.exited.done():  # cancelled or broken from outside: leave nothing behind
                _signal_tree(pid, _descendants(pid), signal.SIGKILL)
            transport.close()
        code = transport.get_returncode()
        if stopped is not None:
            return RunResult(stopped[0], code, bytes(out.kept), bytes(err.kept), out.count, err.count, started,
                             _now_ms(), _short(stopped[1]))
        return self._ended(code, out, err, started)

    async def _finish_io(self, pgid: int, io: asyncio.Future, *, leftovers: bool) -> None:
        """After the handler exited: end what is left of its process group if `leftovers` (given the
        grace period to close its end of the pipes), then read the pipes to EOF; a process that
        escaped the group and still holds them is given up on."""
        if leftovers and _group_exists(pgid):
            log.info("handler pid %d exited; ending what is left of its process group", pgid)
            _signal_tree(pgid, [], signal.SIGTERM)
            await asyncio.wait({io}, timeout=self.kill_grace_s)
            _signal_tree(pgid, [], signal.SIGKILL)
        try:
            await asyncio.wait_for(asyncio.shield(io), EXIT_DRAIN_S)
        except asyncio.TimeoutError:
            log.warning("handler pid %d: output pipes still open after it exited; not reading further", pgid)

    async def _kill_tree(self, pid: int, exited: asyncio.Future) -> None:
        """SIGTERM the process group and every descendant (snapshotted first); after the grace
        period, or as soon as they are all gone, SIGKILL the group and whatever is left (also
        descendants that appeared meanwhile). Returns when the handler itself has exited."""
        procs = _descendants(pid)
        _signal_tree(pid, procs, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.kill_grace_s
        while (not exited.done() or any(map(_alive, procs))) and loop.time() < deadline:
            await asyncio.sleep(POLL_S)
        if not exited.done():
            procs += [p for p in _descendants(pid) if p not in procs]
        # Unconditional: also reaches group members the snapshot missed. (Zombies, which
        # keep a group "existing", make waiting on the group itself useless.)
        _signal_tree(pid, procs, signal.SIGKILL)
        await asyncio.shield(exited)

    # ------------------------------------------------------------ results

    @staticmethod
    def _ended(code: int, out: _Head, err: _Head, started: int) -> RunResult:
        if code == 0:
            outcome, reason = "ok", ""
        elif code < 0:
            outcome, reason = "failed", f"killed by signal {-code} ({_signame(-code)})"
        else:
            outcome, reason = "failed", f"exit {code}"
        return RunResult(outcome, code, bytes(out.kept), bytes(err.kept), out.count, err.count, started,
                         _now_ms(), reason)

    @staticmethod
    def _error(started: int, reason: str) -> RunResult:
        return RunResult("error", NO_EXIT, b"", b"", 0, 0, started, _now_ms(), _short(reason))

    @staticmethod
    def _cancelled(started: int, reason: str) -> RunResult:
        return RunResult("cancelled", NO_EXIT, b"", b"", 0, 0, started, _now_ms(), _short(reason))


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return "?"
