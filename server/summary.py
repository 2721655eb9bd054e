"""The final table of a run: per-site AUROC, their mean (labelled), pooled AUROC, epsilon; all on the
validation splits (the test splits are scored once per final model, by ``simulations.compare``).

Printed with rich at the end of the ServerApp and written as ``summary.md`` beside
``rounds.csv`` in the run's output dir.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from server.rounds import RoundLog


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.3f}"


def final_table(cfg: DictConfig, log: RoundLog, final_round: int, *, synthetic: bool,
                pooled_note: str | None) -> Table:
    tag = "SYNTHETIC data" if synthetic else "real data"
    dp = (f", DP (unit {cfg.dp_unit}, noise {cfg.dp_noise_multiplier}, clip {cfg.dp_max_grad_norm})"
          if cfg.dp else "")
    table = Table(title=f"fed-ecg: {cfg.model}/{cfg.preset}, {cfg.strategy}{dp}, round {final_round}, "
                        f"seed {cfg.seed} [{tag}]")
    table.add_column("validation set")
    table.add_column("macro AUROC", justify="right")
    table.add_column("how it is computed")
    if cfg.dp:
        table.add_column("epsilon (delta)", justify="right")
        table.add_column("DP: units, sample rate, steps this run", justify="right")
    for site in cfg.site_list:
        how = ("at the site: global model + the site's own site-local layers (FedBN)" if cfg.site_local
               else "federated evaluation at the site")
        row = [site, _fmt(log.value(final_round, site, "auroc_macro")), how]
        if cfg.dp:
            eps = log.value(final_round, site, "epsilon")
            delta = log.value(final_round, site, "delta")
            if eps is None:  # a site that stopped (budget) reports its last epsilon in earlier rounds
                eps = max((v for r, s, m, v in log.rows if s == site and m == "epsilon"), default=None)
            row.append("n/a" if eps is None else f"{eps:.2f} ({delta if delta is not None else cfg.dp_delta:g})")
            row.append(_dp_cell(log, site, cfg.dp_unit))
        table.add_row(*row)
    row = ["mean of sites", _fmt(log.value(final_round, "mean-of-sites", "auroc_macro")),
           "unweighted mean of the site AUROCs (not a pooled AUROC)"]
    table.add_row(*(row + (["", ""] if cfg.dp else [])))
    if pooled_note is not None:
        row = ["pooled validation", _fmt(log.value(final_round, "pooled", "auroc_macro")), pooled_note]
        table.add_row(*(row + (["", ""] if cfg.dp else [])))
    return table


def _dp_cell(log: RoundLog, site: str, unit: str) -> str:
    """``N <unit>s, q <rate>, <steps> steps`` from the site's train replies of this run."""
    units = [v for r, s, m, v in log.rows if s == site and m == f"dp_units_{unit}"]
    rates = [v for r, s, m, v in log.rows if s == site and m == "dp_sample_rate"]
    steps = sum(v for r, s, m, v in log.rows if s == site and m == "steps")
    if not units:
        return "n/a"
    return f"{int(units[-1])} {unit}s, q {rates[-1]:.3g}, {int(steps)} steps"


def render(table: Table, *, width: int = 120) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False, color_system=None).print(table)
    return buf.getvalue()


def write_summary(out_dir: Path, text: str) -> Path:
    path = out_dir / "summary.md"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("```\n" + text + "```\n")
    os.replace(tmp, path)
    return path
