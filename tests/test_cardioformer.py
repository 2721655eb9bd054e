"""Cardioformer (shared/models/cardioformer.py): shapes, published sizes, training behaviour,
DP readiness, state round trip, configuration errors and interpretation."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.models import build_model, rebuild_model
from shared.models.cardioformer import PATCH_LENGTHS_PTB, PRESETS, Cardioformer, build
from shared.models.cardioformer_blocks import EmbeddingAugmentation, LinearAttention, TwoStageAttention


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread does the work as fast, and two OpenMP threads on a
    machine busier than its cores spin-wait each other into 10-30x slower steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(n_leads=12, input_samples=250, n_classes=5, seed=0, **overrides) -> Cardioformer:
    torch.manual_seed(seed)
    return build_model("cardioformer", "tiny", n_leads=n_leads, input_samples=input_samples,
                       n_classes=n_classes, **overrides)


@pytest.mark.parametrize("n_leads,input_samples", [(12, 250), (15, 300), (12, 500), (15, 37), (12, 32)])
def test_output_shape_for_12_and_15_leads_and_several_lengths(n_leads, input_samples):
    model = tiny(n_leads, input_samples, n_classes=7).eval()
    logits = model(torch.randn(3, n_leads, input_samples))
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()


def test_paper_parameter_counts_match_the_released_code_exactly():
    # PTB-XL / MIMIC-IV configuration: 12 leads, 250 samples, 5 classes, 16 granularities.
    assert n_params(build("paper", n_leads=12, input_samples=250, n_classes=5)) == 8_702_597
    # PTB configuration: 15 leads, 300 samples, 2 classes, 12 granularities.
    ptb = build("paper", n_leads=15, input_samples=300, n_classes=2, patch_lengths=PATCH_LENGTHS_PTB)
    assert n_params(ptb) == 6_894_338
    assert PRESETS["paper"]["fs"] * PRESETS["paper"]["seconds"] == 250


def test_token_counts_and_routers_follow_the_padding_rule():
    model = build("paper", n_leads=12, input_samples=250, n_classes=5)
    # floor(L / p) + 1 tokens per granularity (the released int((L - p) / p + 2)).
    assert model.token_counts == [250 // p + 1 for p in model.patch_lengths]
    assert model.classifier.in_features == 128 * 381


def test_every_trainable_parameter_receives_a_gradient():
    model = tiny()
    x, y = torch.randn(8, 12, 250), torch.randint(0, 2, (8, 5)).float()
    for mode in ("eval", "train"):  # eval: no randomness; train: augmentation and dropout active
        model.zero_grad(set_to_none=True)
        model.train(mode == "train")
        F.binary_cross_entropy_with_logits(model(x), y).backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert missing == [], f"{mode}: no gradient for {missing}"


def test_same_seed_gives_same_model_and_same_training_forward():
    x = torch.randn(4, 12, 250)
    a, b = tiny(seed=3), tiny(seed=3)
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), na
    a.train(), b.train()
    torch.manual_seed(11)
    out_a = a(x)
    torch.manual_seed(11)
    out_b = b(x)
    assert torch.equal(out_a, out_b)
    torch.manual_seed(12)
    assert not torch.equal(a(x), out_a)  # a different seed draws different augmentations / dropout


def test_tiny_overfits_a_small_fixed_batch():
    model = tiny(seed=0)
    torch.manual_seed(1)
    x = torch.randn(8, 12, 250)
    y = (torch.rand(8, 5) < 0.4).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return F.binary_cross_entropy_with_logits(model(x), y).item()

    before = eval_loss()
    model.train()
    for _ in range(15):  # training mode: augmentation and dropout stay on
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(x), y).backward()
        opt.step()
    after = eval_loss()
    assert after < 0.1 * before, (before, after)


def test_embedding_augmentation_is_active_only_in_training():
    tokens = torch.randn(4, 9, 16)
    for spec in ("jitter0.2", "scale0.2", "drop0.5"):
        aug = EmbeddingAugmentation(spec)
        aug.eval()
        assert torch.equal(aug(tokens), tokens), spec
        aug.train()
        assert not torch.equal(aug(tokens), tokens), spec
    # The whole model: without dropout, the augmentation is the only randomness left.
    model = tiny(dropout=0.0, augmentations=["jitter0.2", "scale0.2", "drop0.5"])
    x = torch.randn(2, 12, 250)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))
    model.train()
    no_aug = tiny(dropout=0.0, augmentations=["none"])
    assert torch.equal(no_aug.train()(x), no_aug(x))


def test_grouped_attention_equals_one_attention_per_granularity():
    torch.manual_seed(0)
    counts = [9, 5, 5, 3, 3, 3]  # granularities sharing a token count go through one fused call
    stage = TwoStageAttention(counts, d_model=16, n_heads=4, dropout=0.1).eval()
    x = torch.randn(2, sum(counts), 16)
    got, _ = stage(x)
    parts = [att(part)[0] for att, part in zip(stage.intra, x.split(counts, dim=1))]
    routed, _ = stage.inter(torch.cat([p[:, -1:] for p in parts], dim=1))
    expected = torch.cat([torch.cat([p[:, :-1], routed[:, g:g + 1]], dim=1) for g, p in enumerate(parts)], dim=1)
    torch.testing.assert_close(got, expected)


def test_layer_recomputation_gives_the_same_gradients():
    x, y = torch.randn(4, 12, 250), torch.randint(0, 2, (4, 5)).float()
    grads = []
    for recompute in (False, True):
        model = tiny(seed=5, recompute_layers=recompute).train()
        torch.manual_seed(9)  # same augmentation and dropout draws in both runs
        F.binary_cross_entropy_with_logits(model(x), y).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert build("paper", n_leads=12, input_samples=250, n_classes=5, recompute_layers=True).recompute_layers
    assert not build("paper", n_leads=12, input_samples=250, n_classes=5, dp=True, recompute_layers=True).recompute_layers


def released_forward(model: Cardioformer, x: torch.Tensor) -> torch.Tensor:
    """The released code's evaluation forward (Medformer's ``ListPatchEmbedding``,
    ``MedformerLayer`` with separate q/k/v projections and an explicit softmax, ``EncoderLayer``
    with kernel-1 ``Conv1d`` blocks, one list entry per granularity), re-expressed here with this
    model's weights copied into that layout."""
    emb, d = model.embedding, model.norm.normalized_shape[0]

    def positions(n: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float32).unsqueeze(1)
        div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * -(np.log(10000.0) / d))
        table = torch.zeros(n, d)
        table[:, 0::2], table[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        return table

    def attention_layer(module, queries: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = module.qkv.weight.chunk(3)
        bq, bk, bv = module.qkv.bias.chunk(3)
        b, n, _ = queries.shape
        h = module.n_heads
        q, k, v = (F.linear(queries, w, bias).view(b, n, h, d // h) for w, bias in ((wq, bq), (wk, bk), (wv, bv)))
        scores = torch.einsum("blhe,bshe->bhls", q, k) / np.sqrt(d // h)
        out = torch.einsum("bhls,bshd->blhd", torch.softmax(scores, dim=-1), v).reshape(b, n, d)
        return F.linear(out, module.out.weight, module.out.bias)

    xs = []
    for g, p in enumerate(model.patch_lengths):
        padded = F.pad(x, (0, p), mode="replicate").unsqueeze(1)  # ReplicationPad1d((0, p))
        tokens = F.conv2d(padded, emb.patch_convs[g].weight, stride=(1, p)).squeeze(2).transpose(1, 2)
        xs.append(tokens + emb.granularity_embeddings[g].weight + positions(tokens.shape[1]))
    for layer in model.layers:
        stage = layer.attention
        intra = [attention_layer(stage.intra[g], t) for g, t in enumerate(xs)]
        routed = attention_layer(stage.inter, torch.cat([t[:, -1:] for t in intra], dim=1))
        intra = [torch.cat([t[:, :-1], routed[:, g:g + 1]], dim=1) for g, t in enumerate(intra)]
        xs = [layer.norm1(t + a) for t, a in zip(xs, intra)]
        out = []
        for t in xs:
            y = t.transpose(1, 2)  # [B, D, n]: the released Conv1d layout
            for block in layer.blocks:
                hidden = F.gelu(F.conv1d(y, block.expand.weight.unsqueeze(-1), block.expand.bias))
                y = block.norm((y + F.conv1d(hidden, block.project.weight.unsqueeze(-1), block.project.bias)).transpose(1, 2)).transpose(1, 2)
            out.append(layer.norm2(t + y.transpose(1, 2)))
        xs = out
    encoded = torch.cat([model.norm(t) for t in xs], dim=1)
    return model.classifier(F.gelu(encoded).flatten(1))


@pytest.mark.parametrize("overrides", [{}, {"patch_lengths": [4, 8, 8, 16], "n_layers": 3}])
def test_logits_equal_the_released_forward_with_the_same_weights(overrides):
    """Eval mode, and training mode with dropout and augmentation off (the same function)."""
    x = torch.randn(3, 15, 300)
    model = tiny(n_leads=15, input_samples=300, seed=2, **overrides).eval()
    with torch.no_grad():
        expected = released_forward(model, x)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        quiet = tiny(n_leads=15, input_samples=300, seed=2, dropout=0.0, augmentations=["none"], **overrides).train()
        torch.testing.assert_close(quiet(x), expected, rtol=1e-5, atol=1e-5)


def test_augmentation_is_chosen_on_the_device_one_per_granularity():
    """``_augment`` keeps exactly the numbered candidate; the choice is a tensor, never a Python int."""
    model = tiny(augmentations=["none", "scale0.2"]).train()
    tokens = torch.randn(2, 9, 32)
    assert torch.equal(model.embedding._augment(tokens, torch.tensor(0)), tokens)
    scaled = model.embedding._augment(tokens, torch.tensor(1))
    ratio = scaled / tokens  # one factor per sample and token
    assert not torch.equal(scaled, tokens)
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-4, atol=1e-4)


def test_recomputation_stands_aside_for_opacus_hooks_and_the_dp_form():
    from opacus import GradSampleModule

    model = tiny(recompute_layers=True).train()
    assert model._recompute_now(False) and not model._recompute_now(True)  # maps asked for (explain)
    assert not build("tiny", n_leads=12, input_samples=250, n_classes=5, dp=True, recompute_layers=True).recompute_layers
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    GradSampleModule(model, batch_first=True, loss_reduction="mean")  # hooks every trainable layer
    assert not model._recompute_now(False)


def test_dp_form_passes_opacus_validation_and_trains_one_private_step():
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    model = tiny(dp=True)
    assert ModuleValidator.validate(model, strict=False) == []
    x, y = torch.randn(8, 12, 250), torch.randint(0, 2, (8, 5)).float()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        private, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            grad_sample_mode="hooks",
        )
        private.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            F.binary_cross_entropy_with_logits(private(xb), yb).backward()
            no_sample = [n for n, p in private.named_parameters() if getattr(p, "grad_sample", None) is None]
            assert no_sample == []
            optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before)
    assert engine.get_epsilon(1e-5) > 0


def test_per_sample_gradients_stay_per_sample_with_augmentation_on():
    """The DP argument for keeping the augmentation: every random draw is per sample (or, for
    the choice of augmentation, independent of the data), so one sample's clipped gradient
    depends on that sample only. Checked with Opacus' own per-sample gradients."""
    from opacus import GradSampleModule

    model = tiny(dp=True, augmentations=["jitter0.2", "scale0.2", "drop0.5"])
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum").train()
    x, y = torch.randn(4, 12, 250), torch.randint(0, 2, (4, 5)).float()

    def per_sample(inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        gsm.zero_grad(set_to_none=True)
        for p in gsm.parameters():
            p.grad_sample = None
        torch.manual_seed(21)
        F.binary_cross_entropy_with_logits(gsm(inputs), y, reduction="sum").backward()
        return {n: p.grad_sample.clone() for n, p in gsm.named_parameters()}, {n: p.grad.clone() for n, p in gsm.named_parameters()}

    samples, batch_grad = per_sample(x)
    for n, g in samples.items():  # per-sample gradients add up to the batch gradient
        torch.testing.assert_close(g.sum(0), batch_grad[n], rtol=1e-4, atol=1e-5)
    changed = x.clone()
    changed[3] += 1.0  # change sample 3 only: samples 0-2 keep their gradients
    samples_changed, _ = per_sample(changed)
    for n in samples:
        torch.testing.assert_close(samples_changed[n][:3], samples[n][:3], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(samples_changed[n][3], samples[n][3]) for n in samples)


def test_state_dict_round_trips_exactly_through_numpy():
    source, target = tiny(seed=1).eval(), tiny(seed=2).eval()
    arrays = {k: v.detach().cpu().numpy().copy() for k, v in source.state_dict().items()}
    assert all(isinstance(a, np.ndarray) for a in arrays.values())
    target.load_state_dict({k: torch.from_numpy(a) for k, a in arrays.items()})
    for k, v in target.state_dict().items():
        assert torch.equal(v, source.state_dict()[k]), k
    x = torch.randn(2, 12, 250)
    assert torch.equal(source(x), target(x))


def test_config_is_json_and_rebuilds_the_same_architecture():
    model = tiny(15, 300, 2, d_model=48, patch_lengths=[8, 16])
    config = json.loads(json.dumps(model.config))
    assert config["name"] == "cardioformer" and config["overrides"]["d_model"] == 48
    again = rebuild_model(config)
    assert [(n, p.shape) for n, p in again.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]


def test_site_local_parameters_are_the_layernorms():
    model = tiny()
    names = model.site_local_parameter_names()
    params = dict(model.named_parameters())
    assert names and all(n in params for n in names)
    assert all(".norm" in n or n.startswith("norm.") for n in names)
    # 2 layers x (norm1, 3 block norms, norm2) + final norm, weight and bias each.
    assert len(names) == 2 * (2 * 5 + 1)


@pytest.mark.parametrize("overrides,needle", [
    ({"patch_lengths": [4, 64]}, "[64] longer than the input"),
    ({"d_model": 30, "n_heads": 4}, "not divisible by n_heads"),
    ({"patch_lengths": []}, "patch_lengths is empty"),
    ({"augmentations": ["blur0.2"]}, "augmentation 'blur0.2'"),
    ({"dropout": 1.5}, "dropout"),
    ({"depth": 3}, "unknown option(s) ['depth']"),
])
def test_bad_configurations_are_rejected_with_the_values_to_change(overrides, needle):
    with pytest.raises(ValueError) as error:
        tiny(input_samples=50, **overrides)
    assert needle in str(error.value)


def test_wrong_input_shape_names_the_expected_shape():
    model = tiny().eval()
    with pytest.raises(ValueError, match=r"\[batch, 12 leads, 250 samples\]"):
        model(torch.randn(2, 12, 500))
    with pytest.raises(ValueError, match="unknown preset"):
        build("huge", n_leads=12, input_samples=250, n_classes=5)


def test_explain_returns_router_attention_and_lead_importance():
    model = tiny(n_classes=3).train()
    x = torch.randn(2, 12, 250)
    out = model.explain(x)
    assert model.training  # explain restores the mode
    g = len(model.patch_lengths)
    assert out["method"] == "router_attention"
    assert out["lead_importance"].shape == (2, 1, 12)
    assert out["router_attention"].shape == (2, 2, g, g)  # [layers, B, G, G]
    torch.testing.assert_close(out["router_attention"].sum(-1), torch.ones(2, 2, g))
    assert out["granularity_importance"].shape == (2, g)
    torch.testing.assert_close(out["lead_importance"].sum(-1), torch.ones(2, 1))
    torch.testing.assert_close(out["logits"], model.eval()(x))
    per_class = model.explain(x, method="input_x_gradient")
    assert per_class["lead_importance"].shape == (2, 3, 12)
    torch.testing.assert_close(per_class["lead_importance"].sum(-1), torch.ones(2, 3))
    single = tiny(patch_lengths=[25]).explain(x)  # one granularity: no routers to compare
    assert single["router_attention"] is None and single["lead_importance"].shape == (2, 1, 12)


def test_lead_importance_follows_the_leads_the_patch_embedding_reads():
    model = tiny()
    with torch.no_grad():  # make every patch kernel blind to all leads but V2 (row 7)
        for conv in model.embedding.patch_convs:
            conv.weight[:, :, [c for c in range(12) if c != 7]] = 0.0
    importance = model.explain(torch.randn(2, 12, 250))["lead_importance"]
    assert torch.all(importance[:, 0].argmax(-1) == 7)
    torch.testing.assert_close(importance[:, 0, 7], torch.ones(2))


def test_linear_attention_weights_match_the_fused_kernel():
    torch.manual_seed(0)
    att = LinearAttention(16, 4, dropout=0.1).eval()
    x = torch.randn(2, 7, 16)
    fused, _ = att(x)
    explicit, weights = att(x, need_weights=True)
    torch.testing.assert_close(fused, explicit)
    assert weights.shape == (2, 7, 7)


def test_a_training_step_after_an_inference_mode_forward_works():
    """The removed fused path's buffer pool handed an inference tensor to the next training
    step (``RuntimeError: Inplace update to inference tensor outside InferenceMode``)."""
    model = tiny(seed=6)
    x, y = torch.randn(3, 12, 250), torch.randint(0, 2, (3, 5)).float()
    with torch.inference_mode():
        model.eval()(x)
    model.train()
    F.binary_cross_entropy_with_logits(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
