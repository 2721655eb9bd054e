"""Choose DP-SGD settings on one site's VALIDATION split, fast. SYNTHETIC data.

For every combination of logical batch, learning rate and warm-up: the model (the
Opacus-compatible form the federation trains under DP) is trained at one site for ``--rounds``
calls of ``--local-epochs`` epochs, each call a fresh AdamW as in a federated round, with DP-SGD
at a target epsilon after all rounds (record unit, delta = 1/(10 N), RDP accountant), and its
validation macro AUROC after each round is printed. ``--epsilon 0`` trains the same model
without noise or clipping, as a reference. The test split is never read.

One site is a quick screen, not the federation: a setting that learns here may still not learn
federated (at the previous defaults, batch 128 x 2 epochs per round, 0.698 here against 0.522
pooled-test federated; docs/privacy.md, "Benchmark"). The federated figure is
``python -m bench.dp.run``. Defaults: the DP defaults (``--batch 0`` = min(512, N // 3)).

    python -m bench.dp.sweep [--site ptbxl] [--records 2000] [--epsilon 10] [--rounds 8] \
        [--local-epochs 4] [--batch 128,512] [--lr 0.003,0.01,0.03] [--warmup 0,2]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch

from bench.dp.run import noise_multiplier_for
from shared.data.loader import WindowDataset
from shared.federation.quiet import quiet_third_party_warnings
from shared.federation.run_config import DEFAULTS, dp_logical_batch, input_samples, load_run_config
from shared.federation.site_data import ensure_cache
from shared.federation.site_training import evaluate_site, new_model
from shared.metrics import masked_macro_auroc
from shared.training import DPConfig, TrainConfig, train_local


def one_setting(cfg, cache: Path, *, epsilon: float, rounds: int, local_epochs: int, batch: int, lr: float,
                warmup: int, clip: float, seed: int) -> dict:
    train = WindowDataset(cache, "train", crop_samples=input_samples(cfg), train=True, unit="record", seed=seed)
    batch = dp_logical_batch(batch, len(train))
    dp = None
    if epsilon > 0:
        dp = DPConfig(noise_multiplier=noise_multiplier_for(epsilon, len(train), batch, rounds * local_epochs),
                      max_grad_norm=clip, delta=1.0 / (10 * len(train)))
    train_cfg = TrainConfig(epochs=local_epochs, batch_size=batch, lr=lr, device="cpu", dp=dp, seed=seed,
                            max_physical_batch=int(cfg.dp_max_physical_batch), warmup_steps=warmup)
    torch.manual_seed(seed)
    model = new_model(cfg)
    t0 = time.perf_counter()
    dp_state, per_round = None, []
    for _ in range(rounds):  # a fresh AdamW per call, as in every federated round
        result = train_local(model, train, train_cfg, dp_state=dp_state)
        dp_state = result.dp_state
        scored = evaluate_site(cfg, cache, model.state_dict(), split="val")
        per_round.append(float(masked_macro_auroc(scored.probs, scored.targets, scored.mask)[1]))
    return {"units": len(train), "batch": batch, "noise": dp.noise_multiplier if dp else 0.0, "epsilon": result.epsilon,
            "val_auroc": per_round, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--site", default="ptbxl")
    p.add_argument("--records", type=int, default=2000, help="synthetic records of the site")
    p.add_argument("--epsilon", type=float, default=10.0, help="target epsilon after all epochs; 0 = no DP")
    p.add_argument("--rounds", type=int, default=DEFAULTS["num-server-rounds"])
    p.add_argument("--local-epochs", type=int, default=DEFAULTS["dp-local-epochs"] or DEFAULTS["local-epochs"])
    p.add_argument("--batch", default=str(DEFAULTS["dp-batch-size"]),
                   help="logical batches, comma-separated (0 = min(512, N // 3))")
    p.add_argument("--lr", default=str(DEFAULTS["dp-lr"]), help="learning rates, comma-separated")
    p.add_argument("--warmup", default=str(DEFAULTS["dp-warmup-steps"]), help="warm-up steps per round, comma-separated")
    p.add_argument("--clip", type=float, default=DEFAULTS["dp-max-grad-norm"])
    p.add_argument("--model", default="hierarchical")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quiet_third_party_warnings(False)
    cfg = load_run_config({"model": args.model, "preset": args.preset, "synthetic-records": args.records,
                           "device": "cpu", "dp": True})
    cache = ensure_cache(args.site, "", cfg)
    print(f"bench/dp/sweep: SYNTHETIC {args.site}, {args.records} records, {args.model}/{args.preset} (DP form), "
          f"{args.rounds} rounds x {args.local_epochs} local epochs, epsilon {args.epsilon:g} after all rounds "
          f"(0 = no DP), record unit, clip {args.clip:g}; validation macro AUROC after each round")
    print("| logical batch | lr | warm-up | noise | val macro AUROC per round | last | seconds |")
    print("|---|---|---|---|---|---|---|")
    grid = itertools.product((int(b) for b in args.batch.split(",")), (float(lr) for lr in args.lr.split(",")),
                             (int(w) for w in args.warmup.split(",")))
    for batch, lr, warmup in grid:
        r = one_setting(cfg, cache, epsilon=args.epsilon, rounds=args.rounds, local_epochs=args.local_epochs,
                        batch=batch, lr=lr, warmup=warmup, clip=args.clip, seed=args.seed)
        curve = " ".join(f"{v:.2f}" for v in r["val_auroc"])
        print(f"| {r['batch']} | {lr:g} | {warmup} | {r['noise']:.2f} | {curve} | {r['val_auroc'][-1]:.3f} | "
              f"{r['seconds']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
