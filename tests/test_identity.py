"""Node identity: unique with equal hostnames, stable, overridable; the start counter."""

import logging
import re

import pytest

from agent.identity import IdentityError, boot_count, node_id

MACHINE_A = "0123456789abcdef0123456789abcdef"
MACHINE_B = "fedcba9876543210fedcba9876543210"


def machine_id(tmp_path, text, name="machine-id"):
    path = tmp_path / name
    path.write_text(text + "\n")
    return path


def test_same_hostname_different_machines_differ(tmp_path):
    a = node_id(tmp_path / "a", None, machine_id(tmp_path, MACHINE_A, "a-id"), hostname="raspberrypi")
    b = node_id(tmp_path / "b", None, machine_id(tmp_path, MACHINE_B, "b-id"), hostname="raspberrypi")
    assert a != b
    assert re.fullmatch(r"raspberrypi-[0-9a-f]{8}", a) and re.fullmatch(r"raspberrypi-[0-9a-f]{8}", b)
    assert MACHINE_A[:8] not in a  # a keyed hash: the id does not reveal the machine id


def test_without_machine_id_ids_are_random_but_kept(tmp_path):
    missing = tmp_path / "no-machine-id"
    a = node_id(tmp_path / "a", None, missing, hostname="raspberrypi")
    b = node_id(tmp_path / "b", None, machine_id(tmp_path, "uninitialized"), hostname="raspberrypi")
    assert a != b
    assert node_id(tmp_path / "a", None, missing, hostname="raspberrypi") == a


def test_stable_across_calls_and_host_renames(tmp_path):
    mid = machine_id(tmp_path, MACHINE_A)
    data = tmp_path / "data"
    first = node_id(data, None, mid, hostname="raspberrypi")
    assert node_id(data, None, mid, hostname="renamed") == first
    assert (data / "node-id").read_text().strip() == first


def test_lost_node_id_file_is_derived_again_the_same(tmp_path):
    mid = machine_id(tmp_path, MACHINE_A)
    first = node_id(tmp_path / "a", None, mid, hostname="pi")
    assert node_id(tmp_path / "b", None, mid, hostname="pi") == first


def test_hostname_is_sanitised(tmp_path):
    nid = node_id(tmp_path / "d", None, machine_id(tmp_path, MACHINE_A), hostname="My_Pi!.lan")
    assert re.fullmatch(r"my-pi-[0-9a-f]{8}", nid)
    assert node_id(tmp_path / "e", None, machine_id(tmp_path, MACHINE_A), hostname="__").startswith("node-")


def test_override_wins_and_is_not_stored(tmp_path):
    data = tmp_path / "data"
    assert node_id(data, "gateway-1", machine_id(tmp_path, MACHINE_A), hostname="pi") == "gateway-1"
    assert not (data / "node-id").exists()


def test_bad_override(tmp_path):
    with pytest.raises(IdentityError, match="not allowed"):
        node_id(tmp_path, "bad id", hostname="pi")


def test_corrupt_node_id_file_is_derived_again(tmp_path, caplog):
    mid = machine_id(tmp_path, MACHINE_A)
    expected = node_id(tmp_path / "ref", None, mid, hostname="pi")
    data = tmp_path / "data"
    data.mkdir()
    (data / "node-id").write_bytes(b"\xff not an id\n")
    with caplog.at_level(logging.WARNING):
        assert node_id(data, None, mid, hostname="pi") == expected
    assert "no valid node id" in caplog.text


def test_unwritable_data_dir_names_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for call in (lambda: node_id(blocker / "data", None, hostname="pi"), lambda: boot_count(blocker / "data")):
        with pytest.raises(IdentityError, match=re.escape(str(blocker / "data")) + ".*: Not a directory"):
            call()


def test_data_dir_created_private(tmp_path):
    data = tmp_path / "new" / "data"
    node_id(data, None, machine_id(tmp_path, MACHINE_A), hostname="pi")
    assert data.is_dir() and data.stat().st_mode & 0o007 == 0


def test_boot_count_increments(tmp_path):
    assert [boot_count(tmp_path / "d") for _ in range(3)] == [1, 2, 3]
    assert (tmp_path / "d" / "boot-count").read_text().strip() == "3"
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["boot-count"]  # no temp files left


@pytest.mark.parametrize("content", [b"", b"garbage", b"-4", b"\xff\xfe"])
def test_boot_count_survives_corruption(tmp_path, caplog, content):
    (tmp_path / "boot-count").write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert boot_count(tmp_path) == 1
    assert "corrupt" in caplog.text
    assert boot_count(tmp_path) == 2
