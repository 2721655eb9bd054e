"""PTB-XL 1.0.3: 21,799 12-lead 10 s records, SCP-ECG statements, ten stratified folds.

Layout: ``<root>/ptbxl_database.csv`` (one row per ``ecg_id``: ``patient_id``, ``scp_codes`` as a
``{code: likelihood}`` dict, ``strat_fold``, ``filename_lr``/``filename_hr``),
``<root>/scp_statements.csv``, ``<root>/records500/NNNNN/NNNNN_hr.{hea,dat}`` and
``<root>/records100/NNNNN/NNNNN_lr.{hea,dat}``. The native labels are the ``scp_codes`` keys
(likelihoods kept in ``meta['scp_likelihoods']``); the split follows ``strat_fold``.
Option ``rate`` picks 500 (default) or 100 Hz; when the requested folder is absent the reader
falls back to the other one and says so (a warning and ``meta['rate_fallback']``).
"""

from __future__ import annotations

import ast
import os
import logging
import warnings
from functools import lru_cache
from pathlib import Path

import pandas as pd

from ..errors import DatasetRootError, RecordError
from ..record import STANDARD_LEADS, EcgRecord
from .base import RecordRef, SiteReader
from .common import check_native_labels, find_root_above, read_leads

log = logging.getLogger(__name__)

DATABASE_CSV = "ptbxl_database.csv"
STATEMENTS_CSV = "scp_statements.csv"
RATE_DIRS = {500: ("records500", "filename_hr"), 100: ("records100", "filename_lr")}


@lru_cache(maxsize=4)
def _load_database(csv_path: str) -> pd.DataFrame:
    try:
        df = pd.read_csv(csv_path, index_col="ecg_id")
    except (ValueError, pd.errors.ParserError) as exc:
        raise DatasetRootError(f"{csv_path} is not a readable PTB-XL database table: {exc}") from exc
    missing = {"patient_id", "scp_codes", "strat_fold", "filename_lr", "filename_hr"} - set(df.columns)
    if missing:
        raise DatasetRootError(f"{csv_path} lacks the PTB-XL columns {', '.join(sorted(missing))}")
    return df


def find_root(path: str | Path) -> Path:
    """The PTB-XL root above a record path: the nearest parent holding ``ptbxl_database.csv``."""
    return find_root_above(path, DATABASE_CSV, "the PTB-XL root above records100/ or records500/")


class PtbxlReader(SiteReader):
    """Options: ``rate`` (500|100), ``bad_leads``, ``strict_labels``."""

    site = "ptbxl"
    dataset_version = "ptb-xl 1.0.3"
    lead_names = STANDARD_LEADS

    def __init__(self, root, **options):
        super().__init__(root, **options)
        self.requested_rate = int(options.get("rate", 500))
        if self.requested_rate not in RATE_DIRS:
            raise ValueError(f"PTB-XL rate must be 500 or 100, got {self.requested_rate}")
        self._rate: int | None = None

    def validate_root(self) -> None:
        missing = [n for n in (DATABASE_CSV, STATEMENTS_CSV) if not (self.root / n).is_file()]
        if not any((self.root / d).is_dir() for d, _ in RATE_DIRS.values()):
            missing.append("records500/ or records100/")
        if missing:
            raise DatasetRootError(
                f"{self.root} is not a PTB-XL 1.0.3 root: missing {', '.join(missing)} "
                f"(expected {DATABASE_CSV}, {STATEMENTS_CSV}, records500/ and/or records100/)"
            )

    @property
    def rate(self) -> int:
        """The rate actually read (the requested one unless its folder is absent)."""
        if self._rate is None:
            want = self.requested_rate
            other = 100 if want == 500 else 500
            if (self.root / RATE_DIRS[want][0]).is_dir() or not (self.root / RATE_DIRS[other][0]).is_dir():
                self._rate = want
            else:
                msg = f"PTB-XL: {self.root / RATE_DIRS[want][0]} is absent; reading {RATE_DIRS[other][0]} ({other} Hz) instead"
                warnings.warn(msg, stacklevel=2)
                log.warning(msg)
                self._rate = other
        return self._rate

    def _ref(self, ecg_id: int, row) -> RecordRef:
        try:
            codes = ast.literal_eval(row.scp_codes) if isinstance(row.scp_codes, str) else {}
        except (ValueError, SyntaxError):
            codes = None
        filename = getattr(row, RATE_DIRS[self.rate][1])
        meta = {
            "strat_fold": int(row.strat_fold),
            "scp_likelihoods": {str(k): float(v) for k, v in (codes or {}).items()},
            "filename": filename,
            "rate": self.rate,
        }
        if codes is None:
            meta["label_issue"] = "scp_codes_unreadable"
        if self.rate != self.requested_rate:
            meta["rate_fallback"] = f"{self.requested_rate} Hz requested, {self.rate} Hz read"
        patient = None if pd.isna(row.patient_id) else str(int(row.patient_id))
        return RecordRef(
            record_id=f"{int(ecg_id):05d}", path=os.path.join(self.root, filename), patient_id=patient,
            native_labels=tuple(str(k) for k in (codes or {})), meta=meta,
        )

    def list_records(self) -> list[RecordRef]:
        self.validate_root()
        df = _load_database(str(self.root / DATABASE_CSV))
        return [self._ref(ecg_id, row) for ecg_id, row in zip(df.index, df.itertuples(index=False))]

    def split_key(self, ref: RecordRef) -> tuple[str, str]:
        return ("fold", str(ref.meta["strat_fold"]))

    @classmethod
    def ref_for_path(cls, path: str | Path, **options) -> tuple["PtbxlReader", RecordRef]:
        """Find the root above ``path`` and the database row of this record file."""
        root = find_root(path)
        name = Path(os.path.abspath(path)).relative_to(root).as_posix()
        rate = 100 if name.startswith("records100/") else 500
        reader = cls(root, **{**options, "rate": rate})
        reader.validate_root()
        df = _load_database(str(root / DATABASE_CSV))
        column = RATE_DIRS[rate][1]
        hits = df.index[df[column] == name]
        if len(hits) == 0:
            raise RecordError(str(path), "not_in_metadata", f"{name} is not a {column} in {root / DATABASE_CSV}")
        ecg_id = hits[0]
        return reader, reader._ref(ecg_id, next(df.loc[[ecg_id]].itertuples(index=False)))

    def read(self, ref: RecordRef) -> EcgRecord:
        strict = self.options.get("strict_labels", True)
        meta = dict(ref.meta)
        if meta.get("label_issue") == "scp_codes_unreadable" and strict:
            raise RecordError(ref.path, "labels_unreadable", "scp_codes is not a {code: likelihood} dict")
        meta.update(check_native_labels(self.site, ref.native_labels, ref.path, strict))
        header, signal, read_meta = read_leads(ref.path, STANDARD_LEADS, bad_leads=self.options.get("bad_leads", "skip"))
        meta.update(read_meta)
        return EcgRecord(
            site=self.site, record_id=ref.record_id, patient_id=ref.patient_id, signal=signal, fs=header.fs,
            lead_names=STANDARD_LEADS, native_labels=ref.native_labels, source=ref.path, meta=meta,
        )
