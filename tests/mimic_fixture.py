"""Build a small MIMIC-IV-ECG root in a temporary folder (no real MIMIC waveform is available).

The layout, the CSV columns and the first metadata row are the real ones, copied from the kit's
``mimic-iv-ecg`` folder (subject 10000032, study 40689238). Further records get new ids and
statements from :data:`EXTRA_REPORTS`, written for testing (not real MIMIC rows). Waveforms are
synthetic and deterministic, written with ``wfdb.wrsamp`` as format 16 in MIMIC's stored lead
order (I, II, III, aVR, **aVF, aVL**, V1-V6); :attr:`FixtureRecord.signal` holds the same
signal in the project's standard order, so a test can check the reader's reordering.

Reusable: ``build_mimic_root(tmp_path / "mimic", n_records=4, kit_mimic=kit_data / "mimic-iv-ecg")``.
"""

from __future__ import annotations

import csv
import datetime
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import wfdb

from shared.data.record import MIMIC_NATIVE_LEADS, STANDARD_LEADS

FS = 500
SECONDS = 10
GAIN = 200.0  # digital units per mV
#: Statement sets for records after the real first one (written for tests; cycled).
EXTRA_REPORTS: tuple[tuple[str, ...], ...] = (
    ("Sinus rhythm", "Normal ECG"),
    ("Sinus rhythm", "Inferior infarct - age undetermined", "Abnormal ECG"),
    ("Atrial fibrillation", "Right bundle branch block", "Nonspecific ST-T changes", "Abnormal ECG"),
    ("Sinus bradycardia", "Left ventricular hypertrophy", "Abnormal ECG"),
)


@dataclass
class FixtureRecord:
    subject_id: str
    study_id: str
    path: str  # relative to the root, without extension (record_list.csv ``path``)
    reports: tuple[str, ...]
    signal: np.ndarray = field(repr=False)  # float32 [12, n] in mV, STANDARD_LEADS order

    def record_path(self, root: Path) -> Path:
        return Path(root) / self.path


def standard_signal(index: int, n_samples: int = FS * SECONDS) -> np.ndarray:
    """A distinct, deterministic signal per lead (standard order): lead k is a (k+1) Hz sine."""
    t = np.arange(n_samples) / FS
    rows = [(0.1 * (k + 1)) * np.sin(2 * np.pi * (k + 1) * t) + 0.01 * index + 0.05 * k for k in range(12)]
    sig = np.stack(rows).astype(np.float64)
    return (np.round(sig * GAIN) / GAIN).astype(np.float32)  # exactly representable after fmt 16


def write_mimic_wfdb(record_path: Path, signal_standard: np.ndarray, lead_order=MIMIC_NATIVE_LEADS,
                     nan_leads: tuple[str, ...] = (), ecg_time: str | None = None) -> None:
    """Write ``<record_path>.{hea,dat}`` (fmt 16, gain 200/mV) with leads stored in ``lead_order``.

    ``ecg_time`` (``YYYY-MM-DD HH:MM:SS``, as in ``record_list.csv``) becomes the header's base
    time and date, as in the real files.
    """
    record_path.parent.mkdir(parents=True, exist_ok=True)
    when = {}
    if ecg_time:
        stamp = datetime.datetime.strptime(ecg_time, "%Y-%m-%d %H:%M:%S")
        when = {"base_time": stamp.time(), "base_date": stamp.date()}
    stored = np.stack([signal_standard[STANDARD_LEADS.index(name)] for name in lead_order])
    digital = np.round(stored.astype(np.float64) * GAIN).astype(np.int64)
    for name in nan_leads:
        digital[list(lead_order).index(name), 100:110] = -32768  # WFDB's invalid-sample value
    wfdb.wrsamp(
        record_path.name, fs=FS, units=["mV"] * len(lead_order), sig_name=list(lead_order),
        d_signal=digital.T.astype(np.int16), fmt=["16"] * len(lead_order), adc_gain=[GAIN] * len(lead_order),
        baseline=[0] * len(lead_order), write_dir=str(record_path.parent), **when,
    )


def _rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def build_mimic_root(root: Path, n_records: int = 4, *, kit_mimic: Path, write_waveforms: bool = True) -> list[FixtureRecord]:
    """Create ``root`` as a MIMIC-IV-ECG root with ``n_records`` records; returns their facts."""
    root = Path(root)
    rl_cols, rl_rows = _rows(kit_mimic / "record_list.csv")
    mm_cols, mm_rows = _rows(kit_mimic / "machine_measurements.csv")
    rl_tpl, mm_tpl = rl_rows[0], mm_rows[0]
    real_reports = tuple(mm_tpl[f"report_{i}"] for i in range(18) if mm_tpl.get(f"report_{i}", "").strip())
    records, rl_out, mm_out = [], [], []
    for i in range(n_records):
        subject = int(rl_tpl["subject_id"]) + i // 2  # two studies per subject
        study = int(rl_tpl["study_id"]) + i
        reports = real_reports if i == 0 else EXTRA_REPORTS[(i - 1) % len(EXTRA_REPORTS)]
        rel = f"files/p{str(subject)[:4]}/p{subject}/s{study}/{study}"
        rl_out.append({**rl_tpl, "subject_id": subject, "study_id": study, "file_name": study, "path": rel})
        mm = {**mm_tpl, "subject_id": subject, "study_id": study}
        for k in range(18):
            mm[f"report_{k}"] = reports[k] if k < len(reports) else ""
        mm_out.append(mm)
        rec = FixtureRecord(str(subject), str(study), rel, reports, standard_signal(i))
        if write_waveforms:
            write_mimic_wfdb(rec.record_path(root), rec.signal, ecg_time=rl_tpl.get("ecg_time"))
        records.append(rec)
    root.mkdir(parents=True, exist_ok=True)
    (root / "files").mkdir(exist_ok=True)
    for name, cols, rows in (("record_list.csv", rl_cols, rl_out), ("machine_measurements.csv", mm_cols, mm_out)):
        with open(root / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    return records
