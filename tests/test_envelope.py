"""The envelope: sealing and opening, every way a datagram is refused, replay
protection, the size bound, and the fleet key file."""

from __future__ import annotations

import os
import stat

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.counters import Counters
from agent.envelope import (
    MAX_BOOT,
    MAX_COUNTER,
    MAX_MESH_NAME,
    WINDOW,
    FleetKey,
    KeyFileError,
    Opener,
    ReplayWindow,
    Sealer,
    generate_key_file,
    load_keys,
    write_key_file,
)
from agent.messages import MAX_NODE_ID
from agent.wire import ENVELOPE_OVERHEAD, MAX_DATAGRAM, MAX_PACKET

MESH = "fleet"
PACKET = b"\x83\x01\x61a\x81\x82\x02\x01"  # any bytes; the envelope does not look inside


def det_rng(n: int) -> bytes:
    return b"\x11" * n


@pytest.fixture
def key():
    return FleetKey.generate()


def pair(keys, *, mesh=MESH, opener_keys="same", sender="pi-01", boot=1, **kw):
    counters = Counters()
    opener = Opener(mesh, keys if opener_keys == "same" else opener_keys, counters, **kw)
    return Sealer(mesh, keys, sender, boot), opener, counters


def dropped(opener: Opener, counters: Counters, datagram: bytes) -> str:
    """The one reason counted for dropping datagram."""
    before = counters.snapshot()
    assert opener.open(datagram) is None
    diff = {k: v - before.get(k, 0) for k, v in counters.snapshot().items() if v != before.get(k, 0)}
    assert len(diff) == 1 and sum(diff.values()) == 1, diff
    return next(iter(diff))


# ------------------------------------------------------------------ round trip


@pytest.mark.parametrize("secure", [True, False])
def test_round_trip(key, secure):
    sealer, opener, counters = pair([key] if secure else None)
    for i in range(3):
        assert opener.open(sealer.seal(PACKET + bytes([i]))) == ("pi-01", PACKET + bytes([i]))
    assert counters.snapshot() == {}


def test_secure_datagram_is_cose_encrypt0_and_hides_the_packet(key):
    sealer = Sealer(MESH, [key], "pi-01", 1, rng_bytes=det_rng)
    d = sealer.seal(PACKET)
    tagged = cbor2.loads(d)
    assert tagged.tag == 16
    protected, unprotected, ciphertext = tagged.value
    assert cbor2.loads(protected) == {1: 24, "mesh": MESH}
    assert unprotected == {4: key.kid, 5: b"\x11" * 12}
    assert PACKET not in d and b"pi-01" not in d


@pytest.mark.parametrize("mesh", [MESH, "m" * MAX_MESH_NAME])
@pytest.mark.parametrize("secure", [True, False])
def test_worst_case_overhead_fits_a_datagram(key, mesh, secure):
    sealer = Sealer(mesh, [key] if secure else None, "n" * MAX_NODE_ID, MAX_BOOT)
    sealer.counter = MAX_COUNTER
    size = len(sealer.seal(b"x" * MAX_PACKET))
    assert size <= MAX_DATAGRAM
    if secure and mesh != MESH:
        assert size - MAX_PACKET == ENVELOPE_OVERHEAD  # the bound is tight
    with pytest.raises(ValueError):
        sealer.seal(b"x" * (MAX_PACKET + 1))


# ---------------------------------------------------------------- refusals


def test_tampering_any_byte_is_counted_never_raised(key):
    sealer, opener, counters = pair([key])
    sealer._rng = det_rng
    d = sealer.seal(PACKET)
    iv_at = d.index(b"\x11" * 12)
    ciphertext_at = len(d) - len(cbor2.dumps(["pi-01", 1, 0, PACKET])) - 16  # ciphertext + tag end it
    for i in range(len(d)):
        reason = dropped(opener, counters, d[:i] + bytes([d[i] ^ 0x01]) + d[i + 1 :])
        assert reason in {"malformed", "truncated", "wrong_mesh", "unknown_key", "auth_failed"}
        if iv_at <= i < iv_at + 12 or i >= ciphertext_at:
            assert reason == "auth_failed"
    assert opener.open(d) == ("pi-01", PACKET)  # refusals left the replay window alone


def test_wrong_key(key):
    sealer, _, _ = pair([key])
    other_kid, other_key = FleetKey.generate(), FleetKey(key.kid, os.urandom(32))
    for opener_keys, expected in [([other_kid], "unknown_key"), ([other_key], "auth_failed")]:
        _, opener, counters = pair([key], opener_keys=opener_keys)
        assert dropped(opener, counters, sealer.seal(PACKET)) == expected


@pytest.mark.parametrize("sealer_secure", [True, False])
@pytest.mark.parametrize("opener_secure", [True, False])
def test_wrong_mesh_wins_over_mode_mismatch(key, sealer_secure, opener_secure):
    sealer = Sealer("other", [key] if sealer_secure else None, "pi-01", 1)
    opener = Opener(MESH, [key] if opener_secure else None, Counters())
    assert dropped(opener, opener.counters, sealer.seal(PACKET)) == "wrong_mesh"


@pytest.mark.parametrize("sealer_secure", [True, False])
def test_insecure_mismatch(key, sealer_secure):
    sealer = Sealer(MESH, [key] if sealer_secure else None, "pi-01", 1)
    opener = Opener(MESH, None if sealer_secure else [key], Counters())
    assert dropped(opener, opener.counters, sealer.seal(PACKET)) == "insecure_mismatch"


@pytest.mark.parametrize(
    "datagram, expected",
    [
        (b"", "truncated"),
        (b"\xd0", "truncated"),
        (b"\x00" * (MAX_DATAGRAM + 1), "oversized"),
        (b"\xd0\x83\x40\xa0\x40", "malformed"),
        (b"\xd0" + cbor2.dumps(["x", {}, b""]), "malformed"),
        (cbor2.dumps(["meshagent-insecure", MESH, "a", 1]), "malformed"),
        (cbor2.dumps(["hello", MESH, "a", 1, 2, b""]), "malformed"),
        (b"\xd0\xd0\x80", "malformed"),  # a tag inside
        (b"GET / HTTP/1.1\r\n\r\n", "malformed"),
    ],
)
def test_garbage_is_counted(datagram, expected):
    opener = Opener(MESH, None, Counters())
    assert dropped(opener, opener.counters, datagram) == expected


def test_authenticated_but_malformed_plaintext(key):
    """A keyholder's bug: the plaintext must be [sender, boot, counter, packet]."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    sealer, opener, counters = pair([key])
    for plaintext, expected in [
        (cbor2.dumps(["pi-01", 1, 0]), "malformed"),
        (cbor2.dumps(["pi-01", -1, 0, b""]), "malformed"),
        (cbor2.dumps(["pi-01", 1, 0, "text"]), "malformed"),
        (cbor2.dumps(["not an id", 1, 0, b""]), "bad_node_id"),
    ]:
        iv = os.urandom(12)
        ct = ChaCha20Poly1305(key.key).encrypt(iv, plaintext, sealer._aad)
        d = b"\xd0" + cbor2.dumps([sealer._protected, {4: key.kid, 5: iv}, ct])
        assert dropped(opener, counters, d) == expected


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=MAX_DATAGRAM + 4), st.booleans())
def test_fuzz_open_never_raises(datagram, secure):
    opener = Opener(MESH, [FleetKey(b"k" * 8, b"K" * 32)] if secure else None, Counters())
    assert opener.open(datagram) is None


# ------------------------------------------------------------------ replay


def test_replay_is_dropped(key):
    sealer, opener, counters = pair([key])
    d = sealer.seal(PACKET)
    assert opener.open(d)
    assert dropped(opener, counters, d) == "replay"


@pytest.mark.parametrize("secure", [True, False])
def test_reordered_within_window_accepted_once(key, secure):
    sealer, opener, counters = pair([key] if secure else None)
    ds = [sealer.seal(PACKET) for _ in range(WINDOW)]
    assert all(opener.open(d) for d in reversed(ds))
    assert all(dropped(opener, counters, d) == "replay" for d in ds)


def test_below_window_is_replay(key):
    sealer, opener, counters = pair([key])
    ds = [sealer.seal(PACKET) for _ in range(WINDOW + 1)]
    assert opener.open(ds[-1])
    assert opener.open(ds[1])  # exactly WINDOW-1 behind: still inside
    assert dropped(opener, counters, ds[0]) == "replay"


def test_boot_order(key):
    old, opener, counters = pair([key], boot=5)
    stale = old.seal(PACKET)
    old.counter = 1000
    assert opener.open(old.seal(PACKET))
    new = Sealer(MESH, [key], "pi-01", 6)
    assert opener.open(new.seal(PACKET))  # a newer boot resets the window (counter 0 < 1000)
    assert dropped(opener, counters, old.seal(PACKET)) == "replay"  # older boot
    assert dropped(opener, counters, stale) == "replay"


def test_window_edges_and_huge_jumps():
    w = ReplayWindow()
    assert w.accept("a", 0, 100)
    assert w.accept("a", 0, 100 - (WINDOW - 1))
    assert not w.accept("a", 0, 100 - WINDOW)
    assert w.accept("a", 0, MAX_COUNTER)  # a huge jump must not build a huge bitmap
    assert not w.accept("a", 0, MAX_COUNTER)
    assert w.accept("a", 0, MAX_COUNTER - 1)


def test_window_is_bounded_lru(key):
    counters = Counters()
    opener = Opener(MESH, [key], counters, max_senders=2)
    sealers = {n: Sealer(MESH, [key], n, 1) for n in ("a", "b", "c")}
    first = sealers["a"].seal(PACKET)
    assert opener.open(first) and opener.open(sealers["b"].seal(PACKET))
    assert opener.open(sealers["a"].seal(PACKET))  # "a" is now the most recent
    assert opener.open(sealers["c"].seal(PACKET))  # evicts "b", the least recent
    assert len(opener.window) == 2
    assert dropped(opener, counters, first) == "replay"  # "a" was kept


# ------------------------------------------------------------------- keys


def test_generate_key_file_mode_and_round_trip(tmp_path):
    path = tmp_path / "fleet.key"
    k = generate_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_keys(path) == [k]
    assert k.key.hex() not in repr(k)
    assert [p.name for p in tmp_path.iterdir()] == ["fleet.key"]  # no temp file left


def test_generate_refuses_to_overwrite(tmp_path):
    path = tmp_path / "fleet.key"
    k = generate_key_file(path)
    with pytest.raises(KeyFileError, match="fleet.key"):
        generate_key_file(path)
    assert load_keys(path) == [k]
    assert generate_key_file(path, force=True) != k
    assert [p.name for p in tmp_path.iterdir()] == ["fleet.key"]


def test_rotation_old_key_still_opens(tmp_path):
    path = tmp_path / "fleet.key"
    old = generate_key_file(path)
    old_sealer = Sealer(MESH, load_keys(path), "pi-01", 1)
    write_key_file(path, [FleetKey.generate(), *load_keys(path)], force=True)
    keys = load_keys(path)
    assert keys[1] == old
    opener = Opener(MESH, keys, Counters())
    assert opener.open(old_sealer.seal(PACKET))
    new_sealer = Sealer(MESH, keys, "pi-02", 1)
    assert opener.open(new_sealer.seal(PACKET))
    old_only = Opener(MESH, [old], Counters())
    assert dropped(old_only, old_only.counters, new_sealer.seal(PACKET)) == "unknown_key"


K1 = "meshagent-fleet-key v1 " + "01" * 8 + " " + "aa" * 32
K2 = "meshagent-fleet-key v1 " + "02" * 8 + " " + "bb" * 32


@pytest.mark.parametrize(
    "text, mode, match",
    [
        (K1, 0o644, "mode 0644"),
        (K1, 0o640, "mode 0640"),
        ("# only a comment\n", 0o600, "no keys"),
        ("meshagent-fleet-key v2 " + K1.split(" ", 2)[2], 0o600, ":1: expected"),
        (K1 + "\ngarbage", 0o600, ":2: expected"),
        (K1[:-2], 0o600, "hex digits"),
        (K1.replace("aa", "zz"), 0o600, "hex digits"),
        (K1 + "\n" + K1, 0o600, "twice"),
        ("\xff\n", 0o600, "cannot read"),
    ],
)
def test_bad_key_files(tmp_path, text, mode, match):
    path = tmp_path / "fleet.key"
    path.write_bytes(text.encode("latin-1"))
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=match) as e:
        load_keys(path)
    assert str(path) in str(e.value)


def test_key_file_comments_and_order(tmp_path):
    path = tmp_path / "fleet.key"
    path.write_text(f"# fleet key, newest first\n\n{K2}\n  {K1}  \n")
    path.chmod(0o600)
    assert [k.kid for k in load_keys(path)] == [b"\x02" * 8, b"\x01" * 8]


def test_missing_key_file(tmp_path):
    with pytest.raises(KeyFileError, match="no such key file"):
        load_keys(tmp_path / "absent.key")
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_keys(tmp_path)


def test_configuration_errors(key):
    with pytest.raises(ValueError):
        Sealer(MESH, [], "pi-01", 1)
    with pytest.raises(ValueError):
        Opener(MESH, [], Counters())
    with pytest.raises(ValueError):
        Sealer("bad mesh", None, "pi-01", 1)
    with pytest.raises(ValueError):
        Opener("m" * (MAX_MESH_NAME + 1), None, Counters())
    with pytest.raises(ValueError):
        Sealer(MESH, None, "pi-01", -1)
    with pytest.raises(ValueError):
        FleetKey(b"short", b"k" * 32)


def test_purpose_binds_a_datagram_to_its_channel(key):
    """A mesh datagram replayed to the Raft channel (or the reverse) fails authentication."""
    raft_sealer = Sealer(MESH, [key], "pi-01", 1, purpose="raft")
    datagram = raft_sealer.seal(b"\x80")
    c = Counters()
    assert Opener(MESH, [key], c).open(datagram) is None and c.snapshot() == {"auth_failed": 1}
    assert Opener(MESH, [key], Counters(), purpose="raft").open(datagram) == ("pi-01", b"\x80")
    mesh_datagram = Sealer(MESH, [key], "pi-01", 1).seal(b"\x80")
    c = Counters()
    assert Opener(MESH, [key], c, purpose="raft").open(mesh_datagram) is None and c.snapshot() == {"auth_failed": 1}
