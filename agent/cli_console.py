"""`meshagent console DEVICE`: the host side of an agent's serial line console.

Interactive, it edits lines with readline (history in HISTORY_FILE) and sends
each finished line; with `--cmd`, it sends one command, prints the answer and
exits, for scripts. The agent does not echo: it answers each line with text,
a line break and its prompt (agent.io.serial_console.PROMPT), and the prompt
at the start of a line, with nothing after it, is where an answer ends.

Before each command the client sends Ctrl-U, which makes the agent drop any
half line left on the port (by a previous session, or noise on a UART), so
the answer read back belongs to this command.

Exit codes of `--cmd`: 0 answered, 1 the port cannot be opened or no answer
came within --timeout, 2 the agent refused the command (unknown, bad argument).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from agent.io.serial_console import BAUD, PROMPT, port_error

HISTORY_FILE = Path("~/.meshagent_console_history")
HISTORY_LINES = 1000
MAX_ANSWER_BYTES = 256 * 1024  #: a misbehaving device cannot fill our memory either
CTRL_U = b"\x15"
_PROMPT = PROMPT.encode()


def add_commands(sub) -> None:
    p = sub.add_parser("console", help="talk to an agent over its serial line console (USB gadget or UART)")
    p.add_argument("device", help="the serial port on this host, e.g. /dev/ttyACM0 (USB gadget) or /dev/ttyUSB0 (UART adapter)")
    p.add_argument("--cmd", metavar="COMMAND", help='run one command (e.g. "status"), print the answer and exit')
    p.add_argument("--timeout", type=_seconds, default=5.0, metavar="S", help="wait at most S seconds for an answer (default 5)")
    p.add_argument("--baud", type=int, default=BAUD, metavar="N", help=f"line speed (default {BAUD}, 8N1)")
    p.set_defaults(func=cmd_console)


def _seconds(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds from 0 to 3600, not {text!r}")
    return value


def cmd_console(args) -> int:
    port = open_port(args.device, args.baud)
    try:
        if args.cmd is not None:
            return _one(port, args)
        return _interactive(port, args)
    finally:
        port.close()


def open_port(device: str, baud: int):
    import serial

    from agent.cli import Failure

    try:
        return serial.Serial(device, baud, timeout=0.1, write_timeout=2)
    except (serial.SerialException, OSError, ValueError) as exc:
        raise Failure(f"cannot open {device}: {port_error(exc)}") from None


def ask(port, line: str, timeout: float) -> str | None:
    """Send one command line; its answer without the prompt, or None when no
    prompt came back within `timeout` seconds."""
    import serial

    from agent.cli import Failure

    port.reset_input_buffer()
    try:
        port.write(CTRL_U + line.encode("utf-8") + b"\r")
        port.flush()
    except serial.SerialTimeoutException:
        raise Failure(f"cannot send to {port.port}: the port does not take data (flow control?)") from None
    return read_answer(port, timeout)


def read_answer(port, timeout: float) -> str | None:
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # each read returns within the port's 0.1 s timeout
        buf += port.read(max(1, port.in_waiting))
        if buf == _PROMPT or buf.endswith(b"\n" + _PROMPT):
            text = buf[: -len(_PROMPT)].decode("utf-8", "replace").replace("\r\n", "\n")
            return text.removesuffix("\n")
        if len(buf) > MAX_ANSWER_BYTES:
            del buf[: len(buf) - MAX_ANSWER_BYTES]
    return None


def _one(port, args) -> int:
    from agent.cli import Failure
    from agent.cli_consensus import CallFailed

    answer = ask(port, args.cmd, args.timeout)
    if answer is None:
        raise Failure(f"no answer from {args.device} within {args.timeout:g} s (is the agent's console on this port, at {args.baud} baud?)")
    if answer.startswith("error: "):
        raise CallFailed(answer.removeprefix("error: ").splitlines()[0], 2)
    if answer:
        print(answer)
    return 0


def _interactive(port, args) -> int:
    readline = _readline()
    print(f"connected to {args.device} at {args.baud} baud; `help` lists the commands, Ctrl-D leaves")
    if ask(port, "", args.timeout) is None:
        print(f"(no prompt from the agent within {args.timeout:g} s: is its console on this port?)", file=sys.stderr)
    try:
        while True:  # until Ctrl-D or quit
            try:
                line = input(PROMPT)
            except EOFError:
                print()
                break
            except KeyboardInterrupt:
                print()
                continue
            if line.strip() in ("quit", "exit"):
                break
            if not line.strip():
                continue
            if readline is not None:
                readline.add_history(line)
            try:
                answer = ask(port, line, args.timeout)
            except KeyboardInterrupt:
                print("(interrupted)")
                continue
            print(answer if answer is not None else f"(no answer within {args.timeout:g} s)")
    finally:
        _save_history(readline)
    return 0


def _readline():
    """readline with our history loaded, or None where it is missing (line editing is then the terminal's)."""
    try:
        import readline
    except ImportError:
        return None
    readline.set_history_length(HISTORY_LINES)
    readline.set_auto_history(False)  # we add what was sent, not empty lines
    try:
        readline.read_history_file(HISTORY_FILE.expanduser())
    except OSError:
        pass  # first use, or an unreadable home: history starts empty
    return readline


def _save_history(readline) -> None:
    if readline is None:
        return
    try:
        readline.write_history_file(HISTORY_FILE.expanduser())
    except OSError as exc:
        print(f"(history not saved: {exc.strerror or exc})", file=sys.stderr)

