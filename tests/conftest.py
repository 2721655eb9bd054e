"""Test fixtures shared by every test module.

The real public samples live in the kit folder beside the checkout (``../shared/data``). In a
user's fresh clone that folder is absent: the tests that need it skip with a clear reason. CI
(``.ci/run``) sets ``FED_ECG_REQUIRE_KIT_DATA=1`` so that their absence is a failure instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SLOW_GROUP = "flower-processes"


def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n 2 --dist loadgroup`` (the README's test command) every ``slow`` test - a
    Flower simulation or a real SuperLink/SuperNode deployment - runs on one worker, one at a
    time, while the unit tests share the other: two deployments never compete for the cores,
    and their waits (heartbeats, deadlines) overlap with unit tests instead of idling."""
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.xdist_group(SLOW_GROUP))
KIT_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def kit_data() -> Path:
    """Path of the real public ECG samples (``../shared/data``), or skip/fail if absent."""
    if not (KIT_DATA / "README.md").is_file():
        msg = (
            f"real ECG samples not found at {KIT_DATA} (the kit folder beside the checkout); "
            "these tests read real PhysioNet files and cannot run without them"
        )
        if os.environ.get("FED_ECG_REQUIRE_KIT_DATA") == "1":
            pytest.fail(msg + " - FED_ECG_REQUIRE_KIT_DATA=1 makes this a failure")
        pytest.skip(msg)
    return KIT_DATA


@pytest.fixture(scope="module")
def synthetic_cache_root(tmp_path_factory):
    """``$FED_ECG_CACHE`` for one test module: its synthetic caches (and runs), not the user's."""
    root = tmp_path_factory.mktemp("fed-ecg-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FED_ECG_CACHE", str(root))
        yield root
