"""Scores from record-level predictions, and the paired, patient-level bootstrap behind every
interval of the report. compare.py and the report use the same code.

* Point estimates are the bootstrap's statistic with every weight 1, so a cell and its interval
  come from one function. AUROC is the Mann-Whitney statistic with average ranks for ties (the
  number scikit-learn's ``roc_auc_score`` gives); AUPRC is average precision (scikit-learn's
  ``average_precision_score``).
* Resampling unit: the **patient**. Every site's test patients are drawn with replacement
  (stratified by site: each site keeps its number of patients); a record's weight is the number
  of times its patient was drawn, so the records of one patient always move together. Records
  without a patient id are their own patient.
* Paired: one set of weights per replicate is shared by every method and seed, so a difference
  (federated - pooled, ...) is computed on the same resampled patients for both terms.
* Seeds combined: a method's value is the mean over its seeds (every seed scores the same test
  records); a difference is the mean over the seeds both methods have.
* Vectorised: weights are a ``[B, n_records]`` matrix; one sort per class and cumulative sums give
  all ``B`` replicate AUROCs at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from shared.metrics import masked_macro_auroc

from .results import MEAN_OF_SITES, POOLED


# ---------------------------------------------------------------------------- weighted metrics
def _groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(scores, kind="mergesort")
    _, start = np.unique(scores[order], return_index=True)
    return order, start


def weighted_auroc(scores: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of ``scores`` for labels ``y`` under each row of ``weights`` ``[B, n]``: ``[B]``, NaN
    where a replicate has no positive or no negative weight. Ties count one half."""
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y, dtype=bool)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if scores.size == 0:
        return np.full(weights.shape[0], np.nan)
    order, start = _groups(scores)
    w, ys = weights[:, order], y[order]
    pos = np.add.reduceat(np.where(ys, w, 0.0), start, axis=1)
    neg = np.add.reduceat(np.where(ys, 0.0, w), start, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    num = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    tp, tn = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / (tp * tn)
    out[(tp == 0) | (tn == 0)] = np.nan
    return out


def weighted_average_precision(scores: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision (area under the precision-recall curve, step-wise, as scikit-learn) under
    each row of ``weights``: ``[B]``, NaN where a replicate has no positive or no negative."""
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y, dtype=bool)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if scores.size == 0:
        return np.full(weights.shape[0], np.nan)
    order, start = _groups(-scores)  # descending scores
    w, ys = weights[:, order], y[order]
    pos = np.add.reduceat(np.where(ys, w, 0.0), start, axis=1)
    neg = np.add.reduceat(np.where(ys, 0.0, w), start, axis=1)
    tp_cum, fp_cum = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    tp, tn = tp_cum[:, -1], fp_cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp_cum + fp_cum > 0, tp_cum / (tp_cum + fp_cum), 0.0)
        out = (pos * precision).sum(axis=1) / tp
    out[(tp == 0) | (tn == 0)] = np.nan
    return out


METRICS = {"auroc": weighted_auroc, "auprc": weighted_average_precision}


def per_class(pred: Mapping[str, np.ndarray], weights: np.ndarray, metric: str = "auroc",
              classes: Sequence[int] | None = None) -> np.ndarray:
    """``[B, K]``: the metric per class over the records whose label is known (NaN: undefined or
    not in ``classes``)."""
    fn = METRICS[metric]
    probs, targets, mask = (np.asarray(pred[k]) for k in ("probs", "targets", "mask"))
    weights = np.atleast_2d(weights)
    out = np.full((weights.shape[0], probs.shape[1]), np.nan)
    for k in range(probs.shape[1]) if classes is None else classes:
        known = mask[:, k] > 0
        if known.any():
            out[:, k] = fn(probs[known, k], targets[known, k] > 0.5, weights[:, known])
    return out


def nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the defined entries; NaN where none is defined (no warning)."""
    values = np.asarray(values, dtype=np.float64)
    n = (~np.isnan(values)).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.nansum(values, axis=-1) / n
    return np.where(n > 0, out, np.nan)


def macro(pred: Mapping[str, np.ndarray], weights: np.ndarray, metric: str = "auroc",
          classes: Sequence[int] | None = None) -> np.ndarray:
    """``[B]``: the mean over the defined classes (of ``classes``, default all)."""
    return nanmean_rows(per_class(pred, weights, metric, classes))


def undefined_reason(pred: Mapping[str, np.ndarray], k: int) -> str | None:
    """Why class ``k`` has no AUROC on this prediction set (None when it has one)."""
    known = np.asarray(pred["mask"])[:, k] > 0
    if not known.any():
        return "class not available at this site"
    y = np.asarray(pred["targets"])[known, k] > 0.5
    if not y.any():
        return f"no positive among {int(known.sum())} records"
    if y.all():
        return f"no negative among {int(known.sum())} records"
    return None


# ---------------------------------------------------------------------------- patient resampling
def patient_groups(pred: Mapping[str, np.ndarray]) -> np.ndarray:
    """Patient id of every record (the record id where a record has no patient id)."""
    records = np.asarray(pred["record_ids"]).astype(str)
    if "patient_ids" not in pred:
        return records
    patients = np.asarray(pred["patient_ids"]).astype(str)
    return np.where(patients == "", records, patients)


def patient_weights(groups: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, n_records]``: every record weighted by how often its patient was drawn when the
    patients are resampled with replacement (one draw per patient)."""
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    n_patients = int(inverse.max()) + 1 if inverse.size else 0
    if n_patients == 0:
        return np.zeros((n_boot, 0))
    counts = rng.multinomial(n_patients, np.full(n_patients, 1.0 / n_patients), size=n_boot)
    return counts[:, inverse].astype(np.float64)


def interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the defined replicates (NaN, NaN when fewer than half are defined)."""
    values = np.asarray(replicates, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0 or values.size < 0.5 * np.asarray(replicates).size:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


class Bootstrap:
    """One set of patient-level replicate weights per test site, shared by every method and seed.

    ``columns(sets)`` turns ``{site: predictions}`` (aligned to the site's reference record order)
    into ``{column: [1 + B] values}``: index 0 is the point estimate (all weights 1), the rest are
    the replicates; columns are the sites, ``pooled`` (the concatenation) and ``mean-of-sites``.
    """

    def __init__(self, groups_by_site: Mapping[str, np.ndarray], n_boot: int = 1000, seed: int = 0):
        self.n_boot = int(n_boot)
        rng = np.random.default_rng(seed)
        self.weights = {}
        for site, groups in groups_by_site.items():
            w = patient_weights(groups, self.n_boot, rng)
            self.weights[site] = np.vstack([np.ones((1, len(groups))), w])

    def site(self, site: str, pred: Mapping[str, np.ndarray], metric: str = "auroc",
             classes: Sequence[int] | None = None) -> np.ndarray:
        return macro(pred, self.weights[site], metric, classes)

    def site_per_class(self, site: str, pred, metric: str = "auroc") -> np.ndarray:
        return per_class(pred, self.weights[site], metric)

    def columns(self, sets: Mapping[str, Mapping[str, np.ndarray]], metric: str = "auroc") -> dict[str, np.ndarray]:
        out = {s: self.site(s, p, metric) for s, p in sets.items()}
        out[MEAN_OF_SITES] = nanmean_rows(np.stack(list(out.values()), axis=1))
        pooled = concat_predictions(list(sets.values()))
        w = np.hstack([self.weights[s] for s in sets])
        out[POOLED] = macro(pooled, w, metric)
        return out


# ---------------------------------------------------------------------------- plain scores
def concat_predictions(preds: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One prediction set made of several sites' sets (same classes required)."""
    if not preds:
        raise ValueError("no predictions to concatenate")
    classes = [list(np.asarray(p["classes"]).astype(str)) for p in preds if "classes" in p]
    if classes and any(c != classes[0] for c in classes):
        raise ValueError(f"sites predict different classes: {classes}")
    out = {k: np.concatenate([np.asarray(p[k]) for p in preds]) for k in ("probs", "targets", "mask")}
    if all("record_ids" in p for p in preds):
        out["record_ids"] = np.concatenate([np.asarray(p["record_ids"]).astype(str) for p in preds])
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
    """Same number as :func:`shared.metrics.masked_macro_auroc`, through the bootstrap's code."""
    return float(macro({"probs": probs, "targets": targets, "mask": mask}, np.ones((1, len(probs))))[0])


def best_f1_thresholds(pred: Mapping[str, np.ndarray]) -> np.ndarray:
    """``[K]``: per class, the threshold that maximises F1 on ``pred`` (the validation split);
    NaN where the class has no positive or no known record there."""
    probs, targets, mask = (np.asarray(pred[k]) for k in ("probs", "targets", "mask"))
    out = np.full(probs.shape[1], np.nan)
    for k in range(probs.shape[1]):
        known = mask[:, k] > 0
        s, y = probs[known, k].astype(np.float64), targets[known, k] > 0.5
        if not y.any():
            continue
        order = np.argsort(-s, kind="mergesort")
        s, y = s[order], y[order]
        last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each distinct score
        tp = np.cumsum(y)[last]
        fp = (last + 1) - tp
        f1 = 2 * tp / (2 * tp + fp + (y.sum() - tp))
        out[k] = s[last[int(np.argmax(f1))]]
    return out


def f1_scores(pred: Mapping[str, np.ndarray], thresholds: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``(per-class F1 [K], macro F1, micro F1)`` at ``thresholds`` (``[K]``, or ``[N, K]`` per
    record; predicted positive: prob >= threshold) over the known labels. A NaN threshold leaves
    the class out for those records; a class with no positive there has NaN F1."""
    probs, targets, mask = (np.asarray(pred[k]) for k in ("probs", "targets", "mask"))
    ths = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), probs.shape)
    per = np.full(probs.shape[1], np.nan)
    tps = fps = fns = 0
    for k in range(probs.shape[1]):
        use = (mask[:, k] > 0) & ~np.isnan(ths[:, k])
        if not use.any():
            continue
        y = targets[use, k] > 0.5
        hat = probs[use, k] >= ths[use, k]
        tp, fp, fn = int((hat & y).sum()), int((hat & ~y).sum()), int((~hat & y).sum())
        tps, fps, fns = tps + tp, fps + fp, fns + fn
        if y.any():
            per[k] = 2 * tp / (2 * tp + fp + fn)
    defined = per[~np.isnan(per)]
    macro_f1 = float(defined.mean()) if defined.size else float("nan")
    micro_f1 = 2 * tps / (2 * tps + fps + fns) if (2 * tps + fps + fns) else float("nan")
    return per, macro_f1, float(micro_f1)


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
    per-class AUROC/AUPRC and record counts, plus ``pooled`` and ``mean-of-sites`` macro AUROC
    and AUPRC."""
    from .results import make_row

    common = dict(method=method, train_sites=train_sites, seed=seed, config_hash=config_hash,
                  round=round, synthetic=synthetic)
    rows = []
    for site, p in preds_by_site.items():
        ones = np.ones((1, len(p["probs"])))
        classes = [str(c) for c in p["classes"]] if "classes" in p else [str(k) for k in range(p["probs"].shape[1])]
        for metric in ("auroc", "auprc"):
            for name, v in zip(classes, per_class(p, ones, metric)[0]):
                rows.append(make_row(test_site=site, metric=f"{metric}_{name}", value=v, **common))
        rows.append(make_row(test_site=site, metric="n_records", value=len(p["probs"]), **common))
    for metric in ("auroc", "auprc"):
        cols = Bootstrap({s: np.asarray(p["record_ids"]) if "record_ids" in p else np.arange(len(p["probs"]))
                          for s, p in preds_by_site.items()}, n_boot=0).columns(preds_by_site, metric)
        for col, v in cols.items():
            rows.append(make_row(test_site=col, metric=f"{metric}_macro", value=float(v[0]), **common))
    return rows
