"""The last N log lines, kept in memory for the serial console's `log`.

When the network is down, journald may be out of reach too (no ssh), so the
console shows what the agent said lately from its own memory. The buffer is a
bounded deque of formatted lines, each cut to MAX_LINE_CHARS, so it costs at
most N x MAX_LINE_CHARS characters whatever is logged.

One buffer per process, on the root logger: `install(n)` after logging is set
up (logging.basicConfig(force=True) drops the root's handlers), `current()`
for whoever wants to read it.
"""

from __future__ import annotations

import logging
from collections import deque

MAX_LINE_CHARS = 400  #: a longer record (a traceback) keeps its start and says how much was cut
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_current: tuple[LogBuffer, logging.Logger] | None = None  #: the installed buffer and its logger


class LogBuffer(logging.Handler):
    """A logging handler keeping the last `size` formatted lines."""

    def __init__(self, size: int, level: int = logging.NOTSET):
        super().__init__(level)
        self.size = size
        self.lines: deque[str] = deque(maxlen=size)
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record).replace("\r", "")
        except Exception:  # a bad %-format in someone's log call must not break logging
            self.handleError(record)
            return
        if len(text) > MAX_LINE_CHARS:
            text = f"{text[:MAX_LINE_CHARS]}... ({len(text) - MAX_LINE_CHARS} more characters)"
        self.lines.append(text)  # emit runs under the handler's lock

    def tail(self, n: int) -> list[str]:
        """The last `n` lines, oldest first (safe against a logging thread)."""
        with self.lock:
            lines = list(self.lines)
        return lines[-n:] if n > 0 else []


def install(size: int, logger: logging.Logger | None = None) -> LogBuffer | None:
    """Attach a buffer of `size` lines to the root logger (replacing one installed
    before); None and nothing attached when `size` is 0 (log.memory_lines = 0)."""
    global _current
    uninstall()
    if size <= 0:
        return None
    buffer, logger = LogBuffer(size), logger or logging.getLogger()
    logger.addHandler(buffer)
    _current = (buffer, logger)
    return buffer


def uninstall() -> None:
    global _current
    if _current is not None:
        buffer, logger = _current
        logger.removeHandler(buffer)
        _current = None


def current() -> LogBuffer | None:
    """The buffer `install` attached, if any."""
    return _current[0] if _current is not None else None
