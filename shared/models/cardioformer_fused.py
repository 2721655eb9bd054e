"""Lean kernels for Cardioformer's encoder layer: two ``torch.autograd.Function``\\ s.

They compute what the module path of ``cardioformer_blocks`` computes, with the same parameters
and the same dropout masks (drawn in the same order from the same generator, so a seeded run
gives the same numbers to float rounding), but keep less for backward and allocate little:

- :func:`dropout_attention`: ``softmax(q k^T / sqrt(E))`` with dropout on the weights, times
  ``v``, for all heads of a ``[batch, n, 3 * D]`` q/k/v projection. It keeps the projection and
  the dropout mask; backward recomputes the scores and the softmax (as flash attention does)
  instead of keeping two float ``[n, n]`` maps per head.
- :func:`layer_tail`: the rest of an encoder layer, ``norm2(x + blocks(x))`` with
  ``x = norm1(z)``, ``z = r + dropout(a)`` (r the layer input, a the attention output), each of
  the three residual blocks being ``LayerNorm(u + dropout(W2 dropout(GELU(W1 u + b1)) + b2))``.
  It keeps z, the residual dropout's mask, per block the LayerNorm input and the two dropout
  masks, and the pre-GELU activation of the last ``3 - RECOMPUTED_PRE_GELU`` blocks; backward
  recomputes GELU, the dropped activations, the LayerNorm outputs (element-wise work) and the
  other pre-GELU activations (one matrix product each). The dropout scale ``1 / (1 - p)``
  rides on the matrix products.

Dropout masks are drawn chunk by chunk into one reused buffer and kept as **bits** on CPU
(``numpy.packbits``, about 0.04 ms per million entries: ``bench/models/dropout_masks.py``): one
bit per entry where a bool mask costs a byte, and 32 where PyTorch's own dropout keeps a float.

Both work in **chunks** on CPU: a few samples of attention maps, or ``TAIL_ROWS`` tokens of the
layer tail, go through every step before the next chunk starts, so the intermediates are a few
reused MiB instead of fresh 12-16 MiB tensors per element-wise step (every step here is per token
or per sample, so chunking changes no result; the weight gradients are summed over chunks). On
other devices one chunk holds everything and masks stay one byte per entry.

Their large buffers are reused from one step to the next (:data:`BUFFERS`) rather than taken
fresh from the allocator each time, which cost a page fault per 4 KiB.

Both run only where nothing watches the layers' forward (Opacus' per-sample hooks need the module
path; ``Cardioformer._fused_now`` decides) and outside autocast (the kernels are written for one
dtype). ``tests/test_cardioformer.py`` checks outputs and every gradient against the module path;
``docs/performance.md`` has the memory and speed figures.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from shared.models.common import KeepMaskStream

#: Tokens per chunk of the layer tail on CPU ([2048, 256] float32 is 2 MiB). Paper preset:
#: 24.9-25.3 samples/s for 1024-4096 tokens, 23.4 unchunked (bench/models/cardioformer_chunks.py).
TAIL_ROWS = 2048
#: Residual blocks (counted from the first of each layer) whose pre-GELU activation backward
#: recomputes (one more matrix product per block) instead of keeping: each saves
#: tokens x d_ff x 4 bytes per layer (75 MB over the paper preset's 6 layers at batch 32).
#: Paper preset, batch 32, 2 threads, back to back (docs/performance.md;
#: ``bench/models/cardioformer_vs_released_layout.py --recomputed-pre-gelu N``): 0 -> 1.14 GiB
#: peak, 2.66 CPU-s per step; 2 -> 1.00 GiB, 2.81 CPU-s (training 1.53x / 1.43x the released
#: layout in the same runs).
RECOMPUTED_PRE_GELU = 2
#: Attention-map bytes per chunk on CPU (samples x heads x n x n x 4); unchunked: 22.4 samples/s.
ATTENTION_CHUNK_BYTES = 2 * 2**20

_BOOL = torch.empty(0, dtype=torch.bool)  # dtype and device of the mask scratch buffers
_gelu_out = torch.ops.aten.gelu.out
_gelu_backward_out = torch.ops.aten.gelu_backward.grad_input
_layer_norm_backward = torch.ops.aten.native_layer_norm_backward


class _BufferPool:
    """Reuses the kernels' large buffers from one training step to the next.

    A fresh tensor of a few MiB is memory the C allocator may just have handed back to the
    system, and touching it again costs a page fault per 4 KiB: measured, 25-80 thousand faults
    and a tenth of the step time. Buffers come back here when nothing can read them any more: at
    the end of forward for scratch buffers, and at the end of a backward that frees the graph
    for the tensors kept for it (never under ``retain_graph=True``, which keeps them readable).
    Holds at most ``max_per_shape`` buffers of each shape; ``clear()`` gives the memory back.
    """

    def __init__(self, max_per_shape: int = 32):
        self.max_per_shape = max_per_shape
        self._free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        free = self._free.get((tuple(shape), like.dtype, like.device))
        return free.pop() if free else like.new_empty(shape)

    def give(self, *tensors: torch.Tensor | None) -> None:
        for tensor in tensors:
            if tensor is None:
                continue
            free = self._free.setdefault((tuple(tensor.shape), tensor.dtype, tensor.device), [])
            if len(free) < self.max_per_shape:
                free.append(tensor)

    def clear(self) -> None:
        self._free.clear()


#: The pool of every Cardioformer in this process (``BUFFERS.clear()`` frees what it holds).
BUFFERS = _BufferPool()


def _graph_is_freed_after_this_backward() -> bool:
    """False under ``retain_graph=True`` (the kept tensors may be read again)."""
    return not torch._C._autograd._get_current_graph_task_keep_graph()


def _chunks(total: int, per_chunk: int, device: torch.device):
    """``(start, stop)`` pairs covering ``range(total)``; one pair off the CPU."""
    step = max(1, per_chunk) if device.type == "cpu" else max(1, total)
    return [(start, min(total, start + step)) for start in range(0, total, step)]


# --------------------------------------------------------------------------- dropout masks
class _Mask:
    """One dropout mask of a kernel, drawn chunk by chunk in forward (``KeepMaskStream``: the
    draws ``dropout_keep_mask`` would make, so the module path's mask) and kept for backward as
    bits on CPU (``numpy.packbits``, about 0.04 ms per million entries), as bytes elsewhere."""

    def __init__(self, shape: tuple[int, ...], p: float, device: torch.device):
        self.stream = KeepMaskStream(shape, p, device)
        per_row = int(np.prod(shape[1:]))
        self.kept = (torch.empty(shape[0], (per_row + 7) // 8, dtype=torch.uint8) if device.type == "cpu"
                     else torch.empty(shape, dtype=torch.uint8, device=device))

    def draw(self, start: int, stop: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` as 0/1 uint8 (an in-place multiply by uint8 is the fastest way to
        apply a mask on CPU), recorded for backward. ``scratch``: a bool buffer the rows may be
        written into on CPU (valid until the next draw into it)."""
        keep = self.stream.rows(start, stop, out=scratch).view(torch.uint8)
        if self.kept.device.type == "cpu":
            bits = np.packbits(keep.reshape(stop - start, -1).numpy(), axis=1, bitorder="little")
            self.kept[start:stop] = torch.from_numpy(bits)
        else:
            self.kept[start:stop] = keep
        return keep


def _mask_scratch(entries: int, device: torch.device) -> torch.Tensor | None:
    """A reused bool buffer of ``entries`` for :meth:`_Mask.draw` on CPU (``None`` elsewhere)."""
    return BUFFERS.take((entries,), _BOOL) if device.type == "cpu" else None


def _masks(shapes: list[tuple[int, ...]], p: float, device: torch.device) -> list[_Mask | None]:
    """One :class:`_Mask` per shape, seeded in order (the module path's order); ``None`` at p = 0."""
    return [_Mask(shape, p, device) if p > 0.0 else None for shape in shapes]


def _kept(mask: _Mask | None) -> torch.Tensor:
    """What autograd keeps of a mask (an empty tensor for no dropout)."""
    return torch.empty(0, dtype=torch.uint8) if mask is None else mask.kept


def _unpack(kept: torch.Tensor, start: int, stop: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
    """Rows ``start:stop`` of a mask of ``shape`` kept by :class:`_Mask`, as 0/1 of ``dtype``
    (converted once: backward applies each mask twice)."""
    if kept.numel() == 0:
        return None
    if kept.device.type != "cpu":
        return kept[start:stop].to(dtype)
    bits = np.unpackbits(kept[start:stop].numpy(), axis=1, count=int(np.prod(shape[1:])), bitorder="little")
    return torch.from_numpy(bits).view(stop - start, *shape[1:]).to(dtype)


# --------------------------------------------------------------------------- attention
class _DropoutAttention(torch.autograd.Function):
    """``qkv [B, n, 3 * D]`` (q, k, v side by side, heads inside each) -> ``[B, n, D]``."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, n_heads: int, p: float) -> torch.Tensor:  # type: ignore[override]
        b, n, three_d = qkv.shape
        d = three_d // 3
        (mask,) = _masks([(b, n_heads, n, n)], p, qkv.device)
        attended = qkv.new_empty(b, n, n_heads, d // n_heads)
        chunks = _attention_chunks(b, n_heads, n, qkv.device)
        largest = (chunks[0][1] - chunks[0][0]) * n_heads * n * n  # entries of the first (a full) chunk
        scratch = _mask_scratch(largest, qkv.device) if mask is not None else None
        for start, stop in chunks:
            q_scaled, k, v = _chunk_heads(qkv, n_heads, start, stop)
            weights = torch.softmax(torch.matmul(q_scaled, k.transpose(-2, -1)), dim=-1)
            if mask is not None:
                weights.mul_(mask.draw(start, stop, scratch))
            attended[start:stop] = torch.matmul(weights, v).transpose(1, 2)
        BUFFERS.give(scratch)
        if p > 0.0:
            attended.mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(qkv, _kept(mask))
        ctx.n_heads, ctx.p = n_heads, p
        return attended.view(b, n, d)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        qkv, kept_mask = ctx.saved_tensors
        n_heads, scale = ctx.n_heads, 1.0 / (1.0 - ctx.p)
        b, n, three_d = qkv.shape
        e = three_d // (3 * n_heads)
        grad = grad.reshape(b, n, n_heads, e)
        grad_qkv = qkv.new_empty(b, n, 3, n_heads, e)
        for start, stop in _attention_chunks(b, n_heads, n, qkv.device):
            keep = _unpack(kept_mask, start, stop, torch.Size((b, n_heads, n, n)), qkv.dtype)
            q_scaled, k, v = _chunk_heads(qkv, n_heads, start, stop)
            weights = torch.softmax(torch.matmul(q_scaled, k.transpose(-2, -1)), dim=-1)  # recomputed
            grad_out = grad[start:stop].transpose(1, 2) * scale  # [b', H, n, E], dropout scale included
            kept = weights if keep is None else weights * keep
            grads = qkv.new_empty(3, *q_scaled.shape)  # d q, d k, d v of this chunk
            torch.matmul(kept.transpose(-2, -1), grad_out, out=grads[2])
            del kept
            grad_weights = torch.matmul(grad_out, v.transpose(-2, -1))
            if keep is not None:
                grad_weights.mul_(keep)
            grad_scores = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
            torch.matmul(grad_scores, k.mul_(e ** -0.5), out=grads[0])  # scores = q k^T / sqrt(E)
            torch.matmul(grad_scores.transpose(-2, -1), q_scaled, out=grads[1])
            grad_qkv[start:stop] = grads.permute(1, 3, 0, 2, 4)
        return grad_qkv.view(b, n, three_d), None, None


def _chunk_heads(qkv: torch.Tensor, n_heads: int, start: int, stop: int):
    """Samples ``start:stop`` of ``qkv [B, n, 3 * D]`` as contiguous q / sqrt(E), k, v
    ``[b', H, n, E]`` (one copy; the matrix products then need no hidden copies)."""
    b, n, three_d = qkv.shape
    e = three_d // (3 * n_heads)
    q, k, v = qkv[start:stop].view(stop - start, n, 3, n_heads, e).permute(2, 0, 3, 1, 4).contiguous()
    return q.mul_(e ** -0.5), k, v


def _attention_chunks(b: int, n_heads: int, n: int, device: torch.device):
    return _chunks(b, ATTENTION_CHUNK_BYTES // (n_heads * n * n * 4), device)


def dropout_attention(qkv: torch.Tensor, n_heads: int, p: float) -> torch.Tensor:
    """Multi-head attention with dropout ``p`` on the weights, heads merged: ``[B, n, D]``.

    ``qkv`` is one ``LinearAttention.qkv`` output (or several stacked along the batch).
    """
    return _DropoutAttention.apply(qkv.contiguous(), n_heads, p)


# --------------------------------------------------------------------------- layer tail
def _tail_parameters(norm1: nn.LayerNorm, blocks: nn.Sequential, norm2: nn.LayerNorm) -> list[torch.Tensor]:
    params = [norm1.weight, norm1.bias]
    for block in blocks:
        params += [block.expand.weight, block.expand.bias, block.project.weight, block.project.bias,
                   block.norm.weight, block.norm.bias]
    return params + [norm2.weight, norm2.bias]


class _LayerTail(torch.autograd.Function):
    """``(r, a) [B, N, D]`` -> ``norm2(x + blocks(x))``, ``x = norm1(z)``, ``z = r + dropout(a)``
    (r: the layer's input, a: its attention output). ``params`` in the order of
    :func:`_tail_parameters`; ``eps`` one per LayerNorm, in the same order; ``save``: keep what
    backward needs (off for inference, where the per-block buffers shrink to one chunk).

    Kept for backward: z, and per block i ``block_in[i]`` (the block's LayerNorm input), both
    masks (as bits on CPU) and, for ``i >= RECOMPUTED_PRE_GELU``, ``pre_gelu[i]``
    (h = W1 u + b1); plus the residual dropout's mask and every LayerNorm's mean and 1/std.
    """

    @staticmethod
    def forward(ctx, residual: torch.Tensor, attended: torch.Tensor, p: float,  # type: ignore[override]
                eps: tuple[float, ...], save: bool, *params: torch.Tensor):
        shape, d = residual.shape, residual.shape[-1]
        residual, attended = residual.reshape(-1, d), attended.reshape(-1, d)
        rows, n_blocks, d_ff = residual.shape[0], (len(params) - 4) // 6, params[2].shape[0]
        scale = 1.0 / (1.0 - p)
        # The module path's order: the residual dropout, then each block's two.
        masks = _masks([(rows, d)] + [(rows, d_ff), (rows, d)] * n_blocks, p, residual.device)
        mask_z, mask1, mask2 = masks[0], masks[1::2], masks[2::2]
        chunk = min(rows, TAIL_ROWS)
        kept_rows = rows if save else chunk
        recomputed = min(RECOMPUTED_PRE_GELU, n_blocks) if save else n_blocks  # pre-GELU not kept
        pre_gelu = [BUFFERS.take((chunk if i < recomputed else rows, d_ff), residual) for i in range(n_blocks)]
        z, *block_in = (BUFFERS.take((kept_rows, d), residual) for _ in range(1 + n_blocks))
        stats = BUFFERS.take((2 + n_blocks, 2, rows, 1), residual)  # (norm1, blocks..., norm2) x (mean, 1/std)
        out = torch.empty_like(residual)
        activation, projected = BUFFERS.take((chunk, d_ff), residual), BUFFERS.take((chunk, d), residual)
        scratch = _mask_scratch(chunk * max(d, d_ff), residual.device)
        for start, stop in _chunks(rows, TAIL_ROWS, residual.device):
            here = slice(start, stop) if save else slice(0, stop - start)  # rows of z and block_in
            zc = z[here]
            if mask_z is None:
                torch.add(residual[start:stop], attended[start:stop], out=zc)
            else:
                zc.copy_(attended[start:stop]).mul_(mask_z.draw(start, stop, scratch))
                torch.add(residual[start:stop], zc, alpha=scale, out=zc)
            x, stats[0, 0, start:stop], stats[0, 1, start:stop] = torch.native_layer_norm(
                zc, (d,), params[0], params[1], eps[0])
            u = x
            for i in range(n_blocks):
                w1, b1, w2, b2, gamma, beta = params[2 + 6 * i: 8 + 6 * i]
                h = pre_gelu[i][: stop - start] if i < recomputed else pre_gelu[i][start:stop]
                a, y = activation[: stop - start], projected[: stop - start]
                torch.addmm(b1, u, w1.t(), out=h)
                _gelu_out(h, out=a)
                if mask1[i] is not None:
                    a.mul_(mask1[i].draw(start, stop, scratch))
                # dropout(W2 (a * scale) + b2) = keep2 * scale * (b2 + scale * W2 a)
                torch.addmm(b2, a, w2.t(), beta=scale, alpha=scale * scale, out=y)
                if mask2[i] is not None:
                    y.mul_(mask2[i].draw(start, stop, scratch))
                torch.add(y, u, out=block_in[i][here])
                u, stats[1 + i, 0, start:stop], stats[1 + i, 1, start:stop] = torch.native_layer_norm(
                    block_in[i][here], (d,), gamma, beta, eps[1 + i])
            out[start:stop], stats[-1, 0, start:stop], stats[-1, 1, start:stop] = torch.native_layer_norm(
                x.add_(u), (d,), params[-2], params[-1], eps[-1])
        BUFFERS.give(activation, projected, scratch, *pre_gelu[:recomputed])
        if not save:
            BUFFERS.give(z, *block_in, stats)
        else:
            ctx.save_for_backward(z, stats, *pre_gelu[recomputed:], *block_in, *(_kept(m) for m in masks), *params)
            ctx.p, ctx.eps, ctx.n_blocks, ctx.shape, ctx.recomputed = p, eps, n_blocks, shape, recomputed
        return out.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        n_blocks, eps, p, d, recomputed = ctx.n_blocks, ctx.eps, ctx.p, ctx.shape[-1], ctx.recomputed
        z, stats, *rest = ctx.saved_tensors
        pre_gelu_kept, rest = rest[: n_blocks - recomputed], rest[n_blocks - recomputed:]
        block_in, params = rest[:n_blocks], rest[3 * n_blocks + 1:]
        kept_z, *kept_masks = rest[n_blocks: 3 * n_blocks + 1]
        kept1, kept2 = kept_masks[0::2], kept_masks[1::2]
        rows, d_ff, scale = z.shape[0], params[2].shape[0], 1.0 / (1.0 - p)
        shape1, shape2 = torch.Size((rows, d_ff)), torch.Size((rows, d))
        grad = grad.reshape(rows, d)
        # Gradients of every parameter, summed over chunks (W2 and b2 scaled at the end).
        param_grads = [torch.zeros_like(t) for t in params]
        w2_scaled = [params[4 + 6 * i] * (scale * scale) for i in range(n_blocks)]
        grad_residual, grad_attended = torch.empty_like(z), torch.empty_like(z)
        chunk = min(rows, TAIL_ROWS)
        activation, grad_activation, grad_pre, pre = (BUFFERS.take((chunk, d_ff), z) for _ in range(4))
        grad_projected = BUFFERS.take((chunk, d), z)
        lnorm_mask = [True, True, True]

        def accumulate(index: int, values) -> None:
            for offset, value in enumerate(values):
                param_grads[index + offset].add_(value)

        for start, stop in _chunks(rows, TAIL_ROWS, z.device):
            n = stop - start
            mean_rstd = stats[:, :, start:stop]
            # Recompute the LayerNorm outputs (the forward's kernel, so bit for bit).
            x = torch.native_layer_norm(z[start:stop], (d,), params[0], params[1], eps[0])[0]
            block_inputs = [x]
            for i in range(n_blocks):
                block_inputs.append(torch.native_layer_norm(
                    block_in[i][start:stop], (d,), params[6 + 6 * i], params[7 + 6 * i], eps[1 + i])[0])
            grad_outer, *norm2_grads = _layer_norm_backward(
                grad[start:stop], x + block_inputs.pop(), (d,), mean_rstd[-1, 0], mean_rstd[-1, 1],
                params[-2], params[-1], lnorm_mask)
            accumulate(len(params) - 2, norm2_grads)
            grad_u = grad_outer
            for i in reversed(range(n_blocks)):
                o = 2 + 6 * i
                if i < recomputed:
                    h = torch.addmm(params[o + 1], block_inputs[i], params[o].t(), out=pre[:n])
                else:
                    h = pre_gelu_kept[i - recomputed][start:stop]
                keep1 = _unpack(kept1[i], start, stop, shape1, z.dtype)
                keep2 = _unpack(kept2[i], start, stop, shape2, z.dtype)
                grad_in, *norm_grads = _layer_norm_backward(
                    grad_u, block_in[i][start:stop], (d,), mean_rstd[1 + i, 0], mean_rstd[1 + i, 1],
                    params[o + 4], params[o + 5], lnorm_mask)
                accumulate(o + 4, norm_grads)
                grad_y = grad_in if keep2 is None else torch.mul(grad_in, keep2, out=grad_projected[:n])
                param_grads[o + 3].add_(grad_y.sum(0))
                a = _gelu_out(h, out=activation[:n])
                if keep1 is not None:
                    a.mul_(keep1)
                param_grads[o + 2].addmm_(grad_y.t(), a)
                grad_a = torch.mm(grad_y, w2_scaled[i], out=grad_activation[:n])
                if keep1 is not None:
                    grad_a.mul_(keep1)
                grad_h = _gelu_backward_out(grad_a, h, grad_input=grad_pre[:n])
                param_grads[o + 1].add_(grad_h.sum(0))
                param_grads[o].addmm_(grad_h.t(), block_inputs[i])
                grad_u = grad_in.addmm_(grad_h, params[o])  # residual path + the path through W1
            grad_z, *norm1_grads = _layer_norm_backward(
                grad_u.add_(grad_outer), z[start:stop], (d,), mean_rstd[0, 0], mean_rstd[0, 1],
                params[0], params[1], lnorm_mask)
            accumulate(0, norm1_grads)
            grad_residual[start:stop] = grad_z  # z = r + keep * scale * a
            keep_z = _unpack(kept_z, start, stop, shape2, z.dtype)
            if keep_z is None:
                grad_attended[start:stop] = grad_z
            else:
                torch.mul(grad_z.mul_(scale), keep_z, out=grad_attended[start:stop])
        BUFFERS.give(activation, grad_activation, grad_pre, pre, grad_projected)
        if _graph_is_freed_after_this_backward():
            BUFFERS.give(z, *pre_gelu_kept, *block_in, stats)
        for i in range(n_blocks):  # y = keep2 * scale * (b2 + scale * W2 a)
            param_grads[4 + 6 * i].mul_(scale * scale)
            param_grads[5 + 6 * i].mul_(scale)
        return (grad_residual.view(ctx.shape), grad_attended.view(ctx.shape), None, None, None, *param_grads)


def layer_tail(residual: torch.Tensor, attended: torch.Tensor, norm1: nn.LayerNorm, blocks: nn.Sequential,
               norm2: nn.LayerNorm, p: float) -> torch.Tensor:
    """``norm2(x + blocks(x))`` with ``x = norm1(residual + dropout(attended))`` and dropout ``p``
    inside the blocks too (the same function as ``CardioformerLayer``'s residual dropout, norm1
    and ``pointwise``, lean in memory)."""
    eps = (norm1.eps, *(block.norm.eps for block in blocks), norm2.eps)
    params = _tail_parameters(norm1, blocks, norm2)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (residual, attended, *params))
    return _LayerTail.apply(residual.contiguous(), attended.contiguous(), p, eps, save, *params)
