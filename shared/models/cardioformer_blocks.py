"""Building blocks of Cardioformer (arXiv 2505.05538), one job per class.

Top to bottom, the data path of one forward pass:

1. ``EmbeddingAugmentation``: one augmentation of patch embeddings; ``CrossChannelPatchEmbedding``
   picks one at random per granularity in training, without a host sync.
2. ``GranularityEmbedding``: the learnable vector that tells the granularities apart.
3. ``CrossChannelPatchEmbedding``: replication pad, then a Conv2d spanning all leads per patch.
4. ``LinearAttention``: multi-head self-attention built from ``nn.Linear`` (Opacus can clip it).
5. ``TwoStageAttention``: intra-granularity attention (one module per granularity), then
   inter-granularity attention among the routers (the last token of each granularity).
6. ``ResidualPointwiseBlock``: the 1x1-convolution residual block that replaces the FFN.
7. ``CardioformerLayer``: 5 then three of 6, with the residual LayerNorms.

Every learned tensor lives in a module that Opacus has a per-sample gradient rule for
(``nn.Linear``, ``nn.Conv2d``, ``nn.LayerNorm``) except the granularity vectors, each of which
sits alone in its own tiny ``GranularityEmbedding`` module (Opacus computes its per-sample
gradient with functorch; the module holds no randomness, so that works).

Tokens of all granularities travel as ONE tensor ``[batch, n_tokens, d_model]``, granularity
after granularity. Per-token operations that the released code applies to each granularity
with shared weights (the LayerNorms, the residual 1x1-conv blocks) then run once on all tokens:
the same arithmetic as the released loop, in a few large matrix products instead of many small
ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


#: Augmentation names the model accepts: ``jitter<sigma>``, ``scale<sigma>``, ``drop<p>`` and
#: ``none``, as in the released code's ``--augmentations`` option (e.g. ``jitter0.2``).
AUGMENTATION_KINDS = ("jitter", "scale", "drop", "none")


def parse_augmentation(spec: str) -> tuple[str, float]:
    """``"jitter0.2"`` -> ``("jitter", 0.2)``; ``"none"`` -> ``("none", 0.0)``.

    Raises ValueError naming the bad spec and the accepted forms.
    """
    for kind in AUGMENTATION_KINDS:
        if spec.startswith(kind):
            rest = spec[len(kind):]
            if kind == "none":
                if rest:
                    break
                return kind, 0.0
            try:
                strength = float(rest)
            except ValueError:
                break
            if not (0.0 <= strength < 1.0 if kind == "drop" else strength >= 0.0):
                break
            return kind, strength
    raise ValueError(
        f"augmentation {spec!r} not understood: use jitter<sigma>, scale<sigma>, drop<p> "
        "(0 <= p < 1) or none, e.g. ['jitter0.2', 'scale0.2', 'drop0.5', 'none']"
    )


class EmbeddingAugmentation(nn.Module):
    """One augmentation of patch embeddings ``[B, n, D]``, active only in training mode.

    jitter: add N(0, sigma^2) to every element; scale: multiply each token of each sample by
    1 + N(0, sigma^2); drop: dropout with probability p; none: identity. Every random draw is
    per sample, so under DP each sample's gradient still depends on that sample only.
    """

    def __init__(self, spec: str):
        super().__init__()
        self.spec = spec
        self.kind, self.strength = parse_augmentation(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.kind == "none":
            return x
        if self.kind == "jitter":
            return x + torch.randn_like(x) * self.strength
        if self.kind == "scale":
            factor = 1.0 + torch.randn(x.shape[0], x.shape[1], 1, dtype=x.dtype, device=x.device) * self.strength
            return x * factor
        return F.dropout(x, self.strength, training=True)

    def extra_repr(self) -> str:
        return self.spec


class GranularityEmbedding(nn.Module):
    """A learnable vector added to every token of one granularity.

    Alone in its own module on purpose: Opacus computes per-sample gradients of a bare
    parameter with functorch for the module that holds it, and that fails if the module also
    runs dropout.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, d_model))  # released code: torch.randn(1, d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.weight


def sinusoidal_positions(n_positions: int, d_model: int) -> torch.Tensor:
    """Fixed sine/cosine position table ``[n_positions, d_model]`` (Vaswani et al.)."""
    position = torch.arange(n_positions, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term[: d_model // 2])
    return table


def tokens_per_granularity(input_samples: int, patch_length: int) -> int:
    """Tokens of one granularity: the input padded by one patch, cut into whole patches."""
    return input_samples // patch_length + 1


class CrossChannelPatchEmbedding(nn.Module):
    """Multi-granularity, cross-channel patch embedding (Medformer's ``ListPatchEmbedding``).

    For each patch length p: replicate the last sample p times, then
    ``Conv2d(1, d_model, kernel=(n_leads, p), stride=(1, p), bias=False)``: one token per
    patch, spanning all leads. Each granularity then gets its random training augmentation,
    its learnable granularity vector and fixed sinusoidal positions counted from 0. The last
    token of each granularity (the one over the padded tail) is its router.
    Output: ``[B, sum(n_tokens), d_model]``, granularity after granularity.
    """

    def __init__(self, n_leads: int, input_samples: int, d_model: int, patch_lengths: list[int],
                 augmentations: list[str]):
        super().__init__()
        self.patch_lengths = list(patch_lengths)
        self.token_counts = [tokens_per_granularity(input_samples, p) for p in patch_lengths]
        self.patch_convs = nn.ModuleList(
            nn.Conv2d(1, d_model, kernel_size=(n_leads, p), stride=(1, p), bias=False) for p in patch_lengths
        )
        for conv in self.patch_convs:  # the released initialisation
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="leaky_relu")
        self.augmentations = nn.ModuleList(EmbeddingAugmentation(a) for a in augmentations)
        self.granularity_embeddings = nn.ModuleList(GranularityEmbedding(d_model) for _ in patch_lengths)
        table = sinusoidal_positions(max(self.token_counts), d_model)
        positions = torch.cat([table[:n] for n in self.token_counts])
        self.register_buffer("positions", positions, persistent=False)  # [n_tokens, D], fixed

    def lead_tokens(self, x: torch.Tensor, granularity: int) -> torch.Tensor:
        """Un-summed patch embedding of one granularity: ``[B, n_leads, n_tokens, D]``.

        Row c is the partial convolution over lead c alone; summing over leads gives the
        token (before augmentation, granularity vector and positions). Used by ``explain``.
        """
        p = self.patch_lengths[granularity]
        weight = self.patch_convs[granularity].weight  # [D, 1, C, p]
        padded = F.pad(x, (0, p), mode="replicate")
        n = self.token_counts[granularity]
        patches = padded[..., : n * p].reshape(x.shape[0], x.shape[1], n, p)  # [B, C, n, p]
        return torch.einsum("bcnp,dcp->bcnd", patches, weight[:, 0])

    def _augment(self, tokens: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """The augmentation numbered ``choice`` (a 0-d tensor on the tokens' device) applied to
        ``tokens``. Every candidate is computed and ``torch.where`` keeps the chosen one, so the
        choice never leaves the device (no host sync, no graph break under ``torch.compile``)."""
        out = self.augmentations[0](tokens)
        for i in range(1, len(self.augmentations)):
            out = torch.where(choice == i, self.augmentations[i](tokens), out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded_by_length: dict[int, torch.Tensor] = {}
        parts = []
        choices = None
        if self.training and len(self.augmentations) > 1:  # one draw per granularity, on the device
            choices = torch.randint(len(self.augmentations), (len(self.patch_lengths),), device=x.device)
        for g, p in enumerate(self.patch_lengths):
            if p not in padded_by_length:  # granularities of equal length share the padded copy
                padded_by_length[p] = F.pad(x, (0, p), mode="replicate").unsqueeze(1)
            tokens = self.patch_convs[g](padded_by_length[p])  # [B, D, 1, n]
            tokens = tokens.squeeze(2).transpose(1, 2)  # [B, n, D]
            if self.training and len(self.augmentations) > 1:
                tokens = self._augment(tokens, choices[g])
            elif self.training and len(self.augmentations) == 1:
                tokens = self.augmentations[0](tokens)
            parts.append(self.granularity_embeddings[g](tokens))
        return torch.cat(parts, dim=1) + self.positions


class LinearAttention(nn.Module):
    """Multi-head self-attention from two ``nn.Linear`` layers and ``F.scaled_dot_product_attention``.

    ``qkv`` holds the released code's query, key and value projections stacked (the same
    3 x (D*D + D) parameters); ``out`` is its output projection. No ``nn.MultiheadAttention``,
    which Opacus rejects.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, n, D]`` -> stacked q, k, v ``[3, B, heads, n, D / heads]`` (a view)."""
        b, n, d = x.shape
        return self.qkv(x).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)

    def merge(self, attended: torch.Tensor) -> torch.Tensor:
        """``[B, heads, n, D / heads]`` -> output projection ``[B, n, D]``."""
        b, h, n, e = attended.shape
        return self.out(attended.transpose(1, 2).reshape(b, n, h * e))

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        q, k, v = self.heads(x)
        if need_weights:  # explicit softmax so the map can be returned (explain only)
            weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
            return self.merge(weights @ v), weights.mean(dim=1)  # weights: [B, n, n], head mean
        return self.merge(F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)), None


class TwoStageAttention(nn.Module):
    """Intra- then inter-granularity attention (Medformer's ``MedformerLayer``).

    Intra: each granularity attends within itself with its own ``LinearAttention``.
    Inter: the routers (last token of each intra output) attend to one another with one more
    ``LinearAttention``; each router's result replaces that router token. With one granularity
    there is no inter stage (as in the released code).

    Speed-up, same arithmetic: granularities with the same token count have their
    (separately projected) q, k, v stacked along the batch and go through ONE
    ``F.scaled_dot_product_attention`` call (dropout on the weights in training); each keeps its
    own projection weights.
    """

    def __init__(self, token_counts: list[int], d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.token_counts = list(token_counts)
        self.dropout = dropout
        self.intra = nn.ModuleList(LinearAttention(d_model, n_heads, dropout) for _ in token_counts)
        self.inter = LinearAttention(d_model, n_heads, dropout) if len(token_counts) > 1 else None
        groups: dict[int, list[int]] = {}
        for g, n in enumerate(token_counts):
            groups.setdefault(n, []).append(g)
        self.groups = list(groups.values())  # granularity indices sharing a token count

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        parts = x.split(self.token_counts, dim=1)
        outputs: list[torch.Tensor | None] = [None] * len(parts)
        p = self.dropout if self.training else 0.0
        for group in self.groups:
            qkv = [self.intra[g].heads(parts[g]) for g in group]  # each [3, B, H, n, E]
            stacked = qkv[0] if len(group) == 1 else torch.cat(qkv, dim=1)
            attended = F.scaled_dot_product_attention(stacked[0], stacked[1], stacked[2], dropout_p=p)
            for g, chunk in zip(group, attended.chunk(len(group), dim=0)):
                outputs[g] = self.intra[g].merge(chunk)
        if self.inter is None:
            return torch.cat(outputs, dim=1), None
        routers = torch.cat([o[:, -1:] for o in outputs], dim=1)  # [B, G, D]
        routed, router_weights = self.inter(routers, need_weights=need_weights)
        pieces = []
        for g, o in enumerate(outputs):
            pieces += [o[:, :-1], routed[:, g:g + 1]]
        return torch.cat(pieces, dim=1), router_weights


class ResidualPointwiseBlock(nn.Module):
    """``LayerNorm(x + dropout(W2 dropout(GELU(W1 x))))`` on every token (the paper's ResNet block).

    The released code writes W1, W2 as ``Conv1d(kernel_size=1)``; a kernel-1 convolution over
    tokens is exactly a per-token ``nn.Linear`` (same parameters, weight ``[out, in]`` instead
    of ``[out, in, 1]``), which needs no transposes.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.expand = nn.Linear(d_model, d_ff)
        self.project = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropout(F.gelu(self.expand(x)))
        y = self.dropout(self.project(y))
        return self.norm(x + y)


class CardioformerLayer(nn.Module):
    """One encoder layer: two-stage attention, residual + LayerNorm, three residual 1x1-conv
    blocks, residual + LayerNorm (the released ``EncoderLayer`` of ``Cardioformer_EncDec.py``)."""

    def __init__(self, token_counts: list[int], d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.attention = TwoStageAttention(token_counts, d_model, n_heads, dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.blocks = nn.Sequential(*(ResidualPointwiseBlock(d_model, d_ff, dropout) for _ in range(3)))
        self.norm2 = nn.LayerNorm(d_model)

    def attend(self, x: torch.Tensor, need_weights: bool = False):
        """First half: two-stage attention, residual + LayerNorm."""
        attended, router_weights = self.attention(x, need_weights=need_weights)
        return self.norm1(x + self.dropout(attended)), router_weights

    def pointwise(self, x: torch.Tensor) -> torch.Tensor:
        """Second half: three residual 1x1-conv blocks, residual + LayerNorm."""
        return self.norm2(x + self.blocks(x))

    def forward(self, x: torch.Tensor, need_weights: bool = False, recompute: bool = False):
        """``recompute``: keep only each half's input for backward and rerun the half there
        (``torch.utils.checkpoint`` restores the random state, so the same dropout masks are
        redrawn). The function computed is the same either way."""
        if recompute:
            x = checkpoint(lambda t: self.attend(t)[0], x, use_reentrant=False)
            return checkpoint(self.pointwise, x, use_reentrant=False), None
        x, router_weights = self.attend(x, need_weights=need_weights)
        return self.pointwise(x), router_weights
