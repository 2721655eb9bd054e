"""The federation seen from the server: set up, run the strategy, report. Called by the
ServerApp with Flower's ``Grid``; tests call it with a fake grid.

Order: validate the config (done by the caller) -> output dir and, with ``resume``, the last
checkpoint -> server-side copy of the sites' caches for the pooled validation AUROC (simulation, or a
coordinator holding every site's cache; prepares the synthetic caches before round 1) -> round 0
(the initial model), while a node for every site is found (``server.assignment``: asked, with a deadline) -> ``strategy.start`` with
:class:`server.rounds.RoundEnd` as ``evaluate_fn`` -> final table.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord
from omegaconf import DictConfig

from shared.federation.site_data import ensure_cache
from shared.federation.site_training import new_model
from shared.federation.run_config import ConfigError, cache_root, site_cache_setting
from server.assignment import OneMessagePerNode, wait_for_sites
from server.guard import FAILURES_CSV
from server.rounds import CHECKPOINT, ROUNDS_CSV, RoundEnd, RoundLog
from server.strategies import build_strategy
from server.summary import final_table, render, write_summary
from shared.training import load_checkpoint

POOLED_NOTE = ("server-side: the global model on the server's own copy of every site's validation "
               "split, predictions concatenated (simulation only)")


@dataclass
class ServerOutcome:
    out_dir: Path
    final_round: int
    log: RoundLog
    arrays: ArrayRecord | None
    table_text: str


def resolve_out_dir(cfg: DictConfig) -> Path:
    if cfg.out_dir:
        return Path(str(cfg.out_dir)).expanduser().resolve()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    dp = "-dp" if cfg.dp else ""
    return cache_root() / "runs" / f"{cfg.model}-{cfg.strategy}{dp}-seed{cfg.seed}-{stamp}"


def is_simulation(grid) -> bool:
    """True for Flower's simulation grid (``flwr.simulation`` runs the ServerApp with an
    ``InMemoryGrid``), where the simulated nodes read the same caches as the server."""
    return type(grid).__name__ == "InMemoryGrid" and type(grid).__module__.startswith("flwr.")


def pooled_caches(cfg: DictConfig, echo=print, *, simulation: bool = True) -> dict[str, Path] | None:
    """The server's copy of the sites' caches, or None when pooled evaluation is off.

    ``server-eval = auto``: on when every site's cache is a path that exists on the server (the
    coordinator explicitly holds the caches), or in a Flower simulation (the simulated nodes use
    the same run-config caches, '' = the embedded synthetic data). Off otherwise: in a
    deployment the server never builds synthetic caches under real site names, and the sites'
    own evaluation AUROCs are the ones reported. ``on`` forces it (tests; a coordinator that
    holds every site's test split); ``off`` turns it off.
    """
    if cfg.server_eval == "off":
        return None
    settings = {s: site_cache_setting(cfg, s) for s in cfg.site_list}
    held = all(v and (Path(v).expanduser() / "manifest.json").is_file() for v in settings.values())
    if cfg.server_eval == "auto" and not held and not simulation:
        echo("pooled validation AUROC off: the coordinator does not hold every site's cache (server-eval = auto; "
             "set cache-<site> to the server's copies, or server-eval = \"on\")")
        return None
    if cfg.server_eval == "auto" and any(v and not (Path(v).expanduser() / "manifest.json").is_file()
                                         for v in settings.values()):
        echo("pooled validation AUROC off: some site caches are not on the server (server-eval = auto)")
        return None
    return {site: ensure_cache(site, setting, cfg) for site, setting in settings.items()}


def run_server(grid, cfg: DictConfig, *, echo=print) -> ServerOutcome:
    out_dir = resolve_out_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = int(cfg.num_server_rounds)
    offset, strategy_state, history = 0, None, None
    if cfg.resume and (out_dir / CHECKPOINT).is_file():
        ckpt = load_checkpoint(out_dir / CHECKPOINT)
        _check_same_run(cfg, ckpt, out_dir)
        offset = int(ckpt["round"])
        state = ckpt["state_dict"]
        strategy_state = ckpt.get("strategy_state")
        history = RoundLog.read(out_dir / ROUNDS_CSV, offset)
        echo(f"resuming {out_dir} after round {offset} of {total}")
    else:
        if cfg.resume:
            echo(f"resume: no checkpoint in {out_dir} yet, starting at round 1")
        torch.manual_seed(int(cfg.seed))
        state = new_model(cfg).state_dict()
    echo(f"fed-ecg federation: model {cfg.model}/{cfg.preset}, strategy {cfg.strategy}, "
         f"sites {','.join(cfg.site_list)}, {total} rounds, dp {'on' if cfg.dp else 'off'}; output {out_dir}")

    caches = pooled_caches(cfg, echo, simulation=is_simulation(grid))
    strategy = build_strategy(cfg, round_offset=offset)
    strategy.load_optimizer_state(strategy_state)
    strategy.failures_path = out_dir / FAILURES_CSV
    strategy.guard.load(strategy.failures_path, up_to_round=offset)
    round_end = RoundEnd(cfg, out_dir, strategy, total_rounds=total, round_offset=offset,
                         pooled_caches=caches, history=history, echo=echo)
    # The nodes are asked which site they play while round 0 (the initial model's pooled
    # evaluation and checkpoint) runs here: the first answer waits for the nodes to start.
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ask-nodes")
    try:
        asked = pool.submit(wait_for_sites, grid, list(cfg.site_list), int(cfg.min_nodes),
                            float(cfg.node_wait_timeout), echo, stop, strategy.handshake)
        round_end(0, ArrayRecord(state))
        strategy.assignment = asked.result()
    finally:
        stop.set()  # round 0 failed: stop waiting for the nodes
        pool.shutdown(wait=False)
    echo(f"sites by node: {strategy.assignment.describe()}")
    round_end.restart_clock()  # round 1's seconds count from here, not from round 0
    if offset < total:
        strategy.start(
            grid=OneMessagePerNode(grid), initial_arrays=ArrayRecord(state), num_rounds=total - offset,
            timeout=float(cfg.round_timeout), train_config=ConfigRecord(), evaluate_config=ConfigRecord(),
            evaluate_fn=round_end,
        )
    for line in dropped_sites(strategy.guard, offset + 1):
        echo(line)
    # one synthetic site is enough to make the result synthetic
    synthetic = any(round_end.site_synthetic.values()) if round_end.site_synthetic else any(
        not site_cache_setting(cfg, s) for s in cfg.site_list)
    table = final_table(cfg, round_end.log, total, synthetic=synthetic,
                        pooled_note=POOLED_NOTE if round_end.pooled_caches else None)
    text = render(table)
    echo(text)
    write_summary(out_dir, text)
    echo(f"checkpoint: {out_dir / CHECKPOINT} (load: from shared.training import load_model; "
         f"model = load_model('{out_dir / CHECKPOINT}'))")
    return ServerOutcome(out_dir, total, round_end.log, round_end.final_arrays, text)


def dropped_sites(guard, first_round: int = 1) -> list[str]:
    """One line per site that missed rounds of this run: which rounds, since when, why first."""
    missed: dict[str, list] = {}
    for e in guard.exclusions:
        if e.round >= first_round:
            missed.setdefault(e.site, []).append(e)
    return [f"site {site} missed round(s) {sorted({e.round for e in rows})} (first at {rows[0].time_utc}: "
            f"{rows[0].reason}); failures.csv has every round" for site, rows in missed.items()]


def _check_same_run(cfg: DictConfig, ckpt: dict, out_dir: Path) -> None:
    old = ckpt.get("run_config") or {}
    for key in ("model", "preset", "strategy", "dp", "sites", "seed"):
        if key in old and old[key] != cfg[key]:
            raise ConfigError(
                f"resume: {out_dir / CHECKPOINT} was written with {key} = {old[key]!r}, "
                f"this run has {cfg[key]!r}; use another out-dir or the same settings"
            )
