"""PTB Diagnostic ECG Database 1.0.0 (``ptbdb``): 15 leads at 1000 Hz, one diagnosis per patient.

Layout: ``<root>/RECORDS`` (``patient001/s0010_re`` per line) and
``<root>/patientNNN/sNNNNxxx.{hea,dat,xyz}``: the ``.dat`` holds the 12 standard leads, the
``.xyz`` the Frank leads vx, vy, vz (the header names them in lower case: ``i, ii, avr``...).
The native label is the header comment ``Reason for admission: ...``; a record whose reason is
``n/a`` carries no label and is rejected (``no_labels``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DatasetRootError
from ..record import PTB_LEADS, EcgRecord
from .base import RecordRef, SiteReader
from .common import check_native_labels, comment_value, read_leads
from .fastio import read_header

REASON_KEY = "Reason for admission"
NO_REASON = frozenset({"", "n/a"})


class PtbReader(SiteReader):
    """Options: ``bad_leads`` (``skip``|``zero``|``keep``), ``strict_labels`` (default True)."""

    site = "ptb"
    dataset_version = "ptbdb 1.0.0"
    lead_names = PTB_LEADS

    def validate_root(self) -> None:
        if not self.root.is_dir():
            raise DatasetRootError(f"PTB root {self.root} is not a directory (expected the ptbdb 1.0.0 folder)")
        if not (self.root / "RECORDS").is_file() and not any(self.root.glob("patient*/*.hea")):
            raise DatasetRootError(
                f"{self.root} is not a PTB Diagnostic ECG Database root: expected a RECORDS file or "
                "patientNNN/sNNNNxxx.hea records directly below it"
            )

    def list_records(self) -> list[RecordRef]:
        self.validate_root()
        records_file = self.root / "RECORDS"
        if records_file.is_file():
            names = [ln.strip() for ln in records_file.read_text().splitlines() if ln.strip()]
        else:
            names = sorted(p.relative_to(self.root).with_suffix("").as_posix() for p in self.root.glob("patient*/*.hea"))
        return [self._ref(name) for name in names]

    def _ref(self, name: str) -> RecordRef:
        patient = name.split("/")[0]
        return RecordRef(record_id=name, path=str(self.root / name), patient_id=patient)

    @classmethod
    def ref_for_path(cls, path: str | Path, **options) -> tuple["PtbReader", RecordRef]:
        """Reader and reference for one record path (``.../patientNNN/sNNNNxxx``)."""
        p = Path(path)
        reader = cls(p.parent.parent, **options)
        return reader, reader._ref(f"{p.parent.name}/{p.name}")

    def read(self, ref: RecordRef) -> EcgRecord:
        header = read_header(ref.path)
        reason = comment_value(header.comments, REASON_KEY)
        labels = () if reason is None or reason.strip().lower() in NO_REASON else (reason.strip(),)
        meta = check_native_labels(self.site, labels, ref.path, self.options.get("strict_labels", True))
        _, signal, read_meta = read_leads(ref.path, PTB_LEADS, bad_leads=self.options.get("bad_leads", "skip"), header=header)
        meta.update(read_meta)
        if reason is not None and not labels:
            meta["reason_for_admission"] = reason
        return EcgRecord(
            site=self.site, record_id=ref.record_id, patient_id=ref.patient_id, signal=signal, fs=header.fs,
            lead_names=PTB_LEADS, native_labels=labels, source=ref.path, meta=meta,
        )
