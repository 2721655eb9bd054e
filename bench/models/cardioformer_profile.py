"""Where a Cardioformer training step goes: matrix products, mask drawing, page faults.

One ``paper`` model (batch 32) in this process, training steps of forward + backward + Adam:

* per step: wall time, user and system CPU seconds and minor page faults (``getrusage``);
* one step under ``torch.profiler``: the share of operator self time spent in matrix products
  (``mm``, ``addmm``, ``addmm_``, ``bmm``) and the rate they ran at (the step's forward FLOPs
  x 3, over that time);
* ``--no-mask-draws``: the same steps with every dropout mask served from a cache (the cost of
  drawing them is the difference; the masks are then not random: timing only);
* ``--mallopt``: glibc told never to give memory back (``M_MMAP_THRESHOLD`` and
  ``M_TRIM_THRESHOLD`` at 2 GB) before anything is allocated;
* ``--module-path``: ``fused_layers=False``.

    python bench/models/cardioformer_profile.py [--steps 6] [--threads 2] [--no-mask-draws]
        [--mallopt] [--module-path]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import sys
import time

GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-mask-draws", action="store_true")
    ap.add_argument("--mallopt", action="store_true")
    ap.add_argument("--module-path", action="store_true")
    args = ap.parse_args()
    if args.mallopt:  # before torch allocates anything
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 2_000_000_000)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2_000_000_000)  # M_TRIM_THRESHOLD

    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    import shared.models.common as common
    from shared.models import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("cardioformer", "paper", n_leads=12, input_samples=250, n_classes=5,
                        fused_layers=not args.module_path).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(args.batch, 12, 250), (torch.rand(args.batch, 5) > 0.5).float()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    model.train()
    train_flops = 3 * counter.get_total_flops()

    if args.no_mask_draws:
        draw, cache = common.KeepMaskStream.rows, {}

        def cached_rows(stream, start, stop, out=None):
            key = (tuple(stream.shape), start, stop)
            if key not in cache:  # drawn into a tensor of its own: ``out`` is a reused scratch buffer
                cache[key] = draw(stream, start, stop)
            stream._next_row = stop
            return cache[key]

        common.KeepMaskStream.rows = cached_rows

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(model(x), y).backward()
        optimizer.step()

    step()
    rows = []
    for _ in range(args.steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        after = resource.getrusage(resource.RUSAGE_SELF)
        rows.append({"wall_s": time.perf_counter() - start, "user_s": after.ru_utime - before.ru_utime,
                     "sys_s": after.ru_stime - before.ru_stime, "minor_faults": after.ru_minflt - before.ru_minflt})
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    gemm_us = sum(e.self_cpu_time_total for e in events if e.key in GEMMS)
    print(json.dumps({
        "path": "module" if args.module_path else "fused", "no_mask_draws": args.no_mask_draws,
        "mallopt": args.mallopt, "threads": args.threads, "batch": args.batch,
        "train_samples_s": round(args.batch / statistics.median(r["wall_s"] for r in rows), 2),
        **{k: round(statistics.median(r[k] for r in rows), 3) for k in ("wall_s", "user_s", "sys_s")},
        "minor_faults_per_step": [r["minor_faults"] for r in rows],
        "profiled_gemm_share": round(gemm_us / total_us, 3),
        "profiled_gemm_gflop_s": round(train_flops / (gemm_us * 1e-6) / 1e9, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    raise SystemExit(main())
