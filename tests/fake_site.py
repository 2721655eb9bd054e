"""A small in-memory site reader and labeler for the cache/loader tests.

It lets the cache builder's own behaviour (splits, windows, skips, resume, determinism) be
tested without depending on one dataset's reader; the round trip on real WFDB files through the
real readers lives in tests/test_cache.py as well.
"""

from __future__ import annotations

import numpy as np

from shared.data.errors import DatasetRootError, RecordError
from shared.data.readers.base import RecordRef, SiteReader
from shared.data.record import PTB_LEADS, EcgRecord

CLASSES = ("NORM", "MI", "STTC", "CD", "HYP")


class FakeReader(SiteReader):
    """``n`` records of 500 Hz noise+sine, 10-34 s long, three records per patient.

    ``bad`` maps record number -> kind: ``"nan"`` (a NaN sample), ``"error"`` (RecordError
    truncated_signal), ``"crash"`` (a plain exception), ``"short"`` (4 s), ``"huge"`` (gain error).
    """

    site = "ptb"
    dataset_version = "fake-1"

    def __init__(self, root="fake-root", n=30, bad=None, site="ptb", **options):
        super().__init__(root, **options)
        self.n, self.bad = n, dict(bad or {})
        self.site = site

    def validate_root(self) -> None:
        if str(self.root) == "wrong-root":
            raise DatasetRootError(f"{self.root}: expected patientNNN/ folders (ptbdb layout)")

    def list_records(self) -> list[RecordRef]:
        return [RecordRef(f"r{i:03d}", f"{self.root}/r{i:03d}", patient_id=f"p{i // 3}",
                          native_labels=(("MI",) if i % 2 else ("NORM",)))
                for i in range(self.n)]

    def signal(self, i: int) -> np.ndarray:
        seconds = 10 + (i * 7) % 25
        t = np.arange(500 * seconds) / 500.0
        rng = np.random.default_rng(i)
        leads = len(PTB_LEADS)
        sig = np.sin(2 * np.pi * (1 + np.arange(leads)[:, None] / 5) * t) * (1 + i % 3)
        return (sig + 0.1 * rng.standard_normal((leads, t.size))).astype(np.float32)

    def read(self, ref: RecordRef) -> EcgRecord:
        i = int(ref.record_id[1:])
        kind = self.bad.get(i)
        if kind == "error":
            raise RecordError(ref.path + ".dat", "truncated_signal", "file holds 100 of 5000 samples")
        if kind == "crash":
            raise ValueError("header line 1 is garbage")
        sig = self.signal(i)
        if kind == "nan":
            sig[3, 100] = np.nan
        if kind == "short":
            sig = sig[:, : 500 * 4]
        if kind == "huge":
            sig = sig * 1e5
        return EcgRecord(self.site, ref.record_id, ref.patient_id, sig, 500.0, PTB_LEADS,
                         ref.native_labels, ref.path)


class FakeLabeler:
    """NORM/MI known, STTC unknown (mask 0), CD/HYP known negatives."""

    space = "superclass"
    classes = CLASSES

    def available(self, site: str) -> np.ndarray:
        return np.array([1, 1, 0, 1, 1], dtype=bool)

    def label(self, site: str, record) -> tuple[np.ndarray, np.ndarray]:
        labels = np.array([c in record.native_labels for c in CLASSES], dtype=np.uint8)
        return labels, self.available(site).astype(np.uint8)
