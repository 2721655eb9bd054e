"""DP-SGD at a site: the reported epsilon is cumulative over rounds and equals Opacus's own
accountant; the epsilon budget stops a site instead of overspending; the model comes back clean."""

from __future__ import annotations

import json
import math

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
