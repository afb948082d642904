"""Transcript tests of the Raft core, in the style of etcd-io/raft's interaction tests.

Each file in tests/raft_transcripts/ is a script of harness commands
(`agent.sim.raft_harness`), each followed by `----` and the output it must
produce. Run with REWRITE=1 to regenerate the outputs after a deliberate
change, then read the diff: it is the behaviour change.
"""

import difflib
import os
from pathlib import Path

import pytest

from agent.sim.raft_harness import run_transcript

DIR = Path(__file__).parent / "raft_transcripts"
FILES = sorted(DIR.glob("*.txt"))


def test_there_are_transcripts():
    assert len(FILES) >= 12


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_transcript(path: Path):
    text = path.read_text()
    got = run_transcript(text)
    if os.environ.get("REWRITE") == "1":
        if got != text:
            path.write_text(got)
        return
    if got != text:
        diff = "".join(difflib.unified_diff(text.splitlines(True), got.splitlines(True), "golden", "now", n=2))
        pytest.fail(f"{path.name} differs from its golden output (REWRITE=1 regenerates it):\n{diff}")
