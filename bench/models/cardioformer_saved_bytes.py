"""Cardioformer: bytes autograd keeps for backward after one training forward, per path.

Sums the distinct storages that pass through ``torch.autograd.graph.saved_tensors_hooks``
(parameters excluded) for the ``paper`` preset, module path (``fused_layers=False``) and fused
kernels (the default).

    python bench/models/cardioformer_saved_bytes.py [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def kept_bytes(fused: bool, batch: int) -> int:
    import torch

    from shared.models import build_model

    torch.manual_seed(0)
    model = build_model("cardioformer", "paper", n_leads=12, input_samples=250, n_classes=5,
                        fused_layers=fused).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(batch, 12, 250))
    return sum(storages.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    for name, fused in (("module_path", False), ("fused", True)):
        print(json.dumps({"path": name, "batch": args.batch, "kept_mb": round(kept_bytes(fused, args.batch) / 1e6)}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    raise SystemExit(main())
