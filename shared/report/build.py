"""Long-form results CSV (+ saved predictions) -> ``report.md`` and PNG plots.

Tables: macro AUROC per test site and method (spread over seeds, or a bootstrap interval when
there is one seed), the cross-site matrix of the local baselines, federated minus pooled, and
epsilon per site for the DP rows. The numbers come from the CSV; bootstrap intervals and ROC curves
from the saved record-level predictions.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shared.training.evaluate import load_predictions

from . import plots
from .results import MEAN_OF_SITES, OWN_SITE, POOLED, predictions_path, read_results
from .scores import bootstrap_interval, concat_predictions

SYNTHETIC_TAG = " (synthetic data)"


def method_order(methods) -> list[str]:
    def key(m: str):
        if m == "local":
            return (0, m)
        if m == "pooled":
            return (1, m)
        return (3 if m.endswith("+dp") else 2, m)

    return sorted(set(methods), key=key)


def _fmt(v: float) -> str:
    return "n/a" if v is None or np.isnan(v) else f"{v:.3f}"


class Report:
    """The results of one CSV, grouped for the tables (final rows only)."""

    def __init__(self, results_csv, predictions_dirs: Sequence[Path]):
        self.rows = read_results(results_csv)
        if not self.rows:
            raise ValueError(f"{results_csv}: no results to report")
        self.predictions_dirs = [Path(p) for p in predictions_dirs]
        self.synthetic = any(r["synthetic"] for r in self.rows)
        self.tag = SYNTHETIC_TAG if self.synthetic else ""
        self.final = [r for r in self.rows if not r["metric"].startswith("round_")]
        self.methods = method_order(r["method"] for r in self.final)
        self.sites = self._sites()
        self.columns = [*self.sites, MEAN_OF_SITES, POOLED]

    def _sites(self) -> list[str]:
        seen: list[str] = []
        for r in self.final:
            t = r["test_site"]
            if t not in (POOLED, MEAN_OF_SITES) and t not in seen:
                seen.append(t)
        return seen

    def headline_rows(self, method: str) -> list[dict]:
        """The rows of ``method`` that answer "how good on each test site": local -> own-site."""
        if method == "local":
            return [r for r in self.final if r["method"] == "local" and r["train_sites"] == OWN_SITE]
        return [r for r in self.final if r["method"] == method]

    def values(self, rows, test_site: str, metric: str = "auroc_macro") -> dict[int, float]:
        return {r["seed"]: r["value"] for r in rows if r["test_site"] == test_site and r["metric"] == metric}

    def seeds(self, method: str) -> list[int]:
        return sorted({r["seed"] for r in self.headline_rows(method)})

    def load_method_predictions(self, method: str, seed: int) -> dict[str, dict] | None:
        """``{site: predictions}`` behind the headline row of ``method`` (None if any is missing)."""
        rows = self.headline_rows(method)
        out = {}
        for site in self.sites:
            train = site if method == "local" else next(
                (r["train_sites"] for r in rows if r["test_site"] == site and r["seed"] == seed), None)
            if train is None:
                return None
            path = self._find(method, seed, train, site)
            if path is None:
                return None
            out[site] = load_predictions(path)
        return out

    def _find(self, method, seed, train, test) -> Path | None:
        for d in self.predictions_dirs:
            p = predictions_path(d, method, seed, train, test)
            if p.is_file():
                return p
        return None

    # ------------------------------------------------------------------ tables
    def auroc_table(self, n_boot: int) -> list[str]:
        lines = [
            f"### Macro AUROC per test site{self.tag}",
            "",
            "Record-level macro AUROC of the final model on each site's test split. `pooled` is the "
            "AUROC of all sites' test predictions concatenated (not an average); `mean-of-sites` is "
            "the mean of the site columns (defined ones only). `local` = each site's own model on its own "
            "test split (its `pooled` concatenates the predictions of the sites' own models). "
            + ("Cells: mean ± standard deviation over seeds (n seeds)." if self._multi_seed() else "")
            + (f" One seed: the interval is a {n_boot}-replicate bootstrap 95 % interval over test records."
               if not self._multi_seed() else "")
            + " n/a: undefined (no class has both positive and negative records in that test split).",
            "",
            "| method | " + " | ".join(self.columns) + " |",
            "|---|" + "---|" * len(self.columns),
        ]
        for method in self.methods:
            rows = self.headline_rows(method)
            if not rows:
                continue
            seeds = self.seeds(method)
            preds = None
            if len(seeds) == 1:
                preds = self.load_method_predictions(method, seeds[0])
            cells = []
            for col in self.columns:
                vals = self.values(rows, col)
                cells.append(self._cell(vals, preds, col, n_boot))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return lines

    def _multi_seed(self) -> bool:
        return any(len(self.seeds(m)) > 1 for m in self.methods)

    def _cell(self, vals: dict[int, float], preds, col: str, n_boot: int) -> str:
        if not vals:
            return "–"
        v = np.array(list(vals.values()), dtype=float)
        if np.all(np.isnan(v)):
            return "n/a"
        if len(v) > 1:
            return f"{np.nanmean(v):.3f} ± {np.nanstd(v, ddof=1):.3f} (n={len(v)})"
        if preds is None:
            return f"{_fmt(v[0])} (no CI: predictions missing)"
        lo, hi = bootstrap_interval(preds, col, n_boot=n_boot)
        return f"{_fmt(v[0])} [{_fmt(lo)}, {_fmt(hi)}]"

    def cross_site_matrix(self) -> np.ndarray:
        m = np.full((len(self.sites), len(self.sites)), np.nan)
        for i, train in enumerate(self.sites):
            for j, test in enumerate(self.sites):
                vals = [r["value"] for r in self.final if r["method"] == "local" and r["train_sites"] == train
                        and r["test_site"] == test and r["metric"] == "auroc_macro"]
                if vals:
                    m[i, j] = float(np.nanmean(vals)) if not np.all(np.isnan(vals)) else np.nan
        return m

    def cross_site_table(self, matrix: np.ndarray) -> list[str]:
        lines = [
            f"### Cross-site matrix: local training, macro AUROC{self.tag}",
            "",
            "Row: the site a local-only model was trained on; column: the test split it was scored on "
            "(mean over seeds). `gap` = own-site AUROC minus the mean over the other sites.",
            "",
            "| trained on \\ tested on | " + " | ".join(self.sites) + " | gap |",
            "|---|" + "---|" * (len(self.sites) + 1),
        ]
        for i, s in enumerate(self.sites):
            others = [matrix[i, j] for j in range(len(self.sites)) if j != i and not np.isnan(matrix[i, j])]
            gap = matrix[i, i] - np.mean(others) if others and not np.isnan(matrix[i, i]) else np.nan
            lines.append(f"| {s} | " + " | ".join(_fmt(v) for v in matrix[i]) + f" | {_fmt(gap)} |")
        return lines

    def fed_minus_pooled(self) -> list[str]:
        feds = [m for m in self.methods if m.startswith("federated")]
        if not feds or "pooled" not in self.methods:
            return []
        pooled_rows = self.headline_rows("pooled")
        lines = [
            f"### Federated minus pooled, macro AUROC{self.tag}",
            "",
            "Paired by seed (same splits, same budget of local updates); negative = federation loses.",
            "",
            "| method | " + " | ".join(self.columns) + " |",
            "|---|" + "---|" * len(self.columns),
        ]
        for method in feds:
            rows = self.headline_rows(method)
            cells = []
            for col in self.columns:
                a, b = self.values(rows, col), self.values(pooled_rows, col)
                diffs = np.array([a[s] - b[s] for s in sorted(set(a) & set(b))], dtype=float)
                diffs = diffs[~np.isnan(diffs)]
                if diffs.size == 0 and (a or b):
                    cells.append("n/a")
                elif diffs.size == 0:
                    cells.append("–")
                elif diffs.size == 1:
                    cells.append(f"{diffs[0]:+.3f}")
                else:
                    cells.append(f"{np.nanmean(diffs):+.3f} ± {np.nanstd(diffs, ddof=1):.3f}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return lines

    def epsilon_table(self) -> list[str]:
        dp_methods = [m for m in self.methods if m.endswith("+dp")]
        if not dp_methods:
            return []
        lines = [
            f"### Privacy spent per site (DP-SGD, Opacus){self.tag}",
            "",
            "Cumulative epsilon over every round the site trained in, at the delta shown (mean over seeds).",
            "",
            "| method | " + " | ".join(self.sites) + " | delta |",
            "|---|" + "---|" * (len(self.sites) + 1),
        ]
        for method in dp_methods:
            rows = [r for r in self.final if r["method"] == method]
            eps = [np.mean(list(self.values(rows, s, "epsilon").values()) or [np.nan]) for s in self.sites]
            deltas = {r["value"] for r in rows if r["metric"] == "delta"}
            delta = ", ".join(f"{d:g}" for d in sorted(deltas)) or "n/a"
            lines.append(f"| {method} | " + " | ".join(_fmt(e) if not np.isnan(e) else "n/a" for e in eps)
                         + f" | {delta} |")
        return lines

    # ------------------------------------------------------------------ plots
    def round_series(self) -> dict[str, dict[str, list[tuple[int, float]]]]:
        """Per-round macro AUROC of the first seed of every method that has per-round rows."""
        series: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for method in self.methods:
            rows = [r for r in self.rows if r["method"] == method and r["metric"] == "round_auroc_macro"]
            if not rows:
                continue
            seed = min(r["seed"] for r in rows)
            for r in rows:
                if r["seed"] == seed and not np.isnan(r["value"]):
                    series[method][r["test_site"]].append((r["round"], r["value"]))
        return {m: dict(s) for m, s in series.items()}

    def roc_sets(self) -> tuple[dict[str, dict], list[str]]:
        curves, classes = {}, []
        for method in self.methods:
            seeds = self.seeds(method)
            preds = self.load_method_predictions(method, seeds[0]) if seeds else None
            if preds:
                pooled = concat_predictions(list(preds.values()))
                curves[method] = pooled
                classes = [str(c) for c in pooled.get("classes", classes)]
        return curves, classes


def build_report(results_csv, predictions_dirs, out_dir, *, n_boot: int = 200) -> Path:
    """Write ``out_dir/report.md`` and its PNG plots; returns the report's path."""
    if isinstance(predictions_dirs, (str, os.PathLike)):
        predictions_dirs = [predictions_dirs]
    report = Report(results_csv, [Path(p) for p in predictions_dirs])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Federated vs pooled vs local ECG diagnosis{report.tag}", ""]
    if report.synthetic:
        lines += [
            "> **Synthetic data.** Every number below comes from the embedded synthetic generator, "
            "not from patients: it shows that the pipeline works, not how well any method diagnoses.",
            "",
        ]
    hashes = sorted({r["config_hash"] for r in report.final})
    lines += [f"Source: `{Path(results_csv).name}`; config hash(es): {', '.join(f'`{h}`' for h in hashes)}; "
              f"sites: {', '.join(report.sites)}.", ""]
    lines += report.auroc_table(n_boot) + [""]
    matrix = report.cross_site_matrix()
    if not np.all(np.isnan(matrix)):
        lines += report.cross_site_table(matrix) + [""]
        plots.plot_heatmap(matrix, report.sites, out / "cross_site_heatmap.png", report.tag)
        lines += [f"![Cross-site heatmap{report.tag}](cross_site_heatmap.png)", ""]
    lines += report.fed_minus_pooled() + [""]
    lines += report.epsilon_table() + [""]
    series = report.round_series()
    if series:
        plots.plot_rounds(series, out / "auroc_per_round.png", report.tag)
        lines += [f"![Macro AUROC per round per site{report.tag}](auroc_per_round.png)", ""]
    curves, classes = report.roc_sets()
    if curves and classes:
        plots.plot_roc(curves, classes, out / "roc_curves.png", report.tag)
        lines += [f"![ROC curves on the pooled test set{report.tag}](roc_curves.png)", ""]
    path = out / "report.md"
    tmp = out / f".report.md.tmp-{os.getpid()}"
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    os.replace(tmp, path)
    return path
