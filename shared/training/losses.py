"""Losses that honour the label-availability mask.

A class a site cannot express is *unknown* there (mask 0), not negative: it must contribute
neither loss nor gradient. :func:`masked_bce_with_logits` takes each sample's mean binary
cross-entropy over its own known entries, then the mean over the batch. Normalising per sample
keeps one sample's gradient independent of the other samples' masks, which the per-sample
sensitivity of DP-SGD (Opacus) relies on; a batch-wide mask count would couple them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_bce_with_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample mean binary cross-entropy over entries where ``mask`` is 1, averaged over the batch.

    Args:
        logits, targets, mask: ``[B, K]`` tensors (targets and mask 0/1, any float dtype).
        pos_weight: optional ``[K]`` weight of the positive term (as in PyTorch's BCE).

    Returns a scalar. Unknown entries get exactly zero gradient; a sample with no known entry
    contributes 0 (and still counts in the batch mean); an empty batch (Poisson sampling can
    give one) gives a loss of 0 still attached to the graph, so ``backward()`` works.
    """
    if logits.shape != targets.shape or logits.shape != mask.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and mask "
            f"{tuple(mask.shape)} must have the same shape"
        )
    mask = mask.to(logits.dtype)
    known = mask > 0
    # An unknown entry's target may be anything (even NaN): replace it before the loss so
    # neither its value nor its gradient (sigmoid - target) can leak through the mask.
    targets = torch.where(known, targets.to(logits.dtype), torch.zeros_like(logits))
    per_entry = F.binary_cross_entropy_with_logits(logits, targets, reduction="none", pos_weight=pos_weight)
    per_sample = (per_entry * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    return per_sample.sum() / max(int(per_sample.shape[0]), 1)
