"""The serial line console: agent.console served on a serial port (pyserial, asyncio).

When a device has dropped off the network, an operator plugs a USB cable (the
Pi's USB gadget port, /dev/ttyGS0) or a UART adapter (/dev/serial0) into it
and asks the agent what is wrong. So this adapter must work with no network,
and must never hurt the agent it serves:

- The port is opened non-blocking at 115200 8N1 and read from the event loop
  (`add_reader`); nothing here waits on the device.
- Line discipline (LineReader): CR, LF or CRLF ends a line; backspace/DEL
  erase; Ctrl-C/Ctrl-U drop the line; a line longer than MAX_LINE bytes is
  discarded whole and answered with an error. No echo by default: the host
  client (`meshagent console`) edits lines itself.
- Lines are served one at a time, in order; each answer ends with a line
  break and the prompt PROMPT, which tells the host where the answer ends.
  At most MAX_PENDING_LINES lines wait; more are dropped and counted.
- Output waits in a buffer of at most `max_out` bytes: a host that never reads
  costs no more memory and never blocks the loop; answers that do not fit are
  dropped and counted, and the next one that fits says so.
- A device that disappears (USB gadget unplugged, read error, hangup) is
  closed and tried again every `reopen_s` seconds (a flapping link is logged
  at most once a minute); a port that a getty has taken meanwhile is left to it.
- A port a getty owns is never opened (resolve_device, getty_owner).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import dataclass

from agent.counters import Counters

log = logging.getLogger("meshagent.console")

BAUD = 115200
PROMPT = "meshagent> "
MAX_LINE = 256  #: bytes of one command line
MAX_OUT = 32 * 1024  #: bytes of answers waiting for the host
MAX_PENDING_LINES = 16  #: lines received and not answered yet
REOPEN_S = 3.0  #: a vanished device is looked for this often
REOPEN_MOST_S = 60.0  #: a device that is there but fails to open is retried at most this rarely
COMMAND_TIMEOUT_S = 15.0  #: `net` with many unreachable seeds takes a few seconds; nothing should take this long
LOG_EVERY_S = 60.0  #: a device that keeps coming and going is logged once a minute
READ_CHUNK = 1024
WRITE_CHUNK = 4096

_GETTY = re.compile(r"[a-z]{0,8}getty")  #: agetty, getty, mgetty, mingetty, uugetty ...
BACKSPACE, DELETE, CTRL_C, CTRL_U = 0x08, 0x7F, 0x03, 0x15


# ------------------------------------------------------------- which device


def resolve_device(config) -> tuple[str | None, str]:
    """(the port to serve, why) or (None, why not) from console.device: "off",
    "board" (the board profile's serial_device; none on generic) or a path.
    A port that a getty holds is refused (it scans processes: call it off the loop)."""
    device = config.console.device
    if device == "off":
        return None, "console.device = off"
    source = "console.device"
    if device == "board":
        device = config.board.serial_device
        source = f"board {config.board.name}'s serial_device"
        if not device:
            return None, f"board {config.board.name} has no serial device (set console.device to a port to use one)"
    owner = getty_owner(device)
    if owner is not None:
        return None, f"{device} is owned by {owner}; a port a getty owns is never opened (disable it or set console.device)"
    return device, f"{device} (from {source})"


def getty_owner(path: str, dev_dir: str = "/dev") -> str | None:
    """"NAME (pid N)" of a getty holding the tty behind `path` (symlinks such as
    /dev/serial0 resolved), or None. A getty holds its tty as its controlling
    terminal (systemd's serial-getty runs `agetty ... - vt220` on TTYPath) or
    names it on its command line (`agetty 115200 ttyS0`); psutil reads both
    without privileges."""
    import psutil

    real = os.path.realpath(path)
    for proc in psutil.process_iter(["pid", "name", "cmdline", "terminal"]):
        info = proc.info
        cmdline = info.get("cmdline") or []
        name = info.get("name") or ""
        program = os.path.basename(cmdline[0]) if cmdline else ""
        if not (_GETTY.fullmatch(name) or _GETTY.fullmatch(program)):
            continue
        ttys = [info.get("terminal"), *(a for a in cmdline[1:] if a and not a.startswith("-"))]
        for tty in ttys:
            if tty and os.path.realpath(tty if "/" in tty else os.path.join(dev_dir, tty)) == real:
                return f"{name or program} (pid {info.get('pid')})"
    return None


# ------------------------------------------------------------ line discipline


@dataclass(frozen=True)
class Overlong:
    """A line that was longer than allowed; its bytes were discarded."""

    length: int


class LineReader:
    """Bytes in, complete lines out (str, or Overlong): the line discipline, without I/O."""

    def __init__(self, max_line: int = MAX_LINE, echo: bool = False):
        self.max_line = max_line
        self.echo = echo
        self.echoed = bytearray()  #: what to send back when echo is on; the caller empties it
        self._buf = bytearray()
        self._dropped = 0  #: bytes beyond max_line in the current line
        self._after_cr = False

    def feed(self, data: bytes) -> list[str | Overlong]:
        out: list[str | Overlong] = []
        for byte in data:
            after_cr, self._after_cr = self._after_cr, byte == 0x0D
            if byte == 0x0A and after_cr:
                continue  # the LF of a CRLF
            if byte in (0x0D, 0x0A):
                out.append(self._end())
            elif byte in (BACKSPACE, DELETE):
                if self._buf and not self._dropped:
                    self._buf.pop()
                    self._echo(b"\b \b")
            elif byte in (CTRL_C, CTRL_U):
                self._buf.clear()
                self._dropped = 0
                self._echo(b"^C\r\n" if byte == CTRL_C else b"\r\n")
            elif len(self._buf) < self.max_line:
                self._buf.append(byte)
                self._echo(bytes([byte]))
            else:
                self._dropped += 1
        return out

    def _end(self) -> str | Overlong:
        self._echo(b"\r\n")
        line, dropped = bytes(self._buf), self._dropped
        self._buf.clear()
        self._dropped = 0
        if dropped:
            return Overlong(len(line) + dropped)
        return line.decode("utf-8", "replace")

    def _echo(self, data: bytes) -> None:
        if self.echo and len(self.echoed) < 4 * self.max_line:
            self.echoed += data


# ------------------------------------------------------------------ the port


class SerialConsole:
    """Serves `console` (agent.console.Console) on the serial port `device`."""

    def __init__(self, device: str, console, *, baud: int = BAUD, echo: bool = False, reopen_s: float = REOPEN_S,
                 max_out: int = MAX_OUT, max_line: int = MAX_LINE):
        self.device = device
        self.console = console
        self.baud = baud
        self.echo = echo
        self.reopen_s = reopen_s
        self.max_out = max_out
        self.max_line = max_line
        self.stats = Counters()
        self._port = None
        self._fd = -1
        self._writing = False
        self._out = bytearray()
        self._dropped_bytes = 0  #: answers dropped since the host last got one
        self._reader = LineReader(max_line, echo)
        self._lines: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._reopener: asyncio.Task | None = None
        self._stopping = False
        self._logged: dict[int, float] = {}  #: level -> when a loss/return was last logged at it

    @property
    def is_open(self) -> bool:
        return self._port is not None

    @property
    def pending_out(self) -> int:
        """Bytes of answers waiting for the host (at most max_out)."""
        return len(self._out)

    async def start(self) -> None:
        """Open the port (or keep trying every reopen_s seconds) and serve it."""
        self._loop = asyncio.get_running_loop()
        self._lines = asyncio.Queue(MAX_PENDING_LINES)
        self._worker = asyncio.create_task(self._serve())
        why = self._open()
        if why is None:
            log.info("serial console on %s at %d 8N1", self.device, self.baud)
        else:
            log.warning("serial console: cannot open %s (%s); trying again every %g s", self.device, why, self.reopen_s)
            self._reopener = asyncio.create_task(self._reopen())

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for t in (self._worker, self._reopener) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._close()

    # ------------------------------------------------------------- open/close

    def _open(self) -> str | None:
        """Open the port; None on success, else why not."""
        import serial

        try:
            port = serial.Serial(self.device, self.baud, bytesize=serial.EIGHTBITS, parity=serial.PARITY_NONE,
                                 stopbits=serial.STOPBITS_ONE, timeout=0, write_timeout=0, exclusive=True)
        except (serial.SerialException, OSError, ValueError) as exc:
            return port_error(exc)
        self._port, self._fd = port, port.fileno()
        os.set_blocking(self._fd, False)
        self._dropped_bytes = 0
        self._reader = LineReader(self.max_line, self.echo)
        self._loop.add_reader(self._fd, self._on_readable)
        return None

    def _close(self) -> None:
        if self._port is None:
            return
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        try:
            self._port.close()
        except Exception as exc:  # a vanished USB device may fail its close too
            log.debug("serial console: closing %s: %s", self.device, exc)
        self._port, self._fd = None, -1
        self._out.clear()

    def _lost(self, why: str) -> None:
        """The device went away: close it, forget what was queued for it, try again later."""
        if self._port is None:
            return
        self.stats.inc("lost")
        self._log("serial console: %s %s; trying to reopen it every %g s", self.device, why, self.reopen_s)
        self._close()
        while self._lines is not None and not self._lines.empty():
            self._lines.get_nowait()
        if not self._stopping and (self._reopener is None or self._reopener.done()):
            self._reopener = asyncio.create_task(self._reopen())

    async def _reopen(self) -> None:
        """Every reopen_s seconds: open the device once it is back, unless a getty took
        it. A device that is there but will not open (permissions, a lock) is tried
        less and less often, up to every REOPEN_MOST_S: each try scans the processes."""
        delay = self.reopen_s
        while not self._stopping:
            await asyncio.sleep(delay)
            if not os.path.exists(self.device):
                delay = self.reopen_s
                continue
            owner = await asyncio.to_thread(getty_owner, self.device)
            if owner is not None:
                log.warning("serial console: %s is now owned by %s; leaving it alone (console off)", self.device, owner)
                return
            why = self._open()
            if why is None:
                self.stats.inc("reopened")
                self._log("serial console: %s is back", self.device, level=logging.INFO)
                return
            log.debug("serial console: cannot open %s yet: %s", self.device, why)
            delay = min(REOPEN_MOST_S, delay * 2)

    def _log(self, msg: str, *args, level: int = logging.WARNING) -> None:
        """Loss and return at most once per LOG_EVERY_S each at `level` (a flapping
        USB link would otherwise fill the log); in between at debug."""
        now = time.monotonic()
        if now - self._logged.get(level, -LOG_EVERY_S) < LOG_EVERY_S:
            level = logging.DEBUG
        else:
            self._logged[level] = now
        log.log(level, msg, *args)

    # ------------------------------------------------------------------ input

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(f"failed to read ({exc.strerror or exc})")
            return
        if not data:
            self._lost("hung up")
            return
        for item in self._reader.feed(data):
            if self._lines.full():
                self.stats.inc("lines_dropped_busy")
            else:
                self._lines.put_nowait(item)
        if self._reader.echoed:
            self._write(bytes(self._reader.echoed))
            self._reader.echoed.clear()

    async def _serve(self) -> None:
        """Answer lines one at a time, in order."""
        while True:
            item = await self._lines.get()
            self.stats.inc("lines")
            if isinstance(item, Overlong):
                self.stats.inc("lines_overlong")
                answer = f"error: a line of {item.length} bytes was dropped; a command line holds at most {self.max_line} bytes"
            else:
                answer = await self._answer(item)
            try:
                self._send(answer)
            except Exception:  # our bug: keep serving the next line, loudly
                log.exception("serial console: sending an answer failed")

    async def _answer(self, line: str) -> str:
        try:
            return await asyncio.wait_for(self.console.handle(line), COMMAND_TIMEOUT_S)
        except (asyncio.TimeoutError, TimeoutError):
            return f"error: no answer within {COMMAND_TIMEOUT_S:g} s"
        except Exception as exc:  # the console answers its own errors; this is a bug there
            log.exception("serial console: a command failed")
            return f"error: {type(exc).__name__}: {exc}"[:500]

    # ----------------------------------------------------------------- output

    def _send(self, answer: str) -> None:
        """Queue an answer and the prompt; drop it (and count) when the host is not reading."""
        if self._port is None:
            self.stats.inc("answers_lost")  # the device went away while the command ran
            return
        body = answer.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8", "replace")
        if len(body) > self.max_out // 2:  # never larger than what the buffer can hold
            body = body[: self.max_out // 2] + b"\r\n(... answer cut at the console's output limit)"
        data = body + b"\r\n" + PROMPT.encode() if body else PROMPT.encode()
        note = f"(dropped {self._dropped_bytes} bytes of answers: the host was not reading)\r\n".encode() if self._dropped_bytes else b""
        if len(self._out) + len(note) + len(data) > self.max_out:
            self.stats.inc("answers_dropped")
            self._dropped_bytes += len(data)
            return
        self._dropped_bytes = 0
        self._write(note + data)

    def _write(self, data: bytes) -> None:
        if self._port is None or len(self._out) + len(data) > self.max_out:
            return
        self._out += data
        self._flush()

    def _flush(self) -> None:
        """Write what the device takes now; wait for writability for the rest."""
        while self._out and self._port is not None:
            try:
                n = os.write(self._fd, self._out[:WRITE_CHUNK])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._lost(f"failed to write ({exc.strerror or exc})")
                return
            del self._out[:n]
        if self._port is None:
            return
        if self._out and not self._writing:
            self._loop.add_writer(self._fd, self._flush)
            self._writing = True
        elif not self._out and self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False


def port_error(exc: BaseException) -> str:
    """Why pyserial could not open a port, in a few words: it wraps the OSError
    in messages like "[Errno 2] could not open port X: [Errno 2] ...: 'X'"."""
    cause = exc.__cause__ or exc.__context__
    if exc.args and isinstance(exc.args[0], int) and isinstance(cause, OSError) and cause.strerror:
        return cause.strerror  # could not open port: the errno says why
    return str(exc)


async def start_console(agent) -> SerialConsole | None:
    """Serve agent.console.Console(agent) on the port config.console.device
    names, if any; logs why not otherwise. Returns the running console (stop it
    on shutdown) or None."""
    from agent.console import Console

    device, why = await asyncio.to_thread(resolve_device, agent.config)
    if device is None:
        log.info("serial console off: %s", why)
        return None
    console = SerialConsole(device, Console(agent))
    await console.start()
    return console
