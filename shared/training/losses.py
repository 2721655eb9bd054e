"""Losses that honour the label-availability mask.

A class a site cannot express is *unknown* there (mask 0), not negative: it must contribute
neither loss nor gradient. :func:`masked_bce_with_logits` averages the binary cross-entropy
over the known entries of the batch only.
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
    """Mean binary cross-entropy over entries where ``mask`` is 1.

    Args:
        logits, targets, mask: ``[B, K]`` tensors (targets and mask 0/1, any float dtype).
        pos_weight: optional ``[K]`` weight of the positive term (as in PyTorch's BCE).

    Returns a scalar. Unknown entries get exactly zero gradient; a batch with no known entry
    gives a loss of 0 (still attached to the graph, so ``backward()`` works and yields zeros).
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
    return (per_entry * mask).sum() / mask.sum().clamp_min(1.0)
