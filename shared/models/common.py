"""Building blocks shared by the project's models.

Everything here is built from modules Opacus can compute per-sample gradients for
(``nn.Linear``, ``nn.LayerNorm``, ``nn.RMSNorm``) or from small modules that own exactly one
learned tensor and take one batched input (so Opacus' functorch fallback can vmap them without
meeting a dropout, which fails under vmap's randomness checks). Attention runs through
``torch.nn.functional.scaled_dot_product_attention`` so PyTorch can pick a fused kernel (flash
attention on CPU and GPU) that never materialises the ``[L, L]`` attention maps.

Layout convention: sequences are batch first, ``[batch, tokens, d_model]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_table(length: int, d_model: int) -> torch.Tensor:
    """The fixed sine/cosine position table of "Attention is all you need", ``[length, d_model]``.

    Even columns hold ``sin(pos / 10000^(2i/d))``, odd columns ``cos``; an odd ``d_model`` simply
    drops the last cosine column.
    """
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term)[:, : d_model // 2]
    return table


class SinusoidalPositionalEncoding(nn.Module):
    """Adds fixed sinusoidal positions to ``x [B, L, D]``, then dropout.

    The table is a non-persistent buffer: it is not part of ``state_dict`` (nothing to send
    between federated sites, nothing to load) and is rebuilt from ``max_len``.
    """

    def __init__(self, d_model: int, max_len: int, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.table.shape[0]:
            raise ValueError(f"sequence of {x.shape[1]} tokens is longer than the position table ({self.table.shape[0]})")
        return self.dropout(x + self.table[: x.shape[1]].to(x.dtype))


class LearnedToken(nn.Module):
    """One learned token (e.g. a CLS token) prepended to a batch of sequences.

    ``forward(x [B, L, D]) -> [B, 1 + L, D]``. The token lives alone in this module, which takes
    one batched input and holds no dropout: Opacus computes its per-sample gradient with its
    functorch fallback without tripping over random operations elsewhere.
    """

    def __init__(self, d_model: int, init_std: float = 0.02):
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, d_model) * init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention from ``nn.Linear`` layers and fused SDPA.

    Parameter layout matches ``nn.MultiheadAttention`` (one ``[3D, D]`` input projection with
    bias, one ``[D, D]`` output projection with bias), so parameter counts agree with models
    built on it, but Opacus supports it (``nn.MultiheadAttention`` is rejected by its validator).

    ``attn_dropout`` > 0 drops attention weights like ``nn.MultiheadAttention`` does; PyTorch's
    fused CPU kernel does not support it, so it falls back to the O(L^2)-memory math kernel.
    """

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}: change n_heads or d_model")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, length, self.d_model))


def differential_lambda_init(depth: int) -> float:
    """DIFF Transformer's depth-dependent lambda_init = 0.8 - 0.6 exp(-0.3 (depth))."""
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


class DifferentialLambda(nn.Module):
    """The learned lambda of differential attention, applied to the two attention outputs.

    lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init (DIFF Transformer's
    re-parameterisation). ``forward(o [B, H, 2, L, Dv]) -> o[:, :, 0] - lambda * o[:, :, 1]``,
    which equals ``(softmax_1 - lambda softmax_2) V`` because attention is linear in the maps.
    Own module, one batched input, no dropout: see :class:`LearnedToken`.
    """

    def __init__(self, head_dim: int, lambda_init: float):
        super().__init__()
        self.lambda_init = lambda_init
        self.q1 = nn.Parameter(torch.randn(head_dim) * 0.1)
        self.k1 = nn.Parameter(torch.randn(head_dim) * 0.1)
        self.q2 = nn.Parameter(torch.randn(head_dim) * 0.1)
        self.k2 = nn.Parameter(torch.randn(head_dim) * 0.1)

    def value(self) -> torch.Tensor:
        return torch.exp(torch.dot(self.q1, self.k1)) - torch.exp(torch.dot(self.q2, self.k2)) + self.lambda_init

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        return o[:, :, 0] - self.value().to(o.dtype) * o[:, :, 1]


class DifferentialSelfAttention(nn.Module):
    """Multi-head differential attention (Ye et al., "Differential Transformer", ICLR 2025).

    As in the Hierarchical Transformer's released code (``MultiheadDiffAttn`` without rotary
    positions and without a causal mask): with ``h = d_model / n_heads / 2``, queries and keys are
    split into two groups of ``n_heads`` heads of size ``h``; each head has values of size ``2h``;

        head_i = RMSNorm((softmax(Q1 K1^T / sqrt h) - lambda softmax(Q2 K2^T / sqrt h)) V) * (1 - lambda_init)

    with a per-head RMSNorm (the paper's head-wise "GroupNorm") and bias-free projections.

    Fused kernels need equal q/k/v head sizes, so q and k are zero-padded from ``h`` to ``2h``
    (``scale`` keeps ``1/sqrt h``): one fused SDPA call computes both maps of every head.
    """

    def __init__(self, d_model: int, n_heads: int, depth: int):
        super().__init__()
        if d_model % (2 * n_heads):
            raise ValueError(
                f"differential attention needs d_model ({d_model}) divisible by 2 x n_heads ({2 * n_heads}): "
                "change n_heads or the channels per lead"
            )
        self.d_model, self.n_heads = d_model, n_heads
        self.head_dim = d_model // n_heads // 2
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.lam = DifferentialLambda(self.head_dim, differential_lambda_init(depth))
        self.subln = nn.RMSNorm(2 * self.head_dim, eps=1e-5, elementwise_affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        h, nh = self.head_dim, self.n_heads
        # q, k: [B, 2*nh, L, h] ordered (head, map) like the reference's view(B, L, 2*nh, h).
        q = self.q_proj(x).view(b, length, 2 * nh, h).transpose(1, 2)
        k = self.k_proj(x).view(b, length, 2 * nh, h).transpose(1, 2)
        v = self.v_proj(x).view(b, length, nh, 2 * h).transpose(1, 2)  # [B, nh, L, 2h]
        q = F.pad(q, (0, h))
        k = F.pad(k, (0, h))
        v = v.unsqueeze(2).expand(b, nh, 2, length, 2 * h).reshape(b, 2 * nh, length, 2 * h)
        o = F.scaled_dot_product_attention(q, k, v, scale=h**-0.5)  # [B, 2*nh, L, 2h]
        o = self.lam(o.view(b, nh, 2, length, 2 * h))  # [B, nh, L, 2h]
        o = self.subln(o) * (1.0 - self.lam.lambda_init)
        return self.out_proj(o.transpose(1, 2).reshape(b, length, self.d_model))


class TransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer (``nn.TransformerEncoderLayer`` semantics, batch first, ReLU).

    ``x = norm1(x + dropout1(attn(x))); x = norm2(x + dropout2(W2 dropout(relu(W1 x))))``, with
    ``nn.Dropout`` under the same names as ``nn.TransformerEncoderLayer``.
    ``attention`` is ``"standard"`` (:class:`MultiHeadSelfAttention`) or ``"differential"``
    (:class:`DifferentialSelfAttention`, ``depth`` sets its lambda_init).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.1,
        attention: str = "standard",
        depth: int = 0,
        attn_dropout: float = 0.0,
    ):
        super().__init__()
        if attention == "standard":
            self.self_attn: nn.Module = MultiHeadSelfAttention(d_model, n_heads, attn_dropout)
        elif attention == "differential":
            self.self_attn = DifferentialSelfAttention(d_model, n_heads, depth)
        else:
            raise ValueError(f"attention must be 'standard' or 'differential', not {attention!r}")
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)  # between the FFN's ReLU and linear2
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.self_attn(x)))
        hidden = self.dropout(F.relu(self.linear1(x)))
        return self.norm2(x + self.dropout2(self.linear2(hidden)))
