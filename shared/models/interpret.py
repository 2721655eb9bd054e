"""Lead importance: which leads a model relied on, per class.

Every model exposes ``model.explain(x) -> dict`` with at least ``lead_importance``
(``[B, K or 1, n_leads]``, non-negative, summing to 1 over the leads) and ``method`` (what the
numbers are). The Hierarchical Transformer returns its gated head's per-class attention summed
per lead; Cardioformer returns its router attention. :func:`lead_importance` calls ``explain``
when a model has it and falls back to :func:`input_x_gradient` otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .state import unwrap


def input_x_gradient(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """|input x d logit_k / d input| summed over time per lead, normalised over leads.

    Returns ``{'lead_importance': [B, K, n_leads], 'method': 'input_x_gradient', 'logits': [B, K]}``.
    Runs one backward pass per class, in eval mode; the model's parameters get no gradient.
    """
    was_training = model.training
    model.eval()
    try:
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x)
            per_class = []
            for k in range(logits.shape[1]):
                (grad,) = torch.autograd.grad(logits[:, k].sum(), x, retain_graph=k + 1 < logits.shape[1])
                per_class.append((grad * x).abs().sum(-1))  # [B, n_leads]
        importance = torch.stack(per_class, dim=1).detach()
        importance = importance / importance.sum(-1, keepdim=True).clamp_min(1e-12)
        return {"lead_importance": importance, "method": "input_x_gradient", "logits": logits.detach()}
    finally:
        model.train(was_training)


def lead_importance(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """``model.explain(x)`` if the model has it, else :func:`input_x_gradient`; in eval mode.

    The result's ``lead_importance`` is checked to be ``[B, K or 1, n_leads]``.
    """
    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        out = model.explain(x) if hasattr(model, "explain") else input_x_gradient(model, x)
    finally:
        model.train(was_training)
    imp = out.get("lead_importance")
    if not isinstance(imp, torch.Tensor) or imp.dim() != 3 or imp.shape[0] != x.shape[0] or imp.shape[2] != x.shape[1]:
        shape = list(imp.shape) if isinstance(imp, torch.Tensor) else type(imp).__name__
        raise ValueError(f"{type(model).__name__}.explain returned lead_importance {shape}, expected [B, K or 1, {x.shape[1]}]")
    out["lead_importance"] = imp.detach().float()
    return out
