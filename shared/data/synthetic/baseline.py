"""A quick cross-site baseline on the synthetic sites: does the site shift cost AUROC?

Records go through the cache's own preprocessing (:func:`shared.data.preprocess.preprocess_record`:
250 Hz, 0.5-45 Hz band-pass, 10 s windows); from the first window of each record we take a
median beat (R peaks from the summed absolute slope of the 12 leads) sampled every 28 ms in
every lead (12 x 25 values), plus heart rate and RR variability, and fit one L2 logistic regression per class
(scikit-learn) on the records where that class is known (the label mask).

Train and test records come from different seeds of the generator, so they are different
synthetic patients. The result is a matrix of macro AUROC (rows: training site or ``pooled``,
columns: test site) over the classes known at both ends.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy.signal import find_peaks
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..labels import get_label_space, harmonise, record_mask
from ..preprocess import PreprocessConfig, preprocess_record
from ..record import SITES
from .reader import SyntheticReader

FS = 250.0
PRE, POST, STEP = 60, 115, 7  # median beat -240..+460 ms at 250 Hz, in 28 ms steps


def beat_features(window: np.ndarray, fs: float = FS) -> np.ndarray:
    """Features of one preprocessed window ``[12, L]``: median beat (12 x 25) + HR + RR sd."""
    x = window.astype(np.float64)
    slope = np.abs(np.diff(x, axis=1)).sum(axis=0)
    slope = np.convolve(slope, np.ones(5) / 5, mode="same")
    peaks, _ = find_peaks(slope, distance=int(0.3 * fs), height=0.35 * np.percentile(slope, 99.5))
    peaks = peaks[(peaks >= PRE) & (peaks < x.shape[1] - POST)]
    if len(peaks) < 2:
        beat = np.zeros((x.shape[0], PRE + POST))
        hr, rr_sd = 0.0, 0.0
    else:
        idx = peaks[:, None] + np.arange(-PRE, POST)[None, :]
        beat = np.median(x[:, idx], axis=1)                       # [leads, PRE+POST]
        beat -= np.median(beat[:, : int(0.08 * fs)], axis=1, keepdims=True)
        rr = np.diff(peaks) / fs
        hr, rr_sd = 60.0 / np.median(rr), float(np.std(rr))
    coarse = beat.reshape(beat.shape[0], -1, STEP).mean(axis=2)
    return np.concatenate([coarse.ravel(), [hr / 100.0, rr_sd * 10.0]]).astype(np.float32)


def site_dataset(site: str, n_records: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels and label mask of ``n_records`` synthetic records of ``site``."""
    space = get_label_space("superclass")
    reader = SyntheticReader(site, n_records, seed=seed)
    config = PreprocessConfig()
    feats, ys, ms = [], [], []
    for ref in reader.list_records():
        rec = reader.read(ref)
        first = int(round(config.window_seconds * rec.fs))  # only the first window is used
        window = preprocess_record(replace(rec, signal=rec.signal[:, :first]), config)[0]
        feats.append(beat_features(window))
        ys.append(harmonise(site, rec.native_labels, space))
        ms.append(record_mask(site, rec.native_labels, space, subsource=rec.meta.get("subsource")))
    return np.stack(feats), np.stack(ys), np.stack(ms)


class MaskedLogistic:
    """One logistic regression per class, fitted on records where the class is known."""

    def __init__(self, n_classes: int, min_per_class: int = 5, c: float = 0.05):
        self.models: list = [None] * n_classes
        self.min_per_class, self.c = min_per_class, c

    def fit(self, x: np.ndarray, y: np.ndarray, m: np.ndarray) -> "MaskedLogistic":
        for k in range(y.shape[1]):
            keep = m[:, k] == 1
            yk = y[keep, k]
            if min(int(yk.sum()), int((1 - yk).sum())) < self.min_per_class:
                continue
            model = make_pipeline(StandardScaler(), LogisticRegression(C=self.c, max_iter=2000))
            self.models[k] = model.fit(x[keep], yk)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        out = np.full((len(x), len(self.models)), np.nan)
        for k, model in enumerate(self.models):
            if model is not None:
                out[:, k] = model.predict_proba(x)[:, 1]
        return out


def class_auroc(p: np.ndarray, y: np.ndarray, m: np.ndarray, min_per_class: int = 3) -> np.ndarray:
    """Per-class AUROC over known test labels; NaN where there is no prediction or too few of
    either value (``min_per_class``)."""
    out = np.full(y.shape[1], np.nan)
    for k in range(y.shape[1]):
        keep = (m[:, k] == 1) & np.isfinite(p[:, k])
        yk = y[keep, k]
        if keep.any() and min(int(yk.sum()), int((1 - yk).sum())) >= min_per_class:
            out[k] = roc_auc_score(yk, p[keep, k])
    return out


def cross_site_table(n_train: dict[str, int], n_test: dict[str, int], seed: int = 0,
                     sites: tuple[str, ...] = SITES) -> dict[str, dict[str, np.ndarray]]:
    """Per-class AUROC ``table[train][test]`` for each site's local model and the pooled model.

    Training records use ``seed``, test records ``seed + 1000`` (other synthetic patients).
    """
    train = {s: site_dataset(s, n_train[s], seed) for s in sites}
    test = {s: site_dataset(s, n_test[s], seed + 1000) for s in sites}
    k = train[sites[0]][1].shape[1]
    models = {s: MaskedLogistic(k).fit(*train[s]) for s in sites}
    pooled = [np.concatenate([train[s][i] for s in sites]) for i in range(3)]
    models["pooled"] = MaskedLogistic(k).fit(*pooled)
    return {a: {b: class_auroc(models[a].predict_proba(test[b][0]), test[b][1], test[b][2]) for b in sites}
            for a in models}


def macro(per_class: np.ndarray) -> float:
    """Mean over the classes with an AUROC (NaN if none)."""
    return float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")


def gap_summary(table: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
    """Mean in-site, cross-site and pooled macro AUROC, compared on the same classes.

    For each pair (trained on a, tested on b != a) the classes are those both a's model and
    b's own model can score on b's test set; ``in_site`` and ``cross_site`` average b's own
    model and a's model over those classes, and ``pooled`` the pooled model, over all pairs.
    """
    sites = [s for s in table if s != "pooled"]
    own, cross, pooled = [], [], []
    for a in sites:
        for b in sites:
            if a == b:
                continue
            both = np.isfinite(table[a][b]) & np.isfinite(table[b][b]) & np.isfinite(table["pooled"][b])
            if both.any():
                own.append(table[b][b][both].mean())
                cross.append(table[a][b][both].mean())
                pooled.append(table["pooled"][b][both].mean())
    return {"in_site": float(np.mean(own)), "cross_site": float(np.mean(cross)), "pooled": float(np.mean(pooled)),
            "pairs": len(own)}


def format_table(table: dict[str, dict[str, float]]) -> str:
    """The macro AUROC matrix as a Markdown table (rows: trained on; columns: tested on)."""
    cols = [c for c in table["pooled"]]
    lines = ["| trained on \\ tested on | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for row, vals in table.items():
        lines.append(f"| {row} | " + " | ".join(f"{macro(vals[c]):.3f}" for c in cols) + " |")
    return "\n".join(lines)
