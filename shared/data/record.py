"""The one record type every site reader (and the synthetic generator) yields.

A record is one ECG recording as the dataset stores it: the signal in physical units (mV),
its native sampling rate, its leads reordered to the project's standard order, the native
labels exactly as the dataset states them, and the identities needed for patient-disjoint
splits. Resampling, filtering and windowing happen later, in the cache builder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: The standard 12-lead order used everywhere in this project (PTB-XL / CinC order).
STANDARD_LEADS: tuple[str, ...] = (
    "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
)
#: The three Frank orthogonal leads PTB records carry in their ``.xyz`` file.
FRANK_LEADS: tuple[str, ...] = ("vx", "vy", "vz")
#: PTB's full 15-lead order: the 12 standard leads, then Frank vx, vy, vz.
PTB_LEADS: tuple[str, ...] = STANDARD_LEADS + FRANK_LEADS
#: The lead order MIMIC-IV-ECG stores on disk (aVF before aVL); readers reorder it.
MIMIC_NATIVE_LEADS: tuple[str, ...] = (
    "I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6",
)

SITES: tuple[str, ...] = ("ptb", "ptbxl", "mimic", "cinc")


@dataclass(frozen=True)
class EcgRecord:
    """One recording, in physical units and standard lead order.

    Attributes:
        site: one of :data:`SITES`.
        record_id: the dataset's own record name (e.g. ``patient001/s0010_re``, ``00001``,
            ``40689238``, ``E07500``); unique within the site.
        patient_id: patient / subject identifier where the dataset has one, else ``None``
            (CinC has none: it is split by record).
        signal: ``float32`` array ``[n_leads, n_samples]`` in millivolts.
        fs: sampling rate in Hz, as stored.
        lead_names: names of the rows of ``signal``, in standard order
            (:data:`STANDARD_LEADS`, or :data:`PTB_LEADS` for PTB).
        native_labels: the labels as the dataset states them (PTB reason for admission,
            PTB-XL SCP codes, CinC SNOMED-CT codes, MIMIC machine statements).
        source: path of the record on disk (without extension), for error messages.
        meta: dataset-specific extras (e.g. ``strat_fold`` for PTB-XL, ``subsource`` for CinC).
    """

    site: str
    record_id: str
    patient_id: str | None
    signal: np.ndarray
    fs: float
    lead_names: tuple[str, ...]
    native_labels: tuple[str, ...]
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_leads(self) -> int:
        return int(self.signal.shape[0])

    @property
    def n_samples(self) -> int:
        return int(self.signal.shape[1])

    @property
    def seconds(self) -> float:
        return self.n_samples / float(self.fs)
