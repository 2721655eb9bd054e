"""Steps every site reader shares: lead names, lead order, units, NaN and flat leads."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DatasetRootError, RecordError

#: Lead names as datasets spell them (lower-cased) -> the project's names.
LEAD_ALIASES: dict[str, str] = {
    "i": "I", "ii": "II", "iii": "III",
    "avr": "aVR", "avl": "aVL", "avf": "aVF",
    "v1": "V1", "v2": "V2", "v3": "V3", "v4": "V4", "v5": "V5", "v6": "V6",
    "vx": "vx", "vy": "vy", "vz": "vz",
}

#: Physical unit (lower-cased) -> factor to millivolts.
UNIT_TO_MV: dict[str, float] = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "v": 1e3}

#: What a reader does with a lead holding NaN or a flat (constant) lead.
BAD_LEAD_POLICIES = ("skip", "zero", "keep")


def normalise_lead_name(name: str) -> str:
    """``'avr'`` / ``'AVR'`` / ``'aVR'`` -> ``'aVR'``; unknown names are returned unchanged."""
    return LEAD_ALIASES.get(name.strip().lower(), name.strip())


def reorder_leads(
    signal: np.ndarray, names: tuple[str, ...] | list[str], wanted: tuple[str, ...], path: str
) -> np.ndarray:
    """Rows of ``signal`` (named ``names`` as stored) rearranged into the order ``wanted``.

    Matching is by lead name, never by position. Raises ``RecordError`` with reason
    ``missing_leads`` or ``duplicate_leads``.
    """
    index = _lead_index([normalise_lead_name(n) for n in names], tuple(names), wanted, path)
    if index == list(range(signal.shape[0])):
        return signal
    return np.ascontiguousarray(signal[index])


def to_millivolts(signal: np.ndarray, units: tuple[str, ...], path: str) -> np.ndarray:
    """Scale each row from its header unit to mV (raises ``unknown_units``)."""
    factors = []
    for u in units:
        f = UNIT_TO_MV.get(u.strip().lower())
        if f is None:
            raise RecordError(path, "unknown_units", f"unit {u!r} is not a voltage")
        factors.append(f)
    if all(f == 1.0 for f in factors):
        return signal
    return (signal * np.asarray(factors, dtype=np.float32)[:, None]).astype(np.float32)


def handle_bad_leads(
    signal: np.ndarray, lead_names: tuple[str, ...], path: str, policy: str
) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Apply the NaN / flat-lead policy; returns the signal and ``{"nan_leads", "flat_leads"}``.

    ``skip`` raises ``RecordError`` (``nan_values`` or ``flat_lead``); ``zero`` sets NaN samples
    and flat leads to 0 mV and reports them; ``keep`` leaves the values and only reports them.
    """
    if policy not in BAD_LEAD_POLICIES:
        raise ValueError(f"bad_leads must be one of {BAD_LEAD_POLICIES}, got {policy!r}")
    nan_rows = np.isnan(signal).any(axis=1)
    # A row holding NaN compares unequal to itself here, so it is reported as NaN, not flat.
    flat_rows = signal.max(axis=1) == signal.min(axis=1) if signal.shape[1] else ~nan_rows
    nan_leads = [lead_names[i] for i in np.flatnonzero(nan_rows)]
    flat_leads = [lead_names[i] for i in np.flatnonzero(flat_rows)]
    found = {"nan_leads": nan_leads, "flat_leads": flat_leads}
    if not nan_leads and not flat_leads:
        return signal, found
    if policy == "skip":
        if nan_leads:
            n = int(np.isnan(signal).sum())
            raise RecordError(path, "nan_values", f"{n} NaN samples in lead(s) {', '.join(nan_leads)}")
        raise RecordError(path, "flat_lead", f"constant signal in lead(s) {', '.join(flat_leads)}")
    if policy == "zero":
        signal = np.nan_to_num(signal, nan=0.0)
        signal[flat_rows] = 0.0
    return signal, found


def comment_value(comments: tuple[str, ...], key: str) -> str | None:
    """The value of a header comment ``key: value`` (case-insensitive key), or ``None``."""
    k = key.lower()
    for c in comments:
        head, sep, value = c.partition(":")
        if sep and head.strip().lower() == k:
            return value.strip()
    return None


def read_leads(
    path: str,
    wanted: tuple[str, ...],
    *,
    bad_leads: str = "skip",
    header=None,
) -> tuple[object, np.ndarray, dict]:
    """Read a WFDB record and return ``(header, float32 [len(wanted), n] in mV, meta)``.

    Fast path for format 16 (``fastio``), wfdb otherwise; leads picked and ordered by name;
    units converted to mV; NaN / flat leads handled by ``bad_leads``.
    """
    from .fastio import read_physical  # local import keeps this module light for workers

    header, values, fast = read_physical(path, header)
    if header.sig_len is not None and values.shape[1] != header.sig_len:
        raise RecordError(path, "length_mismatch", f"{values.shape[1]} samples read, header declares {header.sig_len}")
    if values.shape[1] == 0:
        raise RecordError(path, "empty_signal", "record has no samples")
    norm = [normalise_lead_name(n) for n in header.sig_names]
    index = _lead_index(norm, header.sig_names, wanted, path)
    units = tuple(header.units[i] for i in index)
    signal = values[index] if index != list(range(values.shape[0])) else values
    signal = to_millivolts(np.ascontiguousarray(signal, dtype=np.float32), units, path)
    signal, bad = handle_bad_leads(signal, wanted, path, bad_leads)
    meta = {"fast_path": fast, "stored_lead_order": list(norm)}
    meta.update({k: v for k, v in bad.items() if v})
    return header, signal, meta


def _lead_index(norm: list[str], stored: tuple[str, ...], wanted: tuple[str, ...], path: str) -> list[int]:
    seen: dict[str, int] = {}
    for i, n in enumerate(norm):
        if n in seen and n in wanted:
            raise RecordError(path, "duplicate_leads", f"lead {n} appears twice")
        seen.setdefault(n, i)
    missing = [w for w in wanted if w not in seen]
    if missing:
        raise RecordError(path, "missing_leads", f"missing {', '.join(missing)}; header has {', '.join(stored) or 'no names'}")
    return [seen[w] for w in wanted]


def check_native_labels(site: str, labels: tuple[str, ...], path: str, strict: bool = True) -> dict:
    """Reject (``strict``) or report a record with no labels or only labels its site's table lacks.

    Labels the table does not list are ignored when the record has others; they are reported
    in the returned meta as ``unknown_codes``. Reasons: ``no_labels``, ``unknown_codes``.
    """
    from ..labels import unknown_labels

    if not labels:
        if strict:
            raise RecordError(path, "no_labels", "the record states no diagnosis")
        return {"label_issue": "no_labels"}
    unknown = unknown_labels(site, labels)
    meta: dict = {}
    if unknown:
        meta["unknown_codes"] = list(unknown)
        if len(unknown) == len(labels):
            if strict:
                raise RecordError(path, "unknown_codes", f"none of {', '.join(labels)} is in the {site} label table")
            meta["label_issue"] = "unknown_codes"
    return meta


def find_root_above(path: str | Path, marker: str, expected: str) -> Path:
    """The nearest parent folder of a record path that holds the metadata file ``marker``.

    ``expected`` completes the error message (e.g. "the PTB-XL root above records100/").
    """
    for parent in Path(os.path.abspath(path)).parents:
        if (parent / marker).is_file():
            return parent
    raise DatasetRootError(f"no {marker} found in any parent folder of {path} (expected {expected})")
