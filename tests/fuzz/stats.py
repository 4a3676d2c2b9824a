"""What a fuzzing campaign ran: a pytest plugin counting Hypothesis test cases per test.

``pytest --fuzz-report FILE`` (``make fuzz`` passes ``FUZZ_REPORT``) writes JSON: for each
test that ran Hypothesis, the test cases it executed (every phase: replay, generation,
shrinking), its outcome, wall and CPU time; and the totals. The counts come from Hypothesis's
own run statistics, the ones ``--hypothesis-show-statistics`` prints, so they are what ran,
not what was asked for (a small search space ends before ``max_examples``). Works under
pytest-xdist: each worker attaches its figures to the test's report, the controller writes.

Registered from tests/conftest.py, so ``make test`` carries it too (without writing a file).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Generator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import hypothesis
import pytest
from hypothesis import settings
from hypothesis.statistics import collector

PROPERTY = "natter_fuzz"
PROFILE_ENV = "HYPOTHESIS_PROFILE"
EXAMPLES_ENV = "NATTER_FUZZ_EXAMPLES"
DEFAULT_EXAMPLES = 200_000
"""Examples per fuzzer (weight 1) in the long campaign: five fuzzers at weight 1 and the
session fuzzer at 0.05 make 1,010,000 test cases, the issue's "at least 1,000,000"."""

T = TypeVar("T")


def campaign_examples() -> int:
    """Examples per fuzzer of weight 1 under ``make fuzz`` (``NATTER_FUZZ_EXAMPLES``)."""
    return int(os.environ.get(EXAMPLES_ENV, str(DEFAULT_EXAMPLES)))


def fuzz_budget(weight: float, **options: Any) -> Callable[[T], T]:
    """``@fuzz_budget(0.05)``: under the ``fuzz`` profile this fuzzer runs ``weight`` times
    the campaign's examples per fuzzer (a slow fuzzer, e.g. the over-socket session fuzzer,
    gets a fraction so the campaign ends in hours, not days); under ``ci`` (``make test``) the
    profile's short run, scaled the same way but never below 10. ``options`` are further
    Hypothesis settings: use this instead of ``@settings`` so the profile stays the parent."""
    if not 0 < weight <= 1:
        raise ValueError(f"a fuzz budget is a weight in (0, 1], got {weight}")
    base = settings.default.max_examples
    examples = max(1 if os.environ.get(PROFILE_ENV) == "fuzz" else 10, round(base * weight))
    return settings(settings.default, max_examples=examples, **options)  # type: ignore[return-value]


class CaseCounter:
    """Test cases of one pytest item, summed over every Hypothesis run it made (a
    parametrized or stateful test can run the engine more than once)."""

    def __init__(self, previous: Callable[[Mapping[str, Any]], None] | None) -> None:
        self.previous = previous
        self.runs = 0
        self.cases = 0
        self.valid = 0
        self.interesting = 0
        self.phases: dict[str, int] = {}
        self.stopped_because: list[str] = []

    def __call__(self, stats: Mapping[str, Any]) -> None:
        self.runs += 1
        for phase, figures in stats.items():
            if not phase.endswith("-phase") or not isinstance(figures, Mapping):
                continue
            cases = figures.get("test-cases", [])
            name = phase.removesuffix("-phase")
            self.phases[name] = self.phases.get(name, 0) + len(cases)
            self.cases += len(cases)
            for case in cases:
                status = case.get("status") if isinstance(case, Mapping) else None
                self.valid += status in ("valid", "interesting")
                self.interesting += status == "interesting"
        if reason := stats.get("stopped-because"):
            self.stopped_because.append(str(reason))
        if self.previous is not None:
            self.previous(stats)  # Hypothesis's own (--hypothesis-show-statistics)

    def figures(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "cases": self.cases,
            "valid_cases": self.valid,
            "failing_cases": self.interesting,
            "phases": self.phases,
            "stopped_because": self.stopped_because,
        }


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Inside Hypothesis's own wrapper, so this counter is the statistics collector; it
    passes each run's statistics on to Hypothesis's."""
    counter = CaseCounter(collector.value)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        with collector.with_value(counter):
            return (yield)
    finally:
        if counter.runs:
            figures = counter.figures()
            figures["wall_seconds"] = round(time.perf_counter() - wall, 3)
            figures["cpu_seconds"] = round(time.process_time() - cpu, 3)
            item.user_properties.append((PROPERTY, figures))


class FuzzReport:
    """A plugin of its own on the controller (or the only process): gathers the figures the
    tests' reports carry and writes the JSON at the end of the session."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.time()
        self.wall = time.perf_counter()
        self.fuzzers: dict[str, dict[str, Any]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Each phase reports (setup, call, teardown); the figures ride on all of them.
        figures = next((value for key, value in report.user_properties if key == PROPERTY), None)
        entry = self.fuzzers.get(report.nodeid)
        if entry is None:
            if figures is None and report.when != "call" and not report.failed:
                return
            entry = self.fuzzers[report.nodeid] = {"cases": 0, "outcome": "passed"}
        if figures is not None and report.when == "call":
            entry.update(figures)
        if report.when == "call" and report.skipped:
            entry["outcome"] = "skipped"
        if report.failed:
            entry["outcome"] = "failed"
            entry.setdefault("failures", []).append(
                {"when": report.when, "message": str(report.longrepr)[-4000:]}
            )

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        fuzzers = dict(sorted(self.fuzzers.items()))
        failures = [
            {"test": nodeid, **failure}
            for nodeid, entry in fuzzers.items()
            for failure in entry.get("failures", [])
        ]
        document = {
            "started": datetime.fromtimestamp(self.started, UTC).isoformat(timespec="seconds"),
            "profile": os.environ.get(PROFILE_ENV, "ci"),
            "examples_per_fuzzer": settings.default.max_examples,
            "hypothesis": hypothesis.__version__,
            "python": platform.python_version(),
            "workers": session.config.getoption("numprocesses", None) or 0,
            "total_cases": sum(entry.get("cases", 0) for entry in fuzzers.values()),
            "tests": len(fuzzers),
            "failed_tests": sum(entry["outcome"] == "failed" for entry in fuzzers.values()),
            "failures": failures,
            "wall_seconds": round(time.perf_counter() - self.wall, 1),
            "cpu_seconds": round(sum(e.get("cpu_seconds", 0.0) for e in fuzzers.values()), 1),
            "fuzzers": fuzzers,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-report",
        metavar="FILE",
        default=None,
        help="write the Hypothesis test cases run per test, failures, wall and CPU time as "
        "JSON to FILE (make fuzz: FUZZ_REPORT)",
    )


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("fuzz_report")
    if path and not hasattr(config, "workerinput"):  # the xdist controller or a lone pytest
        config.pluginmanager.register(FuzzReport(Path(path)), "natter-fuzz-report")
