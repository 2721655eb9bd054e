"""DP-SGD at a site: the reported epsilon is cumulative over rounds and equals Opacus's own
accountant; the epsilon budget stops a site instead of overspending; the model comes back clean."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from shared.training import DPConfig, TrainConfig, train_local
from training_helpers import ArrayDataset, TinyEcgNet

SIGMA, CLIP, DELTA = 1.1, 1.0, 1e-5


def _cfg(**dp_kwargs) -> TrainConfig:
    dp = DPConfig(noise_multiplier=SIGMA, max_grad_norm=CLIP, delta=DELTA, **dp_kwargs)
    return TrainConfig(epochs=2, lr=1e-2, batch_size=8, seed=0, device="cpu", dp=dp)


def _fresh_process_round_trip(state: dict) -> dict:
    """What a Flower ConfigRecord / a new process sees: JSON in, JSON out."""
    return json.loads(json.dumps(state))


def test_epsilon_is_cumulative_and_matches_opacus_accountant():
    data = ArrayDataset(n=40)
    cfg = _cfg()
    batches = math.ceil(len(data) / cfg.batch_size)
    sample_rate = 1 / batches
    state, epsilons = None, []
    for rnd in range(3):
        model = TinyEcgNet()  # a fresh process rebuilds the model every round
        result = train_local(model, data, cfg, dp_state=state)
        assert result.skipped_reason is None
        assert result.steps == cfg.epochs * batches
        state = _fresh_process_round_trip(result.dp_state)
        epsilons.append(result.epsilon)
        assert state["rounds_trained"] == rnd + 1
    total_steps = 3 * cfg.epochs * batches
    assert state["total_steps"] == total_steps

    independent = RDPAccountant()
    independent.history = [(SIGMA, sample_rate, total_steps)]
    expected = independent.get_epsilon(delta=DELTA)
    assert epsilons[-1] == pytest.approx(expected, rel=1e-9)
    assert epsilons[0] < epsilons[1] < epsilons[2]
    # A per-round (non-cumulative) accountant would report the first round's epsilon again.
    one_round = RDPAccountant()
    one_round.history = [(SIGMA, sample_rate, cfg.epochs * batches)]
    assert epsilons[-1] > one_round.get_epsilon(delta=DELTA) * 1.2
    assert result.delta == DELTA


def test_prv_accountant_is_cumulative_too():
    data = ArrayDataset(n=24)
    cfg = _cfg(accountant="prv")
    state = None
    for _ in range(2):
        result = train_local(TinyEcgNet(), data, cfg, dp_state=state)
        state = _fresh_process_round_trip(result.dp_state)
    steps = 2 * cfg.epochs * math.ceil(len(data) / cfg.batch_size)
    independent = PRVAccountant()
    independent.history = [(SIGMA, 1 / math.ceil(len(data) / cfg.batch_size), steps)]
    assert result.epsilon == pytest.approx(independent.get_epsilon(delta=DELTA), rel=1e-6)


def test_budget_stops_the_site_and_says_so():
    data = ArrayDataset(n=24)
    first = train_local(TinyEcgNet(), data, _cfg())
    # Budget between the first round's epsilon and what a second round would reach.
    budget = first.epsilon * 1.05
    model = TinyEcgNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    second = train_local(model, data, _cfg(epsilon_budget=budget), dp_state=first.dp_state)
    assert second.steps == 0
    assert second.skipped_reason and "budget" in second.skipped_reason
    assert second.epsilon == pytest.approx(first.epsilon)
    assert second.dp_state["total_steps"] == first.dp_state["total_steps"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Within budget, the same call trains.
    third = train_local(TinyEcgNet(), data, _cfg(epsilon_budget=100.0), dp_state=first.dp_state)
    assert third.skipped_reason is None and third.epsilon > first.epsilon


def test_dp_training_leaves_a_plain_model_with_changed_weights():
    model = TinyEcgNet()
    before = [p.detach().clone() for p in model.parameters()]
    train_local(model, ArrayDataset(n=16), _cfg())
    assert type(model) is TinyEcgNet
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # and it can go on training without DP in the same process
    train_local(model, ArrayDataset(n=16), TrainConfig(epochs=1, batch_size=8, device="cpu"))


def test_model_with_batchnorm_is_refused_with_a_clear_message():
    model = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 3), torch.nn.BatchNorm1d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    model(torch.zeros(2, 3, 32))
    with pytest.raises(ValueError, match="dp=True"):
        train_local(model, ArrayDataset(n=16), _cfg())


def test_switching_accountant_mid_run_is_an_error():
    first = train_local(TinyEcgNet(), ArrayDataset(n=16), _cfg())
    with pytest.raises(ValueError, match="accountant"):
        train_local(TinyEcgNet(), ArrayDataset(n=16), _cfg(accountant="prv"), dp_state=first.dp_state)


def test_invalid_dp_parameters_are_rejected():
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPConfig(noise_multiplier=0)
    with pytest.raises(ValueError, match="accountant"):
        DPConfig(accountant="gdp-typo")


def test_empty_poisson_batches_are_noise_steps_and_are_counted():
    """Poisson sampling of 2 records at rate 1/2 gives empty batches (p = 1/4 per step): each is
    still a privatised step, counted by the accountant."""
    cfg = TrainConfig(epochs=10, batch_size=1, device="cpu", dp=DPConfig(noise_multiplier=SIGMA, delta=DELTA))
    result = train_local(TinyEcgNet(), ArrayDataset(n=2), cfg)
    assert result.steps == 20 and result.dp_state["total_steps"] == 20
    independent = RDPAccountant()
    independent.history = [(SIGMA, 0.5, 20)]
    assert result.epsilon == pytest.approx(independent.get_epsilon(delta=DELTA))



def test_ledger_plan_is_what_opacus_runs_for_93_units_batch_1():
    """For 93 units in batches of 1 Opacus runs int(1/(1/93)) = 92 steps and accounts q = 1/92:
    the plan the ledger commits must be exactly that (review finding 5)."""
    from shared.training.privacy import sample_rate_and_steps

    cfg = TrainConfig(epochs=1, batch_size=1, device="cpu", dp=DPConfig(noise_multiplier=SIGMA, delta=DELTA))
    result = train_local(TinyEcgNet(), ArrayDataset(n=93), cfg)
    q, steps = sample_rate_and_steps(93, 1, 1)
    assert result.dp_state_history() == [(SIGMA, q, steps)]
    assert steps == 92 and q == 1 / 92


def test_ledger_plan_matches_opacus_loader_for_every_n():
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    from shared.training.privacy import sample_rate_and_steps

    data = TensorDataset(torch.zeros(6000, 1))
    # batch 1: every N up to 400 (93, 99, 105, ... mismatch); batch 64: both sides of 5889-5952
    for batch, ns in ((1, range(1, 400)), (64, (5888, 5889, 5920, 5952, 5953))):
        for n in ns:
            loader = DataLoader(torch.utils.data.Subset(data, range(n)), batch_size=batch)
            dp_loader = DPDataLoader.from_data_loader(loader)
            q, steps = sample_rate_and_steps(n, batch, 3)
            assert (q, steps) == (1 / len(dp_loader), 3 * len(dp_loader)), (n, batch)


# ------------------------------------------------------------------ the site's ledger, policy, unit
from pathlib import Path  # noqa: E402

from shared.privacy import Ledger, LedgerError, PrivacyRefused, SitePolicy  # noqa: E402


@pytest.fixture(scope="module")
def site_cache(tmp_path_factory) -> Path:
    from deploy_harness import make_caches

    return make_caches(tmp_path_factory.getbasetemp() / "deploy-caches", ("ptb", "ptbxl"), records=12)


def _site_cfg(**over):
    from shared.federation.run_config import load_run_config

    return load_run_config({"model": "hierarchical", "preset": "tiny", "device": "cpu", "dp": True,
                            "dp-batch-size": 16, "dp-local-epochs": 1, **over})  # one step per call


def _train_site(cache, state_dir, **over):
    from shared.federation.site_training import new_model, train_site

    cfg = _site_cfg(**over)
    return train_site(cfg, cache, "ptb", 1, new_model(cfg).state_dict(), state_dir=state_dir)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and not p.name.startswith(".")}


def test_default_dp_batch_is_a_third_of_the_sites_units_at_most_512(site_cache, tmp_path):
    from shared.federation.run_config import dp_logical_batch

    assert [dp_logical_batch(0, n) for n in (1637, 320, 2)] == [512, 106, 1]
    assert dp_logical_batch(16, 5) == 16  # a set batch is used as given
    report = _train_site(site_cache["ptb"], tmp_path, **{"dp-batch-size": 0}).dp_report
    n = report["units"]
    assert report["sample-rate"] == pytest.approx(1 / math.ceil(n / max(1, n // 3)))


def test_ledger_continues_across_calls_and_refuses_missing_foreign_or_unreadable(site_cache, tmp_path):
    cache, other = site_cache["ptb"], site_cache["ptbxl"]
    first = _train_site(cache, tmp_path)
    d = first.dp_report["delta"]
    # delta is fixed in the ledger at first use (review finding 3): a smaller one is accounted at it,
    # a larger one refused
    second = _train_site(cache, tmp_path, **{"dp-delta": d / 2})
    assert second.result.epsilon > first.result.epsilon > 0  # a new call (run, node) continues
    ledger = Ledger.open(tmp_path, cache, "ptb", "record", "rdp")
    assert sum(h[2] for h in ledger.history) == first.result.steps + second.result.steps
    assert second.dp_report["delta"] == ledger.delta == d and second.result.delta == d
    assert second.result.epsilon == pytest.approx(_eps(ledger.history, d), rel=1e-9)
    with pytest.raises(PrivacyRefused, match="larger than the delta"):
        _train_site(cache, tmp_path, **{"dp-delta": d * 2})
    saved = _files(tmp_path)
    # a dataset with a ledger is not trained without DP (review finding 4); nor under dp-max-epsilon
    with pytest.raises(PrivacyRefused, match="has a privacy ledger"):
        _train_site(cache, tmp_path, dp=False)
    with pytest.raises(PrivacyRefused, match="dp-max-epsilon = 8 implies dp-required"):
        SitePolicy(max_epsilon=8.0).check_run(dp=False, noise_multiplier=0.0, delta=0.0)
    assert _files(tmp_path) == saved

    # a ledger of another dataset, copied over this one's name
    from shared.privacy import dataset_fingerprint

    assert dataset_fingerprint(other) != dataset_fingerprint(cache)
    foreign = json.loads(saved[ledger.path.name])
    foreign["dataset_fingerprint"] = dataset_fingerprint(other)
    ledger.path.write_text(json.dumps(foreign))
    with pytest.raises(LedgerError, match="another dataset") as info:
        _train_site(cache, tmp_path)
    assert str(ledger.path) in str(info.value)
    # unreadable
    ledger.path.write_text("{not json")
    with pytest.raises(LedgerError, match="unreadable") as info:
        _train_site(cache, tmp_path)
    assert str(ledger.path) in str(info.value)
    # missing, but the index says this dataset was trained on: refuse, do not restart at 0
    ledger.path.unlink()
    with pytest.raises(LedgerError, match="missing") as info:
        _train_site(cache, tmp_path)
    assert str(ledger.path) in str(info.value)
    # nothing already written was lost or changed by the refusals
    ledger.path.write_bytes(saved[ledger.path.name])
    assert _files(tmp_path) == saved
    # another unit on the same dataset is refused, naming both
    with pytest.raises(LedgerError, match="'record'.*'patient'"):
        _train_site(cache, tmp_path, **{"dp-unit": "patient"})


def _eps(history, delta):
    acc = RDPAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta=delta)


def test_bad_dp_input_is_refused_before_anything_is_trained_or_written(site_cache, tmp_path):
    cache = site_cache["ptb"]
    with pytest.raises(ValueError, match="noise_multiplier must be > 0, got 0"):
        DPConfig(noise_multiplier=0)
    with pytest.raises(Exception, match="dp-noise-multiplier = -1"):
        _site_cfg(**{"dp-noise-multiplier": -1.0})
    with pytest.raises(PrivacyRefused, match=r"delta = 0.5 is not below 1/N"):
        _train_site(cache, tmp_path, **{"dp-delta": 0.5})
    assert not tmp_path.exists() or not list(tmp_path.glob("privacy-*"))
    # a state directory that cannot be written
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(LedgerError, match=f"state directory {blocked / 'state'} cannot be written"):
        _train_site(cache, blocked / "state")
    # a spent budget (site policy) is refused, naming the ledger; nothing is spent by the refusal
    from shared.federation.site_training import new_model, train_site

    done = _train_site(cache, tmp_path / "s")
    saved = _files(tmp_path / "s")
    cfg = _site_cfg()
    policy = SitePolicy(max_epsilon=done.result.epsilon * 0.5)
    with pytest.raises(PrivacyRefused, match="already spent") as info:
        train_site(cfg, cache, "ptb", 2, new_model(cfg).state_dict(), state_dir=tmp_path / "s", policy=policy)
    assert "privacy-ledger-" in str(info.value) and "dp-max-epsilon = " in str(info.value)
    assert _files(tmp_path / "s") == saved


def test_a_rebuilt_cache_of_the_same_records_keeps_its_ledger(site_cache, tmp_path):
    """The ledger is keyed to the train split's record and patient ids, not the cache's files
    (review finding 7): a re-prepared cache (other manifest: source path, builder version) keeps
    the budget; another train split is another dataset."""
    import shutil

    from shared.privacy import dataset_fingerprint

    cache = site_cache["ptb"]
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(cache, rebuilt)
    manifest = json.loads((rebuilt / "manifest.json").read_text())
    manifest["source"] = "/elsewhere/ptb"
    manifest["builder_version"] = "999"
    (rebuilt / "manifest.json").write_text(json.dumps(manifest))
    assert dataset_fingerprint(rebuilt) == dataset_fingerprint(cache)
    ledger = Ledger.open(tmp_path / "state", cache, "ptb", "record", "rdp")
    ledger.commit([(1.0, 0.5, 3)], {"round": 1}, delta=1e-3)
    assert Ledger.open(tmp_path / "state", rebuilt, "ptb", "record", "rdp").history == [(1.0, 0.5, 3)]
    rows = (rebuilt / "records.csv").read_text().splitlines()
    i = next(k for k, r in enumerate(rows) if ",train," in r)
    rows[i] = rows[i].replace(",train,", ",val,")  # one record fewer in the train split
    (rebuilt / "records.csv").write_text("\n".join(rows) + "\n")
    assert dataset_fingerprint(rebuilt) != dataset_fingerprint(cache)


def test_secure_mode_that_cannot_start_is_refused_before_the_ledger_is_written(site_cache, tmp_path):
    """torchcsprng is not installed: secure mode must be refused before any spend (review finding 6)."""
    import importlib.util

    from shared.federation.site_training import new_model, train_site

    if importlib.util.find_spec("torchcsprng") is not None:
        pytest.skip("torchcsprng is installed here: secure mode can start")
    cfg = _site_cfg()
    for policy, over in ((SitePolicy(secure_mode=True), {}), (None, {"dp-secure-mode": True})):
        cfg = _site_cfg(**over)
        with pytest.raises(PrivacyRefused, match="secure mode cannot start.*torchcsprng"):
            train_site(cfg, site_cache["ptb"], "ptb", 1, new_model(cfg).state_dict(), state_dir=tmp_path,
                       policy=policy)
    assert not list(tmp_path.glob("privacy-*"))


def test_a_crash_between_ledger_and_index_writes_does_not_strand_the_dataset(site_cache, tmp_path, monkeypatch):
    """The ledger is written before the index (review finding 16): a crash in between leaves a
    ledger that opens normally and is indexed at the next commit."""
    from shared.privacy import ledger as ledger_mod

    cache = site_cache["ptb"]
    real = ledger_mod._atomic_write_json

    def crash_on_index(path, data):
        if path.name == ledger_mod.INDEX_NAME:
            raise OSError("simulated crash")
        real(path, data)

    ledger = Ledger.open(tmp_path, cache, "ptb", "record", "rdp")
    monkeypatch.setattr(ledger_mod, "_atomic_write_json", crash_on_index)
    with pytest.raises(OSError, match="simulated crash"):
        ledger.commit([(1.0, 0.5, 2)], {"round": 1}, delta=1e-3)
    monkeypatch.setattr(ledger_mod, "_atomic_write_json", real)
    assert not (tmp_path / ledger_mod.INDEX_NAME).exists()
    again = Ledger.open(tmp_path, cache, "ptb", "record", "rdp")
    assert again.history == [(1.0, 0.5, 2)] and again.delta == 1e-3
    again.commit([(1.0, 0.5, 4)], {"round": 2}, delta=1e-3)
    index = json.loads((tmp_path / ledger_mod.INDEX_NAME).read_text())
    assert again.fingerprint in index["trained"]


def test_site_policy_parsing_names_the_bad_key():
    from shared.federation.run_config import ConfigError
    from shared.privacy.policy import parse_site_policies

    assert parse_site_policies("mimic: dp-required=true dp-max-epsilon=8; ptb: dp-max-delta=1e-6") == {
        "mimic": {"dp-required": "true", "dp-max-epsilon": "8"}, "ptb": {"dp-max-delta": "1e-6"}}
    with pytest.raises(ConfigError, match="dp-max-epsilonn"):
        parse_site_policies("mimic: dp-max-epsilonn=8")
    with pytest.raises(ConfigError, match="dp-max-delta = 2"):
        SitePolicy.from_mapping({"dp-max-delta": 2.0}, "node config")
    with pytest.raises(ConfigError, match="dp-required = 'yes'"):
        SitePolicy.from_mapping({"dp-required": "yes"}, "node config")


def test_record_unit_is_one_random_window_per_record(site_cache):
    """ptb's synthetic records hold several windows: the record unit has one item per record,
    and each access draws one of that record's windows."""
    import numpy as np

    from shared.data.loader import WindowDataset

    cache = site_cache["ptb"]
    windows = WindowDataset(cache, "train", crop_samples=2500, train=True)
    records = WindowDataset(cache, "train", crop_samples=2500, train=True, unit="record", seed=1)
    n_records = len(np.unique(windows.item_record))
    assert len(records) == n_records < len(windows)
    seen = set()
    for _ in range(30):
        x, y, m = records.get_batch(list(range(len(records))))
        assert x.shape[0] == n_records
        seen.add(x[0].sum().item())
    assert len(seen) > 1  # record 0's window (or crop) varies between accesses
    patients = WindowDataset(cache, "train", crop_samples=2500, train=True, unit="patient")
    assert len(patients) <= n_records
    with pytest.raises(ValueError, match="unit 'record' is for training items"):
        WindowDataset(cache, "test", unit="record")


# --------------------------------------------------------------------------------------------
# Per-sample gradients of Conv1d (shared/training/conv1d_grad_sample.py)


@pytest.mark.parametrize("spec", [
    dict(in_channels=12, out_channels=48, kernel_size=14, stride=3, padding=2, groups=12, bias=False),
    dict(in_channels=8, out_channels=12, kernel_size=3, dilation=2, padding="same", groups=4, bias=True),
    dict(in_channels=6, out_channels=6, kernel_size=5, padding="valid", groups=3, bias=True),
    dict(in_channels=4, out_channels=5, kernel_size=3, padding=1, groups=1, bias=True),
    dict(in_channels=4, out_channels=6, kernel_size=4, stride=2, dilation=3, padding=3, groups=2, bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=4, padding="same", groups=2, bias=True),  # asymmetric pad
])
def test_conv1d_per_sample_gradients_equal_one_backward_per_sample(spec):
    """Each sample's gradient from the Opacus hooks (with the project's Conv1d sampler registered)
    equals the gradient of that sample's own loss, computed alone."""
    from opacus import GradSampleModule

    from shared.training import conv1d_grad_sample  # noqa: F401  (registers the sampler)

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(**spec)
    x = torch.randn(5, spec["in_channels"], 40)
    target = torch.randn_like(conv(x))
    model = GradSampleModule(torch.nn.Sequential(conv), loss_reduction="sum")
    ((model(x) - target) ** 2).sum().backward()  # sum: each sample's grad is its own loss's grad
    per_sample = {name: p.grad_sample.clone() for name, p in conv.named_parameters()}
    model.disable_hooks()
    for i in range(len(x)):
        conv.zero_grad(set_to_none=True)
        ((conv(x[i:i + 1]) - target[i:i + 1]) ** 2).sum().backward()
        for name, p in conv.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-5)


def test_dp_training_uses_the_projects_conv1d_sampler():
    """In a fresh process, DP training registers the project's Conv1d sampler before Opacus runs."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from opacus import GradSampleModule\n"
        "from shared.training import DPConfig, TrainConfig, train_local\n"
        "from training_helpers import ArrayDataset, TinyEcgNet\n"
        "dp = DPConfig(noise_multiplier=1.0, delta=1e-3)\n"
        "train_local(TinyEcgNet(), ArrayDataset(n=16), TrainConfig(epochs=1, batch_size=8, device='cpu', dp=dp))\n"
        "print(GradSampleModule.GRAD_SAMPLERS[torch.nn.Conv1d].__module__)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root,
                         env={**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "shared.training.conv1d_grad_sample"
