"""Open and validate a prepared window cache (format_version 1, see docs/architecture.md).

``open_cache(dir)`` validates the directory and returns a :class:`Cache` whose arrays are
memory-mapped (nothing is loaded until indexed). ``validate_cache(dir)`` raises
:class:`~shared.data.errors.CacheError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CacheError
from .splits import SPLITS

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNALS = "signals.npy"
WINDOW_RECORD = "window_record.npy"
LABELS = "labels.npy"
LABEL_MASK = "label_mask.npy"
RECORDS = "records.csv"
SPLITS_FILE = "splits.json"
SKIPS = "skips.csv"
CACHE_FILES = (MANIFEST, SIGNALS, WINDOW_RECORD, LABELS, LABEL_MASK, RECORDS, SPLITS_FILE, SKIPS)
RECORD_COLUMNS = (
    "record_index", "record_id", "patient_id", "split", "first_window", "n_windows",
    "fs_native", "n_samples_native",
)
MANIFEST_KEYS = (
    "format_version", "site", "synthetic", "source", "dataset", "dataset_version", "label_space",
    "classes", "label_available", "fs", "window_samples", "window_stride_samples", "lead_names",
    "config", "config_hash", "counts", "skipped", "complete",
)


@dataclass
class Cache:
    """A validated cache: its manifest, memory-mapped arrays and record table."""

    path: Path
    manifest: dict[str, Any]
    signals: np.ndarray  # float16 memmap [n_windows, n_leads, window_samples]
    window_record: np.ndarray  # int32 [n_windows]
    labels: np.ndarray  # uint8 [n_records, n_classes]
    label_mask: np.ndarray  # uint8 [n_records, n_classes]
    records: list[dict[str, str]]  # rows of records.csv
    splits: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def lead_names(self) -> list[str]:
        return list(self.manifest["lead_names"])

    @property
    def fs(self) -> float:
        return float(self.manifest["fs"])

    @property
    def window_samples(self) -> int:
        return int(self.manifest["window_samples"])

    @property
    def synthetic(self) -> bool:
        return bool(self.manifest["synthetic"])

    def record_split(self) -> np.ndarray:
        """Split name of every record (array of str, records.csv order)."""
        return np.array([r["split"] for r in self.records])

    def split_records(self, split: str) -> np.ndarray:
        """Record indices (rows of records.csv) of one split."""
        _check_split(split)
        return np.flatnonzero(self.record_split() == split).astype(np.int64)

    def split_windows(self, split: str) -> np.ndarray:
        """Window indices (rows of signals.npy) of one split, in cache order."""
        _check_split(split)
        in_split = self.record_split() == split
        return np.flatnonzero(in_split[self.window_record]).astype(np.int64)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def open_cache(path: str | Path) -> Cache:
    """Validate ``path`` and return the cache with memory-mapped arrays."""
    return _load(Path(path))


def validate_cache(path: str | Path) -> dict[str, Any]:
    """Raise ``CacheError`` unless ``path`` is a complete, self-consistent cache; return its manifest."""
    return _load(Path(path)).manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a cache directory (``CacheError`` if missing or unreadable)."""
    file = Path(path) / MANIFEST
    if not Path(path).is_dir():
        raise CacheError(f"{path}: no cache directory here (run `python -m shared.data prepare` first)")
    if not file.is_file():
        raise CacheError(f"{file}: missing; {path} is not a prepared cache (or an unfinished one)")
    return _read_json(file, what="manifest")


def _load(path: Path) -> Cache:
    manifest = read_manifest(path)
    mfile = path / MANIFEST
    missing_keys = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing_keys:
        raise CacheError(f"{mfile}: missing keys {missing_keys}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise CacheError(
            f"{mfile}: format_version {manifest['format_version']!r}, this code reads {FORMAT_VERSION}; "
            "re-run prepare"
        )
    if manifest["complete"] is not True:
        raise CacheError(f"{mfile}: cache is marked incomplete")
    for name in CACHE_FILES:
        if not (path / name).is_file():
            raise CacheError(f"{path / name}: missing from the cache")

    signals = _npy(path / SIGNALS, np.float16, 3)
    window_record = _npy(path / WINDOW_RECORD, np.int32, 1)
    labels = _npy(path / LABELS, np.uint8, 2)
    label_mask = _npy(path / LABEL_MASK, np.uint8, 2)
    records = _read_records(path / RECORDS)
    splits = _read_json(path / SPLITS_FILE)

    n_windows, n_leads, window = signals.shape
    n_records, n_classes = len(records), len(manifest["classes"])
    if n_leads != len(manifest["lead_names"]) or window != manifest["window_samples"]:
        raise CacheError(
            f"{path / SIGNALS}: shape {signals.shape} does not match manifest "
            f"({len(manifest['lead_names'])} leads, {manifest['window_samples']} samples)"
        )
    if window_record.shape != (n_windows,):
        raise CacheError(f"{path / WINDOW_RECORD}: {window_record.shape[0]} entries for {n_windows} windows")
    for file, arr in ((LABELS, labels), (LABEL_MASK, label_mask)):
        if arr.shape != (n_records, n_classes):
            raise CacheError(f"{path / file}: shape {arr.shape}, expected ({n_records}, {n_classes})")
    if ((labels > 0) & (label_mask == 0)).any():
        raise CacheError(f"{path / LABELS}: positive labels where label_mask says unknown")
    if n_windows and (window_record.min() < 0 or window_record.max() >= n_records):
        raise CacheError(f"{path / WINDOW_RECORD}: record index outside 0..{n_records - 1}")
    expected = np.zeros(n_windows, dtype=np.int64)
    for i, row in enumerate(records):
        try:
            first, count = int(row["first_window"]), int(row["n_windows"])
            if int(row["record_index"]) != i:
                raise ValueError("record_index out of order")
        except ValueError as exc:
            raise CacheError(f"{path / RECORDS}: row {i + 1}: {exc}") from exc
        if row["split"] not in SPLITS:
            raise CacheError(f"{path / RECORDS}: row {i + 1}: unknown split {row['split']!r}")
        if count < 1 or first < 0 or first + count > n_windows:
            raise CacheError(f"{path / RECORDS}: row {i + 1}: windows {first}+{count} outside 0..{n_windows}")
        expected[first : first + count] = i
    if not np.array_equal(expected, window_record):
        raise CacheError(f"{path / WINDOW_RECORD}: does not match first_window/n_windows in {RECORDS}")
    by_split = {s: sorted(r["record_id"] for r in records if r["split"] == s) for s in SPLITS}
    for s in SPLITS:
        if sorted(splits.get(s, [])) != by_split[s]:
            raise CacheError(f"{path / SPLITS_FILE}: {s!r} record ids differ from {RECORDS}")
    return Cache(path, manifest, signals, window_record, labels, label_mask, records, splits)


def _npy(file: Path, dtype: type, ndim: int) -> np.ndarray:
    try:
        arr = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CacheError(f"{file}: unreadable array ({exc})") from exc
    if arr.dtype != dtype or arr.ndim != ndim:
        raise CacheError(f"{file}: {arr.dtype} with {arr.ndim} dims, expected {np.dtype(dtype)} with {ndim}")
    return arr


def _read_records(file: Path) -> list[dict[str, str]]:
    try:
        with open(file, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) != RECORD_COLUMNS:
                raise CacheError(f"{file}: columns {reader.fieldnames}, expected {list(RECORD_COLUMNS)}")
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CacheError(f"{file}: unreadable ({exc})") from exc


def _read_json(file: Path, what: str = "file") -> dict[str, Any]:
    """A JSON object from ``file``; ``CacheError`` naming the file (and ``what`` it is) otherwise."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{file}: unreadable {what} ({exc})") from exc
    if not isinstance(data, dict):
        raise CacheError(f"{file}: {what} is not a JSON object")
    return data
