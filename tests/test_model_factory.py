"""Factory, presets, weights <-> arrays, checkpoints and the ``python -m shared.models`` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from shared.models import (
    MODEL_REGISTRY,
    PRESETS,
    arrays_to_state,
    build_model,
    list_models,
    load_checkpoint,
    rebuild_model,
    save_checkpoint,
    state_keys,
    state_to_arrays,
)
from shared.models.__main__ import main as cli_main
from shared.models.registry import ModelEntry


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**kw):
    return build_model("hierarchical", "tiny", n_leads=12, input_samples=2500, n_classes=5, **kw)


def test_presets_say_which_data_they_are_for():
    assert "hierarchical" in list_models()
    for name, presets in PRESETS.items():
        assert {"paper", "base", "tiny"} <= set(presets), name
        for preset in presets.values():
            assert {"fs", "seconds", "n_leads", "n_classes"} <= set(preset)
    hier = PRESETS["hierarchical"]
    assert (hier["paper"]["fs"], hier["paper"]["seconds"], hier["paper"]["n_classes"]) == (500, 15, 27)
    assert all(hier[p]["fs"] * hier[p]["seconds"] == 2500 for p in ("tiny", "base"))


def test_unknown_model_and_preset_name_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        build_model("resnet", "tiny", n_leads=12, input_samples=2500, n_classes=5)
    with pytest.raises(ValueError, match=r"choose one of \['base', 'paper', 'tiny'\]"):
        build_model("hierarchical", "huge", n_leads=12, input_samples=2500, n_classes=5)
    with pytest.raises(ValueError, match="pass n_leads, input_samples"):
        build_model("hierarchical", "tiny", n_leads=12, input_samples=2500, n_classes=5, seconds=10)


def test_state_round_trips_through_numpy_arrays_exactly():
    torch.manual_seed(0)
    src = tiny().train()
    src(torch.randn(4, 12, 2500))  # move BatchNorm running statistics away from their init
    arrays = state_to_arrays(src)
    assert len(arrays) == len(src.state_dict()) and all(isinstance(a, np.ndarray) for a in arrays)
    keys = state_keys(src)
    nbt = arrays[keys.index("encoder.norms.0.num_batches_tracked")]
    assert nbt.dtype == np.int64 and nbt.shape == () and nbt == 1
    torch.manual_seed(1)
    dst = rebuild_model(json.loads(json.dumps(src.config)))
    arrays_to_state(dst, arrays)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    x = torch.randn(2, 12, 2500)
    assert torch.equal(src.eval()(x), dst.eval()(x))


def test_arrays_of_another_architecture_are_refused_with_the_key():
    arrays = state_to_arrays(tiny())
    with pytest.raises(ValueError, match="arrays for a model"):
        arrays_to_state(tiny(), arrays[:-1])
    other = tiny(conv_channels_per_lead=[4, 6, 8, 8, 8, 8], n_heads=4)
    with pytest.raises(ValueError, match="encoder.convs.2.weight"):
        arrays_to_state(other, arrays)


def test_opacus_wrapped_model_exchanges_the_same_arrays():
    from opacus import GradSampleModule

    m = tiny(dp=True)
    wrapped = GradSampleModule(m)
    assert state_keys(wrapped) == state_keys(m)
    arrays_to_state(wrapped, state_to_arrays(m))


def test_checkpoint_rebuilds_the_same_model(tmp_path):
    torch.manual_seed(0)
    m = tiny(attention="differential", fs=500).eval()
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(path, m, {"classes": ["NORM", "MI", "STTC", "CD", "HYP"]})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary file left
    loaded, extra = load_checkpoint(path)
    x = torch.randn(2, 12, 2500)
    assert torch.equal(loaded.eval()(x), m(x)) and extra["classes"][1] == "MI"
    assert loaded.config["overrides"] == {"attention": "differential"} and loaded.config["fs"] == 500


def test_a_model_added_to_the_registry_is_built_by_the_factory(monkeypatch):
    def build(preset, *, n_leads, input_samples, n_classes, dp, width=4):
        model = nn.Sequential(nn.Flatten(), nn.Linear(n_leads * input_samples, n_classes))
        model.site_local_parameter_names = lambda: []
        return model

    presets = {"tiny": {"fs": 100, "seconds": 1, "n_leads": 12, "n_classes": 2, "width": 4}}
    monkeypatch.setitem(MODEL_REGISTRY, "toy", ModelEntry(build, presets))
    m = build_model("toy", "tiny", n_leads=12, input_samples=100, n_classes=3, width=8)
    assert m(torch.zeros(2, 12, 100)).shape == (2, 3)
    assert m.config["overrides"] == {"width": 8} and "toy" in list_models()


def test_summary_cli_prints_json(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "shared.models", "summary", "--model", "hierarchical", "--preset", "tiny", "--leads", "15",
         "--classes", "3"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    m = build_model("hierarchical", "tiny", n_leads=15, input_samples=2500, n_classes=3)
    assert out["params"] == out["trainable_params"] == sum(p.numel() for p in m.parameters())
    assert out["input_shape"] == ["batch", 15, 2500] and out["output_shape"] == ["batch", 3]
    assert out["macs_per_sample"] == out["flops_per_sample"] // 2 and out["flops_per_sample"] > 1e7
    assert out["config"]["n_leads"] == 15


def test_summary_flops_count_attention_with_the_fused_kernel_in_use():
    """The FLOP count includes attention (fused SDPA alone would count 0 for it)."""
    from shared.models.__main__ import count_forward_flops

    m = tiny()
    x = torch.randn(1, 12, 2500)
    total = count_forward_flops(m, x)
    d, tokens = m.d_model, m.stage_tokens
    attention_maps = sum(4 * t * t * d for t in tokens)  # QK^T and AV, one layer per stage in tiny
    m_no_attn = tiny()
    m_no_attn.eval()
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fused:
        m_no_attn(x)
    assert total - fused.get_total_flops() == attention_maps


def test_cli_rejects_bad_input_with_one_line(capsys):
    assert cli_main(["summary", "--model", "hierarchical", "--preset", "tiny", "--seconds", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "too short" in err and "seconds" in err


def test_explain_cli_renders_a_png_for_a_real_record(kit_data, tmp_path, capsys):
    out = tmp_path / "fig.png"
    rc = cli_main(["explain", "--model", "hierarchical", "--preset", "tiny", "--record",
                   str(kit_data / "cinc" / "georgia" / "E07500"), "--site", "cinc", "--out", str(out)])
    assert rc == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads(capsys.readouterr().out)
    assert info["trained"] is False and info["method"] == "gated_attention" and len(info["lead_importance"]) == 12
    assert abs(sum(info["lead_importance"].values()) - 1) < 1e-2


def test_explain_with_a_checkpoint_uses_its_class_names(kit_data, tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, tiny(), {"classes": ["NORM", "MI", "STTC", "CD", "HYP"]})
    out = tmp_path / "fig.png"
    rc = cli_main(["explain", "--model", "hierarchical", "--preset", "tiny", "--checkpoint", str(ckpt), "--class-index", "1",
                   "--record", str(kit_data / "cinc" / "cpsc_2018" / "A0001"), "--site", "cinc",
                   "--out", str(out)])
    assert rc == 0 and out.is_file()
    info = json.loads(capsys.readouterr().out)
    assert info["trained"] is True and info["class"] == "MI"
    assert cli_main(["explain", "--model", "hierarchical", "--preset", "tiny", "--record", str(tmp_path / "nope"),
                     "--site", "cinc", "--out", str(out)]) == 2


def test_explain_draws_cardioformer_router_attention_with_a_federation_checkpoints_class_names(kit_data, tmp_path, capsys):
    """A checkpoint written by the federation (``shared.training.save_checkpoint``) names its
    classes in ``data_config``; explain uses them, and for Cardioformer adds the router
    (granularity) attention to the figure."""
    from shared.training.checkpoint import save_checkpoint as save_federation_checkpoint

    torch.manual_seed(0)
    model = build_model("cardioformer", "tiny", n_leads=12, input_samples=250, n_classes=5)
    classes = ["NORM", "MI", "STTC", "CD", "HYP"]
    ckpt = save_federation_checkpoint(tmp_path / "checkpoint.pt", model_config=model.config, arrays=state_to_arrays(model),
                                      round=1, data_config={"classes": classes, "fs": 250.0})
    out = tmp_path / "fig.png"
    rc = cli_main(["explain", "--model", "cardioformer", "--preset", "tiny", "--checkpoint", str(ckpt),
                   "--record", str(kit_data / "cinc" / "cpsc_2018" / "A0001"), "--site", "cinc", "--out", str(out)])
    assert rc == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "router_attention" and info["predicted"] in classes
    assert list(info["granularity_importance"]) == ["g0 p4", "g1 p8", "g2 p16", "g3 p32"]
    assert abs(sum(info["granularity_importance"].values()) - 1) < 1e-3
