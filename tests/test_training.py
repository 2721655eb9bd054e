"""Local training, FedProx, evaluation, device handling and checkpoints of shared.training."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from shared.training import (
    DPConfig,
    TrainConfig,
    autocast_context,
    evaluate_model,
    load_checkpoint,
    load_model,
    load_predictions,
    save_checkpoint,
    save_predictions,
    select_device,
    train_local,
)
from training_helpers import ArrayDataset, TinyEcgNet


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_local_training_learns_and_counts_steps():
    torch.manual_seed(0)
    train, test = ArrayDataset(n=96, seed=0), ArrayDataset(n=64, seed=1)
    model = TinyEcgNet()
    before = evaluate_model(model, test, batch_size=32)
    cfg = TrainConfig(epochs=6, lr=2e-2, batch_size=16, seed=0, device="cpu")
    result = train_local(model, train, cfg)
    after = evaluate_model(model, test, batch_size=32)
    assert result.num_examples == 96
    assert result.steps == 6 * math.ceil(96 / 16)
    assert result.epsilon is None and result.dp_state is None and result.skipped_reason is None
    assert math.isfinite(result.mean_loss)
    assert after.loss < before.loss
    assert after.auroc_per_class[0] > 0.9  # class 0 is a mean shift: easy to learn


@pytest.mark.parametrize("dp", [False, True])
def test_warmup_scales_the_first_steps_of_each_call(dp):
    """AdamW's first step moves each weight by about lr (its bias-corrected ratio is +-1); with
    ``warmup_steps`` W the first step moves it by lr / W, step k by k lr / W until W. Under DP
    (``dp-warmup-steps``) the schedule counts logical steps, so a fresh call per round starts small
    instead of with a full-size step in the direction of the noise."""
    lr = 0.05
    data = ArrayDataset(n=32)
    for warmup, first_step in ((0, lr), (10, lr / 10)):
        torch.manual_seed(0)
        model = TinyEcgNet()
        before = _params(model)
        dp_cfg = DPConfig(noise_multiplier=1.0, delta=1e-3) if dp else None
        # one epoch at batch 32 of 32 items: one optimiser step (DP: Poisson, one step per epoch)
        cfg = TrainConfig(epochs=1, lr=lr, batch_size=32, device="cpu", dp=dp_cfg, warmup_steps=warmup)
        assert train_local(model, data, cfg).steps == 1
        moved = (_params(model) - before).abs().max().item()
        assert moved == pytest.approx(first_step, rel=0.05), (warmup, moved)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(warmup_steps=-1)


def test_same_seed_same_weights():
    data = ArrayDataset(n=32)
    cfg = TrainConfig(epochs=2, batch_size=8, seed=3, device="cpu")
    a, b = TinyEcgNet(), TinyEcgNet()
    b.load_state_dict(a.state_dict())
    train_local(a, data, cfg)
    train_local(b, data, cfg)
    assert torch.equal(_params(a), _params(b))


def test_fedprox_changes_the_update_and_pulls_towards_global():
    data = ArrayDataset(n=32)
    start = TinyEcgNet()
    global_arrays = [v.numpy().copy() for v in start.state_dict().values()]
    w_global = _params(start)

    def run(mu, arrays):
        model = TinyEcgNet()
        model.load_state_dict(start.state_dict())
        cfg = TrainConfig(epochs=3, lr=5e-2, batch_size=8, seed=0, device="cpu", proximal_mu=mu)
        train_local(model, data, cfg, global_arrays=arrays)
        return _params(model)

    plain = run(0.0, None)
    prox = run(5.0, global_arrays)
    assert not torch.allclose(plain, prox)
    assert (prox - w_global).norm() < 0.8 * (plain - w_global).norm()
    # Without global_arrays the reference is the model's weights at the start of the call.
    assert torch.allclose(run(5.0, None), prox)


def test_fedprox_rejects_misaligned_global_arrays():
    model = TinyEcgNet()
    cfg = TrainConfig(epochs=1, batch_size=8, device="cpu", proximal_mu=0.1)
    with pytest.raises(ValueError, match="state_dict order"):
        train_local(model, ArrayDataset(n=8), cfg, global_arrays=[np.zeros(3)])


def test_evaluation_is_record_level_and_nan_safe():
    data = ArrayDataset(n=60, items_per_record=3, seed=4)
    data.mask[:, 1] = 0  # class 1 unknown at this "site"
    model = TinyEcgNet()
    result = evaluate_model(model, data, batch_size=7)
    assert result.probs.shape == (20, 2) and len(result.record_ids) == 20
    assert result.record_ids[0] == "rec000"
    with torch.no_grad():
        item_probs = torch.sigmoid(model(torch.from_numpy(data.x))).numpy()
    expected = item_probs.reshape(20, 3, 2).mean(axis=1)
    np.testing.assert_allclose(result.probs, expected, rtol=1e-5, atol=1e-6)
    assert np.isnan(result.auroc_per_class[1])
    assert result.auroc_per_class[0] == pytest.approx(roc_auc_score(result.targets[:, 0], expected[:, 0]), abs=1e-6)
    assert result.auroc_macro == pytest.approx(result.auroc_per_class[0])


def test_predictions_file_round_trip(tmp_path):
    data = ArrayDataset(n=20)
    result = evaluate_model(TinyEcgNet(), data)
    path = save_predictions(tmp_path / "p" / "a.npz", result, ["NORM", "MI"])
    loaded = load_predictions(path)
    np.testing.assert_array_equal(loaded["probs"], result.probs)
    assert list(loaded["classes"]) == ["NORM", "MI"]
    assert sorted(os.listdir(tmp_path / "p")) == ["a.npz"]


def test_device_selection_and_cpu_autocast_is_a_no_op():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            select_device("cuda")
    x = torch.ones(2, 2)
    with autocast_context(torch.device("cpu"), True):
        assert (x @ x).dtype == torch.float32


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="tpu")
    assert isinstance(TrainConfig(dp={"noise_multiplier": 2.0}).dp, DPConfig)


def _real_model(dp=False):
    from shared.models import build_model

    return build_model("hierarchical", "tiny", n_leads=12, input_samples=1000, n_classes=5, dp=dp)


def test_real_model_trains_with_dp_and_checkpoint_round_trips(tmp_path):
    """The project's DP model form under Opacus, then save -> load_model gives the same outputs."""
    rng = np.random.default_rng(0)

    class Real(torch.utils.data.Dataset):
        x = rng.normal(size=(8, 12, 1000)).astype(np.float32)
        y = (rng.random((8, 5)) < 0.5).astype(np.float32)

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.from_numpy(self.x[i]), torch.from_numpy(self.y[i]), torch.ones(5)

    model = _real_model(dp=True)
    cfg = TrainConfig(epochs=1, batch_size=4, device="cpu", dp=DPConfig(noise_multiplier=1.0))
    result = train_local(model, Real(), cfg)
    assert result.steps == 2 and result.epsilon > 0

    from shared.models import state_to_arrays

    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(path, model_config=model.config, arrays=state_to_arrays(model), round=3,
                    run_config={"num-server-rounds": 3}, data_config={"classes": list("ABCDE")})
    assert sorted(os.listdir(path.parent)) == ["checkpoint.pt"]  # no temporary left behind
    ckpt = load_checkpoint(path)
    assert ckpt["round"] == 3 and ckpt["run_config"] == {"num-server-rounds": 3}

    from shared.training import load_model as one_liner  # the documented one-liner

    loaded = one_liner(path)
    x = torch.from_numpy(Real.x[:3])
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.data_config["classes"] == list("ABCDE") and loaded.checkpoint_round == 3


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = _real_model()
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model_config=model.config, state_dict=model.state_dict(), round=1)

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model_config=model.config, state_dict=model.state_dict(), round=2)
    monkeypatch.undo()
    assert load_checkpoint(path)["round"] == 1  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    assert isinstance(load_model(path), torch.nn.Module)


def test_load_checkpoint_errors_name_the_file(tmp_path):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="exactly one"):
        save_checkpoint(tmp_path / "x.pt", model_config={}, round=0)


def test_predict_record_matches_the_cache_path_on_a_real_record(kit_data, tmp_path):
    """One real PTB record: predict_record (reader -> preprocess -> crops -> z-score) gives the same
    probabilities as the cache + loader path the model was evaluated on."""
    from shared.data.loader import WindowDataset
    from shared.data.prepare import build_reader, prepare_cache
    from shared.models import build_model, state_to_arrays
    from shared.training import data_config_for, predict_record

    cache = tmp_path / "ptb-cache"
    prepare_cache(build_reader("ptb", kit_data / "ptbdb"), cache, progress=False)
    dataset = WindowDataset(cache, "train", crop_samples=1250, train=False)  # 2 crops per window
    torch.manual_seed(0)
    model = build_model("hierarchical", "tiny", n_leads=12, input_samples=1250, n_classes=5).eval()
    with torch.no_grad():
        x, _, _ = dataset.get_batch(list(range(len(dataset))))
        expected = torch.sigmoid(model(x)).mean(dim=0).numpy()
    path = save_checkpoint(tmp_path / "checkpoint.pt", model_config=model.config, arrays=state_to_arrays(model),
                           round=1, data_config=data_config_for(dataset))
    from shared.training import load_model as one_liner

    probs = predict_record(one_liner(path), kit_data / "ptbdb" / "patient001" / "s0010_re", "ptb")
    assert list(probs) == dataset.classes
    np.testing.assert_allclose(list(probs.values()), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="data_config"):
        predict_record(model, kit_data / "ptbdb" / "patient001" / "s0010_re", "ptb")


def test_data_config_without_preprocess_means_the_cache_defaults():
    from shared.data.preprocess import PreprocessConfig
    from shared.training.predict import preprocess_config_of

    assert preprocess_config_of({"fs": 250.0, "window_samples": 2500}) == PreprocessConfig()
    custom = PreprocessConfig(fs=100.0, bandpass=(1.0, 40.0)).as_dict()
    assert preprocess_config_of({"preprocess": custom}) == PreprocessConfig(fs=100.0, bandpass=(1.0, 40.0))


def test_an_empty_split_scores_nan_not_half_and_not_an_error():
    class EmptySplit(torch.utils.data.Dataset):
        n_classes = 2
        item_record: list[int] = []

        def __len__(self) -> int:
            return 0

        def __getitem__(self, i):
            raise IndexError(i)

    result = evaluate_model(TinyEcgNet(), EmptySplit())
    assert result.num_examples == 0 and math.isnan(result.loss) and math.isnan(result.auroc_macro)
    assert result.probs.shape == (0, 2) and np.isnan(result.auroc_per_class).all()
