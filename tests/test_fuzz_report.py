"""The `make fuzz` report (tests/fuzz/stats.py): Hypothesis test cases counted per test, in
one process and under pytest-xdist, failures kept with their falsifying example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FUZZERS = """
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

@settings(max_examples=37, database=None)
@given(st.integers())
def test_counted(x):
    pass

@settings(max_examples=50, database=None)
@given(st.integers(0, 10**9))
def test_failing(x):
    assert x < 1000

class Machine(RuleBasedStateMachine):
    @rule(x=st.integers())
    def step(self, x):
        pass

Machine.TestCase.settings = settings(max_examples=11, stateful_step_count=3, database=None)
TestMachine = Machine.TestCase

def test_not_hypothesis():
    pass
"""


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist"])
def test_report_counts_cases_and_failures(tmp_path: Path, workers: list[str]) -> None:
    if workers:
        pytest.importorskip("xdist", reason="pytest-xdist is not installed (the test extra)")
    (tmp_path / "test_fuzzers.py").write_text(FUZZERS)
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYPOTHESIS_PROFILE": "ci"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.fuzz.stats"]
        + ["--rootdir", str(tmp_path), "--fuzz-report", str(report), *workers, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1, run.stdout + run.stderr  # test_failing fails
    document = json.loads(report.read_text())
    fuzzers = {name.split("::", 1)[1]: entry for name, entry in document["fuzzers"].items()}
    assert fuzzers["test_counted"]["valid_cases"] == 37
    assert fuzzers["test_counted"]["outcome"] == "passed"
    assert fuzzers["TestMachine::runTest"]["valid_cases"] == 11
    assert fuzzers["test_not_hypothesis"] == {"cases": 0, "outcome": "passed"}
    assert fuzzers["test_failing"]["outcome"] == "failed"
    assert fuzzers["test_failing"]["failing_cases"] >= 1
    (failure,) = document["failures"]
    assert failure["test"].endswith("::test_failing") and "x=1000" in failure["message"]
    assert document["failed_tests"] == 1 and document["tests"] == 4
    assert document["total_cases"] == sum(entry["cases"] for entry in fuzzers.values())
    assert document["workers"] == (2 if workers else 0)
    assert document["cpu_seconds"] >= 0 and document["wall_seconds"] > 0
