"""Flower strategies chosen by the run config's ``strategy`` key, with per-site bookkeeping.

Every strategy is Flower's own (``flwr.serverapp.strategy``), aggregating arrays weighted by the
replies' ``num-examples``. :func:`build_strategy` subclasses the chosen one to

* keep each site's reply metrics (``last_train`` / ``last_eval``, keyed by site name) for the
  per-round line, ``rounds.csv`` and the final table, instead of Flower's weighted mean of
  metrics (a weighted mean of AUROCs is not a pooled AUROC);
* send each sampled site's message to the node that plays it (:mod:`server.assignment`), with
  the site named in the message's config (and the project version and model fingerprint,
  ``shared.federation.version``), and file every reply under the site its message was for;
* sample with a floor and a deadline, never with Flower's ``sample_nodes`` on the real grid
  (it waits forever for ``min_available_nodes``): Flower samples among pseudo-nodes, one per
  site that has a node (``_SitesAsNodes``), and a round (training or evaluation) starts only
  when at least ``min-replies`` sites have a node, waiting up to ``node-wait-timeout`` seconds
  for nodes to (re)join, else the run ends with :class:`server.guard.RoundFailed`;
* aggregate a round only with at least ``min-replies`` valid training replies, else end the run
  (:meth:`server.guard.ReplyGuard.require`, the one short-round policy);
* leave out of the aggregate a site that did not train (``num-examples`` 0: DP budget spent);
* screen every training reply with :class:`server.guard.ReplyGuard` (errors, NaN/inf, wrong
  array names or shapes are left out and recorded in ``failures.csv``);
* number rounds absolutely after a resume (``round_offset``), so clients seed and FedAdam/FedYogi
  bias-correct with the true round;
* expose and restore the server optimiser state of FedAdam/FedYogi (``m_t``, ``v_t``) for
  checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedTrimmedAvg, FedYogi, Krum
from flwr.serverapp.strategy.fedopt import FedOpt
from omegaconf import DictConfig

from server.assignment import SiteAssignment
from server.guard import ReplyGuard, RoundFailed
from shared.federation.version import handshake

BASES = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}


def per_site_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """``<site>/<metric>`` for every scalar metric of every reply (no averaging across sites)."""
    out = MetricRecord()
    for content in contents:
        record = content.config_records.get("site")
        site = str(record["site"]) if record is not None else "?"
        for metrics in content.metric_records.values():
            for key, value in metrics.items():
                if key != weight_key and isinstance(value, (int, float)):
                    out[f"{site}/{key}"] = value
    return out


def _scalars(content: RecordDict) -> dict[str, float]:
    record = next(iter(content.metric_records.values()))
    return {k: v for k, v in record.items() if isinstance(v, (int, float))}


class _SitesAsNodes:
    """What Flower's ``configure_*`` sees as the grid: one pseudo-node per site to serve, so its
    sampling (``fraction-train``/``fraction-evaluate``) picks sites, and never waits."""

    def __init__(self, sites: list[str]):
        self.sites = sites

    def get_node_ids(self) -> list[int]:
        return list(range(len(self.sites)))


class SiteTracking:
    """Mixin over a Flower strategy; see the module docstring."""

    round_offset: int = 0
    assignment: SiteAssignment | None = None
    min_replies: int = 1  # valid training replies a round needs; also the floor of sites with a node
    node_wait_timeout: float = 120.0  # seconds a round waits for min_replies sites to have a node
    handshake: dict[str, str] = {}  # project version and model fingerprint, in every message

    def _init_tracking(self) -> None:
        self.last_train: dict[str, dict[str, Any]] = {}
        self.last_eval: dict[str, dict[str, Any]] = {}
        # server/guard.py: replies unfit for aggregation are dropped and recorded here
        self.guard = ReplyGuard(weight_key=self.weighted_by_key)
        self.failures_path: Path | None = None
        self._eval_sent: list[tuple[Message, str]] = []

    def _per_site(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                  configure) -> tuple[list[Message], list[str]]:
        """Flower's messages for the sampled sites, each sent to the node playing that site, with
        the site named in its config."""
        sites = self._await_floor(server_round, grid)
        messages, names = [], []
        for msg in configure(server_round, arrays, config, _SitesAsNodes(sites)):
            site = sites[msg.metadata.dst_node_id]
            content = RecordDict(dict(msg.content.items()))
            content[self.configrecord_key] = ConfigRecord({**msg.content[self.configrecord_key],
                                                           **self.handshake, "site": site})
            messages.append(Message(content=content, dst_node_id=self.assignment.node_of_site[site],
                                    message_type=msg.metadata.message_type))
            names.append(site)
        return messages, names

    def _await_floor(self, server_round: int, grid: Grid, poll: float = 1.0) -> list[str]:
        """The sites that have a node, once there are at least ``min_replies`` of them; a site
        without a node gets ``node_wait_timeout`` seconds from the run's start or from when its
        node left (so the wait before round 1 counts) to (re)join, then the run ends."""
        self.assignment.refresh(grid)
        announced = False
        while len(self.assignment.served) < self.min_replies:
            since = [self.assignment.missing_since.get(s, time.monotonic()) for s in self.assignment.missing]
            deadline = max(since, default=time.monotonic()) + self.node_wait_timeout
            if time.monotonic() >= deadline:
                raise RoundFailed(
                    f"round {server_round}: no node for {self.assignment.missing} within node-wait-timeout = "
                    f"{self.node_wait_timeout:.0f} s; only {self.assignment.served or 'no site'} of "
                    f"{self.assignment.sites} have a node, the round needs min-replies = {self.min_replies}. "
                    f"The run ends here; checkpoint.pt holds the model of round {server_round - 1} (resume = "
                    "true continues from it once enough sites are back)")
            if not announced:
                print(f"round {server_round}: waiting up to {deadline - time.monotonic():.0f} s for a node for "
                      f"{self.assignment.missing} ({len(self.assignment.served)} site(s) have one, "
                      f"min-replies = {self.min_replies})", flush=True)
                announced = True
            time.sleep(poll)
            # a node that just came back is asked now; a silent one never holds the wait past the deadline
            self.assignment.refresh(grid, timeout=max(1.0, deadline - time.monotonic()), ask_again_after=0.0)
        return self.assignment.served

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.round_offset
        messages, sites = self._per_site(rnd, arrays, config, grid, super().configure_train)
        self.guard.sent(rnd, arrays, messages, sites)
        for site in self.assignment.missing:
            self.guard.unserved(rnd, site)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.round_offset
        messages, sites = self._per_site(rnd, arrays, config, grid, super().configure_evaluate)
        self._eval_sent = list(zip(messages, sites))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        rnd = server_round + self.round_offset
        replies = self.guard.screen(rnd, replies)
        for excluded in (e for e in self.guard.exclusions if e.round == rnd):
            print(f"round {rnd}: site {excluded.site} (node {excluded.node_id}) left out of the "
                  f"aggregate at {excluded.time_utc}: {excluded.reason}", flush=True)
        if self.failures_path is not None:
            self.guard.write(self.failures_path)
        self.guard.require(rnd, [str(m.content.config_records["site"]["site"]) for m in replies], self.min_replies)
        self.last_train = {}
        trained = []
        for msg in replies:
            metrics = _scalars(msg.content)
            site_record = msg.content.config_records["site"]
            metrics["skipped-reason"] = str(site_record.get("skipped-reason", ""))
            self.last_train[str(site_record["site"])] = metrics
            if float(metrics.get(self.weighted_by_key, 0)) > 0:
                trained.append(msg)
        return super().aggregate_train(rnd, trained)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        site_of_message = {m.metadata.message_id: site for m, site in self._eval_sent}
        answered = {m.metadata.reply_to_message_id for m in replies}
        for msg, site in self._eval_sent:
            if msg.metadata.message_id and msg.metadata.message_id not in answered:
                print(f"round {server_round + self.round_offset}: site {site} sent no evaluation reply "
                      "before the round ended", flush=True)
        self.last_eval, kept = {}, []
        for msg in replies:
            site = site_of_message.get(msg.metadata.reply_to_message_id)
            if msg.has_error():
                print(f"round {server_round + self.round_offset}: site {site or '?'} did not evaluate: "
                      f"{msg.error.reason}", flush=True)
                continue
            named = msg.content.config_records.get("site", {}).get("site")
            if site is not None and named == site:
                self.last_eval[site] = _scalars(msg.content)
                kept.append(msg)
            else:
                print(f"round {server_round + self.round_offset}: an evaluation reply names site {named!r}, "
                      f"its message was for {site!r}: left out", flush=True)
        return super().aggregate_evaluate(server_round + self.round_offset, kept)

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
    # Flower samples among the sites that have a node (``_SitesAsNodes``): at least one site,
    # never waiting for more (who waits for nodes, and how long, is server.assignment's job).
    common: dict[str, Any] = {
        "fraction_train": float(cfg.fraction_train),
        "fraction_evaluate": float(cfg.fraction_evaluate),
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
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
    strategy.min_replies = int(cfg.min_replies)
    strategy.node_wait_timeout = float(cfg.node_wait_timeout)
    strategy.handshake = handshake(cfg)
    return strategy
