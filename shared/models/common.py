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

import numpy as np
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


_KEEP_FROM = 32768  # a 16-bit draw d is kept when d >= round(p * 65536) - _KEEP_FROM
_INT16_MAX = 32767  # a threshold above it keeps nothing (and would wrap to -32768 in int16)


def dropout_keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean mask, each entry ``True`` (kept) with probability ``1 - p`` (to 1/65536).

    Drawn as 16-bit integers cut from 64-bit random words (:class:`KeepMaskStream`, all rows at
    once): on CPU drawing and comparing take about a ninth of the float ``bernoulli_`` that
    ``nn.Dropout`` uses (0.067 against 0.61 s for 130 million entries on 2 threads,
    ``bench/models/dropout_masks.py``). ``torch.manual_seed`` makes it reproducible.
    """
    n = math.prod(shape)
    return KeepMaskStream((n,), p, device).rows(0, n).view(shape)


class KeepMaskStream:
    """A dropout keep mask of ``shape`` handed out a few leading-dimension rows at a time, in
    order, without drawing the whole mask at once; the rows together are the mask
    ``dropout_keep_mask(shape, p, device)`` returns from the same generator state.

    Each entry is a uniform 16-bit integer, four per 64-bit random word, kept when at least
    ``round(p * 65536) - 32768``. On CPU the words come from numpy's SFC64 generator seeded by
    one draw from torch's default generator (so ``torch.manual_seed`` governs them): 1.6x as fast
    as torch's CPU generator (0.060 against 0.095 s for 130 million entries,
    ``bench/models/dropout_masks.py``). Elsewhere torch's generator of that device draws the
    whole mask at once.
    """

    def __init__(self, shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu"):
        self.shape, self._threshold, self._next_row = torch.Size(shape), round(p * 65536) - _KEEP_FROM, 0
        self._per_row = math.prod(self.shape[1:])
        self._whole = None
        if self._threshold > _INT16_MAX:  # p within 1/131072 of 1: nothing is kept
            self._whole = torch.zeros(self.shape, dtype=torch.bool, device=device)
        elif torch.device(device).type == "cpu":
            seed = int(torch.randint(0, 2**62, (1,)).item())
            self._generator, self._carry = np.random.SFC64(seed), np.empty(0, np.int16)
        else:
            n = math.prod(self.shape)
            words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
            self._whole = words.view(torch.int16)[:n].view(self.shape) >= self._threshold

    def rows(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean keep mask of rows ``start:stop`` (``start`` must be where the last call stopped).

        ``out``: a contiguous bool tensor of at least that many entries on the CPU to write the
        rows into (a buffer reused from chunk to chunk; the result is a view of it).
        """
        if start != self._next_row or not start <= stop <= self.shape[0]:
            raise ValueError(f"mask rows are handed out in order: expected rows from {self._next_row}, "
                             f"asked for {start}:{stop} of {self.shape[0]}")
        self._next_row = stop
        if self._whole is not None:
            return self._whole[start:stop]
        n = (stop - start) * self._per_row
        missing = n - len(self._carry)
        draws = self._carry
        if missing > 0:
            words = self._generator.random_raw((missing + 3) // 4).view(np.int16)
            draws = np.concatenate((self._carry, words)) if len(self._carry) else words
        self._carry = draws[n:]
        keep = torch.empty(n, dtype=torch.bool) if out is None else out.view(-1)[:n]
        # numpy's compare: 5x faster here than torch's >= on int16 (bench/models/dropout_masks.py)
        np.greater_equal(draws[:n], self._threshold, out=keep.numpy())
        return keep.view(stop - start, *self.shape[1:])


class _KeepAndScale(torch.autograd.Function):
    """``x * keep * scale`` for a one-byte ``keep`` mask (uint8), which is all autograd keeps.

    On CPU an in-place multiply by a uint8 mask is several times faster than ``masked_fill`` or
    an out-of-place multiply by a bool mask (which first converts the mask to float).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(scale).mul_(keep)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return grad.mul(ctx.scale).mul_(keep), None, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``nn.Dropout``'s function (inverted dropout, identity in eval or at ``p == 0``) with the
    cheaper :func:`dropout_keep_mask` and a one-byte mask kept for backward."""
    if not training or p == 0.0:
        return x
    keep = dropout_keep_mask(x.shape, p, x.device).view(torch.uint8)
    return _KeepAndScale.apply(x, keep, 1.0 / (1.0 - p))


class Dropout(nn.Module):
    """``nn.Dropout`` semantics (inverted dropout, identity in eval) with :func:`dropout_keep_mask`."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _ReluDropout(torch.autograd.Function):
    """``dropout(relu(x))`` that saves only its output for backward.

    ``d out / d x = scale`` where the output is positive, else 0 (a dropped or negative entry has
    output 0). The output is the next linear layer's input, saved there anyway, so the
    feed-forward block keeps one ``[B, L, d_ff]`` tensor for backward instead of three (ReLU
    output, dropout mask, dropout output).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:  # type: ignore[override]
        scale = 1.0 / (1.0 - p)
        y = torch.relu(x).mul_(dropout_keep_mask(x.shape, p, x.device).view(torch.uint8)).mul_(scale)
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return grad.mul(y > 0).mul_(ctx.scale), None


def relu_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``dropout(relu(x), p)`` in training (memory-lean, see :class:`_ReluDropout`); ``relu`` otherwise."""
    if not training or p == 0.0:
        return torch.relu(x)
    return _ReluDropout.apply(x, p)


class SinusoidalPositionalEncoding(nn.Module):
    """Adds fixed sinusoidal positions to ``x [B, L, D]``, then dropout.

    The table is a non-persistent buffer: it is not part of ``state_dict`` (nothing to send
    between federated sites, nothing to load) and is rebuilt from ``max_len``.
    """

    def __init__(self, d_model: int, max_len: int, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)
        self.dropout = Dropout(dropout)

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

    ``x = norm1(x + dropout(attn(x))); x = norm2(x + dropout(W2 dropout(relu(W1 x))))``, with
    :class:`Dropout` and the memory-lean :func:`relu_dropout`.
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
        self.dropout_p = dropout  # between the FFN's ReLU and linear2 (fused: relu_dropout)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.self_attn(x)))
        hidden = relu_dropout(self.linear1(x), self.dropout_p, self.training)
        return self.norm2(x + self.dropout2(self.linear2(hidden)))
