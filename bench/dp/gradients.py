"""Where DP-SGD's clipping budget goes: per-sample gradients of the DP model, site by site. SYNTHETIC data.

DP-SGD clips each sample's whole gradient to norm C and adds noise of the same size to every
coordinate. A block of parameters whose per-sample gradients are a small share of the norm gets
a small share of the signal but the full noise. This prints, for ``--samples`` training items
of each site (record unit, as DP trains):

* each site's median per-sample gradient norm (what ``dp-max-grad-norm`` is compared with);
* the median share of each sample's squared gradient norm per block of the model (first
  component of the parameter name; ``stages.0``, ``stages.1``, ... kept apart);
* the cosine similarity between the sites' mean clipped gradients (clip ``--clip``): the
  directions FedAvg averages. Near 1: the sites pull the same way; below 0: they pull apart.

at the initial weights and again after ``--warm-epochs`` plain (non-DP) epochs on the sites'
pooled training data (a model that has learnt something; a diagnostic, not a training recipe).

    python -m bench.dp.gradients [--records 2000] [--samples 256] [--warm-epochs 1]
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from shared.data.loader import WindowDataset
from shared.federation.quiet import quiet_third_party_warnings
from shared.federation.run_config import DEFAULTS, input_samples, load_run_config
from shared.federation.site_data import ensure_cache
from shared.federation.site_training import new_model
from shared.training import TrainConfig, train_local
from shared.training.losses import masked_bce_with_logits


def block_of(name: str) -> str:
    """``stages.2.0.linear1.weight`` -> ``stages.2``; ``head.rho.0.weight`` -> ``head``."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def per_sample_gradients(model: torch.nn.Module, dataset, n: int, generator: torch.Generator):
    """(n, P) per-sample gradients of the masked BCE at ``n`` random items, and each column's block."""
    from opacus import GradSampleModule

    from shared.training import conv1d_grad_sample  # noqa: F401  (the Conv1d sampler DP training uses)

    idx = torch.randperm(len(dataset), generator=generator)[:n].tolist()
    items = [dataset[i] for i in idx]  # one draw per item: its window, labels and mask together
    x, y, mask = (torch.stack([torch.as_tensor(item[k]) for item in items]) for k in range(3))
    wrapped = GradSampleModule(model)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            masked_bce_with_logits(wrapped(x), y, mask).backward()
        named = [(name.removeprefix("_module."), p) for name, p in wrapped.named_parameters()
                 if p.requires_grad and getattr(p, "grad_sample", None) is not None]
        grads = torch.cat([p.grad_sample.reshape(len(idx), -1) for _, p in named], dim=1)
        blocks = [block_of(name) for name, p in named for _ in range(p.numel())]
    finally:
        wrapped._close()
    model.zero_grad(set_to_none=True)
    return grads.detach(), np.array(blocks)


def report(tag: str, model: torch.nn.Module, datasets: dict, n: int, clip: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    directions, rows = {}, []
    for site, dataset in datasets.items():
        grads, blocks = per_sample_gradients(model, dataset, n, generator)
        norms = grads.norm(dim=1)
        squared = grads.pow(2)
        shares = {b: float(torch.median(squared[:, blocks == b].sum(1) / norms.pow(2).clamp(min=1e-30)))
                  for b in dict.fromkeys(blocks)}
        directions[site] = (grads / (norms / clip).clamp(min=1.0)[:, None]).mean(0)
        rows.append((site, float(norms.median()), shares))
    names = list(rows[0][2])
    print(f"\n{tag}: median share of a sample's squared gradient norm, per block")
    print("| site | median per-sample norm | " + " | ".join(names) + " |")
    print("|---" * (2 + len(names)) + "|")
    for site, norm, shares in rows:
        print(f"| {site} | {norm:.3f} | " + " | ".join(f"{shares[b]:.3f}" for b in names) + " |")
    sites = list(directions)
    print(f"\n{tag}: cosine between the sites' mean clipped gradients (clip {clip:g})")
    print("| | " + " | ".join(sites) + " |")
    print("|---" * (1 + len(sites)) + "|")
    for a in sites:
        cos = [float(torch.nn.functional.cosine_similarity(directions[a], directions[b], dim=0)) for b in sites]
        print(f"| {a} | " + " | ".join(f"{c:+.2f}" for c in cos) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=2000, help="synthetic records per site")
    p.add_argument("--samples", type=int, default=256, help="training items per site")
    p.add_argument("--warm-epochs", type=int, default=1, help="plain epochs on the pooled training data (0: init only)")
    p.add_argument("--clip", type=float, default=DEFAULTS["dp-max-grad-norm"])
    p.add_argument("--sites", default=DEFAULTS["sites"])
    p.add_argument("--model", default="hierarchical")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quiet_third_party_warnings(False)
    cfg = load_run_config({"model": args.model, "preset": args.preset, "synthetic-records": args.records,
                           "sites": args.sites, "device": "cpu", "dp": True})
    datasets = {site: WindowDataset(ensure_cache(site, "", cfg), "train", crop_samples=input_samples(cfg),
                                    train=True, unit="record", seed=args.seed) for site in cfg.site_list}
    torch.manual_seed(args.seed)
    model = new_model(cfg)  # the Opacus-compatible form DP trains
    sizes: dict[str, int] = {}
    for name, p in model.named_parameters():
        sizes[block_of(name)] = sizes.get(block_of(name), 0) + p.numel()
    print(f"bench/dp/gradients: SYNTHETIC data, {args.model}/{args.preset} (DP form, "
          f"{sum(sizes.values()):,} parameters: " + ", ".join(f"{b} {n:,}" for b, n in sizes.items())
          + f"), {args.samples} training items per site of {args.records} records")
    report("initial weights", model, datasets, args.samples, args.clip, args.seed)
    if args.warm_epochs:
        train_local(model, ConcatDataset(list(datasets.values())),
                    TrainConfig(epochs=args.warm_epochs, batch_size=int(cfg.batch_size), lr=float(cfg.lr),
                                device="cpu", seed=args.seed))
        report(f"after {args.warm_epochs} plain epoch(s) on the pooled training data", model, datasets,
               args.samples, args.clip, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
