"""``python -m simulations.compare [--config FILE] [--set key=value ...]``: the whole comparison.

Methods, each over every seed in the config, all on the same caches (identical patient-disjoint
splits) and scored by the same code (``shared.training.evaluate_model`` on every site's test split):

* ``local``: every site trains alone; its model is scored on every site's test split (the
  cross-site matrix); the ``own-site`` rows hold each site's model on its own test split;
* ``pooled``: one model on the union of the sites' training splits;
* ``federated-<strategy>``: a Flower simulation (``simulations.federation.run_federation``) of
  the four-site app; its final global checkpoint is scored here;
* ``federated-<strategy>+dp``: the same with Opacus DP-SGD at every site; the cumulative epsilon
  of every site comes from the run's ``rounds.csv``.

Same budget of local updates: a federated run does ``rounds`` rounds of ``local_epochs`` epochs
at each site, so every training record is visited ``rounds * local_epochs`` times. ``local``
trains each site for ``rounds`` calls of ``local_epochs`` epochs (a fresh optimiser per call, as a
client gets every round); ``pooled`` does the same on the union of the training splits, so it
makes as many optimiser steps as all sites together (same batch size, same passes over each
record). ``federated+dp`` runs the DP defaults instead (logical batch ``dp-batch-size``,
``dp-local-epochs`` epochs per round, ``dp-lr``; docs/privacy.md, "Benchmark"). All runs start
from the same seed-determined initial weights.

Validation before test: the per-round curves (the federation's ``rounds.csv``) are computed on
the validation splits; each final model is scored once on the test splits, and its validation
predictions are saved beside them for the report's F1 thresholds.

Resumable: results go to ``<out_dir>/results.csv`` (long form, appended atomically once a run is
complete); a run whose ``(method, seed, config_hash)`` is already there is skipped. The report
(``<out_dir>/report/report.md``) is rebuilt at the end.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import ConcatDataset

from shared.data.cache import open_cache
from shared.data.loader import WindowDataset
from shared.federation.run_config import DEFAULTS
from shared.models import PRESETS, build_model
from shared.report import (
    OWN_SITE,
    append_results,
    build_report,
    config_hash,
    finished_runs,
    make_row,
    predictions_path,
    score_rows,
)
from shared.training import (
    TrainConfig,
    evaluate_model,
    load_model,
    save_predictions,
    select_device,
    train_local,
)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "compare_default.yaml"
METHOD_KINDS = ("local", "pooled", "federated", "federated+dp")
SYNTHETIC_DATA_SEED = 0  # the synthetic data's own seed: all training seeds see the same data


class CompareError(Exception):
    """A user error: bad config, missing cache, failed run. Printed as one line."""


# ---------------------------------------------------------------------------- config
def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    cfg = OmegaConf.load(DEFAULT_CONFIG)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise CompareError(f"config file not found: {path}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except Exception as exc:  # omegaconf/yaml raise several types
            raise CompareError(f"{path}: not a valid compare config ({exc})") from None
    if overrides:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        except Exception as exc:
            raise CompareError(f"bad --set override ({exc})") from None
    check_config(cfg)
    return cfg


def check_config(cfg: DictConfig) -> None:
    unknown = [m for m in cfg.methods if m not in METHOD_KINDS]
    if unknown:
        raise CompareError(f"methods {unknown} unknown; choose from {list(METHOD_KINDS)}")
    if cfg.model not in PRESETS or cfg.preset not in PRESETS[cfg.model]:
        raise CompareError(f"model/preset {cfg.model}/{cfg.preset} unknown; models: "
                           + ", ".join(f"{m} ({', '.join(p)})" for m, p in PRESETS.items()))
    if not cfg.sites or len(set(cfg.sites)) != len(cfg.sites):
        raise CompareError(f"sites must be a non-empty list without repeats, got {list(cfg.sites)}")
    if int(cfg.rounds) < 1 or int(cfg.local_epochs) < 1:
        raise CompareError("rounds and local_epochs must be >= 1")
    if not cfg.seeds:
        raise CompareError("seeds must list at least one seed")
    if "accountant" in (cfg.get("dp") or {}):
        raise CompareError("dp.accountant is not a compare setting: the sites' privacy accountant is fixed by "
                           "the project (see docs/comparison.md); remove the key")
    if int(cfg.bootstrap) < 1:
        raise CompareError(f"bootstrap must be >= 1 replicate, got {cfg.bootstrap}")


def input_samples(cfg: DictConfig) -> int:
    preset = PRESETS[cfg.model][cfg.preset]
    return int(round(float(preset["fs"]) * float(preset["seconds"])))


#: DP training settings ``federated+dp`` takes from the federation's defaults (not compare settings).
FEDERATION_DP_TRAINING = ("dp-batch-size", "dp-local-epochs", "dp-lr", "dp-warmup-steps", "dp-max-physical-batch",
                          "dp-unit")


def run_hash(cfg: DictConfig, caches: dict[str, Path]) -> str:
    """Hash of everything that decides a run's numbers except the seed and the method."""
    keep = OmegaConf.to_container(cfg, resolve=True)
    for key in ("seeds", "methods", "strategies", "out_dir", "device", "federation_timeout_s", "bootstrap"):
        keep.pop(key, None)
    keep.pop("data", None)
    keep["caches"] = {s: open_cache(p).manifest.get("config_hash") for s, p in caches.items()}
    if "federated+dp" in list(cfg.methods):  # its DP training settings are the federation's defaults
        keep["federation_dp_training"] = {k: DEFAULTS[k] for k in FEDERATION_DP_TRAINING}
    return config_hash(keep)


# ---------------------------------------------------------------------------- data
def prepare_caches(cfg: DictConfig, out_dir: Path) -> dict[str, Path]:
    """Each site's cache: the configured path, or the synthetic one (built on first use)."""
    caches = {}
    configured = cfg.data.get("caches", {}) or {}
    for site in cfg.sites:
        setting = str(configured.get(site, "") or "")
        if setting:
            path = Path(setting).expanduser()
            if not (path / "manifest.json").is_file():
                raise CompareError(f"site {site}: {path} is not a prepared cache (no manifest.json)")
        else:
            records = int(cfg.data.synthetic_records)
            path = out_dir / "caches" / f"synthetic-{site}-r{records}-s{SYNTHETIC_DATA_SEED}"
            if not (path / "manifest.json").is_file():
                from shared.data.prepare import build_reader, prepare_cache

                print(f"preparing synthetic cache for {site} ({records} records) -> {path}", flush=True)
                reader = build_reader(site, "synthetic", synthetic_records=records,
                                      synthetic_seed=SYNTHETIC_DATA_SEED)
                prepare_cache(reader, path, progress=False)
        open_cache(path)  # validates
        caches[site] = path
    return caches


def datasets(caches: dict[str, Path], split: str, crop: int, seed: int = 0) -> dict[str, WindowDataset]:
    return {s: WindowDataset(p, split, crop_samples=crop, train=(split == "train"), seed=seed)
            for s, p in caches.items()}


# ---------------------------------------------------------------------------- runs
def new_model(cfg: DictConfig, seed: int, n_classes: int):
    """The model of a local/pooled run; seeded, so every method of a seed starts from the same weights."""
    torch.manual_seed(seed)
    return build_model(cfg.model, cfg.preset, n_leads=12, input_samples=input_samples(cfg), n_classes=n_classes)


def train_rounds(cfg: DictConfig, model, train_set, seed: int) -> None:
    """``rounds`` calls of ``local_epochs`` epochs: the budget a federated client gets."""
    for rnd in range(1, int(cfg.rounds) + 1):
        tc = TrainConfig(epochs=int(cfg.local_epochs), lr=float(cfg.lr), batch_size=int(cfg.batch_size),
                         weight_decay=float(cfg.weight_decay), seed=seed * 1000 + rnd, device=str(cfg.device))
        train_local(model, train_set, tc)


def _patient_ids(ds: WindowDataset, record_ids) -> list[str]:
    """Patient id of every record id (empty where the cache has none): the bootstrap's unit."""
    by_record = {str(r["record_id"]): str(r.get("patient_id") or "") for r in ds.cache.records}
    return [by_record.get(str(r), "") for r in record_ids]


def score(cfg, model, test_sets, *, method, train_sites, seed, chash, synthetic, preds_dir,
          val_sets=None) -> tuple[list, dict]:
    """Score ``model`` once on every test split (and on ``val_sets``, the validation splits its
    thresholds are chosen on), save the predictions with their config hash and patient ids, and
    return the test rows and predictions."""
    device = select_device(str(cfg.device))
    preds = {}
    for split, sets in (("test", test_sets), ("val", val_sets or {})):
        for site, ds in sets.items():
            result = evaluate_model(model, ds, device=device, batch_size=max(int(cfg.batch_size), 64))
            path = predictions_path(preds_dir, method, seed, train_sites, site, chash, split)
            save_predictions(path, result, ds.classes, patient_ids=_patient_ids(ds, result.record_ids),
                             config_hash=chash, split=split)
            if split == "test":
                preds[site] = {**result.to_arrays(), "classes": ds.classes}
    rows = score_rows(preds, method=method, train_sites=train_sites, seed=seed, config_hash=chash,
                      round=int(cfg.rounds), synthetic=synthetic)
    return rows, preds


def run_local(cfg, caches, seed, chash, synthetic, preds_dir) -> list[dict]:
    crop = input_samples(cfg)
    tests, vals = datasets(caches, "test", crop), datasets(caches, "val", crop)
    rows, own = [], {}
    for site, train_set in datasets(caches, "train", crop, seed).items():
        model = new_model(cfg, seed, train_set.n_classes)
        train_rounds(cfg, model, train_set, seed)
        site_rows, preds = score(cfg, model, tests, method="local", train_sites=site, seed=seed,
                                 chash=chash, synthetic=synthetic, preds_dir=preds_dir,
                                 val_sets={site: vals[site]})
        rows += site_rows
        own[site] = preds[site]
    rows += score_rows(own, method="local", train_sites=OWN_SITE, seed=seed, config_hash=chash,
                       round=int(cfg.rounds), synthetic=synthetic)
    return rows


def run_pooled(cfg, caches, seed, chash, synthetic, preds_dir) -> list[dict]:
    crop = input_samples(cfg)
    parts = list(datasets(caches, "train", crop, seed).values())
    union = ConcatDataset(parts)
    model = new_model(cfg, seed, parts[0].n_classes)
    train_rounds(cfg, model, union, seed)
    rows, _ = score(cfg, model, datasets(caches, "test", crop), method="pooled",
                    train_sites="+".join(caches), seed=seed, chash=chash, synthetic=synthetic,
                    preds_dir=preds_dir, val_sets=datasets(caches, "val", crop))
    return rows


def federation_run_config(cfg: DictConfig, caches: dict[str, Path], strategy: str, seed: int, dp: bool,
                          run_dir: Path) -> dict[str, Any]:
    rc: dict[str, Any] = {
        "num-server-rounds": int(cfg.rounds), "local-epochs": int(cfg.local_epochs),
        "model": str(cfg.model), "preset": str(cfg.preset), "sites": ",".join(caches),
        "strategy": strategy, "lr": float(cfg.lr), "batch-size": int(cfg.batch_size),
        "weight-decay": float(cfg.weight_decay), "proximal-mu": float(cfg.proximal_mu),
        "server-lr": float(cfg.server_lr), "seed": int(seed), "device": str(cfg.device),
        "dp": bool(dp), "out-dir": str(Path(run_dir).resolve()), "resume": False,
    }
    for site, path in caches.items():
        rc[f"cache-{site}"] = str(path)
    if dp:
        rc.update({"dp-noise-multiplier": float(cfg.dp.noise_multiplier),
                   "dp-max-grad-norm": float(cfg.dp.max_grad_norm), "dp-delta": float(cfg.dp.delta),
                   "dp-epsilon-budget": float(cfg.dp.epsilon_budget or 0.0)})
    return rc


def run_federated(cfg, caches, seed, chash, synthetic, preds_dir, *, method, strategy, dp, out_dir) -> list[dict]:
    try:
        from simulations.federation import run_federation
    except ImportError as exc:
        raise CompareError(f"federated rows need simulations.federation.run_federation ({exc})") from None
    run_dir = out_dir / "runs" / f"{method}-seed{seed}-{chash}"
    rc = federation_run_config(cfg, caches, strategy, seed, dp, run_dir)
    result = run_federation(run_config=rc, timeout=float(cfg.federation_timeout_s))  # Flower's default nodes
    if not result.ok:
        tail = "\n".join(result.log.strip().splitlines()[-15:])
        raise CompareError(f"{method} seed {seed}: the Flower run ended with status {result.status!r}\n{tail}")
    model = load_model(run_dir / "checkpoint.pt")
    crop = input_samples(cfg)
    rows, _ = score(cfg, model, datasets(caches, "test", crop), method=method,
                    train_sites="+".join(caches), seed=seed, chash=chash, synthetic=synthetic,
                    preds_dir=preds_dir, val_sets=datasets(caches, "val", crop))
    return rows + rounds_rows(run_dir / "rounds.csv", method=method, train_sites="+".join(caches), seed=seed,
                              chash=chash, synthetic=synthetic, sites=list(caches))


# The DP figures a site reports (rounds.csv), kept at their value after the site's last round.
DP_LAST = ("epsilon", "delta", "dp_sample_rate", "dp_noise_multiplier", "dp_max_grad_norm")


def rounds_rows(path: Path, *, method, train_sites, seed, chash, synthetic, sites) -> list[dict]:
    """The server's per-round numbers as ``round_<metric>`` rows and, under DP, each site's privacy
    figures: epsilon and delta after its last round, the unit count ``dp_units_<unit>``, sample
    rate, noise multiplier and clipping norm of its last round, and ``dp_steps`` (the run's steps)."""
    if not path.is_file():
        raise CompareError(f"{path}: the federated run wrote no rounds.csv")
    rows, last, steps = [], {}, {}
    dp = method.endswith("+dp")
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            rnd, site, metric, value = int(r["round"]), r["site"], r["metric"], float(r["value"])
            rows.append(make_row(method=method, train_sites=train_sites, test_site=site, metric=f"round_{metric}",
                                 value=value, seed=seed, config_hash=chash, round=rnd, synthetic=synthetic))
            if not dp or site not in sites:
                continue
            if metric in DP_LAST or metric.startswith("dp_units_"):
                if rnd >= last.get((site, metric), (-1, 0))[0]:
                    last[(site, metric)] = (rnd, value)
            elif metric == "steps":
                n, latest = steps.get(site, (0.0, -1))
                steps[site] = (n + value, max(latest, rnd))
    for site, (n, rnd) in steps.items():
        last[(site, "dp_steps")] = (rnd, n)
    for (site, metric), (rnd, value) in sorted(last.items()):
        rows.append(make_row(method=method, train_sites=train_sites, test_site=site, metric=metric, value=value,
                             seed=seed, config_hash=chash, round=rnd, synthetic=synthetic))
    return rows


def planned_runs(cfg: DictConfig) -> list[tuple[str, str | None, bool]]:
    """``(method name, strategy, dp)`` in the config's order."""
    runs = []
    for kind in cfg.methods:
        if kind in ("local", "pooled"):
            runs.append((kind, None, False))
        else:
            dp = kind == "federated+dp"
            for strategy in cfg.strategies:
                runs.append((f"federated-{strategy}" + ("+dp" if dp else ""), str(strategy), dp))
    return runs


def run_compare(cfg: DictConfig) -> Path:
    """Run every (method, seed) not yet in the results; rebuild the report; return its path."""
    out_dir = Path(cfg.out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    caches = prepare_caches(cfg, out_dir)
    synthetic = any(open_cache(p).synthetic for p in caches.values())
    chash = run_hash(cfg, caches)
    results, preds_dir = out_dir / "results.csv", out_dir / "predictions"
    OmegaConf.save(cfg, out_dir / f"config-{chash}.yaml")
    done = finished_runs(results)
    for seed in cfg.seeds:
        seed = int(seed)
        for method, strategy, dp in planned_runs(cfg):
            if (method, seed, chash) in done:
                print(f"skip {method} seed {seed}: already in {results}", flush=True)
                continue
            t0 = time.monotonic()
            if method == "local":
                rows = run_local(cfg, caches, seed, chash, synthetic, preds_dir)
            elif method == "pooled":
                rows = run_pooled(cfg, caches, seed, chash, synthetic, preds_dir)
            else:
                rows = run_federated(cfg, caches, seed, chash, synthetic, preds_dir, method=method,
                                     strategy=strategy, dp=dp, out_dir=out_dir)
            append_results(results, rows)
            headline = OWN_SITE if method == "local" else "+".join(caches)
            pooled = next((r["value"] for r in rows if r["train_sites"] == headline
                           and r["test_site"] == "pooled" and r["metric"] == "auroc_macro"), float("nan"))
            print(f"done {method} seed {seed}: pooled-test macro AUROC {pooled:.3f}"
                  f"{' (synthetic data)' if synthetic else ''} in {time.monotonic() - t0:.1f} s", flush=True)
    report = build_report(results, preds_dir, out_dir / "report", n_boot=int(cfg.bootstrap), config_hash=chash)
    print(f"report: {report}", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file merged over simulations/compare_default.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="omegaconf dotlist overrides, e.g. --set rounds=5 'seeds=[0]' methods=[local,pooled]")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        run_compare(cfg)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
