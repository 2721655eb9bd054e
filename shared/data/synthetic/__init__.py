"""Synthetic four-site ECG federation: the project's embedded default (no download needed).

Everything generated here is **synthetic**: a parametric model of the heart's dipole, not
recordings of people (``meta["synthetic"] is True`` on every record; caches built from it say
``synthetic: true``). See docs/synthetic.md for the physiology and the site profiles.
"""

from .profiles import CLASSES, PROFILES
from .reader import SyntheticReader

#: Default record counts per site: enough positives per class for AUROC to mean something, small
#: enough that the four caches and a federated demo with tiny models run in minutes on 2 cores
#: (4,528 ten-second windows in all, measured; PTB's 30-40 s records give 3 windows each).
DEFAULT_RECORDS: dict[str, int] = {"ptb": 300, "ptbxl": 1200, "mimic": 1200, "cinc": 900}

__all__ = ["CLASSES", "DEFAULT_RECORDS", "PROFILES", "SyntheticReader"]
