"""GPU throughput of both models: bf16 autocast, eager and torch.compile, per preset.

One command on a machine with a CUDA device:

    python bench/models/gpu.py --device cuda
    python bench/models/gpu.py --device cuda --models cardioformer --presets paper --batch 128 --no-compile

For each model, preset and mode (eager, compiled) it reports training samples/s (forward +
backward + AdamW step under ``torch.autocast(dtype=torch.bfloat16)``) and inference samples/s
(eval mode, ``torch.inference_mode``, autocast), the peak GPU memory of each
(``torch.cuda.max_memory_allocated``), and the achieved FLOP/s: per-sample forward FLOPs
(``FlopCounterMode``, as ``python -m shared.models summary``) x samples/s, a training step
counted as 3x the forward. The reference is a bf16 matmul (8192^3, median of 10) measured in
the same run; each figure is also given as a share of it.

Without a CUDA device (``--device cuda`` on a machine without one) it prints a SKIP line and
exits 0. ``--device cpu`` runs the same code on the CPU (bf16 autocast; a smoke test of the
script, not a GPU figure).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch
import torch._dynamo
import torch.nn.functional as F


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None


def median_seconds(fn, steps: int, device: torch.device) -> float:
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def warm_then_time(fn, steps: int, device: torch.device) -> tuple[float, float, float]:
    """``(warm-up seconds, median seconds per call, peak GiB)``: 3 untimed calls (compilation
    happens there), then ``steps`` timed calls with the peak-memory counter reset."""
    t = time.perf_counter()
    for _ in range(3):
        fn()
    sync(device)
    warm = time.perf_counter() - t
    reset_peak(device)
    return warm, median_seconds(fn, steps, device), peak_gib(device)


def matmul_tflops(device: torch.device, n: int) -> float:
    """bf16 ``n x n @ n x n`` TFLOP/s, median of 10 after 3 warm-ups."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    return 2 * n**3 / median_seconds(lambda: a @ b, 10, device) / 1e12


def measure(name: str, preset: str, compiled: bool, device: torch.device, batch: int, steps: int) -> dict:
    from shared.models import build_model, get_preset
    from shared.models.__main__ import count_forward_flops

    p = get_preset(name, preset)
    samples = int(round(p["fs"] * p["seconds"]))
    torch.manual_seed(0)
    model = build_model(name, preset, n_leads=p["n_leads"], input_samples=samples, n_classes=p["n_classes"])
    flops = count_forward_flops(model, torch.randn(1, p["n_leads"], samples))  # on the CPU, fp32
    model.to(device)
    net = torch.compile(model) if compiled else model
    x = torch.randn(batch, p["n_leads"], samples, device=device)
    y = (torch.rand(batch, p["n_classes"], device=device) > 0.5).float()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.binary_cross_entropy_with_logits(net(x).float(), y)
        loss.backward()
        opt.step()

    def infer() -> None:
        with torch.inference_mode(), autocast:
            net(x)

    model.train()
    warm_train, t_train, train_peak = warm_then_time(train, steps, device)
    opt.zero_grad(set_to_none=True)
    model.eval()
    warm_infer, t_infer, infer_peak = warm_then_time(infer, steps, device)
    del net, model, opt
    gc.collect()
    torch._dynamo.reset()
    return {
        "model": name, "preset": preset, "compiled": compiled, "batch": batch, "steps": steps,
        "input": [p["n_leads"], samples], "gflop_per_sample": flops / 1e9,
        "train_samples_s": batch / t_train, "infer_samples_s": batch / t_infer,
        "train_peak_gib": train_peak, "infer_peak_gib": infer_peak,
        "train_tflop_s": 3 * flops * batch / t_train / 1e12, "infer_tflop_s": flops * batch / t_infer / 1e12,
        "warmup_train_s": warm_train, "warmup_infer_s": warm_infer,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke run")
    ap.add_argument("--models", nargs="+", default=["cardioformer", "hierarchical"])
    ap.add_argument("--presets", nargs="+", default=["tiny", "base", "paper"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--matmul-size", type=int, default=8192)
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"SKIP: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False); "
              "nothing measured. Run this on a machine with a GPU.")
        return 0
    if device.type not in ("cuda", "cpu"):
        print(f"error: --device must be cuda, cuda:N or cpu, got {args.device!r}", file=sys.stderr)
        return 2
    peak = matmul_tflops(device, args.matmul_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"device": name, "torch": torch.__version__, "bf16_matmul_tflop_s": peak,
                      "matmul_size": args.matmul_size}), flush=True)
    rows = []
    for model in args.models:
        for preset in args.presets:
            for compiled in ([False] if args.no_compile else [False, True]):
                try:
                    row = measure(model, preset, compiled, device, args.batch, args.steps)
                except torch.OutOfMemoryError:
                    row = {"model": model, "preset": preset, "compiled": compiled, "batch": args.batch, "error": "out of memory"}
                    gc.collect()
                    torch.cuda.empty_cache()
                row["matmul_tflop_s"] = peak
                print(json.dumps(row), flush=True)
                rows.append(row)
    print()
    print(f"{name}, bf16 autocast, batch {args.batch}; bf16 matmul {peak:.1f} TFLOP/s measured in this run")
    print()
    print("| model | preset | compile | train samples/s | infer samples/s | peak GiB train / infer "
          "| TFLOP/s train / infer | % of bf16 matmul train / infer |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mode = "yes" if r["compiled"] else "no"
        if "error" in r:
            print(f"| {r['model']} | {r['preset']} | {mode} | {r['error']} | | | | |")
            continue
        mem = ("-" if r["train_peak_gib"] is None
               else f"{r['train_peak_gib']:.2f} / {r['infer_peak_gib']:.2f}")
        print(f"| {r['model']} | {r['preset']} | {mode} | {r['train_samples_s']:.4g} | {r['infer_samples_s']:.4g} "
              f"| {mem} | {r['train_tflop_s']:.2f} / {r['infer_tflop_s']:.2f} "
              f"| {100 * r['train_tflop_s'] / peak:.0f} % / {100 * r['infer_tflop_s'] / peak:.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
