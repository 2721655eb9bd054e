"""Cardioformer (Mobin et al., arXiv 2505.05538), faithful to the authors' released code.

The released code (GitHub ``KMobin555/Cardioformer``, a fork of Medformer
``DL4mHealth/Medformer``) is followed block for block; ``cardioformer_blocks.py`` holds the
blocks. The data path of ``forward``::

    x [B, leads, L]
      -> CrossChannelPatchEmbedding: per patch length p, replication pad by p, Conv2d spanning
         all leads -> floor(L/p)+1 tokens; random augmentation (training only); granularity
         vector; sinusoidal positions                        -> tokens [B, N, D]
      -> n_layers x CardioformerLayer: intra-granularity attention, inter-granularity attention
         among the routers, residual + LayerNorm, three residual 1x1-conv blocks, residual +
         LayerNorm
      -> head: LayerNorm over all tokens, GELU, dropout, flatten, Linear -> logits [B, K]

Where this implementation departs from the released code in form but not in arithmetic
(docs/models.md has the full list): q/k/v projections are one stacked ``nn.Linear`` per
attention module; the 1x1 Conv1d layers are ``nn.Linear``; the granularity vectors each sit in
their own module; shared per-token layers run once on all tokens; equal-length granularities
share one ``F.scaled_dot_product_attention`` call. The parameter count is the released one exactly.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.models.cardioformer_blocks import (
    CardioformerLayer,
    CrossChannelPatchEmbedding,
    parse_augmentation,
    tokens_per_granularity,
)

#: The released PTB-XL / MIMIC-IV patch-length list (16 granularities).
PATCH_LENGTHS_PTBXL = [2, 4, 8, 8, 16, 16, 16, 16, 32, 32, 32, 32, 32, 32, 32, 32]
#: The released PTB patch-length list (12 granularities).
PATCH_LENGTHS_PTB = [2, 4, 8, 8, 16, 16, 16, 32, 32, 32, 32, 32]
#: One of these is drawn per granularity per training forward pass.
PAPER_AUGMENTATIONS = ["jitter0.2", "scale0.2", "drop0.5", "none"]

#: ``explain`` methods: router attention x patch-embedding lead shares, or input x gradient.
EXPLAIN_METHODS = ("router_attention", "input_x_gradient")

#: Architecture options a preset sets and ``build`` overrides accept.
ARCHITECTURE_KEYS = ("d_model", "n_heads", "n_layers", "d_ff", "dropout", "patch_lengths", "augmentations")
#: Execution option (no effect on the function computed): ``recompute_layers`` keeps only each
#: encoder layer's input(s) in a training forward and recomputes the layer in backward (less
#: memory, more compute; off in every preset and in the DP form, see docs/models.md).
EXECUTION_KEYS = ("recompute_layers",)

PRESETS: dict[str, dict[str, Any]] = {
    # The published PTB-XL configuration: 250 Hz, 1 s segments, 12 leads, 5 classes
    # -> 8,702,597 parameters. The PTB configuration is this preset with n_leads=15,
    # input_samples=300, n_classes=2 and patch_lengths=PATCH_LENGTHS_PTB (6,894,338).
    "paper": {
        "fs": 250, "seconds": 1.0, "n_leads": 12, "n_classes": 5, "d_model": 128, "n_heads": 8, "n_layers": 6, "d_ff": 256,
        "dropout": 0.1, "patch_lengths": PATCH_LENGTHS_PTBXL, "augmentations": PAPER_AUGMENTATIONS,
        "recompute_layers": False,
    },
    # The paper architecture on 2 s crops of the project's 250 Hz cache (5 crops per 10 s
    # window at evaluation): more rhythm context per prediction, sized for one modern GPU.
    "base": {
        "fs": 250, "seconds": 2.0, "n_leads": 12, "n_classes": 5, "d_model": 128, "n_heads": 8, "n_layers": 6, "d_ff": 256,
        "dropout": 0.1, "patch_lengths": PATCH_LENGTHS_PTBXL, "augmentations": PAPER_AUGMENTATIONS,
        "recompute_layers": False,
    },
    # For CPUs, tests and the embedded demo: 2 layers, d_model 32, four granularities.
    "tiny": {
        "fs": 250, "seconds": 1.0, "n_leads": 12, "n_classes": 5, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64,
        "dropout": 0.1, "patch_lengths": [4, 8, 16, 32], "augmentations": PAPER_AUGMENTATIONS,
        "recompute_layers": False,
    },
}


def check_config(*, n_leads: int, input_samples: int, n_classes: int, d_model: int, n_heads: int,
                 n_layers: int, d_ff: int, dropout: float, patch_lengths: list[int],
                 augmentations: list[str]) -> None:
    """Reject a configuration that cannot work, naming the values to change (ValueError)."""
    for name, value in (("n_leads", n_leads), ("input_samples", input_samples), ("n_classes", n_classes),
                        ("d_model", d_model), ("n_heads", n_heads), ("n_layers", n_layers), ("d_ff", d_ff)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"cardioformer: {name} must be a positive integer, got {value!r}")
    if d_model % n_heads:
        raise ValueError(
            f"cardioformer: d_model={d_model} is not divisible by n_heads={n_heads}; "
            "change d_model or n_heads so that each head gets d_model / n_heads features"
        )
    if d_model % 2:
        raise ValueError(f"cardioformer: d_model={d_model} must be even (sine/cosine positions); change d_model")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"cardioformer: dropout={dropout!r} must be in [0, 1)")
    if not patch_lengths:
        raise ValueError("cardioformer: patch_lengths is empty; give at least one patch length, e.g. [2, 4, 8]")
    bad = [p for p in patch_lengths if isinstance(p, bool) or not isinstance(p, int) or p < 1]
    if bad:
        raise ValueError(f"cardioformer: patch_lengths must be positive integers, got {bad}")
    too_long = sorted({p for p in patch_lengths if p > input_samples})
    if too_long:
        raise ValueError(
            f"cardioformer: patch length(s) {too_long} longer than the input ({input_samples} samples); "
            "remove them from patch_lengths or raise input_samples (fs x seconds)"
        )
    for spec in augmentations:
        parse_augmentation(spec)


class Cardioformer(nn.Module):
    """Cardioformer classifier: ``forward(x [B, n_leads, input_samples]) -> logits [B, n_classes]``.

    Build it with ``build(preset, ...)`` (or the project's ``build_model("cardioformer", ...)``),
    which fills ``config``; constructing it directly leaves ``config`` describing the explicit
    architecture.
    """

    def __init__(self, *, n_leads: int, input_samples: int, n_classes: int, d_model: int = 128,
                 n_heads: int = 8, n_layers: int = 6, d_ff: int = 256, dropout: float = 0.1,
                 patch_lengths: list[int] = tuple(PATCH_LENGTHS_PTBXL),
                 augmentations: list[str] = tuple(PAPER_AUGMENTATIONS), recompute_layers: bool = False):
        super().__init__()
        patch_lengths, augmentations = list(patch_lengths), list(augmentations)
        check_config(n_leads=n_leads, input_samples=input_samples, n_classes=n_classes, d_model=d_model,
                     n_heads=n_heads, n_layers=n_layers, d_ff=d_ff, dropout=dropout,
                     patch_lengths=patch_lengths, augmentations=augmentations)
        self.n_leads, self.input_samples, self.n_classes = n_leads, input_samples, n_classes
        self.patch_lengths = patch_lengths
        self.token_counts = [tokens_per_granularity(input_samples, p) for p in patch_lengths]
        n_tokens = sum(self.token_counts)

        self.embedding = CrossChannelPatchEmbedding(n_leads, input_samples, d_model, patch_lengths, augmentations)
        self.layers = nn.ModuleList(
            CardioformerLayer(self.token_counts, d_model, n_heads, d_ff, dropout) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)  # the encoder's final norm, over every token
        self.head_dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(d_model * n_tokens, n_classes)
        self.recompute_layers = bool(recompute_layers)
        self.config: dict[str, Any] = {
            "name": "cardioformer", "preset": None, "n_leads": n_leads, "input_samples": input_samples,
            "n_classes": n_classes, "dp": False,
            "overrides": {"d_model": d_model, "n_heads": n_heads, "n_layers": n_layers, "d_ff": d_ff,
                          "dropout": dropout, "patch_lengths": patch_lengths, "augmentations": augmentations,
                          "recompute_layers": self.recompute_layers},
        }

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != self.n_leads or x.shape[2] != self.input_samples:
            raise ValueError(
                f"cardioformer expects input [batch, {self.n_leads} leads, {self.input_samples} samples], "
                f"got {list(x.shape)}; crop the windows to {self.input_samples} samples or build the model "
                "for this input (n_leads / input_samples)"
            )

    def encode(self, x: torch.Tensor, need_weights: bool = False):
        """Tokens after the encoder and its final LayerNorm ``[B, N, D]``, and the router
        attention maps (head-averaged ``[B, G, G]`` per layer) when ``need_weights``."""
        self._check_input(x)
        tokens = self.embedding(x)
        recompute = self._recompute_now(need_weights)
        router_maps = []
        for layer in self.layers:
            tokens, weights = layer(tokens, need_weights=need_weights, recompute=recompute)
            router_maps.append(weights)
        return self.norm(tokens), router_maps

    def _unwatched(self, need_weights: bool) -> bool:
        """Nothing watches the layers one by one: no attention maps asked for, and no forward
        hook - Opacus (hooks mode) records each ``nn.Linear``'s activations in forward hooks,
        which a recomputed layer would fire twice, so any hook on the classifier (Opacus hooks
        every trainable layer) switches recomputation off."""
        return not need_weights and not self.classifier._forward_hooks and not self.classifier._forward_pre_hooks

    def _recompute_now(self, need_weights: bool) -> bool:
        return (self.recompute_layers and self.training and torch.is_grad_enabled()
                and self._unwatched(need_weights))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.encode(x)
        return self.classifier(self.head_dropout(F.gelu(tokens)).flatten(1))

    # ---------------------------------------------------------- federation / DP
    def site_local_parameter_names(self) -> list[str]:
        """Parameters a site may keep local (FedBN-style personalisation): every LayerNorm's
        weight and bias - the normalisation layers, the analogue of FedBN's BatchNorm (this
        model has no BatchNorm and no running statistics)."""
        names = []
        for module_name, module in self.named_modules():
            if isinstance(module, nn.LayerNorm):
                names += [f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False)]
        return names

    # ----------------------------------------------------------- interpretation
    def explain(self, x: torch.Tensor, method: str = "router_attention") -> dict[str, Any]:
        """Lead importance and router attention for a batch, computed in eval mode.

        Returns a dict of CPU tensors plus ``method`` (docs/models.md, "Cardioformer:
        interpretation", explains both methods):

        - ``lead_importance`` ``[B, 1, n_leads]`` (``router_attention``, class-agnostic) or
          ``[B, n_classes, n_leads]`` (``input_x_gradient``, per class); each row sums to 1.
        - ``router_attention`` ``[n_layers, B, G, G]``: inter-granularity attention among the
          routers (head mean; row i = how router i's query spreads over the G routers), or
          None with a single granularity.
        - ``granularity_importance`` ``[B, G]``: attention each router receives, averaged over
          layers and querying routers (rows sum to 1).
        - ``lead_share`` ``[B, G, n_leads]``: each lead's share of each granularity's patch
          embeddings (norm of its partial convolution, summed over tokens).
        - ``patch_lengths``, ``logits`` ``[B, n_classes]``.
        """
        if method not in EXPLAIN_METHODS:
            raise ValueError(f"cardioformer: unknown explain method {method!r}; choose one of {list(EXPLAIN_METHODS)}")
        was_training = self.training
        self.eval()
        try:
            x = x.detach().float()
            with torch.no_grad():
                tokens, maps = self.encode(x, need_weights=True)
                logits = self.classifier(F.gelu(tokens).flatten(1))
                share = torch.stack([self._lead_share(x, g) for g in range(len(self.patch_lengths))], dim=1)
            if maps[0] is None:  # one granularity: no routers to compare
                router_attention = None
                granularity = torch.ones(x.shape[0], 1)
            else:
                router_attention = torch.stack(maps)  # [L, B, G, G]
                granularity = router_attention.mean(dim=0).mean(dim=1)  # attention received, [B, G]
            if method == "router_attention":
                importance = torch.einsum("bg,bgc->bc", granularity, share).unsqueeze(1)
            else:
                from shared.models.interpret import input_x_gradient

                importance = input_x_gradient(self, x)["lead_importance"]
            return {
                "method": method,
                "lead_importance": importance.cpu(),
                "router_attention": None if router_attention is None else router_attention.cpu(),
                "granularity_importance": granularity.cpu(),
                "lead_share": share.cpu(),
                "patch_lengths": list(self.patch_lengths),
                "logits": logits.cpu(),
            }
        finally:
            self.train(was_training)

    def _lead_share(self, x: torch.Tensor, granularity: int) -> torch.Tensor:
        """Share of each lead in one granularity's patch embeddings ``[B, n_leads]`` (rows sum to 1)."""
        per_lead = self.embedding.lead_tokens(x, granularity).norm(dim=-1).sum(dim=-1)  # [B, C]
        return per_lead / per_lead.sum(dim=1, keepdim=True).clamp_min(1e-12)


def build(preset: str, *, n_leads: int, input_samples: int, n_classes: int, dp: bool = False,
          **overrides: Any) -> Cardioformer:
    """Cardioformer from ``PRESETS[preset]`` with ``overrides`` (architecture keys only).

    ``dp=True`` returns the form meant for Opacus. The architecture is the same: every layer is
    already one Opacus can clip per sample (Linear, Conv2d, LayerNorm, one-vector modules) and
    the embedding augmentation is per-sample noise, so it stays on (docs/models.md explains why
    that keeps per-sample clipping valid). What changes: layer recomputation is off (Opacus's
    hooks must see each ``nn.Linear``'s forward exactly once). The flag is recorded in ``config``.
    """
    if preset not in PRESETS:
        raise ValueError(f"cardioformer: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    valid = ARCHITECTURE_KEYS + EXECUTION_KEYS
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"cardioformer: unknown option(s) {unknown}; valid overrides are {list(valid)}")
    options = {k: copy.deepcopy(v) for k, v in PRESETS[preset].items() if k in valid}
    options.update(copy.deepcopy(overrides))
    if dp:
        options["recompute_layers"] = False
    model = Cardioformer(n_leads=n_leads, input_samples=input_samples, n_classes=n_classes, **options)
    model.config = {
        "name": "cardioformer", "preset": preset, "n_leads": n_leads, "input_samples": input_samples,
        "n_classes": n_classes, "dp": bool(dp), "overrides": copy.deepcopy(dict(overrides)),
    }
    return model


def from_config(config: dict[str, Any]) -> Cardioformer:
    """Rebuild a model from its ``config`` dict (the inverse of ``model.config``)."""
    if config.get("preset") is None:  # constructed directly: overrides hold the whole architecture
        return Cardioformer(n_leads=config["n_leads"], input_samples=config["input_samples"],
                            n_classes=config["n_classes"], **config["overrides"])
    return build(config["preset"], n_leads=config["n_leads"], input_samples=config["input_samples"],
                 n_classes=config["n_classes"], dp=config.get("dp", False), **config.get("overrides", {}))
