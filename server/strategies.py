"""Flower strategies chosen by the run config's ``strategy`` key, with per-site bookkeeping.

Every strategy is Flower's own (``flwr.serverapp.strategy``), aggregating arrays weighted by the
replies' ``num-examples``. :func:`build_strategy` subclasses the chosen one to

* keep each site's reply metrics (``last_train`` / ``last_eval``, keyed by site name) for the
  per-round line, ``rounds.csv`` and the final table, instead of Flower's weighted mean of
  metrics (a weighted mean of AUROCs is not a pooled AUROC);
* leave out of the aggregate a site that did not train (``num-examples`` 0: DP budget spent);
* screen every training reply with :class:`server.guard.ReplyGuard` (errors, NaN/inf, wrong
  array names or shapes are left out and recorded in ``failures.csv``);
* number rounds absolutely after a resume (``round_offset``), so clients seed and FedAdam/FedYogi
  bias-correct with the true round;
* expose and restore the server optimiser state of FedAdam/FedYogi (``m_t``, ``v_t``) for
  checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedTrimmedAvg, FedYogi, Krum
from flwr.serverapp.strategy.fedopt import FedOpt
from omegaconf import DictConfig

from server.guard import ReplyGuard

BASES = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}


def site_of(content: RecordDict) -> str:
    record = content.config_records.get("site")
    return str(record["site"]) if record is not None else "?"


def per_site_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """``<site>/<metric>`` for every scalar metric of every reply (no averaging across sites)."""
    out = MetricRecord()
    for content in contents:
        site = site_of(content)
        for record in content.metric_records.values():
            for key, value in record.items():
                if key != weight_key and isinstance(value, (int, float)):
                    out[f"{site}/{key}"] = value
    return out


def _scalars(content: RecordDict) -> dict[str, float]:
    record = next(iter(content.metric_records.values()))
    return {k: v for k, v in record.items() if isinstance(v, (int, float))}


class SiteTracking:
    """Mixin over a Flower strategy; see the module docstring."""

    round_offset: int = 0

    def _init_tracking(self) -> None:
        self.last_train: dict[str, dict[str, Any]] = {}
        self.last_eval: dict[str, dict[str, Any]] = {}
        # server/guard.py: replies unfit for aggregation are dropped and recorded here
        self.guard = ReplyGuard(weight_key=self.weighted_by_key)
        self.failures_path: Path | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round + self.round_offset, arrays, config, grid))
        self.guard.sent(server_round + self.round_offset, arrays, messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        rnd = server_round + self.round_offset
        replies = self.guard.screen(rnd, replies)
        for excluded in (e for e in self.guard.exclusions if e.round == rnd):
            print(f"round {rnd}: site {excluded.site} (node {excluded.node_id}) left out of the "
                  f"aggregate at {excluded.time_utc}: {excluded.reason}", flush=True)
        if self.failures_path is not None:
            self.guard.write(self.failures_path)
        self.last_train = {}
        trained = []
        for msg in replies:
            if msg.has_error():
                trained.append(msg)  # Flower logs and drops it
                continue
            metrics = _scalars(msg.content)
            metrics["skipped-reason"] = str(msg.content.config_records["site"]["skipped-reason"]) \
                if "site" in msg.content.config_records else ""
            self.last_train[site_of(msg.content)] = metrics
            if float(metrics.get(self.weighted_by_key, 0)) > 0:
                trained.append(msg)
        return super().aggregate_train(server_round + self.round_offset, trained)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self.last_eval = {
            site_of(m.content): _scalars(m.content) for m in replies if not m.has_error()
        }
        return super().aggregate_evaluate(server_round + self.round_offset, replies)

    # ----------------------------------------------------------- server optimiser state
    def optimizer_state(self) -> dict[str, Any] | None:
        """FedAdam/FedYogi moments as plain arrays (None for stateless strategies)."""
        if not isinstance(self, FedOpt):
            return None
        return {
            "m_t": {k: np.asarray(v) for k, v in (self.m_t or {}).items()},
            "v_t": {k: np.asarray(v) for k, v in (self.v_t or {}).items()},
        }

    def load_optimizer_state(self, state: dict[str, Any] | None) -> None:
        if not isinstance(self, FedOpt) or not state:
            return
        self.m_t = {k: np.asarray(v) for k, v in state.get("m_t", {}).items()} or None
        self.v_t = {k: np.asarray(v) for k, v in state.get("v_t", {}).items()} or None


def build_strategy(cfg: DictConfig, *, round_offset: int = 0) -> FedAvg:
    """The run config's strategy, sampling every site each round by default."""
    base = BASES[cfg.strategy]
    cls = type(f"Tracking{base.__name__}", (SiteTracking, base), {})
    n_sites = len(cfg.site_list)
    min_nodes = int(cfg.min_nodes)
    common: dict[str, Any] = {
        "fraction_train": float(cfg.fraction_train),
        "fraction_evaluate": float(cfg.fraction_evaluate),
        "min_train_nodes": max(1, math.ceil(float(cfg.fraction_train) * min(n_sites, min_nodes))),
        "min_evaluate_nodes": max(1, math.ceil(float(cfg.fraction_evaluate) * min(n_sites, min_nodes))),
        "min_available_nodes": min_nodes,
        "train_metrics_aggr_fn": per_site_metrics,
        "evaluate_metrics_aggr_fn": per_site_metrics,
    }
    if cfg.strategy == "fedprox":
        common["proximal_mu"] = float(cfg.proximal_mu)
    elif cfg.strategy in ("fedadam", "fedyogi"):
        common["eta"] = float(cfg.server_lr)
    elif cfg.strategy == "fedtrimmedavg":
        common["beta"] = float(cfg.trimmed_beta)
    elif cfg.strategy == "krum":
        common["num_malicious_nodes"] = int(cfg.krum_byzantine)
    strategy = cls(**common)
    strategy._init_tracking()
    strategy.round_offset = int(round_offset)
    return strategy
