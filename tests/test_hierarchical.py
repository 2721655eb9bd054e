"""Hierarchical Transformer: architecture of the paper, sizes of the released code, DP form."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from shared.models import build_model
from shared.models.hierarchical import conv_output_lengths, min_input_samples

RELEASED_GATED = 18_626_254  # xiaoyatang/3stageFormer, gated head, differential attention
RELEASED_NOT_GATED = 18_517_693


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models run fastest on one thread (and a shared CI core does not oversubscribe)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(n_leads=12, samples=2500, classes=5, **kw):
    return build_model("hierarchical", "tiny", n_leads=n_leads, input_samples=samples, n_classes=classes, **kw)


def paper(**kw):
    return build_model("hierarchical", "paper", n_leads=12, input_samples=7500, n_classes=27, **kw)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_conv_stack_lengths_match_the_paper_table():
    assert conv_output_lengths(7500) == [2497, 828, 410, 201, 192, 183]
    m = paper()
    assert m.stage_tokens == [411, 202, 184]  # + CLS; the released gated head hard-codes 184
    assert [c.out_channels for c in m.encoder.convs] == [132, 264, 288, 288, 288, 288]
    assert all(c.groups == 12 and c.bias is None for c in m.encoder.convs)


@pytest.mark.parametrize("n_leads", [12, 15])
@pytest.mark.parametrize("gated", [True, False])
def test_output_shapes_at_12_and_15_leads(n_leads, gated):
    m = tiny(n_leads=n_leads, gated=gated).eval()
    x = torch.randn(3, n_leads, 2500)
    assert m(x).shape == (3, 5)
    assert m.d_model == n_leads * 6
    out = m.explain(x)
    assert out["lead_importance"].shape == (3, 5, n_leads)
    assert torch.allclose(out["lead_importance"].sum(-1), torch.ones(3, 5), atol=1e-4)
    assert out["method"] == ("gated_attention" if gated else "input_x_gradient")


def test_paper_15_lead_model_scales_channels_per_lead():
    m = build_model("hierarchical", "paper", n_leads=15, input_samples=7500, n_classes=2)
    assert m.d_model == 360 and [c.out_channels for c in m.encoder.convs][:2] == [165, 330]


def test_paper_parameter_counts_match_the_released_code():
    """Differences from the released counts, derived from the architecture (docs/models.md):

    - no age/sex/20-feature input: the gated head has no ``wide_project`` (1->92->184: 17,296),
      the non-gated head's fc2 has no 22 extra input columns (22 x 27 = 594);
    - conv 6's BatchNorm, whose output the released code never reads, is left out (2 x 288 = 576);
    - standard attention has biases and uses nn.MultiheadAttention's layout: +1,044 per layer
      over the bias-free differential attention (332,928 vs 331,884), x 12 layers = 12,528.
    """
    counts = {
        ("differential", True): n_params(paper(attention="differential", gated=True)),
        ("differential", False): n_params(paper(attention="differential", gated=False)),
        ("standard", True): n_params(paper(gated=True)),
        ("standard", False): n_params(paper(gated=False)),
    }
    assert counts[("differential", True)] == RELEASED_GATED - 17_296 - 576
    assert counts[("differential", False)] == RELEASED_NOT_GATED - 594 - 576
    assert counts[("standard", True)] == RELEASED_GATED - 17_296 - 576 + 12_528
    assert counts[("standard", False)] == RELEASED_NOT_GATED - 594 - 576 + 12_528
    for (attention, gated), n in counts.items():
        ref = RELEASED_GATED if gated else RELEASED_NOT_GATED
        assert abs(n - ref) / ref < 0.03, (attention, gated, n)


def test_tiny_preset_is_small():
    assert 50_000 <= n_params(tiny()) <= 300_000


@pytest.mark.parametrize("attention,gated,norm", [("standard", True, "batch"), ("differential", False, "group")])
def test_gradients_reach_every_trainable_parameter(attention, gated, norm):
    torch.manual_seed(0)
    m = tiny(attention=attention, gated=gated, norm=norm).train()
    x = torch.randn(4, 12, 2500)
    m(x).square().sum().backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []


def test_same_seed_gives_the_same_model_and_the_same_training_forward():
    x = torch.randn(2, 12, 2500)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        m = tiny(attention="differential").train()
        outs.append(m(x))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(124)
    assert not torch.equal(tiny(attention="differential").train()(x), outs[0])


def test_tiny_overfits_a_small_fixed_batch():
    # GroupNorm and no dropout: eval-mode loss then measures the fit itself, not how far
    # BatchNorm's running statistics have caught up after 20 steps.
    torch.manual_seed(0)
    m = tiny(norm="group", dropout=0.0, gate_dropout=0.0)
    x, y = torch.randn(16, 12, 2500), (torch.rand(16, 5) > 0.5).float()
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    m.eval()
    with torch.no_grad():
        first = loss_fn(m(x), y).item()
    m.train()
    for _ in range(20):
        opt.zero_grad()
        loss_fn(m(x), y).backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        last = loss_fn(m(x), y).item()
    assert last < 0.1 * first, (first, last)


def test_lead_attention_sums_each_leads_channel_rows():
    torch.manual_seed(0)
    m = tiny().eval()
    x = torch.randn(2, 12, 2500)
    _, rows = m.forward_with_attention(x)
    assert rows.shape == (2, 5, 72)
    leads = m.lead_attention(x)
    torch.testing.assert_close(leads[:, :, 3], rows[:, :, 18:24].sum(-1))
    with pytest.raises(ValueError, match="gated head"):
        tiny(gated=False).lead_attention(x)


@pytest.mark.parametrize("gated", [True, False])
def test_explain_runs_in_eval_mode_and_restores_the_mode(gated):
    """A model in training mode: explain neither updates BatchNorm statistics nor draws dropout,
    gives the eval-mode logits, and leaves the model in training mode."""
    torch.manual_seed(0)
    m = tiny(gated=gated).train()
    x = torch.randn(2, 12, 2500)
    m(x)  # BatchNorm statistics away from their initial values
    stats = {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}
    first, second = m.explain(x), m.explain(x)
    assert m.training
    assert all(torch.equal(m.state_dict()[k], v) for k, v in stats.items())
    torch.testing.assert_close(first["lead_importance"], second["lead_importance"])
    with torch.no_grad():
        torch.testing.assert_close(first["logits"], m.eval()(x))


def test_site_local_names_are_the_conv_norm_state_entries():
    m = tiny()
    names = m.site_local_parameter_names()
    assert set(names) <= set(m.state_dict())
    assert "encoder.norms.0.running_mean" in names and "encoder.norms.4.weight" in names
    assert not any("stages" in n or "head" in n for n in names)
    g = tiny(dp=True)
    assert set(g.site_local_parameter_names()) == {f"encoder.norms.{i}.{k}" for i in range(5) for k in ("weight", "bias")}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"samples": 900}, f"at least {min_input_samples()} samples"),
        ({"n_heads": 5}, "change n_heads"),
        ({"attention": "differential", "n_heads": 8, "n_leads": 15}, r"2 x n_heads"),
        ({"dp": True, "norm": "batch"}, "norm='group'"),
        ({"conv_channels_per_lead": [4, 6, 6, 8, 6, 6]}, r"conv_channels_per_lead\[2:\] must be equal"),
        ({"layers_per_stage": [1, 1]}, "layers_per_stage"),
        ({"attention": "linear"}, "attention must be"),
        ({"not_a_key": 1}, "unknown override"),
    ],
)
def test_impossible_configurations_are_rejected_naming_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


@pytest.mark.parametrize("attention", ["standard", "differential"])
def test_dp_form_validates_and_trains_one_opacus_step(attention):
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    torch.manual_seed(0)
    m = tiny(samples=2500, dp=True, attention=attention)
    assert ModuleValidator.validate(m, strict=False) == []
    assert ModuleValidator.validate(tiny(), strict=False) != []  # BatchNorm form is rejected
    data = torch.utils.data.TensorDataset(torch.randn(8, 12, 2500), (torch.rand(8, 5) > 0.5).float())
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = [p.detach().clone() for p in m.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm, opt, loader = PrivacyEngine().make_private(
            module=m, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False,
        )
        xb, yb = next(iter(loader))
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(gm(xb), yb).backward()
        assert all(p.grad_sample is not None and p.grad_sample.shape[0] == 8 for p in m.parameters())
        opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_config_is_json_and_names_the_resolved_hyper_parameters():
    m = tiny(dp=True, attention="differential")
    cfg = json.loads(json.dumps(m.config))
    assert cfg["name"] == "hierarchical" and cfg["dp"] is True and cfg["overrides"] == {"attention": "differential"}
    assert cfg["hparams"]["norm"] == "group" and cfg["fs"] == 250
