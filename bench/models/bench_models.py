"""Throughput, peak memory and achieved FLOP/s of the models, per model and preset.

Each configuration runs in a fresh child process (so its peak RSS, ``ru_maxrss``, is its own):
one warm-up step, then the median of ``--steps`` timed steps of

* training: forward + backward + Adam step on a random batch (``--batch``, default 32), train mode;
* inference: forward in eval mode under ``torch.no_grad``.

Achieved FLOP/s = per-sample forward FLOPs (FlopCounterMode, see ``python -m shared.models
summary``) x samples/s, counting a training step as 3x the forward FLOPs (backward ~ 2x
forward). The machine's fp32 matmul FLOP/s (2048^3, median of 5) is measured in the same run. "CPU busy" is the process CPU time
per training step over (wall time x threads): near 100 % means the run had its cores to itself;
far below, other processes were sharing them and the wall-clock figures are pessimistic.

    python bench/models/bench_models.py --model hierarchical --presets tiny base paper
    python bench/models/bench_models.py --model hierarchical --presets paper --set attention=differential
    python bench/models/bench_models.py --presets paper --math-attention   # unfused attention
    python bench/models/bench_models.py --model cardioformer --presets paper --threads 1 --profile
        # also: the operators taking the most CPU time in one training step (torch.profiler)
    python bench/models/bench_models.py --device cuda --bf16 ...   # on a GPU (bench/models/gpu.py: full GPU table)

Prints one JSON line per configuration, then a Markdown table for docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from shared.models import parse_overrides


def matmul_gflops(threads: int, device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    torch.set_num_threads(threads)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(6):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times[1:]) / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_child(spec: dict) -> dict:
    """Measure one configuration (runs inside the fresh child process)."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    from shared.models import build_model, get_preset
    from shared.models.__main__ import count_forward_flops

    device = spec["device"]
    preset = get_preset(spec["model"], spec["preset"])
    n_leads, n_classes = preset["n_leads"], preset["n_classes"]
    samples = int(round(preset["fs"] * preset["seconds"]))
    model = build_model(spec["model"], spec["preset"], n_leads=n_leads, input_samples=samples, n_classes=n_classes,
                        **spec["overrides"])
    params = sum(p.numel() for p in model.parameters())
    flops = count_forward_flops(model, torch.randn(1, n_leads, samples))
    model.to(device)
    x = torch.randn(spec["batch"], n_leads, samples, device=device)
    y = (torch.rand(spec["batch"], n_classes, device=device) > 0.5).float()
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=spec["bf16"])
    kernels = contextlib.ExitStack()  # lives until the function returns
    if spec["math_attention"]:
        # PyTorch's unfused attention: materialises every [L, L] map, as the released code does.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernels.enter_context(sdpa_kernel(SDPBackend.MATH))

    def timed(fn) -> tuple[float, float]:
        """Median wall seconds and median process CPU seconds per step."""
        fn()  # warm-up
        times, cpu = [], []
        for _ in range(spec["steps"]):
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        return statistics.median(times), statistics.median(cpu)

    model.eval()

    def infer() -> None:
        with torch.no_grad(), autocast:
            model(x)

    t_infer, cpu_infer = timed(infer)
    rss_infer = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # GiB (ru_maxrss is KiB)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
        loss.backward()
        opt.step()

    t_train, cpu_train = timed(train)
    top_ops = None
    if spec.get("profile"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        top_ops = {e.key: round(100 * e.self_cpu_time_total / total, 1) for e in events[:8]}
    out = {
        "model": spec["model"], "preset": spec["preset"], "overrides": spec["overrides"], "params": params,
        "input": [n_leads, samples], "batch": spec["batch"], "steps": spec["steps"],
        "device": device, "bf16": spec["bf16"], "threads": spec["threads"], "math_attention": spec["math_attention"],
        "gflop_per_sample": flops / 1e9,
        "train_samples_s": spec["batch"] / t_train, "infer_samples_s": spec["batch"] / t_infer,
        "cpu_s_per_train_step": cpu_train, "cpu_s_per_infer_step": cpu_infer,
        "load_avg_1min": os.getloadavg()[0],
        "flash_attention_enabled": torch.backends.cuda.flash_sdp_enabled(),
        "peak_rss_gib_infer": rss_infer,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }
    if top_ops is not None:
        out["train_step_self_cpu_percent"] = top_ops
    if device.startswith("cuda"):
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 1024**3
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="hierarchical")
    ap.add_argument("--presets", nargs="+", default=["tiny", "base", "paper"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="hyper-parameter override (JSON value)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--math-attention", action="store_true",
                    help="force the unfused (math) attention kernel, for a same-run comparison with the fused one")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one training step and print the operators taking the most CPU time")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0

    overrides = parse_overrides(args.set)
    mm_dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = matmul_gflops(args.threads, args.device, mm_dtype)
    print(json.dumps({"matmul_2048_gflop_s": peak, "dtype": str(mm_dtype), "device": args.device, "threads": args.threads}))
    rows = []
    for preset in args.presets:
        spec = {"model": args.model, "preset": preset, "overrides": overrides, "batch": args.batch, "steps": args.steps,
                "threads": args.threads, "device": args.device, "bf16": args.bf16,
                "math_attention": args.math_attention, "profile": args.profile}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{args.model}/{preset} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["train_gflop_s"] = 3 * row["gflop_per_sample"] * row["train_samples_s"]
        row["infer_gflop_s"] = row["gflop_per_sample"] * row["infer_samples_s"]
        row["matmul_gflop_s"] = peak
        print(json.dumps(row), flush=True)
        rows.append(row)
    print()
    print("| model | preset | params | train samples/s | infer samples/s | peak RSS (GiB) | GFLOP/sample (fwd) "
          "| achieved GFLOP/s train / infer | % of matmul | CPU busy (train) | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        label = r["preset"] + ("".join(f", {k}={v}" for k, v in r["overrides"].items()))
        label += ", unfused attention" if r["math_attention"] else ""
        mem = f"{r['peak_rss_gib']:.2f}" + (f" (GPU {r['peak_cuda_gib']:.2f})" if "peak_cuda_gib" in r else "")
        print(f"| {r['model']} | {label} | {r['params']:,} | {r['train_samples_s']:.3g} | {r['infer_samples_s']:.3g} "
              f"| {mem} | {r['gflop_per_sample']:.3g} | {r['train_gflop_s']:.1f} / {r['infer_gflop_s']:.1f} "
              f"| {100 * r['train_gflop_s'] / peak:.0f} % / {100 * r['infer_gflop_s'] / peak:.0f} % "
              f"| {100 * r['cpu_s_per_train_step'] * r['train_samples_s'] / r['batch'] / r['threads']:.0f} % "
              f"| {r['load_avg_1min']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
