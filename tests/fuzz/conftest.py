"""Fuzzers (Hypothesis). ``make test`` runs a short pass of each (the ``ci`` profile);
``make fuzz`` runs the long campaign (``HYPOTHESIS_PROFILE=fuzz``, see docs/fuzzing.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.fuzz.stats import campaign_examples

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    max_examples=campaign_examples(),  # per fuzzer; @fuzz_budget(w) scales one by w
    deadline=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in tests/fuzz is a fuzzer for ``make fuzz`` (``-m fuzz``), marked or not."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.fuzz)
