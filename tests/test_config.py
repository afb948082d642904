"""Configuration: precedence with sources, every kind of error, boards, the generated doc."""

import json
from dataclasses import fields
from pathlib import Path

import pytest

from agent.config import (
    FIELDS,
    HANDLER_FIELDS,
    ConfigError,
    HandlerConfig,
    TasksConfig,
    known_boards,
    load_config,
    config_as_dict,
    format_config,
    markdown_reference,
    parse_seed,
)
from agent.core.settings import PROFILES

SHIPPED = ["generic", "rpi-3b-plus", "rpi-4b", "rpi-5", "rpi-zero-2w"]


@pytest.fixture
def no_model(tmp_path):
    return tmp_path / "no-model"


def write(tmp_path, text, name="agent.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path, text="", **kw):
    kw.setdefault("model_path", tmp_path / "no-model")
    return load_config(write(tmp_path, text), **kw)


def error(tmp_path, text="", **kw) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text, **kw)
    return e.value


def test_defaults_without_a_file(tmp_path, no_model):
    loaded = load_config(tmp_path / "absent.toml", model_path=no_model)
    c = loaded.config
    assert c.node.port == 5683 and c.node.id == "" and c.node.data_dir == Path("/var/lib/meshagent")
    assert c.discovery.seeds == () and c.discovery.mdns is True
    assert c.membership == PROFILES["lan"] and c.membership_profile == "lan"
    assert c.board.name == "generic"
    assert loaded.sources["node.port"] == "default"
    assert loaded.sources["membership.tick_ms"] == "profile:lan"
    assert loaded.sources["board.name"] == "default"


def test_precedence_default_board_file_flag(tmp_path):
    text = "[node]\nport = 6000\nmesh = \"farm\"\n[load]\nsample_interval_ms = 3000\n"
    loaded = load(tmp_path, text, board="rpi-zero-2w", flags={"node.port": 7000, "node.id": None})
    c, src = loaded.config, loaded.sources
    assert (c.node.port, src["node.port"]) == (7000, "flag")
    assert (c.node.mesh, src["node.mesh"]) == ("farm", f"file:{tmp_path / 'agent.toml'}")
    assert (c.load.sample_interval_ms, src["load.sample_interval_ms"]) == (3000, f"file:{tmp_path / 'agent.toml'}")
    assert (c.membership_profile, src["membership.profile"]) == ("slow", "board:rpi-zero-2w")
    assert (c.membership.tick_ms, src["membership.tick_ms"]) == (PROFILES["slow"].tick_ms, "profile:slow")
    assert (c.node.bind, src["node.bind"]) == ("0.0.0.0", "default")
    assert (c.node.id, src["node.id"]) == ("", "default")  # a None flag was not given
    assert src["board.name"] == "flag" and src["board.models"] == "board:rpi-zero-2w"


def test_profile_from_file_keeps_fields_set_by_board(tmp_path):
    loaded = load(tmp_path, '[membership]\nprofile = "coordinator"\n', board="rpi-zero-2w")
    m = loaded.config.membership
    assert m.probe_interval_ms == PROFILES["coordinator"].probe_interval_ms
    assert (m.max_members, loaded.sources["membership.max_members"]) == (256, "board:rpi-zero-2w")


def test_values_are_converted(tmp_path):
    text = '[node]\ndata_dir = "/srv/mesh"\ncapabilities = ["camera"]\n[load]\nsmoothing = 1\n'
    c = load(tmp_path, text).config
    assert c.node.data_dir == Path("/srv/mesh") and c.node.capabilities == ("camera",)
    assert c.load.smoothing == 1.0 and isinstance(c.load.smoothing, float)


def test_out_of_range_message(tmp_path):
    e = error(tmp_path, "[node]\nport = 70000\n")
    path = tmp_path / "agent.toml"
    assert str(e) == f"config error: node.port = 70000 (from file:{path}): expected an integer from 1 to 65535"
    assert (e.key, e.value, e.allowed) == ("node.port", 70000, "an integer from 1 to 65535")


@pytest.mark.parametrize(
    "text, key, value, allowed",
    [
        ('[node]\nport = "5683"\n', "node.port", "5683", "an integer from 1 to 65535"),
        ("[node]\nport = true\n", "node.port", True, "an integer from 1 to 65535"),
        ("[membership]\ntick_ms = true\n", "membership.tick_ms", True, "an integer from 10 to 1000"),
        ("[node]\ninsecure = 1\n", "node.insecure", 1, "true or false"),
        ("[load]\nsmoothing = 0\n", "load.smoothing", 0, "a number above 0 and at most 1"),
        ("[load]\nchange_threshold_pct = nan\n", "load.change_threshold_pct", None, "a number from 0 to 100"),
        ('[node]\nmesh = "Farm"\n', "node.mesh", "Farm", "1-32 lowercase letters"),
        ('[node]\nid = "-x"\n', "node.id", "-x", "starting with a letter or digit"),
        ('[node]\nbind = "localhost"\n', "node.bind", "localhost", "IPv4 or IPv6"),
        ('[node]\nadvertise = "0.0.0.0"\n', "node.advertise", "0.0.0.0", "unicast"),
        ('[node]\ndata_dir = "var/lib"\n', "node.data_dir", "var/lib", "an absolute path"),
        ('[node]\ncapabilities = ["gpu", "GPU"]\n', "node.capabilities", "GPU", "each 1-32 of a-z"),
        ('[node]\ncapabilities = ["gpu", "gpu"]\n', "node.capabilities", "gpu", "distinct"),
        ('[log]\nlevel = "verbose"\n', "log.level", "verbose", "one of debug, info, warning, error"),
        ('[membership]\nprofile = "fast"\n', "membership.profile", "fast", "one of lan, coordinator, slow"),
        ('[discovery]\nseeds = ["fe80::1"]\n', "discovery.seeds", "fe80::1", "HOST[:PORT]"),
        ('[discovery]\nseeds = ["10.0.0.1:0"]\n', "discovery.seeds", "10.0.0.1:0", "HOST[:PORT]"),
    ],
)
def test_bad_value_names_key_value_and_allowed(tmp_path, text, key, value, allowed):
    e = error(tmp_path, text)
    assert e.key == key and allowed in e.allowed and e.source == f"file:{tmp_path / 'agent.toml'}"
    if value is not None:
        assert e.value == value and type(e.value) is type(value)
    assert key in str(e) and allowed in str(e)


@pytest.mark.parametrize(
    "text, key, hint",
    [
        ("[node]\nprot = 1\n", "node.prot", "did you mean node.port?"),
        ("[node]\nseeds = []\n", "node.seeds", "did you mean discovery.seeds?"),
        ("[node]\nzzz = 1\n", "node.zzz", "known: id, mesh"),
        ("[nod]\nport = 1\n", "nod", "unknown section; did you mean node?"),
        ("[board]\nname = \"rpi-5\"\n", "board", "unknown section"),
        ("port = 1\n", "port", "did you mean node.port?"),
    ],
)
def test_unknown_keys_and_sections(tmp_path, text, key, hint):
    e = error(tmp_path, text)
    assert e.key == key and hint in str(e)


def test_unknown_flag(tmp_path):
    e = error(tmp_path, flags={"discovery.seed": ["a"]})
    assert (e.key, e.source) == ("discovery.seed", "flag") and "did you mean discovery.seeds?" in str(e)


def test_flag_values_are_checked(tmp_path):
    e = error(tmp_path, flags={"node.port": "80"})
    assert (e.key, e.value, e.source) == ("node.port", "80", "flag")


def test_missing_explicit_file(tmp_path, no_model):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nope.toml", explicit_path=True, model_path=no_model)
    assert e.value.value == str(tmp_path / "nope.toml") and "no such file" in str(e.value)


def test_invalid_toml(tmp_path):
    assert "not valid TOML" in str(error(tmp_path, "[node\n"))


def test_unknown_board(tmp_path):
    e = error(tmp_path, board="rpi-6")
    assert e.key == "board" and e.value == "rpi-6"
    assert all(name in e.allowed for name in SHIPPED)


@pytest.mark.parametrize(
    "text, key, source",
    [
        ("[membership]\nprobe_timeout_ms = 1000\n", "membership.probe_timeout_ms", "FILE"),
        ("[membership]\njoin_retry_min_ms = 40000\n", "membership.join_retry_max_ms", "profile:lan"),
        ("[load]\nmeta_refresh_ms = 1000\n", "load.meta_refresh_ms", "FILE"),
    ],
)
def test_cross_field_checks(tmp_path, text, key, source):
    e = error(tmp_path, text)
    assert e.key == key and e.source == source.replace("FILE", f"file:{tmp_path / 'agent.toml'}")


def test_members_above_board_budget(tmp_path):
    e = error(tmp_path, "[membership]\nmax_members = 1000\n", board="rpi-zero-2w")
    assert e.key == "membership.max_members" and "rpi-zero-2w" in e.allowed


@pytest.mark.parametrize(
    "model, board",
    [
        (b"Raspberry Pi 4 Model B Rev 1.4\0", "rpi-4b"),
        (b"Raspberry Pi Zero 2 W Rev 1.0\0", "rpi-zero-2w"),
        (b"Raspberry Pi 5 Model B Rev 1.0", "rpi-5"),
        (b"Raspberry Pi 400 Rev 1.0\0", "rpi-4b"),
        (b"Raspberry Pi 3 Model B Rev 1.2\0", "rpi-3b-plus"),
        (b"Raspberry Pi Model B Rev 2\0", "generic"),
        (b"", "generic"),
    ],
)
def test_board_detected_from_model(tmp_path, model, board):
    (tmp_path / "model").write_bytes(model)
    loaded = load(tmp_path, model_path=tmp_path / "model")
    assert loaded.config.board.name == board
    assert loaded.sources["board.name"] == ("default" if board == "generic" else f"detected:{tmp_path / 'model'}")


def test_board_flag_beats_detection(tmp_path):
    (tmp_path / "model").write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\0")
    assert load(tmp_path, board="rpi-5", model_path=tmp_path / "model").config.board.name == "rpi-5"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_board_loads_and_is_detected(tmp_path, name):
    assert known_boards() == SHIPPED
    board = load(tmp_path, board=name).config.board
    assert board.name == name and board.budgets.max_rss_mb > 0
    for model in board.models:
        (tmp_path / "model").write_bytes(model.encode() + b" Rev 1.1\0")
        assert load(tmp_path, model_path=tmp_path / "model").config.board == board


def test_serial_devices():
    boards = {name: load_config(Path("/nonexistent"), board=name).config.board for name in SHIPPED}
    assert boards["rpi-5"].serial_device == "/dev/ttyAMA10" and boards["rpi-zero-2w"].serial_device == "/dev/ttyGS0"
    assert boards["rpi-4b"].serial_device == "/dev/serial0" and boards["generic"].serial_device == ""


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10.0.0.2", ("10.0.0.2", 5683)),
        ("10.0.0.2:6000", ("10.0.0.2", 6000)),
        ("[fd00::2]", ("fd00::2", 5683)),
        ("[fe80::1%eth0]:5684", ("fe80::1%eth0", 5684)),
        ("hub.local", ("hub.local", 5683)),
        ("pi-3:1", ("pi-3", 1)),
    ],
)
def test_parse_seed(text, expected):
    assert parse_seed(text) == expected


@pytest.mark.parametrize("text", ["fe80::1", "[10.0.0.1]", "[fd00::2]x", "host:", "host:65536", "1.2.3.256", "-bad-", "", "a..b"])
def test_parse_seed_rejects(text):
    with pytest.raises(ConfigError) as e:
        parse_seed(text)
    assert e.value.key == "discovery.seeds" and e.value.value == text


def test_format_and_dict(tmp_path):
    loaded = load(tmp_path, '[discovery]\nseeds = ["hub.local"]\n', flags={"node.port": 7000})
    lines = format_config(loaded).splitlines()
    assert any(line.startswith("node.port = 7000") and line.endswith("# flag") for line in lines)
    assert any(line.startswith('discovery.seeds = ["hub.local"]') and "# file:" in line for line in lines)
    sections = [line.split(".")[0] for line in lines if line]
    assert list(dict.fromkeys(sections)) == ["board", "node", "discovery", "membership", "load", "api", "consensus", "log", "console", "tasks"]
    assert len(lines) - len(sections) == 9  # one blank line between sections
    data = json.loads(json.dumps(config_as_dict(loaded)))
    assert data["config"]["node"]["port"] == 7000 and data["config"]["discovery"]["seeds"] == ["hub.local"]
    assert data["config"]["board"]["budgets"]["max_members"] == 1024
    assert data["sources"]["node.port"] == "flag"


def test_every_field_documented(tmp_path):
    c = load(tmp_path).config
    sections = ("node", "discovery", "membership", "load", "api", "consensus", "log", "console", "tasks")
    expected = {"membership.profile"} | {f"{s}.{f.name}" for s in sections for f in fields(getattr(c, s))}
    assert set(FIELDS) == expected


def test_committed_doc_is_generated():
    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == markdown_reference(), "run: python -m agent.config --markdown > docs/configuration.md"


@pytest.mark.parametrize("text, expected", [
    ('voters = "auto"', "auto"),
    ('voters = ["pi-1", "pi-2", "pi-3"]', ("pi-1", "pi-2", "pi-3")),
])
def test_consensus_voters(tmp_path, text, expected):
    assert load(tmp_path, f"[consensus]\n{text}\n").config.consensus.voters == expected


@pytest.mark.parametrize("text, why", [
    ('voters = "everyone"', 'a string other than "auto"'),
    ("voters = []", "an empty list"),
    ('voters = ["pi-1", "pi-1"]', "listed twice"),
    ('voters = ["a", "b", "c", "d", "e", "f", "g", "h"]', "list of 1-7"),
    ('voters = ["bad id!"]', "node id"),
])
def test_consensus_voters_refused(tmp_path, text, why):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, f"[consensus]\n{text}\n")
    assert "consensus.voters" in str(e.value) and why in str(e.value)


def test_consensus_heartbeat_must_be_shorter_than_the_election_timeout(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, "[consensus]\nheartbeat_ticks = 8\nelection_ticks = 8\n")
    assert "consensus.heartbeat_ticks" in str(e.value) and "less than consensus.election_ticks (8)" in str(e.value)


# ---------------------------------------------------------------- [tasks]


def test_tasks_defaults(tmp_path):
    loaded = load(tmp_path)
    assert loaded.config.tasks == TasksConfig()
    t = loaded.config.tasks
    assert (t.enabled, t.slots, t.strategy, t.replicas, t.idle, t.overload) == (True, 0, "capability", 3, 0.3, 0.8)
    assert t.bid_weights == (0.4, 0.3, 0.2, 0.1) and loaded.sources["tasks.bid_weights"] == "default"
    assert loaded.config.handlers == ()


def test_tasks_from_the_file(tmp_path):
    text = '[tasks]\nstrategy = "auction"\nslots = 4\nbid_weights = [1, 0, 0, 0]\nidle = 0\n'
    loaded = load(tmp_path, text)
    t = loaded.config.tasks
    assert (t.strategy, t.slots, t.idle) == ("auction", 4, 0.0)
    assert t.bid_weights == (1.0, 0.0, 0.0, 0.0) and all(type(w) is float for w in t.bid_weights)
    assert loaded.sources["tasks.slots"] == f"file:{tmp_path / 'agent.toml'}"


@pytest.mark.parametrize(
    "text, key, value, allowed",
    [
        ('strategy = "random"', "tasks.strategy", "random", "one of capability, auction, hash"),
        ("replicas = 8", "tasks.replicas", 8, "an integer from 1 to 7"),
        ("slots = -1", "tasks.slots", -1, "an integer from 0 to 256"),
        ("match_threshold = 1.5", "tasks.match_threshold", 1.5, "a number from 0 to 1"),
        ("bid_weights = [0.5, 0.5, 0.5, 0.5]", "tasks.bid_weights", [0.5, 0.5, 0.5, 0.5], "sum to 1"),
        ("bid_weights = [0.5, 0.5]", "tasks.bid_weights", [0.5, 0.5], "4 numbers"),
        ("bid_weights = [1.5, -0.5, 0, 0]", "tasks.bid_weights", 1.5, "from 0 to 1"),
        ("bid_weights = [true, 0, 0, 0]", "tasks.bid_weights", True, "4 numbers"),
        ("bid_timeout_ms = 5", "tasks.bid_timeout_ms", 5, "an integer from 10 to 60000"),
        ("steal = 1", "tasks.steal", 1, "true or false"),
        ("max_queue = 0", "tasks.max_queue", 0, "an integer from 1 to 1000000"),
    ],
)
def test_tasks_bad_values(tmp_path, text, key, value, allowed):
    e = error(tmp_path, f"[tasks]\n{text}\n")
    assert (e.key, e.value) == (key, value) and allowed in str(e)


def test_bid_weights_sum_allows_rounding(tmp_path):
    weights = load(tmp_path, "[tasks]\nbid_weights = [0.3333, 0.3333, 0.3333, 0.0]\n").config.tasks.bid_weights
    assert weights == (0.3333, 0.3333, 0.3333, 0.0)
    assert "they sum to 0.998" in str(error(tmp_path, "[tasks]\nbid_weights = [0.333, 0.333, 0.332, 0.0]\n"))


@pytest.mark.parametrize("text", ["idle = 0.8", "idle = 0.9", "overload = 0.2"])
def test_idle_must_be_below_overload(tmp_path, text):
    e = error(tmp_path, f"[tasks]\n{text}\n")
    t = TasksConfig()
    idle = float(text.split("= ")[1]) if text.startswith("idle") else t.idle
    overload = float(text.split("= ")[1]) if text.startswith("overload") else t.overload
    assert (e.key, e.value) == ("tasks.idle", idle)
    assert f"tasks.idle = {idle}" in str(e) and f"less than tasks.overload ({overload})" in str(e)


def test_cpu_scope(tmp_path):
    assert load(tmp_path).config.load.cpu_scope == "host"
    assert load(tmp_path, '[load]\ncpu_scope = "tree"\n').config.load.cpu_scope == "tree"
    assert "one of host, tree" in str(error(tmp_path, '[load]\ncpu_scope = "process"\n'))


# ------------------------------------------------------------- [handlers.NAME]

HANDLERS = """
[handlers.transcode]
command = ["ffmpeg", "-i", "{input}"]
env = { LANG = "C.UTF-8", FFREPORT = "level=32" }
cwd = "/srv/media"
timeout_s = 600

[handlers."resize.v2"]
command = ["/usr/local/bin/resize"]
"""


def test_handlers_are_read_with_defaults(tmp_path):
    handlers = load(tmp_path, HANDLERS).config.handlers
    assert handlers == (
        HandlerConfig("transcode", ("ffmpeg", "-i", "{input}"), (("LANG", "C.UTF-8"), ("FFREPORT", "level=32")), "/srv/media", 600, 1),
        HandlerConfig("resize.v2", ("/usr/local/bin/resize",)),
    )
    assert handlers[1].timeout_s == 300 and handlers[1].concurrency == 1 and handlers[1].cwd == "" and handlers[1].env == ()


def test_handlers_in_config_show(tmp_path):
    loaded = load(tmp_path, HANDLERS)
    path = tmp_path / "agent.toml"
    lines = format_config(loaded).splitlines()
    assert f'handlers.transcode.command = ["ffmpeg", "-i", "{{input}}"]   # file:{path}' in lines
    shown = {line.split(" = ")[0]: line for line in lines if line.startswith("handlers.")}
    assert list(shown) == [f"handlers.{n}.{f}" for n in ("transcode", "resize.v2") for f in HANDLER_FIELDS]
    assert 'env = {LANG = "C.UTF-8", FFREPORT = "level=32"}' in shown["handlers.transcode.env"]
    assert shown["handlers.resize.v2.timeout_s"].startswith("handlers.resize.v2.timeout_s = 300 ")
    assert shown["handlers.resize.v2.timeout_s"].endswith("# default")
    assert lines[lines.index(shown["handlers.resize.v2.command"]) - 1] == ""  # each handler its own block
    data = json.loads(json.dumps(config_as_dict(loaded)))
    assert data["config"]["handlers"]["transcode"] == {
        "command": ["ffmpeg", "-i", "{input}"], "env": {"LANG": "C.UTF-8", "FFREPORT": "level=32"},
        "cwd": "/srv/media", "timeout_s": 600, "concurrency": 1,
    }
    assert data["config"]["handlers"]["resize.v2"]["command"] == ["/usr/local/bin/resize"]
    assert data["sources"]["handlers.transcode.cwd"] == f"file:{path}"
    assert data["sources"]["handlers.transcode.concurrency"] == "default"


def test_a_shell_string_command_is_refused(tmp_path):
    e = error(tmp_path, '[handlers.transcode]\ncommand = "ffmpeg -i \'my file.mp4\'"\n')
    assert (e.key, e.value) == ("handlers.transcode.command", "ffmpeg -i 'my file.mp4'")
    assert "a list of strings (argv), never a shell string" in str(e)
    assert 'write it as ["ffmpeg", "-i", "my file.mp4"]' in str(e)
    assert e.source == f"file:{tmp_path / 'agent.toml'}"


@pytest.mark.parametrize(
    "table, key, value, why",
    [
        ("command = []", "handlers.h.command", [], "a list of strings (argv)"),
        ('command = ["", "x"]', "handlers.h.command", "", "the program is empty"),
        ('command = ["a", 1]', "handlers.h.command", 1, "a list of strings (argv)"),
        ("command = [" + ", ".join(['"a"'] * 65) + "]", "handlers.h.command", ["a"] * 65, "up to 63 arguments"),
        ('command = ["a"]\nenv = { lang = "C" }', "handlers.h.env", "lang", "a bad variable name"),
        ('command = ["a"]\nenv = { LANG = 1 }', "handlers.h.env", 1, "the value of LANG"),
        ('command = ["a"]\nenv = { LANG = "' + "x" * 1025 + '" }', "handlers.h.env", "x" * 1025, "at most 1024 characters"),
        ('command = ["a"]\nenv = "LANG=C"', "handlers.h.env", "LANG=C", "a table of at most 32"),
        ('command = ["a"]\ncwd = "media"', "handlers.h.cwd", "media", "an absolute path"),
        ('command = ["a"]\ntimeout_s = 0', "handlers.h.timeout_s", 0, "an integer from 1 to 86400"),
        ('command = ["a"]\nconcurrency = 65', "handlers.h.concurrency", 65, "an integer from 1 to 64"),
        ('command = ["a"]\nconcurency = 2', "handlers.h.concurency", 2, "did you mean handlers.h.concurrency?"),
        ("timeout_s = 5", "handlers.h.command", None, "missing: every handler needs a command"),
    ],
)
def test_bad_handler_fields(tmp_path, table, key, value, why):
    e = error(tmp_path, f"[handlers.h]\n{table}\n")
    assert (e.key, e.value) == (key, value) and why in str(e)
    assert e.source == f"file:{tmp_path / 'agent.toml'}"


def test_too_many_env_variables(tmp_path):
    env = ", ".join(f'V{i} = "x"' for i in range(33))
    e = error(tmp_path, f'[handlers.h]\ncommand = ["a"]\nenv = {{ {env} }}\n')
    assert e.key == "handlers.h.env" and "at most 32" in str(e)


@pytest.mark.parametrize(
    "text, key, why",
    [
        ('[handlers.Transcode]\ncommand = ["a"]\n', "handlers.Transcode", "1-32 of a-z 0-9 _ . -"),
        ('[handlers.sleep]\ncommand = ["a"]\n', "handlers.sleep", "reserved: sleep is a built-in handler"),
        ('[handlers.echo]\ncommand = ["a"]\n', "handlers.echo", "reserved"),
        ('[handlers]\ntranscode = ["ffmpeg"]\n', "handlers.transcode", "a table [handlers.transcode] with command"),
        ('handlers = "ffmpeg"\n', "handlers", "tables [handlers.NAME]"),
        ('[handler.x]\ncommand = ["a"]\n', "handler", "did you mean handlers?"),
        ('[tasks]\ncommand = ["a"]\n', "tasks.command", "did you mean handlers.NAME.command?"),
    ],
)
def test_bad_handler_tables(tmp_path, text, key, why):
    e = error(tmp_path, text)
    assert e.key == key and why in str(e)


def test_at_most_32_handlers(tmp_path):
    tables = "".join(f'[handlers.h{i}]\ncommand = ["a"]\n' for i in range(32))
    assert len(load(tmp_path, tables).config.handlers) == 32
    e = error(tmp_path, tables + '[handlers.one-too-many]\ncommand = ["a"]\n')
    assert e.key == "handlers" and "33 handlers, at most 32" in str(e)


def test_handlers_come_from_the_file_only(tmp_path):
    e = error(tmp_path, flags={"handlers.h.command": ["a"]})
    assert e.key == "handlers.h.command" and e.source == "flag"


def test_doc_describes_handlers():
    doc = markdown_reference()
    section = doc[doc.index("## [handlers.NAME]"):doc.index("Values are also checked")]
    for name in HANDLER_FIELDS:
        assert f"| `{name}` |" in section
    assert "| `timeout_s` | integer | s | `300` |" in section and "| `env` | table |  | `{}` |" in section
    assert "[handlers.transcode]" in section and "| `command` | list of strings |  | required |" in section
    assert "`tasks.idle` must be below `tasks.overload`" in doc
