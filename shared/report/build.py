"""Long-form results CSV (+ saved predictions) -> ``report.md``, per-class cross-site CSVs and PNG plots.

One report covers one config (one ``config_hash``): a CSV holding several is refused unless the
hash to report is named (compare.py names its own). Every number of the tables is recomputed from
the saved record-level predictions of that config (and checked against the CSV's macro AUROC);
every interval, and every difference the report states, comes from one paired, patient-level
bootstrap (:class:`shared.report.scores.Bootstrap`) with the seeds combined.

Tables: macro AUROC and macro AUPRC per test site; per-class AUROC and AUPRC; F1 at thresholds
chosen on the validation split; differences (federated - pooled, federated - local, DP - non-DP)
with intervals; the cross-site matrix of the local models on the classes known at both sites,
with the in-site minus cross-site gap and its interval; per-class cross-site matrices (CSV and
heatmap); epsilon per site. The per-round curves are the server's validation-split numbers.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shared.training.evaluate import load_predictions

from . import plots
from .results import MEAN_OF_SITES, OWN_SITE, POOLED, predictions_path, read_results
from .scores import (
    Bootstrap,
    best_f1_thresholds,
    concat_predictions,
    f1_scores,
    interval,
    nanmean_rows,
    patient_groups,
    per_class,
    undefined_reason,
)

SYNTHETIC_TAG = " (synthetic data)"
DEFAULT_BOOT = 1000


def method_order(methods) -> list[str]:
    def key(m: str):
        if m == "local":
            return (0, m)
        if m == "pooled":
            return (1, m)
        return (3 if m.endswith("+dp") else 2, m)

    return sorted(set(methods), key=key)


def _fmt_g(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.4g}"


def _fmt(v: float) -> str:
    return "n/a" if v is None or np.isnan(v) else f"{v:.3f}"


def _cell(reps: np.ndarray, signed: bool = False) -> str:
    """``point [lo, hi]`` from ``[1 + B]`` values (index 0: the point estimate)."""
    point = float(reps[0])
    if np.isnan(point):
        return "n/a"
    lo, hi = interval(reps[1:])
    f = (lambda v: f"{v:+.3f}") if signed else _fmt
    if np.isnan(lo):
        return f"{f(point)} [no interval: undefined in most replicates]"
    text = f"{f(point)} [{f(lo)}, {f(hi)}]"
    if signed and lo <= 0 <= hi:
        text += " (crosses 0)"
    return text


class Report:
    """The rows of one config of a results CSV and the predictions behind them."""

    def __init__(self, results_csv, predictions_dirs: Sequence[Path], *, config_hash: str | None = None,
                 n_boot: int = DEFAULT_BOOT, boot_seed: int = 0):
        rows = read_results(results_csv)
        if not rows:
            raise ValueError(f"{results_csv}: no results to report")
        hashes = Counter(r["config_hash"] for r in rows)
        listing = ", ".join(f"{h} ({n} rows)" for h, n in sorted(hashes.items()))
        if config_hash is None:
            if len(hashes) > 1:
                raise ValueError(f"{results_csv}: rows of {len(hashes)} configs ({listing}); a report covers one "
                                 f"config: name it with --config-hash HASH")
            config_hash = next(iter(hashes))
        elif config_hash not in hashes:
            raise ValueError(f"{results_csv}: no rows with config hash {config_hash!r}; it holds {listing}")
        self.config_hash = config_hash
        self.other_hashes = sorted(h for h in hashes if h != config_hash)
        self.results_csv = Path(results_csv)
        self.rows = [r for r in rows if r["config_hash"] == config_hash]
        self.predictions_dirs = [Path(p) for p in predictions_dirs]
        self.synthetic = any(r["synthetic"] for r in self.rows)
        self.tag = SYNTHETIC_TAG if self.synthetic else ""
        self.final = [r for r in self.rows if not r["metric"].startswith("round_")]
        self.methods = method_order(r["method"] for r in self.final)
        self.sites = self._sites()
        self.columns = [*self.sites, MEAN_OF_SITES, POOLED]
        self._cache: dict[Path, dict] = {}
        self.n_boot = int(n_boot)
        ref = {s: self._reference(s) for s in self.sites}
        self.ref_ids = {s: np.asarray(p["record_ids"]).astype(str) for s, p in ref.items()}
        self.patient_level = all("patient_ids" in p for p in ref.values())
        self.boot = Bootstrap({s: np.char.add(f"{s}\x1f", patient_groups(p)) for s, p in ref.items()},
                              n_boot=self.n_boot, seed=boot_seed)
        self.n_patients = {s: len(np.unique(patient_groups(p))) for s, p in ref.items()}
        self.n_records = {s: len(p["probs"]) for s, p in ref.items()}
        self.classes = [str(c) for c in ref[self.sites[0]]["classes"]]
        self.known = {s: (np.asarray(p["mask"]) > 0).any(axis=0) for s, p in ref.items()}

    def _sites(self) -> list[str]:
        seen: list[str] = []
        for r in self.final:
            t = r["test_site"]
            if t not in (POOLED, MEAN_OF_SITES) and t not in seen:
                seen.append(t)
        return seen

    # ------------------------------------------------------------------ predictions
    def train_sites(self, method: str, site: str) -> str:
        if method == "local":
            return site
        found = {r["train_sites"] for r in self.final if r["method"] == method and r["test_site"] == site}
        if len(found) != 1:
            raise ValueError(f"{self.results_csv}: method {method!r} has rows trained on {sorted(found)} for "
                             f"test site {site!r} under config {self.config_hash}; expected exactly one")
        return found.pop()

    def seeds(self, method: str) -> list[int]:
        return sorted({r["seed"] for r in self.final if r["method"] == method and r["metric"] == "auroc_macro"})

    def pred(self, method: str, seed: int, train: str, test: str, split: str = "test") -> dict:
        """One saved prediction set, checked to carry this report's config hash."""
        tried = []
        for d in self.predictions_dirs:
            path = predictions_path(d, method, seed, train, test, self.config_hash, split)
            tried.append(str(path))
            if path.is_file():
                break
        else:
            raise ValueError(f"predictions of {method} seed {seed} ({train} -> {test}, {split}) are missing: "
                             f"looked for {', '.join(tried)}")
        if path in self._cache:
            return self._cache[path]
        p = load_predictions(path)
        if "config_hash" not in p:
            raise ValueError(f"{path}: carries no config hash (written by an earlier version of the project)")
        if str(p["config_hash"]) != self.config_hash:
            raise ValueError(f"{path}: predictions of config {p['config_hash']}, the report is for {self.config_hash}")
        if split == "test" and test in getattr(self, "ref_ids", {}):
            ids = np.asarray(p["record_ids"]).astype(str)
            if not np.array_equal(ids, self.ref_ids[test]):
                raise ValueError(f"{path}: its test records differ from the other predictions for {test} "
                                 f"(not the same cache/splits)")
        self._cache[path] = p
        return p

    def _reference(self, site: str) -> dict:
        for method in self.methods:
            for seed in self.seeds(method):
                return self.pred(method, seed, self.train_sites(method, site), site)
        raise ValueError(f"{self.results_csv}: no predictions for test site {site}")

    def method_sets(self, method: str, seed: int) -> dict[str, dict]:
        return {s: self.pred(method, seed, self.train_sites(method, s), s) for s in self.sites}

    # ------------------------------------------------------------------ replicates
    def replicates(self, method: str, metric: str = "auroc") -> dict[int, dict[str, np.ndarray]]:
        """``{seed: {column: [1 + B]}}`` of one method (cached)."""
        key = ("reps", method, metric)
        if key not in self._cache:
            out = {}
            for seed in self.seeds(method):
                sets = self.method_sets(method, seed)
                out[seed] = self.boot.columns(sets, metric)
                if metric == "auroc":
                    self._check_csv(method, seed, out[seed])
            self._cache[key] = out
        return self._cache[key]

    def _check_csv(self, method: str, seed: int, cols: dict[str, np.ndarray]) -> None:
        for col, reps in cols.items():
            csv_rows = [r["value"] for r in self.final if r["method"] == method and r["seed"] == seed
                        and r["test_site"] == col and r["metric"] == "auroc_macro"
                        and (method != "local" or r["train_sites"] == OWN_SITE)]
            if csv_rows and not (np.isnan(csv_rows[0]) and np.isnan(reps[0])) and abs(csv_rows[0] - reps[0]) > 1e-6:
                raise ValueError(f"{self.results_csv}: {method} seed {seed} {col} macro AUROC {csv_rows[0]:.6f} "
                                 f"differs from its saved predictions ({reps[0]:.6f})")

    def combined(self, method: str, metric: str = "auroc") -> dict[str, np.ndarray]:
        """``{column: [1 + B]}``: the mean over seeds."""
        reps = self.replicates(method, metric)
        return {c: nanmean_rows(np.stack([reps[s][c] for s in reps], axis=1)) for c in self.columns}

    def difference(self, a: str, b: str, metric: str = "auroc") -> tuple[dict[str, np.ndarray], int]:
        """``a - b`` per column, paired: same replicate weights, seeds both methods have, averaged."""
        ra, rb = self.replicates(a, metric), self.replicates(b, metric)
        common = sorted(set(ra) & set(rb))
        if not common:
            return {}, 0
        return {c: nanmean_rows(np.stack([ra[s][c] - rb[s][c] for s in common], axis=1))
                for c in self.columns}, len(common)

    # ------------------------------------------------------------------ tables
    def _boot_words(self) -> str:
        unit = "patients" if self.patient_level else "records (the predictions carry no patient ids)"
        seeds = sorted({s for m in self.methods for s in self.seeds(m)})
        return (f"Intervals: {self.n_boot}-replicate percentile bootstrap 95 % intervals resampling test {unit} "
                f"with replacement within each site (a record without a patient id counts as its own patient), "
                f"the same draws for every method and seed (paired); "
                f"values and replicates are the mean over the seeds ({', '.join(map(str, seeds))}).")

    def metric_table(self, metric: str) -> list[str]:
        name = {"auroc": "AUROC", "auprc": "AUPRC (average precision)"}[metric]
        lines = [
            f"### Macro {name} per test site{self.tag}",
            "",
            f"Record-level macro {name} of the final model on each site's test split (the mean over the "
            "classes defined there). `pooled`: all sites' test predictions concatenated (not an average); "
            "`mean-of-sites`: the mean of the site columns. `local` = each site's own model on its own test "
            "split. " + self._boot_words() + " n/a: no class defined in that test split.",
            "",
            "| method | " + " | ".join(self.columns) + " |",
            "|---|" + "---|" * len(self.columns),
        ]
        for method in self.methods:
            comb = self.combined(method, metric)
            lines.append(f"| {method} | " + " | ".join(_cell(comb[c]) for c in self.columns) + " |")
        return lines

    def per_class_table(self, metric: str) -> list[str]:
        name = {"auroc": "AUROC", "auprc": "AUPRC"}[metric]
        lines = [
            f"### Per-class {name}{self.tag}",
            "",
            f"Test split, mean over seeds. n/a says why the class has no {name} there (never 0.5).",
            "",
            "| method | test set | " + " | ".join(self.classes) + " |",
            "|---|---|" + "---|" * len(self.classes),
        ]
        for method in self.methods:
            for col in [*self.sites, POOLED]:
                vals = []
                for seed in self.seeds(method):
                    sets = self.method_sets(method, seed)
                    pred = sets[col] if col != POOLED else concat_predictions(list(sets.values()))
                    w = self.boot.weights[col][:1] if col != POOLED else np.ones((1, len(pred["probs"])))
                    vals.append(per_class(pred, w, metric)[0])
                mean = nanmean_rows(np.stack(vals, axis=1)) if vals else None
                cells = []
                for k in range(len(self.classes)):
                    if mean is not None and not np.isnan(mean[k]):
                        cells.append(_fmt(mean[k]))
                    else:
                        cells.append(f"n/a ({undefined_reason(pred, k) or 'undefined'})")
                lines.append(f"| {method} | {col} | " + " | ".join(cells) + " |")
        return lines

    def f1_table(self) -> list[str]:
        lines = [
            f"### F1 at thresholds chosen on the validation split{self.tag}",
            "",
            "Per class, the threshold that maximises F1 on the model's validation predictions (local: its "
            "site's validation split; pooled and federated: all sites' validation splits concatenated) is "
            "applied once to the test split. Pooled test set; mean over seeds; point estimates only.",
            "",
            "| method | macro F1 | micro F1 | " + " | ".join(f"F1 {c}" for c in self.classes) + " |",
            "|---|---|---|" + "---|" * len(self.classes),
        ]
        for method in self.methods:
            per, mac, mic = [], [], []
            for seed in self.seeds(method):
                tests = [self.pred(method, seed, self.train_sites(method, s), s) for s in self.sites]
                if method == "local":  # each site's own model, its own threshold, on its own records
                    ths = np.concatenate([np.tile(best_f1_thresholds(self.pred(method, seed, s, s, "val")),
                                                  (len(t["probs"]), 1)) for s, t in zip(self.sites, tests)])
                else:
                    val = concat_predictions([self.pred(method, seed, self.train_sites(method, s), s, "val")
                                              for s in self.sites])
                    ths = best_f1_thresholds(val)
                p, ma, mi = f1_scores(concat_predictions(tests), ths)
                per.append(p)
                mac.append(ma)
                mic.append(mi)
            per_m = nanmean_rows(np.stack(per, axis=1)) if per else np.full(len(self.classes), np.nan)
            lines.append(f"| {method} | {_fmt(float(nanmean_rows(np.array(mac))))} | "
                         f"{_fmt(float(nanmean_rows(np.array(mic))))} | "
                         + " | ".join(_fmt(v) for v in per_m) + " |")
        return lines

    def differences_table(self) -> list[str]:
        pairs = []
        for m in self.methods:
            if m.startswith("federated"):
                if "pooled" in self.methods:
                    pairs.append((m, "pooled"))
                if "local" in self.methods:
                    pairs.append((m, "local"))
            if m.endswith("+dp") and m[:-3] in self.methods:
                pairs.append((m, m[:-3]))
        if not pairs:
            return []
        lines = [
            f"### Differences, macro AUROC{self.tag}",
            "",
            "Each row is `first - second` on the same test records; negative = the first method loses. "
            "`local` = each site's own model (its `pooled` column concatenates the sites' own models' "
            "predictions). " + self._boot_words() + " `(crosses 0)`: the interval includes 0 (no difference).",
            "",
            "| difference | seeds | " + " | ".join(self.columns) + " |",
            "|---|---|" + "---|" * len(self.columns),
        ]
        for a, b in pairs:
            diff, n = self.difference(a, b)
            if not diff:
                continue
            lines.append(f"| {a} − {b} | {n} | " + " | ".join(_cell(diff[c], signed=True) for c in self.columns)
                         + " |")
        return lines

    # ------------------------------------------------------------------ cross-site
    def common_classes(self, train: str, test: str) -> list[int]:
        return [k for k in range(len(self.classes)) if self.known[train][k] and self.known[test][k]]

    def cross_site(self) -> dict:
        """Macro AUROC of local model ``i`` on test site ``j`` over the classes known at both, the
        per-class AUROCs, and the gap (in-site minus cross-site on the same classes) per train site."""
        if "local" not in self.methods:
            return {}
        seeds = self.seeds("local")
        n = len(self.sites)
        macro_reps = np.full((n, n, 1 + self.n_boot), np.nan)
        per_cls = np.full((len(self.classes), n, n), np.nan)
        gaps = np.full((n, 1 + self.n_boot), np.nan)
        for i, train in enumerate(self.sites):
            in_minus_cross = []
            for j, test in enumerate(self.sites):
                cls = self.common_classes(train, test)
                cell, insite, pc = [], [], []
                for seed in seeds:
                    p = self.pred("local", seed, train, test)
                    w = self.boot.weights[test]
                    pcs = per_class(p, w, "auroc", cls)
                    cell.append(nanmean_rows(pcs))
                    pc.append(pcs[0])
                    if j != i:
                        own = self.pred("local", seed, train, train)
                        insite.append(nanmean_rows(per_class(own, self.boot.weights[train], "auroc", cls)))
                macro_reps[i, j] = np.mean(np.stack(cell), axis=0)
                per_cls[:, i, j] = nanmean_rows(np.stack(pc, axis=1))
                if j != i:
                    in_minus_cross.append(np.mean(np.stack(insite), axis=0) - macro_reps[i, j])
            if in_minus_cross:
                gaps[i] = nanmean_rows(np.stack(in_minus_cross, axis=1))
        return {"macro": macro_reps, "per_class": per_cls, "gaps": gaps}

    def cross_site_table(self, cs: dict) -> list[str]:
        def short(cls: list[int]) -> str:
            return "all" if len(cls) == len(self.classes) else ",".join(self.classes[k] for k in cls) or "none"

        lines = [
            f"### Cross-site matrix: local training, macro AUROC on the classes known at both sites{self.tag}",
            "",
            "Row: the site a local-only model was trained on; column: the test split it was scored on (mean over "
            "seeds). Each cell averages only the classes the training site and the test site can both state "
            "(in brackets; `all` = every class); a class one of them cannot state says nothing about transfer. "
            "`gap` (in-site − cross-site) = for each other test site, the in-site AUROC on that cell's classes "
            "minus the cell, averaged over the other sites, with its patient-level interval. Per-class matrices: "
            "`cross_site_<CLASS>.csv` / `.png`; the macro one: `cross_site_macro.csv`.",
            "",
            "| trained on \\ tested on | " + " | ".join(self.sites) + " | gap (in-site − cross-site) |",
            "|---|" + "---|" * (len(self.sites) + 1),
        ]
        for i, s in enumerate(self.sites):
            cells = [f"{_fmt(cs['macro'][i, j, 0])} ({short(self.common_classes(s, t))})"
                     for j, t in enumerate(self.sites)]
            lines.append(f"| {s} | " + " | ".join(cells) + f" | {_cell(cs['gaps'][i], signed=True)} |")
        return lines

    def write_cross_site_files(self, cs: dict, out: Path) -> list[str]:
        written = []
        mat = cs["macro"]
        rows = [["trained_on", *[f"{t}" for t in self.sites], *[f"{t}_lo" for t in self.sites],
                 *[f"{t}_hi" for t in self.sites], *[f"{t}_classes" for t in self.sites]]]
        for i, s in enumerate(self.sites):
            ivals = [interval(mat[i, j, 1:]) for j in range(len(self.sites))]
            rows.append([s, *[_fmt(mat[i, j, 0]) for j in range(len(self.sites))],
                         *[_fmt(lo) for lo, _ in ivals], *[_fmt(hi) for _, hi in ivals],
                         *[" ".join(self.classes[k] for k in self.common_classes(s, t)) for t in self.sites]])
        _write_csv(out / "cross_site_macro.csv", rows)
        plots.plot_heatmap(mat[:, :, 0], self.sites, out / "cross_site_heatmap.png", self.tag,
                           title="Cross-site macro AUROC (classes known at both sites)")
        written.append("cross_site_heatmap.png")
        for k, cls in enumerate(self.classes):
            m = cs["per_class"][k]
            rows = [["trained_on", *self.sites]]
            for i, s in enumerate(self.sites):
                cells = []
                for j, t in enumerate(self.sites):
                    if not self.known[s][k]:
                        cells.append(f"n/a (not available at {s})")
                    elif not self.known[t][k]:
                        cells.append(f"n/a (not available at {t})")
                    else:
                        cells.append(_fmt(m[i, j]) if not np.isnan(m[i, j]) else "n/a (undefined in the test split)")
                rows.append([s, *cells])
            _write_csv(out / f"cross_site_{cls}.csv", rows)
            plots.plot_heatmap(m, self.sites, out / f"cross_site_{cls}.png", self.tag,
                               title=f"Cross-site AUROC, class {cls}")
            written.append(f"cross_site_{cls}.png")
        return written

    def epsilon_table(self) -> list[str]:
        dp_methods = [m for m in self.methods if m.endswith("+dp")]
        if not dp_methods:
            return []
        lines = [
            f"### Privacy spent per site (DP-SGD, Opacus){self.tag}",
            "",
            "Per site: the privacy unit and their number N, the Poisson sample rate q, the optimiser "
            "steps of the run, the noise multiplier, the clipping norm, and the (epsilon, delta) spent "
            "on the site's dataset after its last round (from its ledger; mean over seeds). "
            "See docs/privacy.md.",
            "",
            "| method | site | unit | N | q | steps | noise | clip | delta | epsilon |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]

        def mean(rows, metric):
            values = [r["value"] for r in rows if r["metric"] == metric]
            return float(np.mean(values)) if values else float("nan")

        for method in dp_methods:
            for site in self.sites:
                rows = [r for r in self.final if r["method"] == method and r["test_site"] == site]
                units = sorted({r["metric"][len("dp_units_"):] for r in rows if r["metric"].startswith("dp_units_")})
                unit = ", ".join(units) or "n/a"
                n_units = mean(rows, f"dp_units_{units[0]}") if len(units) == 1 else float("nan")
                cells = [unit, _fmt_g(n_units), _fmt_g(mean(rows, "dp_sample_rate")), _fmt_g(mean(rows, "dp_steps")),
                         _fmt_g(mean(rows, "dp_noise_multiplier")), _fmt_g(mean(rows, "dp_max_grad_norm")),
                         _fmt_g(mean(rows, "delta")), _fmt(mean(rows, "epsilon"))]
                lines.append(f"| {method} | {site} | " + " | ".join(cells) + " |")
        return lines

    # ------------------------------------------------------------------ plots
    def round_series(self) -> dict[str, dict[str, list[tuple[int, float]]]]:
        """Per-round macro AUROC (validation split) of the first seed of every method that has them."""
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

    def roc_sets(self) -> dict[str, dict]:
        return {m: concat_predictions(list(self.method_sets(m, self.seeds(m)[0]).values()))
                for m in self.methods if self.seeds(m)}


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def build_report(results_csv, predictions_dirs, out_dir, *, n_boot: int = DEFAULT_BOOT,
                 config_hash: str | None = None) -> Path:
    """Write ``out_dir/report.md``, its CSVs and PNG plots; returns the report's path."""
    if isinstance(predictions_dirs, (str, os.PathLike)):
        predictions_dirs = [predictions_dirs]
    report = Report(results_csv, [Path(p) for p in predictions_dirs], config_hash=config_hash, n_boot=n_boot)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Federated vs pooled vs local ECG diagnosis{report.tag}", ""]
    if report.synthetic:
        lines += [
            "> **Synthetic data.** At least one site's data comes from the embedded synthetic generator, not "
            "from patients: the numbers show that the pipeline works, not how well any method diagnoses.",
            "",
        ]
    counts = ", ".join(f"{s} {report.n_records[s]} records / {report.n_patients[s]} patients" for s in report.sites)
    lines += [f"Source: `{Path(results_csv).name}`, config hash `{report.config_hash}` only"
              + (f" (rows of other configs in the file, not reported here: {', '.join(report.other_hashes)})"
                 if report.other_hashes else "")
              + f"; test splits: {counts}.", ""]
    lines += report.metric_table("auroc") + [""]
    lines += report.differences_table() + [""]
    cs = report.cross_site()
    if cs:
        lines += report.cross_site_table(cs) + [""]
        report.write_cross_site_files(cs, out)
        lines += [f"![Cross-site heatmap{report.tag}](cross_site_heatmap.png)", ""]
    lines += report.metric_table("auprc") + [""]
    lines += report.per_class_table("auroc") + [""]
    lines += report.per_class_table("auprc") + [""]
    lines += report.f1_table() + [""]
    lines += report.epsilon_table() + [""]
    series = report.round_series()
    if series:
        plots.plot_rounds(series, out / "auroc_per_round.png", report.tag)
        lines += [f"![Macro AUROC per round per site, validation split{report.tag}](auroc_per_round.png)", ""]
    curves = report.roc_sets()
    if curves:
        plots.plot_roc(curves, report.classes, out / "roc_curves.png", report.tag)
        lines += [f"![ROC curves on the pooled test set{report.tag}](roc_curves.png)", ""]
    path = out / "report.md"
    tmp = out / f".report.md.tmp-{os.getpid()}"
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    os.replace(tmp, path)
    return path
