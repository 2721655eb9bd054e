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


def _train_forward_backward(model: Cardioformer, x: torch.Tensor, y: torch.Tensor, seed: int = 9):
    torch.manual_seed(seed)  # the same augmentation and dropout draws on every path
    logits = model(x)
    F.binary_cross_entropy_with_logits(logits, y).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("recomputed", [0, 2])
@pytest.mark.parametrize("overrides", [
    {},  # the tiny preset
    {"n_heads": 2, "d_model": 16, "d_ff": 25, "patch_lengths": [3, 5, 5, 7], "n_layers": 3},  # odd sizes
])
def test_fused_kernels_compute_what_the_module_path_computes(overrides, recomputed, monkeypatch):
    """Outputs and every gradient of a training step agree with the module path (same seed, so
    the same dropout masks), with chunks small enough that several run, the last one partial,
    whether the pre-GELU activations are kept or recomputed."""
    import shared.models.cardioformer_fused as fused

    monkeypatch.setattr(fused, "RECOMPUTED_PRE_GELU", recomputed)
    monkeypatch.setattr(fused, "TAIL_ROWS", 37)
    monkeypatch.setattr(fused, "ATTENTION_CHUNK_BYTES", 3 * 4 * 2 * 30 * 30)
    x, y = torch.randn(5, 15, 300), torch.randint(0, 2, (5, 5)).float()
    results = []
    for fused_layers in (False, True):
        model = tiny(n_leads=15, input_samples=300, seed=3, fused_layers=fused_layers, **overrides).train()
        results.append(_train_forward_backward(model, x, y))
    (out_module, grads_module), (out_fused, grads_fused) = results
    torch.testing.assert_close(out_fused, out_module, rtol=1e-5, atol=1e-6)
    for name, grad in grads_module.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_fused[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for fused_layers in (False, True):  # evaluation, with and without a graph
        model = tiny(n_leads=15, input_samples=300, seed=3, fused_layers=fused_layers, **overrides).eval()
        with torch.no_grad():
            results.append(model(x))
    torch.testing.assert_close(results[3], results[2], rtol=1e-5, atol=1e-6)


def test_fused_kernels_reuse_their_buffers_safely_across_steps_and_retained_graphs():
    """Buffers go back to the pool after a backward that frees the graph and are reused by the
    next step; under retain_graph they stay untouched for the second backward."""
    from shared.models.cardioformer_fused import BUFFERS

    x, y = torch.randn(3, 12, 250), torch.randint(0, 2, (3, 5)).float()
    runs = []
    for fused_layers in (False, True):
        model = tiny(seed=4, fused_layers=fused_layers).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3):  # steps 2 and 3 run on pooled buffers
            optimizer.zero_grad()
            logits, _ = _train_forward_backward(model, x, y, seed=step)
            optimizer.step()
        runs.append((logits, [p.detach().clone() for p in model.parameters()]))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-4, atol=1e-5)
    for fused_param, module_param in zip(runs[1][1], runs[0][1]):
        torch.testing.assert_close(fused_param, module_param, rtol=1e-4, atol=1e-5)
    assert BUFFERS._free  # the pool holds the buffers of the last step

    grads = []
    for fused_layers in (False, True):  # two backward passes over one graph (explain does this)
        model = tiny(seed=4, fused_layers=fused_layers).train()
        inputs = x.clone().requires_grad_(True)
        torch.manual_seed(5)
        logits = model(inputs)
        first = torch.autograd.grad(logits[:, 0].sum(), inputs, retain_graph=True)[0]
        model(torch.randn_like(x))  # a forward in between may take pooled buffers
        second = torch.autograd.grad(logits[:, 1].sum(), inputs)[0]
        grads.append((first, second))
    for fused_grad, module_grad in zip(grads[1], grads[0]):
        torch.testing.assert_close(fused_grad, module_grad, rtol=1e-4, atol=1e-6)


def test_fused_kernels_keep_less_for_backward_than_the_module_path():
    """What autograd keeps after a training forward (distinct storages, parameters excluded)."""
    x = torch.randn(16, 12, 250)

    def kept_bytes(model: Cardioformer) -> int:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                storages[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(storages.values())

    module_path = kept_bytes(tiny(seed=1, fused_layers=False).train())
    fused_path = kept_bytes(tiny(seed=1).train())
    assert fused_path < 0.6 * module_path, (fused_path, module_path)


def test_fused_kernels_stand_aside_for_opacus_hooks_autocast_and_the_dp_form():
    from opacus import GradSampleModule

    model = tiny().train()
    x = torch.randn(2, 12, 250)
    assert model.fused_layers and model._fused_now(False, x)
    assert not model._fused_now(True, x)  # attention maps asked for (explain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not model._fused_now(False, x)
    assert not build("tiny", n_leads=12, input_samples=250, n_classes=5, dp=True).fused_layers
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    GradSampleModule(model, batch_first=True, loss_reduction="mean")  # hooks every trainable layer
    assert not model._fused_now(False, x)


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
