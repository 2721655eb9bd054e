"""Federated-learning benchmark: what Flower costs on top of the local work, per model.

For each model (tiny preset, the embedded synthetic sites):

* a real simulated federation (``simulations.federation.run_federation``: SuperLink, Ray, four
  nodes) of ``--rounds`` rounds: wall time per round (from the server's per-round lines), the
  start-up time (SuperLink start to the run accepted; and to the end of round 0), peak memory of
  the whole process tree;
* the same local updates in one process (each site's ``train_site`` + ``evaluate_site`` on its
  test split, plus the server's pooled evaluation, sequentially): the overhead ratio is
  federated round time (rounds after the first) / in-process round time (below 1.0 when two
  nodes train in parallel on the two cores);
* bytes sent per round per site: the ArrayRecord of the model, each way;
* one local step with and without DP (Opacus), seconds per step.

    python -m bench.fl.run [--models hierarchical,cardioformer] [--rounds 3] [--records 60]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from shared.federation.site_data import ensure_cache
from shared.federation.site_training import evaluate_site, new_model, train_site
from shared.federation.run_config import load_run_config
from simulations.federation import DEFAULT_APP_DIR, run_federation

ROUND_LINE = re.compile(r"^round (\d+)/\d+ .*\| ([0-9.]+) s\s*$", re.M)


def in_process_round(cfg, caches: dict[str, Path], state) -> float:
    t0 = time.perf_counter()
    states = []
    for i, (site, cache) in enumerate(caches.items()):
        out = train_site(cfg, cache, site, 1, state)
        states.append(out.state)
    for site, cache in caches.items():
        evaluate_site(cfg, cache, state)  # federated evaluation at the site
    for site, cache in caches.items():
        evaluate_site(cfg, cache, state)  # the server's pooled evaluation
    return time.perf_counter() - t0


def step_time(cfg, cache: Path, site: str, state, *, repeats: int = 2) -> float:
    """Seconds per local step (median over ``repeats`` calls of one local epoch)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = train_site(cfg, cache, site, 1, state)
        times.append((time.perf_counter() - t0) / max(out.result.steps, 1))
    return statistics.median(times)


def bench_model(model: str, rounds: int, records: int, work: Path) -> dict:
    overrides = {"model": model, "synthetic-records": records, "num-server-rounds": rounds,
                 "device": "cpu", "batch-size": 32}
    cfg = load_run_config(overrides)
    caches = {site: ensure_cache(site, "", cfg) for site in cfg.site_list}
    torch.manual_seed(0)
    state = new_model(cfg).state_dict()
    record = ArrayRecord(state)
    bytes_per_site = sum(len(a.data) for a in record.values())

    result = run_federation(DEFAULT_APP_DIR, {**overrides, "out-dir": str(work / f"fl-{model}")},
                            num_supernodes=4, timeout=3600)
    if not result.ok:
        raise SystemExit(f"{model}: federation failed ({result.status})\n{result.log[-3000:]}")
    round_times = {int(r): float(s) for r, s in ROUND_LINE.findall(result.log)}
    fed_rounds = [round_times[r] for r in sorted(round_times) if r > 0]
    first_round = fed_rounds[0]  # includes the Ray workers' first imports and model builds
    fed_round = statistics.median(fed_rounds[1:] or fed_rounds)

    local_round = statistics.median(in_process_round(cfg, caches, state) for _ in range(2))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    site = "ptb"  # the site with the most windows: the most steps per call
    plain = step_time(cfg, caches[site], site, state)
    dp_cfg = load_run_config({**overrides, "dp": True})
    torch.manual_seed(0)
    dp_state = new_model(dp_cfg).state_dict()
    private = step_time(dp_cfg, caches[site], site, dp_state)
    return {
        "model": model,
        "params": sum(t.numel() for t in state.values() if t.is_floating_point()),
        "fed_round_s": fed_round,
        "first_round_s": first_round,
        "local_round_s": local_round,
        "overhead": fed_round / local_round,
        "startup_s": result.startup_s,
        "outside_rounds_s": result.wall_s - sum(fed_rounds),
        "wall_s": result.wall_s,
        "bytes_per_site": bytes_per_site,
        "fed_peak_mb": result.peak_rss_mb,
        "inproc_peak_mb": before,
        "step_s": plain,
        "dp_step_s": private,
        "dp_ratio": private / plain,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fl.run", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="hierarchical,cardioformer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=60, help="synthetic records per site")
    args = parser.parse_args(argv)
    os.environ.setdefault("FED_ECG_CACHE", str(Path(tempfile.gettempdir()) / "fed-ecg-bench-cache"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="fed-ecg-bench-") as tmp:
        for model in args.models.split(","):
            rows.append(bench_model(model.strip(), args.rounds, args.records, Path(tmp)))
    print(f"# bench/fl: {args.rounds} rounds, 4 sites x {args.records} synthetic records, tiny presets, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print("| model | params | federated round 1 (s) | federated round, later rounds (median, s) | same work in one process (s) | overhead ratio | "
          "SuperLink start to run accepted (s) | rest of the wall time outside rounds 1..n: start-up, round 0, shutdown (s) | bytes per round per site (each way) | "
          "peak memory, federation (MiB) | peak memory, one process (MiB) | step (s) | DP step (s) | DP/plain |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['first_round_s']:.1f} | {r['fed_round_s']:.1f} | {r['local_round_s']:.1f} | "
              f"{r['overhead']:.2f} | {r['startup_s']:.1f} | {r['outside_rounds_s']:.1f} | {r['bytes_per_site']:,} | "
              f"{r['fed_peak_mb']:.0f} | {r['inproc_peak_mb']:.0f} | {r['step_s']:.3f} | {r['dp_step_s']:.3f} | "
              f"{r['dp_ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
