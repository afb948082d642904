"""The authenticated, encrypted envelope around every mesh datagram, and the fleet key.

Secure mode (a fleet key): each datagram is a COSE_Encrypt0 (RFC 9052, tag 16)
with ChaCha20/Poly1305 (COSE alg 24; Pi 3/4 SoCs lack AES instructions, so it
beats AES-GCM there)::

    16([ bstr({1: 24, "mesh": mesh}),            protected: authenticated, readable
         {4: kid (8 bytes), 5: iv (12 random bytes)},
         ciphertext of [sender, boot, counter, packet_bytes] + 16-byte tag ])

AAD = Enc_structure ["Encrypt0", protected, b"meshagent/1"]. The mesh name is
readable before decryption so a receiver can count a neighbouring fleet's
traffic as "wrong_mesh" instead of "auth_failed"; being authenticated, a forged
name can only get a datagram dropped, never accepted.

Insecure mode (keys=None, demos only): ["meshagent-insecure", mesh, sender,
boot, counter, packet_bytes], no secrecy and no authenticity. A node in one
mode drops the other's datagrams as "insecure_mismatch" (a mesh name mismatch
is still "wrong_mesh"), so a misconfigured node is visible, not silently mixed.

Replay protection (both modes): a receiver accepts (sender, boot, counter) only
once, through a 64-wide sliding window per sender (RFC 6479 style). `boot` must
grow across restarts of the sender (persist a boot counter); a sender that
restarts with the same boot is dropped as "replay" until its counter passes
the old one. The table holds `max_senders` senders, least recently heard
evicted first; a receiver forgets evicted senders' windows (and everything
across its own restart), so it would accept one old replay of those. Only
keyholders get into the table in secure mode, so sizing it above the fleet
makes eviction a non-issue.

`Opener.open` returns the authenticated sender with the packet bytes; the
caller decodes them with `wire.decode_packet(packet, expect_sender=sender)`,
which refuses a packet naming another sender.

Nonces are random (the COSE norm for this alg); their collision odds stay
below 2**-32 up to about 2**32 datagrams per key, so rotate the fleet key
long before a fleet has sent that many (1,000 datagrams/s fleet-wide: ~4 years).

Key file: text, one key per line ``meshagent-fleet-key v1 <kid hex> <key hex>``,
``#`` comments and blank lines allowed. The first key seals, all keys open,
so rotation is: add the new key as a second line everywhere, then move it
first everywhere, then remove the old one. A key file readable by group or
others is refused (like ssh), since the key is the fleet's only secret.
"""

from __future__ import annotations

import os
import re
import stat
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from agent.counters import Counters
from agent.messages import BadMessage, check_node_id
from agent.wire import MAX_DATAGRAM, MAX_PACKET, loads_strict

COSE_ENCRYPT0_TAG = b"\xd0"  # CBOR head of tag 16
COSE_ALG_CHACHA20_POLY1305 = 24
EXTERNAL_AAD = b"meshagent/1"
INSECURE_MARK = "meshagent-insecure"
KID_BYTES, KEY_BYTES, IV_BYTES = 8, 32, 12
MAX_MESH_NAME = 32  #: bytes; bounds the protected header (wire.ENVELOPE_OVERHEAD)
MAX_BOOT = 2**63 - 1
MAX_COUNTER = 2**64 - 1
WINDOW = 64  #: counters below the highest seen that can still arrive late
KEY_LINE_TAG = "meshagent-fleet-key v1"

_MESH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_mesh_name(mesh: object) -> str:
    """A configuration check (ValueError), not a network one."""
    if not isinstance(mesh, str) or len(mesh.encode()) > MAX_MESH_NAME or not _MESH_NAME.match(mesh):
        raise ValueError(f"mesh name must be 1-{MAX_MESH_NAME} of [A-Za-z0-9._-], got {mesh!r}")
    return mesh


# --------------------------------------------------------------------- keys


class KeyFileError(Exception):
    """The fleet key file is missing, unsafe or unreadable; the message names the path."""


@dataclass(frozen=True)
class FleetKey:
    kid: bytes
    key: bytes = field(repr=False)  # never in logs

    def __post_init__(self):
        if not isinstance(self.kid, bytes) or len(self.kid) != KID_BYTES:
            raise ValueError(f"kid must be {KID_BYTES} bytes")
        if not isinstance(self.key, bytes) or len(self.key) != KEY_BYTES:
            raise ValueError(f"key must be {KEY_BYTES} bytes")

    @classmethod
    def generate(cls, rng_bytes: Callable[[int], bytes] = os.urandom) -> FleetKey:
        return cls(rng_bytes(KID_BYTES), rng_bytes(KEY_BYTES))

    def line(self) -> str:
        return f"{KEY_LINE_TAG} {self.kid.hex()} {self.key.hex()}"


def write_key_file(path: str | os.PathLike, keys: Sequence[FleetKey], *, force: bool = False) -> None:
    """Write keys (first = sealing key) atomically with mode 0600: temp file,
    fsync, then link (refuses an existing file unless force) or rename."""
    if not keys:
        raise ValueError("no keys to write")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write("".join(k.line() + "\n" for k in keys))
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic create-if-absent
            except FileExistsError:
                raise KeyFileError(f"{path}: already exists; not overwriting a fleet key (use force)") from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_key_file(path: str | os.PathLike, *, force: bool = False) -> FleetKey:
    """Create a key file holding one new random key; returns the key."""
    key = FleetKey.generate()
    write_key_file(path, [key], force=force)
    return key


def load_keys(path: str | os.PathLike) -> list[FleetKey]:
    """Keys of a key file, sealing key first; KeyFileError says what is wrong where."""
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read the fleet key; chmod 600 it")
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file (create one with `meshagent keygen --out FILE`, or run with --insecure for a demo)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"{path}: cannot read: {e}") from None
    keys = [_parse_key_line(path, n, line) for n, line in enumerate(text.splitlines(), 1) if _is_key_line(line)]
    if not keys:
        raise KeyFileError(f"{path}: no keys in file")
    kids = [k.kid for k in keys]
    if len(set(kids)) != len(kids):
        raise KeyFileError(f"{path}: the same kid appears twice")
    return keys


def _is_key_line(line: str) -> bool:
    return bool(line.strip()) and not line.lstrip().startswith("#")


def _parse_key_line(path: Path, n: int, line: str) -> FleetKey:
    words = line.split()
    if len(words) != 4 or " ".join(words[:2]) != KEY_LINE_TAG:
        raise KeyFileError(f"{path}:{n}: expected '{KEY_LINE_TAG} <kid hex> <key hex>'")
    try:
        return FleetKey(bytes.fromhex(words[2]), bytes.fromhex(words[3]))
    except ValueError:
        raise KeyFileError(
            f"{path}:{n}: kid must be {2 * KID_BYTES} and key {2 * KEY_BYTES} hex digits"
        ) from None


# ----------------------------------------------------------- replay window


class ReplayWindow:
    """Per sender: (boot, highest counter, bitmap of the WINDOW counters below
    and including it). Bounded by max_senders with LRU eviction."""

    def __init__(self, max_senders: int = 4096):
        self.max_senders = max_senders
        self._senders: OrderedDict[str, list[int]] = OrderedDict()  # sender -> [boot, highest, bitmap]

    def __len__(self) -> int:
        return len(self._senders)

    def accept(self, sender: str, boot: int, counter: int) -> bool:
        """True (and remember it) if (boot, counter) is new for sender."""
        entry = self._senders.get(sender)
        if entry is None or boot > entry[0]:
            self._remember(sender, [boot, counter, 1])
            return True
        self._senders.move_to_end(sender)
        last_boot, highest, bitmap = entry
        if boot < last_boot:
            return False
        if counter > highest:
            shift = counter - highest  # may be huge: never shift by it unchecked
            entry[1] = counter
            entry[2] = ((bitmap << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            return True
        bit = 1 << (highest - counter)
        if highest - counter >= WINDOW or bitmap & bit:
            return False
        entry[2] = bitmap | bit
        return True

    def _remember(self, sender: str, entry: list[int]) -> None:
        self._senders[sender] = entry
        self._senders.move_to_end(sender)
        while len(self._senders) > self.max_senders:
            self._senders.popitem(last=False)


# ------------------------------------------------------------ seal and open


def _enc_structure(protected: bytes, purpose: str = "") -> bytes:
    """The AEAD's associated data. A non-empty `purpose` (e.g. "raft") binds a
    datagram to one channel, so a mesh datagram can never be replayed as a Raft one."""
    aad = EXTERNAL_AAD + (b"/" + purpose.encode() if purpose else b"")
    return cbor2.dumps(["Encrypt0", protected, aad])


def _protected_header(mesh: str) -> bytes:
    return cbor2.dumps({1: COSE_ALG_CHACHA20_POLY1305, "mesh": mesh})


def _check_keys(keys: Sequence[FleetKey] | None) -> None:
    if keys is not None and not keys:
        raise ValueError("empty key list: pass None for insecure mode")


class Sealer:
    """Seals our packets. keys=None: insecure framing; otherwise keys[0] seals.
    `boot` must grow across our restarts (see module doc)."""

    def __init__(
        self,
        mesh: str,
        keys: Sequence[FleetKey] | None,
        sender: str,
        boot: int,
        rng_bytes: Callable[[int], bytes] = os.urandom,
        max_packet: int = MAX_PACKET,
        purpose: str = "",
    ):
        """`max_packet` is larger for API responses, which CoAP carries
        block-wise, and for Raft datagrams (≤ 4 KB); mesh datagrams keep the
        default so they fit in 1024 bytes. `purpose` names the channel."""
        _check_keys(keys)
        self.max_packet = max_packet
        self.mesh = check_mesh_name(mesh)
        self.sender = check_node_id(sender)
        if isinstance(boot, bool) or not isinstance(boot, int) or not 0 <= boot <= MAX_BOOT:
            raise ValueError(f"boot must be an int in 0..{MAX_BOOT}")
        self.boot = boot
        self.counter = 0  #: the next datagram's counter
        self._rng = rng_bytes
        self._key = keys[0] if keys else None
        self._aead = ChaCha20Poly1305(self._key.key) if self._key else None
        self._protected = _protected_header(mesh)
        self._aad = _enc_structure(self._protected, purpose)

    def seal(self, packet_bytes: bytes) -> bytes:
        """The datagram for packet_bytes, at most MAX_DATAGRAM bytes. ValueError
        on a packet over MAX_PACKET: the packer's bug."""
        if len(packet_bytes) > self.max_packet:
            raise ValueError(f"packet of {len(packet_bytes)} bytes exceeds {self.max_packet}")
        if self.counter > MAX_COUNTER:
            raise ValueError("datagram counter exhausted; restart with a new boot")
        counter, self.counter = self.counter, self.counter + 1
        if self._aead is None:
            return cbor2.dumps([INSECURE_MARK, self.mesh, self.sender, self.boot, counter, packet_bytes])
        iv = self._rng(IV_BYTES)
        plaintext = cbor2.dumps([self.sender, self.boot, counter, packet_bytes])
        ciphertext = self._aead.encrypt(iv, plaintext, self._aad)
        return COSE_ENCRYPT0_TAG + cbor2.dumps([self._protected, {4: self._key.kid, 5: iv}, ciphertext])


class Opener:
    """Opens peers' datagrams; never raises on bad input: it counts the reason
    in `counters` and returns None. Reasons: oversized, truncated, malformed,
    wrong_mesh, insecure_mismatch, unknown_key, auth_failed, bad_node_id, replay."""

    def __init__(
        self, mesh: str, keys: Sequence[FleetKey] | None, counters: Counters, max_senders: int = 4096,
        max_datagram: int = MAX_DATAGRAM, purpose: str = "",
    ):
        _check_keys(keys)
        self.max_datagram = max_datagram
        self.mesh = check_mesh_name(mesh)
        self.counters = counters
        self.window = ReplayWindow(max_senders)
        self._secure = keys is not None
        self._aeads = {k.kid: ChaCha20Poly1305(k.key) for k in keys or ()}
        self._protected = _protected_header(mesh)
        self._aad = _enc_structure(self._protected, purpose)
        self.last_drop = ""  #: why the last datagram that failed to open was dropped (a counter label)

    def open(self, datagram: bytes) -> tuple[str, bytes] | None:
        """(authenticated sender, packet bytes), or None after counting why not."""
        try:
            sender, boot, counter, packet = self._unwrap(datagram)
        except BadMessage as e:
            self.counters.inc(e.reason)
            self.last_drop = e.reason
            return None
        if not self.window.accept(sender, boot, counter):
            self.counters.inc("replay")
            self.last_drop = "replay"
            return None
        return sender, packet

    def _unwrap(self, datagram: bytes) -> tuple[str, int, int, bytes]:
        if len(datagram) > self.max_datagram:
            raise BadMessage("oversized")
        if datagram[:1] == COSE_ENCRYPT0_TAG:
            return self._unwrap_cose(datagram[1:])
        return self._unwrap_insecure(datagram)

    def _unwrap_cose(self, body: bytes) -> tuple[str, int, int, bytes]:
        outer = loads_strict(body, maps=True, max_depth=2)
        if type(outer) is not list or len(outer) != 3:
            raise BadMessage("malformed", "COSE_Encrypt0")
        protected, unprotected, ciphertext = outer
        if protected != self._protected:
            raise BadMessage(_header_mismatch(protected, self.mesh))
        if not self._secure:
            raise BadMessage("insecure_mismatch")
        if type(unprotected) is not dict or len(unprotected) != 2 or type(ciphertext) is not bytes:
            raise BadMessage("malformed", "COSE_Encrypt0")
        kid, iv = unprotected.get(4), unprotected.get(5)
        if type(iv) is not bytes or len(iv) != IV_BYTES or type(kid) is not bytes:
            raise BadMessage("malformed", "COSE headers")
        aead = self._aeads.get(kid)
        if aead is None:
            raise BadMessage("unknown_key")
        try:
            plaintext = aead.decrypt(iv, ciphertext, self._aad)
        except InvalidTag:
            raise BadMessage("auth_failed") from None
        inner = loads_strict(plaintext, max_depth=1)
        if type(inner) is not list or len(inner) != 4:
            raise BadMessage("malformed", "plaintext")
        return _fields(*inner)

    def _unwrap_insecure(self, datagram: bytes) -> tuple[str, int, int, bytes]:
        frame = loads_strict(datagram, max_depth=1)
        if type(frame) is not list or len(frame) != 6 or frame[0] != INSECURE_MARK:
            raise BadMessage("malformed", "not a mesh datagram")
        if frame[1] != self.mesh:
            raise BadMessage("wrong_mesh")
        if self._secure:
            raise BadMessage("insecure_mismatch")
        return _fields(*frame[2:])


def _header_mismatch(protected: object, mesh: str) -> str:
    """Why a protected header differs from ours: another mesh, or garbage."""
    if type(protected) is bytes:
        try:
            header = loads_strict(protected, maps=True, max_depth=1)
        except BadMessage:
            return "malformed"
        if type(header) is dict and type(header.get("mesh")) is str and header["mesh"] != mesh:
            return "wrong_mesh"
    return "malformed"


def _fields(sender: object, boot: object, counter: object, packet: object) -> tuple[str, int, int, bytes]:
    """Check the replay-protection fields (an authenticated peer's bug if wrong)."""
    check_node_id(sender)
    if type(boot) is not int or not 0 <= boot <= MAX_BOOT or type(counter) is not int or not 0 <= counter <= MAX_COUNTER:
        raise BadMessage("malformed", "boot/counter")
    if type(packet) is not bytes:
        raise BadMessage("malformed", "packet")
    return sender, boot, counter, packet
