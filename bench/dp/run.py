"""DP benchmark: what DP-SGD at every site costs in pooled-test AUROC and in step time. SYNTHETIC data.

In one run, on the embedded synthetic federation (4 sites, ``--records`` records per site):

* FedAvg without DP, and FedAvg with DP-SGD at every site at a target epsilon per site of about
  1, 3 and 10 (privacy unit: record; delta = 1/(10 N), N = the site's training records). For
  each target the site's noise multiplier is the smallest that reaches it after all rounds
  (Opacus ``get_noise_multiplier``, RDP accountant), so the reported epsilon is the site's
  epsilon after the last round. Pooled-test macro AUROC of the final global model (the test
  splits of all sites concatenated, record-level as in the server's pooled evaluation), and
  each site's own test macro AUROC (over the classes that site labels);
* the DP/plain step-time ratio: seconds per optimiser step of the same model on the same
  site, batch ``--step-batch`` (plain: a shuffled batch; DP: a Poisson batch of that expected
  size with per-sample clipping and noise), median of ``--step-repeats`` calls of each, the
  kinds called in turn so that a change of load on the machine falls on both alike.

The federation is driven in this process, not through Flower: every round each site's
``shared.federation.site_training.train_site`` (the ClientApp's own training path, without a
ledger directory: the accountant history is kept here), then the FedAvg weighted average
(``num-examples``). Flower adds no computation to what is measured (see bench/fl).

With ``--local-only`` the same runs are repeated with every site training alone (its own model
scored on its own split): what federation buys, without DP and under DP.

    python -m bench.dp.run [--records 2000] [--rounds 8] [--epsilons 1,3,10] [--sites ptbxl,mimic]
                           [--split val] [--local-only] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from shared.federation.quiet import quiet_third_party_warnings
from shared.federation.run_config import DEFAULTS, dp_epochs, dp_logical_batch, load_run_config
from shared.federation.site_data import ensure_cache
from shared.federation.site_training import evaluate_site, new_model, train_site
from shared.metrics import masked_macro_auroc
from shared.training.privacy import sample_rate_and_steps


def fedavg(states: list[dict], weights: list[int]) -> dict:
    total = float(sum(weights))
    return {k: (sum(s[k] * (w / total) for s, w in zip(states, weights)) if ref.is_floating_point() else ref)
            for k, ref in states[0].items()}


def scored_auroc(cfg, caches: dict[str, Path], states: dict[str, dict], split: str = "test"
                 ) -> tuple[float, dict[str, float]]:
    """Macro AUROC on every site's ``split``, each site scored by ``states[site]`` (the global
    model for all, or each site's own model): pooled (predictions concatenated) and per site
    (each site's own classes)."""
    results = {site: evaluate_site(cfg, cache, states[site], split=split) for site, cache in caches.items()}
    per_site = {site: float(masked_macro_auroc(r.probs, r.targets, r.mask)[1]) for site, r in results.items()}
    _, macro = masked_macro_auroc(*(np.concatenate([getattr(r, k) for r in results.values()])
                                    for k in ("probs", "targets", "mask")))
    return float(macro), per_site


def train_units(cfg, cache: Path) -> int:
    from shared.data.loader import WindowDataset
    from shared.federation.run_config import input_samples

    return len(WindowDataset(cache, "train", crop_samples=input_samples(cfg), train=True, unit=str(cfg.dp_unit)))


def noise_multiplier_for(target: float, n_units: int, batch: int, epochs: int) -> float:
    """The smallest noise multiplier reaching ``target`` epsilon after ``epochs`` epochs of Poisson
    batches of expected size ``batch`` over ``n_units`` units (delta 1/(10 N), RDP accountant)."""
    from opacus.accountants.utils import get_noise_multiplier

    q, steps = sample_rate_and_steps(n_units, batch, epochs)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is still valid
        warnings.simplefilter("ignore", UserWarning)
        return float(get_noise_multiplier(target_epsilon=target, target_delta=1.0 / (10 * n_units), sample_rate=q,
                                          steps=steps, accountant="rdp", epsilon_tolerance=0.01))


def noise_for(target: float, n_units: int, cfg) -> tuple[float, float]:
    """(noise multiplier, delta) reaching ``target`` epsilon after every round at a site of ``n_units``."""
    batch = dp_logical_batch(int(cfg.dp_batch_size), n_units)
    sigma = noise_multiplier_for(target, n_units, batch, dp_epochs(cfg) * int(cfg.num_server_rounds))
    return sigma, 1.0 / (10 * n_units)


def federate(base: dict, caches: dict[str, Path], target: float | None, split: str = "test", *,
             score: bool = True) -> dict:
    """FedAvg over ``num-server-rounds``; DP at every site when ``target`` is set. ``score``: the
    final model's AUROC on every site's ``split`` (else only the model is returned)."""
    cfg = load_run_config(base)
    site_cfgs, dp_states, info = {}, {}, {}
    for site, cache in caches.items():
        if target is None:
            site_cfgs[site] = cfg
            continue
        n = train_units(cfg, cache)
        sigma, delta = noise_for(target, n, load_run_config({**base, "dp": True}))
        site_cfgs[site] = load_run_config({**base, "dp": True, "dp-noise-multiplier": sigma, "dp-delta": delta})
        info[site] = {"units": n, "noise": sigma, "delta": delta}
    torch.manual_seed(int(cfg.seed))
    state = new_model(site_cfgs[next(iter(caches))]).state_dict()
    t0 = time.perf_counter()
    for rnd in range(1, int(cfg.num_server_rounds) + 1):
        outcomes = []
        for site, cache in caches.items():
            out = train_site(site_cfgs[site], cache, site, rnd, state, dp_state=dp_states.get(site))
            dp_states[site] = out.result.dp_state
            if out.dp_report:
                info[site].update(epsilon=out.dp_report["epsilon"], sample_rate=out.dp_report["sample-rate"])
            outcomes.append(out)
        state = fedavg([o.state for o in outcomes], [o.result.num_examples for o in outcomes])
    result = {"target": target, "sites": info, "seconds": time.perf_counter() - t0, "state": state}
    if score:
        cfg0 = site_cfgs[next(iter(caches))]
        result["auroc"], result["site_auroc"] = scored_auroc(cfg0, caches, dict.fromkeys(caches, state), split)
    return result


def each_site_alone(base: dict, caches: dict[str, Path], target: float | None, split: str = "test") -> dict:
    """Local-only: every site trains alone, the same rounds and epochs as in the federation (and,
    under DP, the same noise: it depends only on the site's units and schedule), and its own
    model scores its own ``split``; pooled = those predictions concatenated."""
    t0 = time.perf_counter()
    runs = {site: federate(base, {site: cache}, target, split, score=False) for site, cache in caches.items()}
    cfg = load_run_config({**base, "dp": target is not None})
    auroc, per_site = scored_auroc(cfg, caches, {site: r["state"] for site, r in runs.items()}, split)
    return {"target": target, "auroc": auroc, "site_auroc": per_site,
            "sites": {site: r["sites"].get(site, {}) for site, r in runs.items()},
            "seconds": time.perf_counter() - t0}


def step_call_seconds(base: dict, cache: Path, batch: int, dp: bool) -> float:
    """Seconds per optimiser step of one ``train_local`` call (1 epoch, a fresh model)."""
    from shared.data.loader import WindowDataset
    from shared.federation.run_config import input_samples
    from shared.training import DPConfig, TrainConfig, train_local

    cfg = load_run_config({**base, "dp": dp})
    dataset = WindowDataset(cache, "train", crop_samples=input_samples(cfg), train=True, unit="record")
    dp_cfg = DPConfig(noise_multiplier=1.0, delta=1.0 / (10 * len(dataset))) if dp else None
    train_cfg = TrainConfig(epochs=1, batch_size=batch, device="cpu", dp=dp_cfg, max_physical_batch=4 * batch)
    torch.manual_seed(0)
    model = new_model(cfg)
    t0 = time.perf_counter()
    out = train_local(model, dataset, train_cfg)
    return (time.perf_counter() - t0) / max(out.steps, 1)


@contextlib.contextmanager
def opacus_conv1d_sampler():
    """Opacus's own Conv1d per-sample gradient (unfold, all channel blocks) in place of the
    project's (shared/training/conv1d_grad_sample.py): the before of that change."""
    from opacus import GradSampleModule
    from opacus.grad_sample.conv import compute_conv_grad_sample

    from shared.training import conv1d_grad_sample  # noqa: F401  (registered first, so restored after)

    samplers = GradSampleModule.GRAD_SAMPLERS
    registered = samplers[torch.nn.Conv1d]
    samplers[torch.nn.Conv1d] = compute_conv_grad_sample
    try:
        yield
    finally:
        samplers[torch.nn.Conv1d] = registered


def step_times(base: dict, cache: Path, batch: int, repeats: int, with_opacus_conv1d: bool = False) -> dict:
    """Median seconds per step of each kind ("plain", "dp", and "dp-opacus-conv1d" if asked) over
    ``repeats`` rounds. A round calls every kind once, in turn, so a change of load on the machine
    falls on all of them alike; a first round warms up (allocations, first kernels) and is not timed."""
    kinds = ["plain", "dp"] + (["dp-opacus-conv1d"] if with_opacus_conv1d else [])
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(repeats + 1):
        for kind in kinds:
            if kind == "dp-opacus-conv1d":
                with opacus_conv1d_sampler():
                    t = step_call_seconds(base, cache, batch, dp=True)
            else:
                t = step_call_seconds(base, cache, batch, dp=kind == "dp")
            if i:
                times[kind].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=2000, help="synthetic records per site")
    # every other default is the simulation's (shared.federation.run_config.DEFAULTS)
    p.add_argument("--rounds", type=int, default=DEFAULTS["num-server-rounds"])
    p.add_argument("--local-epochs", type=int, default=DEFAULTS["local-epochs"],
                   help="local epochs per round without DP")
    p.add_argument("--dp-local-epochs", type=int, default=DEFAULTS["dp-local-epochs"],
                   help="local epochs per round under DP (0 = --local-epochs)")
    p.add_argument("--dp-batch-size", type=int, default=DEFAULTS["dp-batch-size"],
                   help="DP logical batch (expected Poisson sample); 0 = min(512, N // 3) at each site")
    p.add_argument("--dp-warmup-steps", type=int, default=DEFAULTS["dp-warmup-steps"],
                   help="DP learning-rate warm-up steps per round")
    p.add_argument("--dp-lr", type=float, default=DEFAULTS["dp-lr"])
    p.add_argument("--dp-clip", type=float, default=DEFAULTS["dp-max-grad-norm"])
    p.add_argument("--epsilons", default="1,3,10")
    p.add_argument("--step-batch", type=int, default=64)
    p.add_argument("--step-repeats", type=int, default=2)
    p.add_argument("--sites", default=DEFAULTS["sites"],
                   help="the federation's sites (a subset shows which sites DP training can learn from)")
    p.add_argument("--model", default="hierarchical")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="where the pooled AUROC is scored: test (the figure), val (to choose settings)")
    p.add_argument("--local-only", action="store_true",
                   help="also train every site alone (no DP and each epsilon): what federation buys, with and without DP")
    p.add_argument("--no-step-time", action="store_true", help="skip the step-time measurement")
    p.add_argument("--only-step-time", action="store_true",
                   help="measure the step times (also with Opacus's own Conv1d per-sample gradient) and stop")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    quiet_third_party_warnings(False)
    base = {"model": args.model, "preset": args.preset, "synthetic-records": args.records, "sites": args.sites,
            "num-server-rounds": args.rounds, "local-epochs": args.local_epochs,
            "dp-local-epochs": args.dp_local_epochs, "device": "cpu",
            "dp-batch-size": args.dp_batch_size, "dp-lr": args.dp_lr, "dp-max-grad-norm": args.dp_clip,
            "dp-warmup-steps": args.dp_warmup_steps}
    cfg = load_run_config(base)
    caches = {site: ensure_cache(site, "", cfg) for site in cfg.site_list}
    step_site = "ptbxl" if "ptbxl" in caches else next(iter(caches))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    plain_step = dp_step = float("nan")
    if not args.no_step_time:
        steps = step_times(base, caches[step_site], args.step_batch, args.step_repeats,
                           with_opacus_conv1d=args.only_step_time)
        plain_step, dp_step = steps["plain"], steps["dp"]
        print(f"step time, batch {args.step_batch}: plain {plain_step:.3f} s, DP {dp_step:.3f} s", flush=True)
        if args.only_step_time:
            opacus_step = steps["dp-opacus-conv1d"]
            print(f"DP/plain {dp_step / plain_step:.2f}x; with Opacus's own Conv1d per-sample gradient: DP "
                  f"{opacus_step:.3f} s, {opacus_step / plain_step:.2f}x; load average before {load_before[0]:.2f}, "
                  f"after {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}")
            return 0
    where = f"pooled-{args.split}"
    targets = [None] + [float(e) for e in args.epsilons.split(",")]
    kinds = [("FedAvg", federate)] + ([("each site alone", each_site_alone)] if args.local_only else [])
    runs = []
    for kind, train in kinds:
        for target in targets:
            r = train(base, caches, target, args.split)
            r.pop("state", None)
            runs.append({**r, "kind": kind})
            label = "no DP" if target is None else f"DP eps {target:g}"
            print(f"{label}, {kind}: {where} macro AUROC {r['auroc']:.3f} ({r['seconds']:.0f} s) "
                  + json.dumps(r["sites"]), flush=True)
    print()
    dp_batch = args.dp_batch_size or "min(512, N // 3)"
    print(f"bench/dp: SYNTHETIC data, {args.model}/{args.preset}, {len(caches)} sites x {args.records} records, "
          f"{args.rounds} rounds; no DP: {args.local_epochs} local epochs per round, batch {cfg.batch_size}, "
          f"lr {cfg.lr:g}; DP: {args.dp_local_epochs or args.local_epochs} local epochs per round, unit record, "
          f"logical batch {dp_batch}, lr {args.dp_lr:g} (warm-up {args.dp_warmup_steps} steps per round), "
          f"clip {args.dp_clip:g}, delta 1/(10 N) (each at its own defaults: docs/privacy.md)")
    sites = list(caches)
    print(f"| run | epsilon per site (after all rounds) | noise multiplier | {where} macro AUROC | cost vs no DP | "
          + " | ".join(f"{s} {args.split}" for s in sites) + " |")
    print("|---" * (5 + len(sites)) + "|")
    for r in runs:
        plain = next(p["auroc"] for p in runs if p["kind"] == r["kind"] and p["target"] is None)
        per_site = " | ".join(f"{r['site_auroc'][s]:.3f}" for s in sites)
        if r["target"] is None:
            print(f"| no DP, {r['kind']} | - | - | {plain:.3f} | - | {per_site} |")
            continue
        eps = " ".join(f"{s} {v.get('epsilon', float('nan')):.2f}" for s, v in r["sites"].items())
        sig = " ".join(f"{v['noise']:.2f}" for v in r["sites"].values())
        print(f"| DP eps ~{r['target']:g}, {r['kind']} | {eps} | {sig} | {r['auroc']:.3f} | "
              f"{plain - r['auroc']:+.3f} | {per_site} |")
    if args.local_only:
        print("(each site alone: every site's own model scores its own split; pooled = those predictions concatenated)")
    print(f"\nstep time, batch {args.step_batch} ({step_site}): plain {plain_step * 1e3:.1f} ms, DP {dp_step * 1e3:.1f} ms, "
          f"DP/plain {dp_step / plain_step:.2f}x")
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
          f"wall {time.perf_counter() - t0:.0f} s; torch threads {torch.get_num_threads()}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs,
                                         "plain_step_s": plain_step, "dp_step_s": dp_step}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
