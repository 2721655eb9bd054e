"""Scores from record-level predictions: per site, pooled (concatenated, never averaged) and
the mean of sites; bootstrap intervals over records. compare.py and the report use the same code.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.stats import rankdata

from shared.metrics import masked_macro_auroc

from .results import MEAN_OF_SITES, POOLED


def concat_predictions(preds: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One prediction set made of several sites' sets (same classes required)."""
    if not preds:
        raise ValueError("no predictions to concatenate")
    classes = [list(np.asarray(p["classes"]).astype(str)) for p in preds if "classes" in p]
    if classes and any(c != classes[0] for c in classes):
        raise ValueError(f"sites predict different classes: {classes}")
    out = {k: np.concatenate([np.asarray(p[k]) for p in preds]) for k in ("probs", "targets", "mask")}
    if classes:
        out["classes"] = np.asarray(classes[0])
    return out


def macro_auroc(pred: Mapping[str, np.ndarray]) -> float:
    return masked_macro_auroc(pred["probs"], pred["targets"], pred["mask"])[1]


def site_scores(preds_by_site: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, float]:
    """``{site: macro AUROC, ..., "pooled": AUROC of the concatenation, "mean-of-sites": mean}``.

    ``mean-of-sites`` averages the sites whose AUROC is defined (NaN when none is).
    """
    scores = {site: macro_auroc(p) for site, p in preds_by_site.items()}
    defined = [v for v in scores.values() if not np.isnan(v)]
    scores[MEAN_OF_SITES] = float(np.mean(defined)) if defined else float("nan")
    scores[POOLED] = macro_auroc(concat_predictions(list(preds_by_site.values())))
    return scores


def fast_macro_auroc(probs: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    """Same number as :func:`shared.metrics.masked_macro_auroc` (Mann-Whitney U with average ranks
    for ties), without scikit-learn's per-call validation: the bootstrap calls it thousands of times."""
    aucs = []
    for k in range(probs.shape[1]):
        known = mask[:, k] > 0
        y = targets[known, k] > 0.5
        n_pos = int(y.sum())
        n_neg = int(y.size - n_pos)
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = rankdata(probs[known, k])
        aucs.append((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs)) if aucs else float("nan")


def _fast_scores(sets: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
    scores = {s: fast_macro_auroc(p["probs"], p["targets"], p["mask"]) for s, p in sets.items()}
    defined = [v for v in scores.values() if not np.isnan(v)]
    scores[MEAN_OF_SITES] = float(np.mean(defined)) if defined else float("nan")
    pooled = concat_predictions(list(sets.values()))
    scores[POOLED] = fast_macro_auroc(pooled["probs"], pooled["targets"], pooled["mask"])
    return scores


def bootstrap_interval(
    preds_by_site: Mapping[str, Mapping[str, np.ndarray]],
    column: str,
    *,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of ``column`` (a site, ``pooled`` or ``mean-of-sites``) when records
    are resampled with replacement within each site. Replicates with an undefined AUROC are dropped."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        resampled = {}
        for site, p in preds_by_site.items():
            if column not in (POOLED, MEAN_OF_SITES) and site != column:
                continue
            idx = rng.integers(0, len(p["probs"]), size=len(p["probs"]))
            resampled[site] = {k: np.asarray(p[k])[idx] for k in ("probs", "targets", "mask")}
        if column in (POOLED, MEAN_OF_SITES):
            v = _fast_scores(resampled)[column]
        else:
            p = resampled[column]
            v = fast_macro_auroc(p["probs"], p["targets"], p["mask"])
        if not np.isnan(v):
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def score_rows(
    preds_by_site: Mapping[str, Mapping[str, np.ndarray]],
    *,
    method: str,
    train_sites: str,
    seed: int,
    config_hash: str,
    round: int,
    synthetic: bool,
) -> list[dict]:
    """Result rows for one model scored on several sites' test splits: per-site macro and
    per-class AUROC and record counts, plus ``pooled`` and ``mean-of-sites`` macro AUROC."""
    from .results import make_row

    common = dict(method=method, train_sites=train_sites, seed=seed, config_hash=config_hash,
                  round=round, synthetic=synthetic)
    rows = []
    for site, p in preds_by_site.items():
        per_class, _ = masked_macro_auroc(p["probs"], p["targets"], p["mask"])
        classes = [str(c) for c in p["classes"]] if "classes" in p else [str(k) for k in range(len(per_class))]
        for name, v in zip(classes, per_class):
            rows.append(make_row(test_site=site, metric=f"auroc_{name}", value=v, **common))
        rows.append(make_row(test_site=site, metric="n_records", value=len(p["probs"]), **common))
    for col, v in site_scores(preds_by_site).items():
        rows.append(make_row(test_site=col, metric="auroc_macro", value=v, **common))
    return rows
