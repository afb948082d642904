"""The serial line console over real pseudo-terminals: a real agent serves it on
a pty's slave side (opened with pyserial, as a UART or USB gadget would be),
the test or `meshagent console` sits on the other end."""

import asyncio
import logging
import os
import select
import threading

import pytest

from agent import cli, logbuffer
from agent.config import load_config
from agent.console import MAX_ANSWER_CHARS, Console
from agent.io.serial_console import MAX_OUT, PROMPT, LineReader, Overlong, SerialConsole, getty_owner, resolve_device
from agent.node import Agent, Identity

PORT_A, PORT_B, PORT_DEAD = 56061, 56062, 56063  #: A serves the console, B is a live seed, nothing on DEAD
DEAD_SEED = ("127.0.0.63", PORT_DEAD)
COMMANDS = ["help", "status", "peers", "load", "leader", "tasks", "log", "net", "config", "ping", "version"]


def _agent(tmp_path, i, port, seeds=(), **flags):
    loaded = load_config(
        tmp_path / "none.toml", board="generic",
        flags={"node.bind": f"127.0.0.6{i}", "node.port": port, "node.data_dir": tmp_path / f"d{i}",
               "discovery.mdns": False, "node.insecure": True, "consensus.voters": [f"n{i}"]} | flags,
    )
    return Agent(loaded.config, Identity(f"n{i}", 1), None, seeds=list(seeds))


async def _until(pred, seconds):
    for _ in range(int(seconds / 0.05)):
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


class Host:
    """The far end of the cable: a pty's master side, read without blocking the loop."""

    def __init__(self, fd: int):
        self.fd = fd
        os.set_blocking(fd, False)
        self.buf = bytearray()

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def take(self) -> bytes:
        """What has arrived (not kept in self.buf)."""
        data = bytearray()
        for _ in range(1000):  # bounded: at most 1000 x 4 KiB per call
            try:
                data += os.read(self.fd, 4096)
            except BlockingIOError:
                break
        return bytes(data)

    async def answer(self, seconds: float = 8) -> str:
        """Everything up to the next prompt, CRLF turned into LF."""
        for _ in range(int(seconds / 0.02)):
            self.buf += self.take()
            if self.buf.endswith(PROMPT.encode()):
                text = self.buf[: -len(PROMPT)].decode("utf-8", "replace").replace("\r\n", "\n")
                self.buf.clear()
                return text.removesuffix("\n")
            await asyncio.sleep(0.02)
        raise AssertionError(f"no prompt within {seconds} s; got {bytes(self.buf)[-300:]!r}")

    async def ask(self, line: str | bytes, end: bytes = b"\r") -> str:
        self.send((line.encode() if isinstance(line, str) else line) + end)
        return await self.answer()


async def _serving(agents, body, console_on=0, **serial_args):
    """Run the agents; serve agents[console_on]'s console on a fresh pty; run body(host, serial, agents)."""
    master, slave = os.openpty()
    runs = [asyncio.create_task(a.run()) for a in agents]
    serial = SerialConsole(os.ttyname(slave), Console(agents[console_on]), **serial_args)
    try:
        for a in agents:
            await asyncio.wait_for(a.ready.wait(), 5)
        await serial.start()
        assert serial.is_open
        return await body(Host(master), serial, agents)
    finally:
        await serial.stop()
        for a in agents:
            a.stop()
        await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 10)
        os.close(master)
        os.close(slave)


# ---------------------------------------------------------------- over a pty


def test_every_command_is_answered_and_bad_lines_get_errors(tmp_path):
    a = _agent(tmp_path, 1, PORT_A, seeds=[("127.0.0.62", PORT_B), DEAD_SEED])
    b = _agent(tmp_path, 2, PORT_B, **{"consensus.enabled": False})
    buffer = logbuffer.install(50)

    async def body(host, serial, agents):
        assert await _until(lambda: [p["id"] for p in a.peers() if p["state"] == "alive"] == ["n2"], 10)
        assert await _until(lambda: a.consensus.raft.role == "leader", 10)
        logging.getLogger("meshagent.test").warning("marker-%d", 4711)
        got = {line: await host.ask(line) for line in (
            "help", "status", "peers", "load", "leader", "tasks", "log 5", "net", "config", "config node",
            "ping n2", f"ping 127.0.0.63:{PORT_DEAD}", "version", "")}
        bad = {line: await host.ask(line) for line in (
            "frobnicate", "log many", "log 0", "config nosuch", "ping", "ping 999.1.1.1", "version now")}
        binary = await host.ask(b"\x00\x01\xff\xfe status")
        overlong = await host.ask(b"x" * 300)
        edited = await host.ask(b"statuz\x08s", end=b"\r\n")  # backspace; CRLF counts as one end
        after = await host.ask("version", end=b"\n")
        return got, bad, binary, overlong, edited, after, serial.stats.snapshot()

    try:
        got, bad, binary, overlong, edited, after, stats = asyncio.run(_serving([a, b], body))
    finally:
        logbuffer.uninstall()
    assert buffer is not None
    assert all(f"  {c}" in got["help"] for c in COMMANDS), got["help"]
    assert "n1" in got["status"] and "alive 2" in got["status"], got["status"]
    assert "n2" in got["peers"] and "alive" in got["peers"], got["peers"]
    assert "cpu" in got["load"] and "memory" in got["load"], got["load"]
    assert "n1 (this node)" in got["leader"] and "read-write" in got["leader"], got["leader"]
    assert "queued 0" in got["tasks"] and "slots" in got["tasks"], got["tasks"]
    assert "marker-4711" in got["log 5"] and len(got["log 5"].splitlines()) <= 5, got["log 5"]
    net = got["net"]
    assert "127.0.0.1/8" in net and "mdns: off (discovery.mdns = false)" in net, net
    assert f"127.0.0.62:{PORT_B}  answers a CoAP ping in" in net, net
    assert f"127.0.0.63:{PORT_DEAD}  port unreachable: the host is up, no agent listens" in net, net
    assert 'console.device = "board"' in got["config"] and "node.port = 56061" in got["config"], got["config"]
    assert got["config node"].splitlines() and all(ln.startswith("node.") for ln in got["config node"].splitlines())
    assert got["ping n2"].startswith(f"n2 (127.0.0.62:{PORT_B}): answers a CoAP ping in"), got["ping n2"]
    assert "port unreachable" in got[f"ping 127.0.0.63:{PORT_DEAD}"]
    assert got["version"].startswith("meshagent ") and "node n1" in got["version"]
    assert got[""] == "", "an empty line gets just the prompt"
    assert bad["frobnicate"] == "error: unknown command 'frobnicate'; commands: " + ", ".join(COMMANDS)
    assert bad["log many"].startswith("error: N must be a whole number from 1 to 1000, not 'many'"), bad["log many"]
    assert bad["log 0"].startswith("error: N must be")
    assert bad["config nosuch"].startswith("error: no config section 'nosuch'; sections: ") and "node" in bad["config nosuch"]
    assert bad["ping"].startswith("error: ping needs a PEER")
    assert bad["ping 999.1.1.1"].startswith("error: '999.1.1.1' is neither a known member's node id nor HOST[:PORT]")
    assert bad["version now"] == "error: too many arguments to version; usage: version"
    assert binary.startswith("error: the line holds the control character 0x00"), binary
    assert overlong == "error: a line of 300 bytes was dropped; a command line holds at most 256 bytes"
    assert "n1" in edited and "members" in edited, edited
    assert after.startswith("meshagent "), "the console still works after the bad lines"
    assert stats["lines_overlong"] == 1


def test_a_host_that_stops_reading_does_not_block_the_agent(tmp_path):
    a = _agent(tmp_path, 1, PORT_A, **{"consensus.enabled": False, "tasks.enabled": False})

    async def body(host, serial, agents):
        ticks, beats = a.core.now, 0
        for batch in range(6):  # ~10 x 5 KB of answers per batch, never read
            host.send(b"config\r" * 10)
            assert await _until(lambda: serial.stats.get("lines") >= 10 * (batch + 1), 5)
            beats += 1
            assert serial.pending_out <= MAX_OUT
        dropped = serial.stats.get("answers_dropped")
        ticked = a.core.now - ticks
        # The host reads again: everything buffered arrives, then nothing is left.
        assert await _until(lambda: not host.take() and serial.pending_out == 0, 5)
        return dropped, ticked, beats, await host.ask("version")

    dropped, ticked, beats, answer = asyncio.run(_serving([a], body))
    assert dropped > 0, "answers beyond the output buffer are dropped"
    assert ticked > 5 and beats == 6, "the agent's tick loop kept running"
    assert answer.startswith("(dropped ") and "the host was not reading" in answer, answer
    assert answer.splitlines()[-1].startswith("meshagent "), answer


def test_a_vanished_device_is_reopened_when_it_returns(tmp_path):
    a = _agent(tmp_path, 1, PORT_A, **{"consensus.enabled": False, "tasks.enabled": False})
    link = tmp_path / "ttyGS0"
    master, slave = os.openpty()
    os.symlink(os.ttyname(slave), link)
    fds = [master, slave]

    async def body():
        run = asyncio.create_task(a.run())
        serial = SerialConsole(str(link), Console(a), reopen_s=0.2)
        try:
            await asyncio.wait_for(a.ready.wait(), 5)
            await serial.start()
            first = await Host(master).ask("version")
            os.close(fds.pop())  # unplugged: both ends of the old pty go away
            os.close(fds.pop())
            assert await _until(lambda: not serial.is_open, 5)
            await asyncio.sleep(0.5)  # a few reopen attempts fail meanwhile
            m2, s2 = os.openpty()
            fds.extend([m2, s2])
            os.unlink(link)
            os.symlink(os.ttyname(s2), link)  # plugged in again
            assert await _until(lambda: serial.is_open, 5)
            return first, await Host(m2).ask("version"), serial.stats.snapshot()
        finally:
            await serial.stop()
            a.stop()
            await asyncio.wait_for(run, 10)

    try:
        first, second, stats = asyncio.run(body())
    finally:
        for fd in fds:
            os.close(fd)
    assert first.startswith("meshagent ") and second.startswith("meshagent ")
    assert stats["lost"] == 1 and stats["reopened"] == 1, stats


# ---------------------------------------------------- the host-side client


class NullModem:
    """Two ptys whose master sides are cross-connected by a thread, like a cable
    between two serial ports: the agent opens one slave, the client the other."""

    def __init__(self):
        self.a_master, self.a_slave = os.openpty()
        self.b_master, self.b_slave = os.openpty()
        self.a_path, self.b_path = os.ttyname(self.a_slave), os.ttyname(self.b_slave)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        peer = {self.a_master: self.b_master, self.b_master: self.a_master}
        for _ in range(3000):  # at most 30 s
            if self._stop.is_set():
                return
            readable, _, _ = select.select(list(peer), [], [], 0.01)
            for fd in readable:
                try:
                    os.write(peer[fd], os.read(fd, 4096))
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for fd in (self.a_master, self.a_slave, self.b_master, self.b_slave):
            os.close(fd)


def test_client_cmd_mode_prints_the_answer_and_exits_by_outcome(tmp_path, capsys):
    a = _agent(tmp_path, 1, PORT_A, **{"consensus.enabled": False, "tasks.enabled": False})
    cable = NullModem()
    lonely_master, lonely_slave = os.openpty()  # a port where no agent answers

    async def body():
        run = asyncio.create_task(a.run())
        serial = SerialConsole(cable.a_path, Console(a))
        try:
            await asyncio.wait_for(a.ready.wait(), 5)
            await serial.start()
            out = []
            for argv in (["--cmd", "status"], ["--cmd", "frobnicate"], ["--cmd", "version", "--timeout", "2"]):
                rc = await asyncio.to_thread(cli.main, ["console", cable.b_path, *argv])
                out.append((rc, *capsys.readouterr()))
            rc = await asyncio.to_thread(cli.main, ["console", os.ttyname(lonely_slave), "--cmd", "status", "--timeout", "0.5"])
            out.append((rc, *capsys.readouterr()))
            rc = await asyncio.to_thread(cli.main, ["console", str(tmp_path / "no-such-tty"), "--cmd", "status"])
            out.append((rc, *capsys.readouterr()))
            return out
        finally:
            await serial.stop()
            a.stop()
            await asyncio.wait_for(run, 10)

    try:
        (ok, unknown, version, silent, missing) = asyncio.run(body())
    finally:
        cable.close()
        os.close(lonely_master)
        os.close(lonely_slave)
    assert ok[0] == 0 and "n1" in ok[1] and "members" in ok[1] and PROMPT not in ok[1], ok
    assert unknown[0] == 2 and unknown[2].startswith("meshagent: unknown command 'frobnicate'; commands: help"), unknown
    assert version[0] == 0 and version[1].startswith("meshagent "), version
    assert silent[0] == 1 and "no answer from" in silent[2] and "within 0.5 s" in silent[2], silent
    assert len(silent[2].strip().splitlines()) == 1
    assert missing[0] == 1 and "cannot open" in missing[2] and "No such file or directory" in missing[2], missing


def test_client_interactive_mode_keeps_history(tmp_path, capsys, monkeypatch):
    a = _agent(tmp_path, 1, PORT_A, **{"consensus.enabled": False, "tasks.enabled": False})
    cable = NullModem()
    typed = iter(["version", "", "frobnicate"])

    def typing(prompt):  # then Ctrl-D
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr("builtins.input", typing)

    async def body():
        run = asyncio.create_task(a.run())
        serial = SerialConsole(cable.a_path, Console(a))
        try:
            await asyncio.wait_for(a.ready.wait(), 5)
            await serial.start()
            return await asyncio.to_thread(cli.main, ["console", cable.b_path])
        finally:
            await serial.stop()
            a.stop()
            await asyncio.wait_for(run, 10)

    try:
        rc = asyncio.run(body())
    finally:
        cable.close()
    out = capsys.readouterr().out
    assert rc == 0 and "\nmeshagent 0" in out and "error: unknown command 'frobnicate'" in out, out
    history = (tmp_path / ".meshagent_console_history").read_text()
    assert "version" in history and "frobnicate" in history, history


# ------------------------------------------------------------ pieces alone


def test_line_discipline():
    r = LineReader(max_line=8)
    assert r.feed(b"status\r\nlog 5\nver") == ["status", "log 5"]
    assert r.feed(b"sion\rpeerz\x7fs\r") == ["version", "peers"]
    assert r.feed(b"junk\x15help\n") == ["help"], "Ctrl-U drops the half line"
    assert r.feed(b"0123456789ab\rnet\r") == [Overlong(12), "net"]
    assert r.feed(b"\xff\xfe\n") == ["\ufffd\ufffd"]
    assert r.echoed == b"", "no echo unless asked"
    echo = LineReader(echo=True)
    echo.feed(b"ab\x08c\r")
    assert bytes(echo.echoed) == b"ab\b \bc\r\n"


def test_log_buffer_keeps_the_last_lines_only():
    buffer = logbuffer.install(3)
    try:
        log = logging.getLogger("meshagent.test")
        for i in range(5):
            log.warning("line %d", i)
        log.warning("x" * 1000)
        lines = buffer.tail(10)
        assert logbuffer.current() is buffer
        assert len(lines) == 3 and "line 3" in lines[0] and "line 4" in lines[1], lines
        assert lines[2].endswith("more characters)") and len(lines[2]) < 500
        buffer = logbuffer.install(1000)
        for i in range(200):
            log.warning("%03d %s", i, "y" * 200)
        answer = asyncio.run(Console(None).handle("log 1000"))
        assert len(answer) <= MAX_ANSWER_CHARS + 100 and answer.startswith("(... ") and answer.endswith("199 " + "y" * 200), \
            "a long answer is cut, and `log` keeps its newest lines"
    finally:
        logbuffer.uninstall()
    assert logbuffer.install(0) is None and logbuffer.current() is None


class _Proc:
    def __init__(self, pid, name, cmdline, terminal=None):
        self.info = {"pid": pid, "name": name, "cmdline": cmdline, "terminal": terminal}


def test_getty_detection_resolves_links_and_reads_cmdline_and_terminal(tmp_path, mocker):
    (tmp_path / "ttyS0").touch()
    (tmp_path / "serial0").symlink_to(tmp_path / "ttyS0")
    serial0 = str(tmp_path / "serial0")
    procs = mocker.patch("psutil.process_iter")

    procs.return_value = [_Proc(321, "agetty", ["/sbin/agetty", "-o", "-p -- \\u", "--keep-baud", "115200,57600", "-", "vt220"],
                                terminal=str(tmp_path / "ttyS0"))]
    assert getty_owner(serial0, dev_dir=str(tmp_path)) == "agetty (pid 321)", "systemd's serial-getty: the tty is its terminal"
    procs.return_value = [_Proc(77, "getty", ["/sbin/getty", "-L", "115200", "ttyS0", "vt100"])]
    assert getty_owner(serial0, dev_dir=str(tmp_path)) == "getty (pid 77)", "named on the command line"
    procs.return_value = [
        _Proc(5, "bash", ["-bash"], terminal=str(tmp_path / "ttyS0")),  # a shell on it is not a getty
        _Proc(6, "agetty", ["/sbin/agetty", "--noclear", "tty1", "linux"], terminal="/dev/tty1"),
        _Proc(7, None, None),  # access denied
    ]
    assert getty_owner(serial0, dev_dir=str(tmp_path)) is None


@pytest.mark.parametrize("board, device, getty, expected", [
    ("generic", "off", False, (None, "console.device = off")),
    ("generic", "board", False, (None, "board generic has no serial device")),
    ("rpi-4b", "board", False, ("/dev/serial0", "/dev/serial0 (from board rpi-4b's serial_device)")),
    ("generic", "/dev/ttyGS0", False, ("/dev/ttyGS0", "/dev/ttyGS0 (from console.device)")),
    ("generic", "/dev/ttyGS0", True, (None, "/dev/ttyGS0 is owned by agetty (pid 9)")),
])
def test_resolve_device(tmp_path, mocker, board, device, getty, expected):
    mocker.patch("psutil.process_iter", return_value=[_Proc(9, "agetty", ["agetty", "-"], terminal="/dev/ttyGS0")] if getty else [])
    config = load_config(tmp_path / "none.toml", board=board, flags={"console.device": device}).config
    path, why = resolve_device(config)
    assert path == expected[0] and why.startswith(expected[1]), why
