"""MIMIC-IV-ECG 1.0: ~800k 12-lead 10 s ECGs at 500 Hz with machine-generated statements.

Layout: ``<root>/record_list.csv`` (``subject_id, study_id, file_name, ecg_time, path``),
``<root>/machine_measurements.csv`` (``study_id``, ``report_0`` ... ``report_17``, ...),
``<root>/files/pNNNN/pNNNNNNNN/sNNNNNNNN/NNNNNNNN.{hea,dat}``. The files store the leads as
I, II, III, aVR, **aVF, aVL**, V1-V6; the reader picks rows by the lead names in the header,
so the record comes out in the standard order. Native labels are the non-empty statements
``report_0..report_17``; the split is by ``subject_id``. Some records hold NaN samples or flat
leads: option ``bad_leads`` (``skip``: reject with ``nan_values``/``flat_lead``, the default;
``zero``: set them to 0 mV and list them in ``meta``; ``keep``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import pandas as pd

from ..errors import DatasetRootError, RecordError
from ..record import STANDARD_LEADS, EcgRecord
from .base import RecordRef, SiteReader
from .common import check_native_labels, find_root_above, read_leads

RECORD_LIST = "record_list.csv"
MEASUREMENTS = "machine_measurements.csv"
REPORT_COLUMNS = tuple(f"report_{i}" for i in range(18))


@lru_cache(maxsize=4)
def _load_tables(root: str) -> pd.DataFrame:
    rl_path, mm_path = Path(root) / RECORD_LIST, Path(root) / MEASUREMENTS
    try:
        records = pd.read_csv(rl_path, dtype={"subject_id": str, "study_id": str, "path": str})
        header = pd.read_csv(mm_path, nrows=0).columns
        reports = [c for c in REPORT_COLUMNS if c in header]
        meas = pd.read_csv(mm_path, usecols=["study_id", *reports], dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as exc:
        raise DatasetRootError(f"MIMIC-IV-ECG tables under {root} are unreadable: {exc}") from exc
    missing = {"subject_id", "study_id", "path"} - set(records.columns)
    if missing:
        raise DatasetRootError(f"{rl_path} lacks the MIMIC-IV-ECG columns {', '.join(sorted(missing))}")
    meas = meas.drop_duplicates("study_id").set_index("study_id")
    values = meas[reports].to_numpy()
    statements = pd.Series([tuple(s.strip() for s in row if s.strip()) for row in values], index=meas.index, dtype=object)
    records = records.assign(statements=records["study_id"].map(statements))
    return records


def find_root(path: str | Path) -> Path:
    """The MIMIC-IV-ECG root above a record path: the nearest parent holding ``record_list.csv``."""
    return find_root_above(path, RECORD_LIST, "the MIMIC-IV-ECG root above files/")


class MimicReader(SiteReader):
    """Options: ``bad_leads`` (``skip``|``zero``|``keep``), ``strict_labels``."""

    site = "mimic"
    dataset_version = "mimic-iv-ecg 1.0"
    lead_names = STANDARD_LEADS

    def __init__(self, root, **options):
        super().__init__(root, **options)
        self._root_str = str(self.root).rstrip("/")  # string joins: 800k Path joins take seconds

    def validate_root(self) -> None:
        missing = [n for n in (RECORD_LIST, MEASUREMENTS) if not (self.root / n).is_file()]
        if not (self.root / "files").is_dir():
            missing.append("files/")
        if missing:
            raise DatasetRootError(
                f"{self.root} is not a MIMIC-IV-ECG 1.0 root: missing {', '.join(missing)} "
                f"(expected {RECORD_LIST}, {MEASUREMENTS} and files/pNNNN/pNNNNNNNN/sNNNNNNNN/)"
            )

    def _ref(self, study_id, subject_id, path, statements, ecg_time=None) -> RecordRef:
        meta = {"study_id": str(study_id)}
        if not isinstance(statements, tuple):  # NaN: the study has no machine_measurements row
            statements = ()
            meta["label_issue"] = "no_measurements_row"
        if ecg_time is not None:
            meta["ecg_time"] = str(ecg_time)
        return RecordRef(
            record_id=str(study_id), path=f"{self._root_str}/{path}", patient_id=str(subject_id),
            native_labels=statements, meta=meta,
        )

    def _refs(self, table: pd.DataFrame) -> list[RecordRef]:
        times = table["ecg_time"] if "ecg_time" in table.columns else [None] * len(table)
        return [self._ref(*cols) for cols in zip(table["study_id"], table["subject_id"], table["path"],
                                                 table["statements"], times)]

    def list_records(self) -> list[RecordRef]:
        self.validate_root()
        return self._refs(_load_tables(str(self.root)))

    @classmethod
    def ref_for_path(cls, path: str | Path, **options) -> tuple["MimicReader", RecordRef]:
        root = find_root(path)
        reader = cls(root, **options)
        reader.validate_root()
        name = Path(os.path.abspath(path)).relative_to(root).as_posix()
        table = _load_tables(str(root))
        hits = table[table["path"] == name]
        if hits.empty:
            raise RecordError(str(path), "not_in_metadata", f"{name} is not listed in {root / RECORD_LIST}")
        return reader, reader._refs(hits)[0]

    def read(self, ref: RecordRef) -> EcgRecord:
        meta = dict(ref.meta)
        meta.update(check_native_labels(self.site, ref.native_labels, ref.path, self.options.get("strict_labels", True)))
        header, signal, read_meta = read_leads(ref.path, STANDARD_LEADS, bad_leads=self.options.get("bad_leads", "skip"))
        meta.update(read_meta)
        return EcgRecord(
            site=self.site, record_id=ref.record_id, patient_id=ref.patient_id, signal=signal, fs=header.fs,
            lead_names=STANDARD_LEADS, native_labels=ref.native_labels, source=ref.path, meta=meta,
        )
