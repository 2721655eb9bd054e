"""What a federation prints by default: the project's own lines, not third-party noise.

Run config ``verbose = false`` (the default) turns off, in the process that calls these:

* Flower's INFO log (the strategy's per-round dumps of every aggregated MetricRecord, sampling
  and "Received N results" lines); Flower's warnings and errors still show;
* warnings that say nothing about this run: pandas deprecations raised inside wfdb, Ray's
  future-behaviour tips, and Opacus's "Secure RNG turned off" notice (the run's DP settings are
  in its own round lines and table).

``verbose = true`` leaves everything as the libraries print it. Flower-free: Flower's logger is
reached by its name.
"""

from __future__ import annotations

import logging
import warnings

FLOWER_LOGGER = "flwr"


def quiet_third_party_warnings(verbose: bool) -> None:
    if verbose:
        return
    warnings.filterwarnings("ignore", module=r"wfdb(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray(\.|$)")
    warnings.filterwarnings("ignore", message=r"Secure RNG turned off", module=r"opacus(\.|$)")


def quiet_flower_log(verbose: bool) -> None:
    """Flower's INFO lines off (WARNING and above stay), unless ``verbose``."""
    logging.getLogger(FLOWER_LOGGER).setLevel(logging.INFO if verbose else logging.WARNING)
