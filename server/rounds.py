"""After every round: pooled evaluation (when the server has the sites' caches), the checkpoint,
``rounds.csv`` and the one-line progress report. This is the strategy's ``evaluate_fn``.

Every per-round number is on the **validation** split (``evaluate_site``'s default): curves and
any choice made from them never see the test split, which is scored once per final model.

``rounds.csv`` (long form, rewritten atomically each round): ``round, site, metric, value``;
``site`` is a site name, ``pooled`` (AUROC of the concatenated validation predictions of all
sites, computed by the server from its own copy of the caches: simulation only) or
``mean-of-sites`` (the mean of the sites' federated-evaluation AUROCs, labelled as such; never
called pooled). Round 0 is the initial model. A site of the run without a valid training reply
in a round gets a ``missed_round`` row (value 1); ``failures.csv`` says when and why.
See docs/architecture.md ("Training").
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord
from omegaconf import DictConfig

from shared.federation.site_training import evaluate_site, new_model
from shared.federation.run_config import input_samples, plain
from server.strategies import SiteTracking
from shared.data.cache import open_cache
from shared.metrics import masked_macro_auroc
from shared.training import save_checkpoint

CHECKPOINT = "checkpoint.pt"
ROUNDS_CSV = "rounds.csv"
TRAIN_METRICS = {"train-loss": "train_loss", "num-examples": "num_examples", "steps": "steps",
                 "epsilon": "epsilon", "delta": "delta", "dp-budget-exhausted": "dp_budget_exhausted",
                 "dp-sample-rate": "dp_sample_rate", "dp-noise-multiplier": "dp_noise_multiplier",
                 "dp-max-grad-norm": "dp_max_grad_norm"}
DP_UNITS_PREFIX = "dp-units-"  # + the privacy unit: the site's number of units (record, patient, window)
EVAL_METRICS = {"auroc-macro": "auroc_macro", "loss": "loss"}


@dataclass
class RoundLog:
    """Everything the server learnt per round, as long-form rows."""

    rows: list[tuple[int, str, str, float]] = field(default_factory=list)

    def add(self, rnd: int, site: str, metric: str, value: float) -> None:
        self.rows.append((int(rnd), site, metric, float(value)))

    def value(self, rnd: int, site: str, metric: str) -> float | None:
        for r, s, m, v in self.rows:
            if (r, s, m) == (rnd, site, metric):
                return v
        return None

    def write(self, path: Path) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["round", "site", "metric", "value"])
        writer.writerows(self.rows)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(buf.getvalue())
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path, up_to_round: int) -> RoundLog:
        log = cls()
        if path.is_file():
            with open(path, newline="") as fh:
                for row in csv.DictReader(fh):
                    if int(row["round"]) <= up_to_round:
                        log.add(int(row["round"]), row["site"], row["metric"], float(row["value"]))
        return log


def data_config(cfg: DictConfig, cache: Path | None) -> dict[str, Any]:
    """What ``shared.training.predict_record`` needs to preprocess a record like the caches.

    From a cache when the server has one (simulation); otherwise the cache builder's defaults
    (deployment: the sites' caches are expected to use them).
    """
    if cache is not None:
        from shared.data.loader import WindowDataset
        from shared.training.predict import data_config_for

        return data_config_for(WindowDataset(cache, "test", crop_samples=input_samples(cfg)))
    from dataclasses import asdict

    from shared.data.preprocess import PreprocessConfig
    from shared.data.record import STANDARD_LEADS

    pre = PreprocessConfig()
    return {"preprocess": asdict(pre), "fs": float(pre.fs), "window_samples": int(pre.fs * pre.window_seconds),
            "crop_samples": input_samples(cfg), "lead_names": list(STANDARD_LEADS),
            "classes": ["NORM", "MI", "STTC", "CD", "HYP"], "normalize": "zscore"}


class RoundEnd:
    """The ``evaluate_fn`` given to ``strategy.start``: called at round 0 and after every round."""

    def __init__(self, cfg: DictConfig, out_dir: Path, strategy: SiteTracking, *, total_rounds: int,
                 round_offset: int = 0, pooled_caches: dict[str, Path] | None = None,
                 history: RoundLog | None = None, echo=print):
        self.cfg, self.out_dir, self.strategy = cfg, out_dir, strategy
        self.total_rounds, self.offset = total_rounds, round_offset
        self.pooled_caches = pooled_caches
        self.log = history or RoundLog()
        self.echo = echo
        self.model_config = new_model(cfg).config
        first = next(iter(pooled_caches.values())) if pooled_caches else None
        self.data_config = data_config(cfg, first)
        self.t_last = time.monotonic()
        self.final_arrays: ArrayRecord | None = None
        self.round0: tuple[MetricRecord | None] | None = None  # (result,) once round 0 ran
        self.site_synthetic: dict[str, bool] = {}
        self.server_synthetic = {s: bool(open_cache(c).synthetic) for s, c in (pooled_caches or {}).items()}

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        rnd = server_round + self.offset
        if server_round == 0 and self.offset > 0:
            return None  # resumed: round `offset` was evaluated and saved by the earlier run
        if server_round == 0 and self.round0 is not None:
            return self.round0[0]  # evaluated before the strategy started
        state = arrays.to_torch_state_dict()
        if server_round > 0:
            # the one short-round policy (server.guard), also checked before aggregation
            self.strategy.guard.require(rnd, self.strategy.last_train, self.strategy.min_replies)
            self._site_rows(rnd)
            for site in sorted(set(self.cfg.site_list) - set(self.strategy.last_train)):
                self.log.add(rnd, site, "missed_round", 1.0)  # why and when: failures.csv
            self._check_pooled_matches_sites()
        pooled = self._pooled(rnd, state) if self.pooled_caches else None
        self.log.write(self.out_dir / ROUNDS_CSV)
        save_checkpoint(
            self.out_dir / CHECKPOINT, model_config=self.model_config, state_dict=state, round=rnd,
            run_config=plain(self.cfg), strategy_state=self.strategy.optimizer_state(),
            data_config=self.data_config,
        )
        self.final_arrays = arrays
        self.echo(self._line(rnd))
        result = MetricRecord({"pooled-auroc-macro": pooled}) if pooled is not None else None
        if server_round == 0:
            self.round0 = (result,)
        return result

    def restart_clock(self) -> None:
        self.t_last = time.monotonic()

    # ------------------------------------------------------------------ pieces
    def _check_pooled_matches_sites(self) -> None:
        """Stop pooled evaluation if the server's copy is not the data the sites hold."""
        if not self.pooled_caches:
            return
        differ = [s for s, syn in self.site_synthetic.items()
                  if s in self.server_synthetic and syn != self.server_synthetic[s]]
        if differ:
            self.echo(f"WARNING: sites {differ} evaluate on other data than the server's copy "
                      "(synthetic vs real); the pooled AUROC is switched off for this run")
            self.pooled_caches = None

    def _site_rows(self, rnd: int) -> None:
        for site, metrics in sorted(self.strategy.last_train.items()):
            for key, name in TRAIN_METRICS.items():
                if key in metrics and not (name in ("epsilon", "delta") and metrics[key] < 0):
                    self.log.add(rnd, site, name, metrics[key])
            for key in (k for k in metrics if k.startswith(DP_UNITS_PREFIX)):
                self.log.add(rnd, site, key.replace("-", "_"), metrics[key])
        aurocs = []
        for site, metrics in sorted(self.strategy.last_eval.items()):
            for key, name in EVAL_METRICS.items():
                if key in metrics:
                    self.log.add(rnd, site, name, metrics[key])
            if "synthetic" in metrics:
                self.site_synthetic[site] = bool(metrics["synthetic"])
            if not math.isnan(metrics.get("auroc-macro", float("nan"))):
                aurocs.append(metrics["auroc-macro"])
        if aurocs:
            self.log.add(rnd, "mean-of-sites", "auroc_macro", float(np.mean(aurocs)))

    def _pooled(self, rnd: int, state) -> float:
        probs, targets, masks = [], [], []
        for site, cache in self.pooled_caches.items():
            result = evaluate_site(self.cfg, cache, state)
            probs.append(result.probs)
            targets.append(result.targets)
            masks.append(result.mask)
            if rnd == 0:
                self.log.add(rnd, site, "auroc_macro", result.auroc_macro)
        _, macro = masked_macro_auroc(np.concatenate(probs), np.concatenate(targets), np.concatenate(masks))
        self.log.add(rnd, "pooled", "auroc_macro", float(macro))
        return float(macro)

    def _line(self, rnd: int) -> str:
        now = time.monotonic()
        took, self.t_last = now - self.t_last, now
        parts = [f"round {rnd}/{self.total_rounds}"]
        sites = list(self.cfg.site_list)

        def fmt(site: str, metric: str) -> str:
            v = self.log.value(rnd, site, metric)
            return "-" if v is None or math.isnan(v) else f"{v:.3f}"

        if rnd > 0 and not self.cfg.dp:  # a DP site sends no (unnoised) training loss
            parts.append("train loss " + " ".join(f"{s} {fmt(s, 'train_loss')}" for s in sites))
        if rnd > 0:
            parts.append("AUROC " + " ".join(f"{s} {fmt(s, 'auroc_macro')}" for s in sites)
                         + f" mean-of-sites {fmt('mean-of-sites', 'auroc_macro')}")
        if self.pooled_caches:
            parts.append(f"pooled-val {fmt('pooled', 'auroc_macro')}")
        if self.cfg.dp and rnd > 0:
            parts.append(f"DP unit {self.cfg.dp_unit}: eps " + " ".join(f"{s} {fmt(s, 'epsilon')}" for s in sites)
                         + " | delta " + " ".join(f"{s} {_g(self.log.value(rnd, s, 'delta'))}" for s in sites)
                         + " | q " + " ".join(f"{s} {_g(self.log.value(rnd, s, 'dp_sample_rate'))}" for s in sites)
                         + " | steps " + " ".join(f"{s} {_g(self.log.value(rnd, s, 'steps'))}" for s in sites)
                         + f" | noise {self.cfg.dp_noise_multiplier:g} clip {self.cfg.dp_max_grad_norm:g}")
            stopped = [s for s in sites if self.log.value(rnd, s, "dp_budget_exhausted") == 1.0]
            if stopped:
                parts.append("stopped, epsilon budget reached: " + " ".join(stopped))
        parts.append(f"{took:.1f} s")
        return " | ".join(parts)


def _g(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.3g}"
