"""Cardioformer's fused kernels: training throughput against the CPU chunk sizes.

``shared.models.cardioformer_fused`` runs the layer tail ``TAIL_ROWS`` tokens at a time and the
attention ``ATTENTION_CHUNK_BYTES`` of maps at a time on CPU. This times one ``paper`` model
(batch 32) under each setting, the settings taking turns step by step in one process so that
a drifting machine load hits them alike, and prints the median samples/s of each.

    python bench/models/cardioformer_chunks.py [--threads 2] [--steps 6]
        [--settings 1024,2097152 2048,2097152 4096,2097152 100000,2097152 2048,100000000]

A setting is ``tail_rows,attention_bytes``; 100000 rows or 100000000 bytes mean one chunk
(no chunking).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--settings", nargs="+",
                    default=["1024,2097152", "2048,2097152", "4096,2097152", "100000,2097152", "2048,100000000"])
    args = ap.parse_args()
    settings = [tuple(int(v) for v in s.split(",")) for s in args.settings]

    import torch
    import torch.nn.functional as F

    import shared.models.cardioformer_fused as fused
    from shared.models import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("cardioformer", "paper", n_leads=12, input_samples=250, n_classes=5).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(args.batch, 12, 250), (torch.rand(args.batch, 5) > 0.5).float()
    times: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
    for step in range(args.steps + 1):  # step 0 warms every setting up
        for setting in settings:
            fused.TAIL_ROWS, fused.ATTENTION_CHUNK_BYTES = setting
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(model(x), y).backward()
            optimizer.step()
            if step:
                times[setting].append(time.perf_counter() - start)
    for (rows, nbytes), values in times.items():
        print(json.dumps({"tail_rows": rows, "attention_chunk_bytes": nbytes, "threads": args.threads,
                          "batch": args.batch, "train_samples_s": round(args.batch / statistics.median(values), 2)}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    raise SystemExit(main())
