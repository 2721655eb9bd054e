"""Per-sample gradients of ``nn.Conv1d`` for Opacus, as one grouped convolution.

Opacus's conv grad sampler (``opacus.grad_sample.conv``) unfolds the input (``F.unfold``) and
multiplies every output channel with every unfolded input channel, ``groups x groups`` blocks,
keeping only the diagonal blocks a grouped convolution has. The Hierarchical Transformer's
lead-wise encoder has ``groups = 12``, so 11 of every 12 products were thrown away, and the
unfold and the product were the largest items of a DP training step.

A sample's weight gradient is the weight gradient of a convolution of that sample alone. With
the batch folded into the channels (``[1, n * in, L]``) and ``n * groups`` groups, one call of
PyTorch's ``torch.nn.grad.conv1d_weight`` gives every sample's gradient at once: no unfold, no
discarded blocks. Figures and command: docs/performance.md, "DP step".

Registered through Opacus's public extension point (``register_grad_sampler``) for
``nn.Conv1d``; import this module before ``PrivacyEngine.make_private`` (``train_local`` does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn


@register_grad_sampler(nn.Conv1d)
def conv1d_grad_sample(layer: nn.Conv1d, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """``{weight: [n, *weight.shape], bias: [n, out]}``: each sample's gradient of the layer."""
    if layer.padding_mode != "zeros":
        raise NotImplementedError(f"per-sample gradients of Conv1d with padding_mode={layer.padding_mode!r}")
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    if n == 0:  # an empty Poisson batch: Opacus's own zero gradients
        return compute_conv_grad_sample(layer, activations, backprops)
    result = {}
    if layer.weight.requires_grad:
        (kernel,), (dilation,) = layer.kernel_size, layer.dilation
        if layer.padding == "same":
            total = dilation * (kernel - 1)
            left, right = math.floor(total / 2), total - math.floor(total / 2)
        elif layer.padding == "valid":
            left = right = 0
        else:
            left = right = layer.padding[0]
        x = F.pad(x, (left, right))
        grads = torch.nn.grad.conv1d_weight(
            x.reshape(1, n * layer.in_channels, x.shape[-1]),
            (n * layer.out_channels, layer.in_channels // layer.groups, kernel),
            backprops.reshape(1, n * layer.out_channels, backprops.shape[-1]),
            stride=layer.stride, padding=0, dilation=layer.dilation, groups=n * layer.groups,
        )
        result[layer.weight] = grads.view(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        result[layer.bias] = backprops.reshape(n, layer.out_channels, -1).sum(dim=2)
    return result
