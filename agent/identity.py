"""This node's lasting identity: its id and a start counter, kept in the data directory.

The id must be unique even when every device is called `raspberrypi`, stable
across restarts and overridable. It is derived once as `<hostname>-<8 hex>`
and then read back from `data_dir/node-id`, so renaming the host later does
not rename the node. The hex is an HMAC-SHA256 of an application key under
/etc/machine-id, as machine-id(5) asks (the id then does not reveal the
machine id), so a lost node-id file is derived again the same; with no usable
machine id it is random. 32 bits make a collision among 1000 devices sharing
a hostname about 1 in 10,000.

Cloned SD cards: a card copied after first boot carries the same machine id
and, if the agent ran, the same node-id file, so the clones share an id. Give
each clone a new machine id (`rm /etc/machine-id && systemd-machine-id-setup`)
and delete data_dir/node-id, or set `[node] id`.

The start counter gives incarnation numbers and replay epochs a base that
rises with every start, so they need not be written to the SD card on every
change (card wear).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import socket
import tempfile
from pathlib import Path

from agent.messages import MAX_NODE_ID, BadMessage, check_node_id

log = logging.getLogger(__name__)

NODE_ID_FILE = "node-id"
BOOT_COUNT_FILE = "boot-count"
MACHINE_ID_PATH = Path("/etc/machine-id")
_APP_KEY = b"meshagent node-id v1"
_MACHINE_ID = re.compile(r"[0-9a-f]{32}")

#: What a node id may be (the wire's rule, agent.messages.check_node_id), in words.
NODE_ID_RULE = f"up to {MAX_NODE_ID} bytes of letters, digits and . _ : - starting with a letter or digit"


class IdentityError(Exception):
    """The identity cannot be used or kept: a bad configured id, or the data
    directory cannot be read or written (the message names the path and why)."""


def node_id(
    data_dir: Path,
    override: str | None,
    machine_id_path: Path = MACHINE_ID_PATH,
    hostname: str | None = None,
) -> str:
    """`override` if given (not stored), else the id kept in data_dir, else a new one, kept."""
    if override:
        try:
            return check_node_id(override)
        except BadMessage:
            raise IdentityError(f"node id {override!r} is not allowed: expected {NODE_ID_RULE}") from None
    path = data_dir / NODE_ID_FILE
    stored = _read(path)
    if stored is not None:
        try:
            return check_node_id(stored.strip())
        except BadMessage:
            log.warning("%s holds no valid node id (%r); deriving it again", path, stored[:80])
    new = f"{_host_label(hostname if hostname is not None else socket.gethostname())}-{_suffix(machine_id_path)}"
    _write_atomic(path, new + "\n")
    return new


def boot_count(data_dir: Path) -> int:
    """Count this start and return the count (1 the first time). A corrupt
    counter restarts from 0 with a warning rather than keep the node down."""
    path = data_dir / BOOT_COUNT_FILE
    text = _read(path)
    count = 0
    if text is not None:
        try:
            count = int(text.strip())
            if count < 0:
                raise ValueError(count)
        except ValueError:
            log.warning("%s is corrupt (%r); counting starts from 0 again", path, text[:40])
            count = 0
    _write_atomic(path, f"{count + 1}\n")
    return count + 1


def _host_label(hostname: str) -> str:
    """The host's first DNS label, lowercased, reduced to a-z 0-9 -, at most 32 characters."""
    label = re.sub(r"[^a-z0-9-]+", "-", hostname.split(".")[0].lower()).strip("-")[:32].strip("-")
    return label or "node"


def _suffix(machine_id_path: Path) -> str:
    """8 hex characters: from the machine id when there is one (re-derivable), else random."""
    try:
        machine_id = machine_id_path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        machine_id = ""
    if _MACHINE_ID.fullmatch(machine_id):
        return hmac.new(bytes.fromhex(machine_id), _APP_KEY, hashlib.sha256).hexdigest()[:8]
    log.warning("no usable machine id in %s; the node id gets a random suffix", machine_id_path)
    return os.urandom(4).hex()


def _read(path: Path) -> str | None:
    """The file's text, None if it does not exist."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise IdentityError(f"cannot read {path}: {e.strerror or e}") from e


def _write_atomic(path: Path, text: str) -> None:
    """Replace the file whole (temp file, fsync, rename, fsync the directory), so
    a power cut leaves the old or the new content, never a torn one."""
    try:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as e:
        raise IdentityError(f"cannot create {path.parent}: {e.strerror or e}") from e
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise IdentityError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
