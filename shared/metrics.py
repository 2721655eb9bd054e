"""Metrics that honour the label-availability mask, and record-level aggregation.

AUROC is computed per class on the entries whose label is known; a class that is unknown at a
site, or has a single value (all positive or all negative) among the known entries, has an
undefined AUROC: NaN, never 0.5. The macro mean is over the defined classes only.
"""

from __future__ import annotations

import numpy as np


def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def masked_auroc_per_class(probs, targets, mask) -> np.ndarray:
    """AUROC of every class over its known entries; NaN where unknown or one-class."""
    probs, targets, mask = _np(probs).astype(np.float64), _np(targets), _np(mask) > 0
    if probs.shape != targets.shape or probs.shape != mask.shape or probs.ndim != 2:
        raise ValueError(f"probs {probs.shape}, targets {targets.shape}, mask {mask.shape}: need equal [N, K]")
    out = np.full(probs.shape[1], np.nan)
    for k in range(probs.shape[1]):
        known = mask[:, k]
        y = targets[known, k] > 0.5
        if y.size and 0 < y.sum() < y.size:
            out[k] = _roc_auc_score(y, probs[known, k])
    return out


def masked_macro_auroc(probs, targets, mask) -> tuple[np.ndarray, float]:
    """``(per_class [K], macro)``: per-class AUROC (NaN where undefined) and their mean over
    the defined classes (NaN if none is defined)."""
    per_class = masked_auroc_per_class(probs, targets, mask)
    defined = per_class[~np.isnan(per_class)]
    return per_class, float(defined.mean()) if defined.size else float("nan")


def record_level(values, item_record) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the items of each record: ``(record_ids [R] sorted, values [R, ...])``.

    ``item_record`` is :attr:`shared.data.loader.WindowDataset.item_record` (one record index
    per item, in item order); ``values`` are per-item probabilities (or targets/masks, which
    are equal across a record's items, so their mean is the record's value).
    """
    values, item_record = _np(values).astype(np.float64), _np(item_record).astype(np.int64)
    if len(values) != len(item_record):
        raise ValueError(f"{len(values)} values for {len(item_record)} item records")
    records, inverse = np.unique(item_record, return_inverse=True)
    sums = np.zeros((len(records),) + values.shape[1:])
    np.add.at(sums, inverse, values)
    counts = np.bincount(inverse, minlength=len(records)).reshape((-1,) + (1,) * (values.ndim - 1))
    return records, sums / counts


def _roc_auc_score(y_true: np.ndarray, scores: np.ndarray) -> float:
    # Imported on first use: scikit-learn adds ~1.5 s to every Flower ClientApp process start.
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y_true, scores))
