"""The shared model blocks compute what their reference definitions compute."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared.models.common import (
    DifferentialSelfAttention,
    LearnedToken,
    MultiHeadSelfAttention,
    SinusoidalPositionalEncoding,
    TransformerEncoderLayer,
    differential_lambda_init,
    sinusoidal_table,
)


def test_sinusoidal_table_matches_the_formula_for_even_and_odd_widths():
    for d in (8, 9):
        table = sinusoidal_table(50, d)
        pos, i = 7, 2
        assert torch.isclose(table[pos, 2 * i], torch.tensor(math.sin(pos / 10000 ** (2 * i / d))), atol=1e-6)
        assert torch.isclose(table[pos, 2 * i + 1], torch.tensor(math.cos(pos / 10000 ** (2 * i / d))), atol=1e-6)
        assert table.shape == (50, d)


def test_positional_encoding_adds_the_table_and_is_not_saved_in_state():
    pe = SinusoidalPositionalEncoding(16, max_len=20).eval()
    x = torch.zeros(2, 5, 16)
    assert torch.equal(pe(x), sinusoidal_table(20, 16)[:5].expand(2, 5, 16))
    assert pe.state_dict() == {}
    try:
        pe(torch.zeros(1, 21, 16))
    except ValueError as exc:
        assert "longer than the position table" in str(exc)
    else:
        raise AssertionError("a sequence longer than the table must be rejected")


def test_learned_token_is_prepended_to_every_sequence():
    tok = LearnedToken(4)
    out = tok(torch.ones(3, 2, 4))
    assert out.shape == (3, 3, 4)
    assert torch.equal(out[:, 0], tok.token[0].expand(3, 4))
    assert torch.equal(out[:, 1:], torch.ones(3, 2, 4))


def _copy_mha(ours: MultiHeadSelfAttention, ref: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        ours.qkv.weight.copy_(ref.in_proj_weight)
        ours.qkv.bias.copy_(ref.in_proj_bias)
        ours.out.weight.copy_(ref.out_proj.weight)
        ours.out.bias.copy_(ref.out_proj.bias)


def test_self_attention_equals_torch_multihead_attention_with_the_same_weights():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(24, 4, batch_first=True).eval()
    ours = MultiHeadSelfAttention(24, 4).eval()
    _copy_mha(ours, ref)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    x = torch.randn(2, 11, 24)
    torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)


def test_encoder_layer_equals_torch_post_norm_encoder_layer():
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(24, 4, 40, dropout=0.1, batch_first=True).eval()
    ours = TransformerEncoderLayer(24, 4, 40, dropout=0.1).eval()
    _copy_mha(ours.self_attn, ref.self_attn)
    for name in ("linear1", "linear2", "norm1", "norm2"):
        getattr(ours, name).load_state_dict(getattr(ref, name).state_dict())
    x = torch.randn(3, 9, 24)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def _reference_diff_attention(m: DifferentialSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """DIFF Transformer as written in the released MultiheadDiffAttn (no mask, no rotary)."""
    b, n, _ = x.shape
    h, nh = m.head_dim, m.n_heads
    q = m.q_proj(x).view(b, n, 2 * nh, h).transpose(1, 2) * h**-0.5
    k = m.k_proj(x).view(b, n, 2 * nh, h).transpose(1, 2)
    v = m.v_proj(x).view(b, n, nh, 2 * h).transpose(1, 2)
    w = F.softmax(q @ k.transpose(-1, -2), dim=-1).view(b, nh, 2, n, n)
    lam = (torch.exp((m.lam.q1 * m.lam.k1).sum()) - torch.exp((m.lam.q2 * m.lam.k2).sum()) + m.lam.lambda_init)
    attn = (w[:, :, 0] - lam * w[:, :, 1]) @ v
    attn = attn * torch.rsqrt(attn.pow(2).mean(-1, keepdim=True) + 1e-5) * m.subln.weight
    attn = attn * (1 - m.lam.lambda_init)
    return m.out_proj(attn.transpose(1, 2).reshape(b, n, nh * 2 * h))


def test_differential_attention_equals_the_two_softmax_reference():
    torch.manual_seed(0)
    m = DifferentialSelfAttention(32, 4, depth=3)
    with torch.no_grad():
        m.subln.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 13, 32)
    torch.testing.assert_close(m(x), _reference_diff_attention(m, x), atol=1e-5, rtol=1e-4)
    assert m.head_dim == 4 and abs(m.lam.lambda_init - differential_lambda_init(3)) < 1e-12
    # parameters as in the released code: 4 bias-free projections, 4 lambda vectors, per-head RMSNorm
    assert sum(p.numel() for p in m.parameters()) == 4 * 32 * 32 + 4 * 4 + 2 * 4


def test_bad_head_counts_are_rejected_with_the_values_to_change():
    for build in (lambda: MultiHeadSelfAttention(30, 4), lambda: DifferentialSelfAttention(36, 4, 0)):
        try:
            build()
        except ValueError as exc:
            assert "n_heads" in str(exc)
        else:
            raise AssertionError("expected ValueError")


def test_encoder_layer_dropout_is_nn_dropout_under_nn_transformer_names():
    layer = TransformerEncoderLayer(24, 4, 40, dropout=0.1)
    assert all(isinstance(getattr(layer, n), nn.Dropout) and getattr(layer, n).p == 0.1
               for n in ("dropout", "dropout1", "dropout2"))
    x = torch.randn(2, 5, 24)
    layer.train()
    torch.manual_seed(4)
    a = layer(x)
    torch.manual_seed(4)
    assert torch.equal(a, layer(x)) and not torch.equal(a, layer.eval()(x))


@pytest.mark.parametrize("name,samples", [("cardioformer", 250), ("hierarchical", 2500)])
def test_training_forward_compiles_with_at_most_five_graph_breaks(name, samples):
    """torch.compile's tracer (``torch._dynamo.explain``, no code generation) sees the whole
    training forward of the tiny preset: no host syncs, no numpy, no data-dependent Python."""
    import torch._dynamo

    from shared.models import build_model

    torch.manual_seed(0)
    model = build_model(name, "tiny", n_leads=12, input_samples=samples, n_classes=5).train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        explained = torch._dynamo.explain(model)(torch.randn(2, 12, samples))
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    assert explained.graph_break_count <= 5, [r.reason for r in explained.break_reasons]
