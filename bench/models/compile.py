"""torch.compile on both models: graph breaks of a training forward, and the CPU speed-up.

For each model and preset (default: the ``tiny`` presets):

1. ``torch._dynamo.explain`` on a training-mode forward: graph count, graph-break count and
   the reason of each break (target: at most 5 per model);
2. eager against ``torch.compile`` (inductor): median seconds of a training step (forward +
   backward + Adam step, train mode) and of an inference forward (eval mode, ``no_grad``),
   after warm-up, in the same process one after the other, so the ratio is the comparable
   figure on a shared machine; the compile time (first steps) is printed too;
3. that the compiled model computes what the eager one does in eval mode (max abs difference).

    python bench/models/compile.py                      # both tiny presets, 2 threads
    python bench/models/compile.py --models cardioformer --presets paper --batch 16 --steps 3
    python bench/models/compile.py --explain-only       # graph breaks only (seconds)
    python bench/models/compile.py --models cardioformer --set dropout=0 --set 'augmentations=["none"]'
        # without random operations (dropout, augmentation)
    python bench/models/compile.py --fallback-random    # random numbers from aten, not inductor's kernels

Prints one JSON line per model/preset and a Markdown table; records the 1-minute load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from shared.models import parse_overrides


def build(name: str, preset: str, overrides: dict) -> tuple[torch.nn.Module, int, int, int]:
    from shared.models import build_model, get_preset

    p = get_preset(name, preset)
    samples = int(round(p["fs"] * p["seconds"]))
    torch.manual_seed(0)
    model = build_model(name, preset, n_leads=p["n_leads"], input_samples=samples, n_classes=p["n_classes"], **overrides)
    return model, p["n_leads"], samples, p["n_classes"]


def graph_breaks(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """``torch._dynamo.explain`` of a training-mode forward."""
    import torch._dynamo

    model.train()
    explained = torch._dynamo.explain(model)(x)
    torch._dynamo.reset()
    return {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
            "break_reasons": [r.reason.splitlines()[0][:200] for r in explained.break_reasons]}


def median_seconds(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def speed(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, compiled: bool) -> dict:
    """Median training-step and inference seconds, eager or compiled (warm-up excluded)."""
    net = torch.compile(model) if compiled else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train() -> None:
        opt.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(net(x), y).backward()
        opt.step()

    def infer() -> torch.Tensor:
        with torch.no_grad():
            return net(x)

    model.train()
    t = time.perf_counter()
    train()
    train()  # the second step too: compiled graphs may specialise after the first
    warm_train = time.perf_counter() - t
    t_train = median_seconds(train, steps)
    model.eval()
    t = time.perf_counter()
    out = infer()
    warm_infer = time.perf_counter() - t
    t_infer = median_seconds(infer, steps)
    return {"train_s": t_train, "infer_s": t_infer, "warmup_train_s": warm_train, "warmup_infer_s": warm_infer,
            "eval_output": out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cardioformer", "hierarchical"])
    ap.add_argument("--presets", nargs="+", default=["tiny"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--explain-only", action="store_true", help="graph breaks only, no timing")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="hyper-parameter override (JSON value)")
    ap.add_argument("--fallback-random", action="store_true",
                    help="torch._inductor.config.fallback_random: random numbers from aten's generators")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)
    if args.fallback_random:
        from torch._inductor import config as inductor_config

        inductor_config.fallback_random = True
    rows = []
    for name in args.models:
        for preset in args.presets:
            model, n_leads, samples, n_classes = build(name, preset, overrides)
            x = torch.randn(args.batch, n_leads, samples)
            y = (torch.rand(args.batch, n_classes) > 0.5).float()
            row = {"model": name, "preset": preset, "overrides": overrides, "fallback_random": args.fallback_random,
                   "batch": args.batch, "threads": args.threads,
                   **graph_breaks(model, x[:2])}
            if not args.explain_only:
                eager = speed(model, x, y, args.steps, compiled=False)
                torch.manual_seed(1)
                fresh, *_ = build(name, preset, overrides)
                fresh.load_state_dict(model.state_dict())
                compiled = speed(fresh, x, y, args.steps, compiled=True)
                with torch.no_grad():
                    reference = fresh.eval()(x)
                row.update({
                    "eager_train_samples_s": args.batch / eager["train_s"],
                    "compiled_train_samples_s": args.batch / compiled["train_s"],
                    "eager_infer_samples_s": args.batch / eager["infer_s"],
                    "compiled_infer_samples_s": args.batch / compiled["infer_s"],
                    "train_speedup": eager["train_s"] / compiled["train_s"],
                    "infer_speedup": eager["infer_s"] / compiled["infer_s"],
                    "compile_s_train": compiled["warmup_train_s"], "compile_s_infer": compiled["warmup_infer_s"],
                    "eval_max_abs_diff": float((compiled["eval_output"] - reference).abs().max()),
                })
                torch._dynamo.reset()
            row["load_avg_1min"] = os.getloadavg()[0]
            print(json.dumps(row), flush=True)
            rows.append(row)
    print()
    print("| model | preset | graph breaks (train fwd) | train samples/s eager / compiled (x) "
          "| infer samples/s eager / compiled (x) | compile s (train / infer) | load avg |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "train_speedup" in r:
            timing = (f"{r['eager_train_samples_s']:.3g} / {r['compiled_train_samples_s']:.3g} ({r['train_speedup']:.2f}x) "
                      f"| {r['eager_infer_samples_s']:.3g} / {r['compiled_infer_samples_s']:.3g} ({r['infer_speedup']:.2f}x) "
                      f"| {r['compile_s_train']:.0f} / {r['compile_s_infer']:.0f}")
        else:
            timing = "- | - | -"
        print(f"| {r['model']} | {r['preset']} | {r['graph_breaks']} | {timing} | {r['load_avg_1min']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
