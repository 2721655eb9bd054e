"""Federated-learning benchmark: what Flower costs on top of the local work, as users run it.

For each model (tiny preset, the embedded synthetic sites), in one run of this script:

* a real simulated federation (``simulations.federation.run_federation``: its own SuperLink,
  Ray, the ServerApp and ClientApps) with Flower's default node count unless ``--nodes`` says
  otherwise: wall time per round (the server's per-round lines), the start-up (SuperLink start
  to the run accepted) and everything outside rounds 1..n (start-up, round 0, shutdown), peak
  memory of the whole process tree (sampled every 0.5 s);
* the same work in one plain Python process (a child process, so its peak memory is its own):
  every round, each site's ``train_site`` and ``evaluate_site`` on its test split, the server's
  pooled evaluation, and the FedAvg average; the overhead ratio is the federated round time
  (median of rounds 2..n) / the in-process round time (median of rounds 2..n);
* one local step with and without DP (Opacus), seconds per step.

``--default-run`` also times the README's main command exactly as a new user runs it
(``flwr run simulations/four_sites --stream`` with every default: 8 rounds, 4 x 400 synthetic
records), with a fresh Flower home and a fresh synthetic-data cache, and stops the local
SuperLink ``flwr`` leaves behind.

    python -m bench.fl.run [--models hierarchical,cardioformer] [--rounds 3] [--records 400] [--default-run]
    python -m bench.fl.run --models hierarchical --nodes 4 --client-cpus 1      # another node layout
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from shared.federation.quiet import quiet_third_party_warnings
from shared.federation.run_config import load_run_config
from shared.federation.site_data import ensure_cache
from shared.federation.site_training import evaluate_site, new_model, train_site
from shared.metrics import masked_macro_auroc
from simulations.federation import DEFAULT_APP_DIR, run_federation
from shared.processes import free_port, stop, tree_rss_mb

ROUND_LINE = re.compile(r"^round (\d+)/\d+ .*\| ([0-9.]+) s\s*$", re.M)
REPO = Path(__file__).resolve().parents[2]


def overrides_for(model: str, rounds: int, records: int) -> dict:
    return {"model": model, "synthetic-records": records, "num-server-rounds": rounds, "device": "cpu"}


# ------------------------------------------------------------------ the same work in one process
def fedavg(states: list[dict], weights: list[int]) -> dict:
    total = float(sum(weights))
    out = {}
    for key, ref in states[0].items():
        if ref.is_floating_point():
            out[key] = sum(s[key] * (w / total) for s, w in zip(states, weights))
        else:
            out[key] = ref  # integer buffers (BatchNorm's step counter): not averaged
    return out


def in_process(model: str, rounds: int, records: int) -> dict:
    """Rounds 1..n of the federation's work in this process: per-round seconds and peak RSS."""
    cfg = load_run_config(overrides_for(model, rounds, records))
    caches = {site: ensure_cache(site, "", cfg) for site in cfg.site_list}
    torch.manual_seed(int(cfg.seed))
    state = new_model(cfg).state_dict()
    times = []
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        outcomes = [train_site(cfg, cache, site, rnd, state) for site, cache in caches.items()]
        state = fedavg([o.state for o in outcomes], [o.result.num_examples for o in outcomes])
        for cache in caches.values():
            evaluate_site(cfg, cache, state)  # federated evaluation at the site
        pooled = [evaluate_site(cfg, cache, state) for cache in caches.values()]  # the server's copy
        masked_macro_auroc(*(np.concatenate([getattr(r, k) for r in pooled]) for k in ("probs", "targets", "mask")))
        times.append(time.perf_counter() - t0)
    return {"round_s": times, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def in_process_child(model: str, rounds: int, records: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.fl.run", "--in-process-child", model,
                           str(rounds), str(records)], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_time(cfg, cache: Path, site: str, state, *, repeats: int = 2) -> float:
    """Seconds per local step (median over ``repeats`` calls of the local epochs)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = train_site(cfg, cache, site, 1, state)
        times.append((time.perf_counter() - t0) / max(out.result.steps, 1))
    return statistics.median(times)


# ------------------------------------------------------------------ one model
def bench_model(model: str, rounds: int, records: int, nodes: int | None, cpus: int | None, work: Path) -> dict:
    overrides = overrides_for(model, rounds, records)
    cfg = load_run_config(overrides)
    for site in cfg.site_list:
        ensure_cache(site, "", cfg)  # caches built before anything is timed

    result = run_federation(DEFAULT_APP_DIR, {**overrides, "out-dir": str(work / f"fl-{model}")},
                            num_supernodes=nodes, client_cpus=cpus, timeout=3600)
    if not result.ok:
        raise SystemExit(f"{model}: federation failed ({result.status})\n{result.log[-3000:]}")
    round_times = {int(r): float(s) for r, s in ROUND_LINE.findall(result.log)}
    fed_rounds = [round_times[r] for r in sorted(round_times) if r > 0]
    local = in_process_child(model, rounds, records)

    site = "ptb"  # the site with the most windows: the most steps per call
    torch.manual_seed(0)
    plain = step_time(cfg, ensure_cache(site, "", cfg), site, new_model(cfg).state_dict())
    # the DP step at the plain step's batch and epochs (DP runs default to their own: dp-batch-size,
    # dp-local-epochs)
    dp_cfg = load_run_config({**overrides, "dp": True, "dp-batch-size": int(cfg.batch_size), "dp-local-epochs": 0})
    torch.manual_seed(0)
    private = step_time(dp_cfg, ensure_cache(site, "", dp_cfg), site, new_model(dp_cfg).state_dict())
    fed_round = statistics.median(fed_rounds[1:] or fed_rounds)
    local_round = statistics.median(local["round_s"][1:] or local["round_s"])
    return {
        "model": model,
        "nodes": f"{nodes or 'default (2)'} x {cpus or 'default (2)'} CPUs",
        "params": sum(t.numel() for t in new_model(cfg).state_dict().values() if t.is_floating_point()),
        "first_round_s": fed_rounds[0],
        "fed_round_s": fed_round,
        "local_round_s": local_round,
        "overhead": fed_round / local_round,
        "startup_s": result.startup_s,
        "outside_rounds_s": result.wall_s - sum(fed_rounds),
        "wall_s": result.wall_s,
        "fed_peak_mb": result.peak_rss_mb,
        "inproc_peak_mb": local["peak_mb"],
        "memory_ratio": result.peak_rss_mb / local["peak_mb"],
        "step_s": plain,
        "dp_step_s": private,
        "dp_ratio": private / plain,
    }


# ------------------------------------------------------------------ the README's main command
class _TreeSampler(threading.Thread):
    """Peak summed RSS of every process whose command line mentions ``marker``, with their trees."""

    def __init__(self, marker: str, every: float = 0.5):
        super().__init__(daemon=True)
        self.marker, self.every, self.peak = marker, every, 0.0
        self.done = threading.Event()

    def roots(self) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if self.marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    def run(self) -> None:
        while not self.done.is_set():
            roots = set(self.roots())
            tops = [pid for pid in roots if _parent(pid) not in roots]  # no tree counted twice
            self.peak = max(self.peak, sum(tree_rss_mb(pid) for pid in tops))
            self.done.wait(self.every)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def default_run() -> dict:
    """``flwr run simulations/four_sites --stream`` as the README says, in a fresh home and cache."""
    with tempfile.TemporaryDirectory(prefix="fed-ecg-default-run-") as tmp:
        home, cache = Path(tmp) / "flwr-home", Path(tmp) / "cache"
        env = dict(os.environ, FLWR_HOME=str(home), FED_ECG_CACHE=str(cache),
                   FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()))
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        sampler = _TreeSampler(str(home))
        sampler.start()
        t0 = time.perf_counter()
        proc = subprocess.run(["flwr", "run", "simulations/four_sites", "--stream"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
        sampler.done.set()
        for pid in sampler.roots():  # the local SuperLink `flwr run` started and left running
            stop(pid)
        log = proc.stdout + proc.stderr
        completed = "checkpoint:" in log and "round 8/8" in log
        return {"wall_s": wall, "completed": completed, "peak_mb": sampler.peak,
                "deprecation": "deprecat" in log.lower(), "log_tail": log[-1500:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fl.run", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="hierarchical,cardioformer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=400, help="synthetic records per site")
    parser.add_argument("--nodes", type=int, default=None, help="simulated nodes (default: Flower's default, 2)")
    parser.add_argument("--client-cpus", type=int, default=None, help="CPUs per simulated node (default: Flower's, 2)")
    parser.add_argument("--default-run", action="store_true", help="also time the README's main command")
    parser.add_argument("--in-process-child", nargs=3, metavar=("MODEL", "ROUNDS", "RECORDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("FED_ECG_CACHE", str(Path(tempfile.gettempdir()) / "fed-ecg-bench-cache"))
    quiet_third_party_warnings(verbose=False)
    if args.in_process_child:
        model, rounds, records = args.in_process_child
        print(json.dumps(in_process(model, int(rounds), int(records))))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="fed-ecg-bench-") as tmp:
        for model in args.models.split(","):
            rows.append(bench_model(model.strip(), args.rounds, args.records, args.nodes, args.client_cpus, Path(tmp)))
    print(f"# bench/fl: {args.rounds} rounds, 4 sites x {args.records} synthetic records (SYNTHETIC data), "
          f"tiny presets, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print("| model | simulated nodes x CPUs | params | federated round 1 (s) | federated round, rounds 2.. (median, s) | "
          "same work in one process (s) | overhead ratio | SuperLink start to run accepted (s) | "
          "outside rounds 1..n: start-up, round 0, shutdown (s) | peak memory, federation (MiB) | "
          "peak memory, one process (MiB) | memory ratio | step (s) | DP step (s) | DP/plain |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['nodes']} | {r['params']:,} | {r['first_round_s']:.1f} | {r['fed_round_s']:.1f} | "
              f"{r['local_round_s']:.1f} | {r['overhead']:.2f} | {r['startup_s']:.1f} | {r['outside_rounds_s']:.1f} | "
              f"{r['fed_peak_mb']:.0f} | {r['inproc_peak_mb']:.0f} | {r['memory_ratio']:.2f} | {r['step_s']:.3f} | "
              f"{r['dp_step_s']:.3f} | {r['dp_ratio']:.2f} |")
    if args.default_run:
        run = default_run()
        print(f"\n# the README's main command (`flwr run simulations/four_sites --stream`, every default, fresh "
              f"Flower home and synthetic-data cache): {run['wall_s']:.0f} s wall, completed {run['completed']}, "
              f"peak memory {run['peak_mb']:.0f} MiB, deprecation warning printed: {run['deprecation']}")
        if not run["completed"]:
            print(run["log_tail"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
