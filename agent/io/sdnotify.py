"""systemd's notify protocol (sd_notify(3)) without libsystemd: one datagram of
"KEY=value" lines to the unix socket named by $NOTIFY_SOCKET.

Type=notify units learn from it when the agent is ready (READY=1), that its
event loop is alive (WATCHDOG=1, every half of $WATCHDOG_USEC), that it is
reloading (RELOADING=1) or stopping (STOPPING=1), and a one-line STATUS=
shown by `systemctl status`. Outside systemd ($NOTIFY_SOCKET unset) every
call does nothing. A failed send is logged once and never raised: the
service manager being away must not take the agent down.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("meshagent.sdnotify")


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None):
        self.address = address
        self.watchdog_usec = watchdog_usec
        self.sent = 0
        self.failed = 0
        self._sock: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> Notifier:
        """Read and remove $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID, so
        task handlers we start cannot speak for us (sd_notify's unset_environment)."""
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", None) or None
        usec_text = env.pop("WATCHDOG_USEC", None)
        pid_text = env.pop("WATCHDOG_PID", None)
        usec = None
        try:
            if usec_text and (not pid_text or int(pid_text) == os.getpid()):
                usec = int(usec_text) if int(usec_text) > 0 else None
        except ValueError:
            log.warning("ignoring a malformed WATCHDOG_USEC=%r / WATCHDOG_PID=%r", usec_text, pid_text)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the service's WatchdogSec."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def notify(self, *fields: str) -> bool:
        """Send "K=V" fields as one datagram; True when it left."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
            self._sock.sendto("\n".join(fields).encode(), target)
        except OSError as exc:
            if not self.failed:
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
            self.failed += 1
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (253+, Type=notify-reload) match the reload to this message.
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=leaving the mesh")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
