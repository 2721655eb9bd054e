"""FedTrimmedAvg must trim at least one site update at each end, or the run config is refused."""

from __future__ import annotations

import pytest

from shared.federation.run_config import ConfigError, load_run_config

BASE = {"model": "hierarchical", "preset": "tiny", "strategy": "fedtrimmedavg", "sites": "ptb,ptbxl,mimic,cinc"}


def test_a_beta_that_trims_nobody_is_refused():
    # four sites, a round may aggregate 3 replies (the default majority): int(0.2 x 3) = 0
    with pytest.raises(ConfigError, match=r"trimmed-beta = 0.2 is invalid: .*trim nobody.*>= 0.333"):
        load_run_config({**BASE, "trimmed-beta": 0.2})
    with pytest.raises(ConfigError, match="trim nobody"):
        load_run_config({**BASE, "trimmed-beta": 0.3, "min-replies": 3})


def test_a_beta_that_trims_one_site_is_accepted():
    cfg = load_run_config({**BASE, "trimmed-beta": 0.34})
    assert int(cfg.trimmed_beta * cfg.min_replies) == 1
    cfg = load_run_config({**BASE, "trimmed-beta": 0.25, "min-replies": 4})
    assert int(cfg.trimmed_beta * cfg.min_replies) == 1
    load_run_config({**BASE, "strategy": "fedavg", "trimmed-beta": 0.2})  # other strategies ignore it
