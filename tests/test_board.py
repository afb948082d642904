"""`meshagent board` and the board readings, on fake /proc and /sys trees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent import board
from agent.cli import main
from agent.config import Thermal, load_config

FIRMWARE = "sys/devices/platform/soc/soc:firmware/get_throttled"
PI5_FIRMWARE = "sys/devices/platform/soc@107c000000/soc@107c000000:firmware/get_throttled"


def fake_pi(root: Path, model: str, temp_milli: int | None = None, throttled: str | None = None,
            firmware: str = FIRMWARE, mem_kb: int = 438_000) -> Path:
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_bytes(model.encode() + b"\0")
    (root / "proc/meminfo").write_text(f"MemTotal:       {mem_kb} kB\nMemFree:  1000 kB\n")
    if temp_milli is not None:
        (root / "sys/class/thermal/thermal_zone0").mkdir(parents=True)
        (root / "sys/class/thermal/thermal_zone0/temp").write_text(f"{temp_milli}\n")
    if throttled is not None:
        (root / firmware).parent.mkdir(parents=True)
        (root / firmware).write_text(throttled + "\n")
    return root


def loaded_for(root: Path, name: str | None = None):
    (root / "agent.toml").write_text("")
    return load_config(root / "agent.toml", board=name, model_path=root / "proc/device-tree/model")


def test_zero_detected_with_readings(tmp_path, capsys):
    fake_pi(tmp_path, "Raspberry Pi Zero 2 W Rev 1.0", temp_milli=51_234, throttled="0")
    (tmp_path / "agent.toml").write_text("")
    assert main(["board", "--config", str(tmp_path / "agent.toml"), "--sysroot", str(tmp_path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["board"] == "rpi-zero-2w" and d["model"] == "Raspberry Pi Zero 2 W Rev 1.0"
    assert "lists" in d["why"] and "proc/device-tree/model" in d["why"]
    assert d["serial_device"] == "/dev/ttyGS0" and d["serial_present"] is False
    assert d["timing"] == {"membership_profile": "slow", "probe_interval_ms": d["timing"]["probe_interval_ms"], "load_sample_interval_ms": 5000}
    assert d["thermal"]["temp_c"] == pytest.approx(51.234) and d["thermal"]["state"] == "ok"
    assert d["throttle"]["state"] == "ok" and d["throttle"]["word"] == "0x0"
    assert d["memory_total_mb"] == 438_000 // 1024 and d["budgets"]["max_rss_mb"] == 64


def test_pi5_firmware_file_found_where_it_lives_there(tmp_path):
    fake_pi(tmp_path, "Raspberry Pi 5 Model B Rev 1.0", temp_milli=82_000, throttled="80008", firmware=PI5_FIRMWARE)
    d = board.report(loaded_for(tmp_path), tmp_path)
    assert d["board"] == "rpi-5" and d["serial_device"] == "/dev/ttyAMA10"
    assert d["throttle"]["path"].endswith(PI5_FIRMWARE)
    assert d["throttle"]["state"] == "now: soft-temp-limit"
    assert d["thermal"]["state"] == "warn"


def test_unknown_model_explained_and_generic(tmp_path, capsys):
    fake_pi(tmp_path, "Raspberry Pi Model B Rev 2", temp_milli=40_000)
    (tmp_path / "agent.toml").write_text("")
    main(["board", "--config", str(tmp_path / "agent.toml"), "--sysroot", str(tmp_path)])
    out = capsys.readouterr().out
    assert "board        generic" in out
    assert "'Raspberry Pi Model B Rev 2', which no profile lists" in out
    assert "not read on this board" in out  # generic has no firmware flags to read


def test_flag_named_and_device_model_shown(tmp_path):
    fake_pi(tmp_path, "Raspberry Pi 4 Model B Rev 1.4")
    d = board.report(loaded_for(tmp_path, "rpi-3b-plus"), tmp_path)
    assert d["board"] == "rpi-3b-plus"
    assert d["why"] == "chosen with --board rpi-3b-plus (the device says 'Raspberry Pi 4 Model B Rev 1.4')"


def test_no_device_tree(tmp_path):
    (tmp_path / "agent.toml").write_text("")
    loaded = load_config(tmp_path / "agent.toml", model_path=tmp_path / "proc/device-tree/model")
    d = board.report(loaded, tmp_path)
    assert d["board"] == "generic" and d["why"].startswith("no /proc/device-tree/model")
    assert d["thermal"]["state"] == "unknown" and d["throttle"]["state"] == "unknown"


def test_serial_device_present(tmp_path):
    fake_pi(tmp_path, "Raspberry Pi 4 Model B Rev 1.1")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/serial0").write_text("")
    assert board.report(loaded_for(tmp_path), tmp_path)["serial_present"] is True


@pytest.mark.parametrize("word, state", [
    (None, "unknown"),
    (0, "ok"),
    (0x50005, "now: under-voltage, throttled"),
    (0x50000, "since boot: under-voltage, throttled"),
    (0x20002, "now: freq-capped"),
])
def test_throttle_state(word, state):
    assert board.throttle_state(word) == state


@pytest.mark.parametrize("temp, state", [(None, "unknown"), (59.9, "ok"), (60.0, "warn"), (79.9, "warn"), (80.0, "critical")])
def test_thermal_state(temp, state):
    assert board.thermal_state(temp, Thermal(60.0, 80.0)) == state


def test_garbage_sysfs_reads_as_unknown(tmp_path):
    fake_pi(tmp_path, "Raspberry Pi 4 Model B Rev 1.4", throttled="not hex")
    (tmp_path / "sys/class/thermal/thermal_zone0").mkdir(parents=True)
    (tmp_path / "sys/class/thermal/thermal_zone0/temp").write_text("9999999\n")  # 9999 °C: a glitch
    d = board.report(loaded_for(tmp_path), tmp_path)
    assert d["throttle"]["state"] == "unknown" and d["thermal"]["temp_c"] is None


def test_unknown_board_flag_is_a_config_error(tmp_path, capsys):
    assert main(["board", "--board", "rpi-6", "--sysroot", str(tmp_path)]) == 1
    assert "board = \"rpi-6\"" in capsys.readouterr().err


def test_agent_logs_each_thermal_crossing_once(tmp_path, caplog):
    from agent.io.load import Load
    from agent.node import Agent, Identity

    loaded = load_config(tmp_path / "none.toml", board="rpi-4b", flags={
        "node.bind": "127.0.0.39", "node.port": 56919, "node.data_dir": tmp_path / "d", "discovery.mdns": False,
        "node.insecure": True, "consensus.enabled": False, "tasks.enabled": False})
    agent = Agent(loaded.config, Identity("n", 1), None)
    caplog.set_level("INFO", logger="meshagent")
    for temp in (50.0, 81.0, 82.0, 86.0, 86.5, 60.0, 61.0):
        agent._watch_board(Load(cpu=1.0, mem=1.0, load1=0.1, temp_c=temp, throttled=0))
    lines = [r.getMessage() for r in caplog.records if "CPU temperature" in r.getMessage()]
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == ["warn", "critical", "ok"]
    assert "warn 80, critical 85" in lines[0]


def test_board_named_in_the_config_file(tmp_path):
    fake_pi(tmp_path, "Raspberry Pi 4 Model B Rev 1.4")
    (tmp_path / "agent.toml").write_text('[node]\nboard = "rpi-5"\n')
    loaded = load_config(tmp_path / "agent.toml", model_path=tmp_path / "proc/device-tree/model")
    assert loaded.config.board.name == "rpi-5" and loaded.sources["board.name"] == f"file:{tmp_path / 'agent.toml'}"
    assert board.why(loaded, tmp_path).startswith(f"chosen with node.board = 'rpi-5' in {tmp_path / 'agent.toml'}")
    flag = load_config(tmp_path / "agent.toml", board="rpi-4b", model_path=tmp_path / "proc/device-tree/model")
    assert flag.config.board.name == "rpi-4b"  # --board wins over the file


def test_unknown_board_in_the_file_names_the_key(tmp_path):
    from agent.config import ConfigError

    (tmp_path / "agent.toml").write_text('[node]\nboard = "rpi-4"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "agent.toml")
    e = caught.value
    assert e.key == "node.board" and e.value == "rpi-4" and "did you mean rpi-4b" in str(e) and str(tmp_path) in e.source
