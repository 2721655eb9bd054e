"""One site's work for one message: build the model, load the global weights, train or evaluate.

Flower-free (plain dicts and torch state dicts in, plain results out); ``client/app.py``
translates Flower messages to and from these calls, and the tests and benchmarks call them too.
"""

from __future__ import annotations

import secrets
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from shared.federation.run_config import dp_config_dict, dp_epochs, dp_logical_batch, input_samples
from shared.data.loader import WindowDataset
from shared.models import build_model
from shared.privacy.ledger import Ledger, check_writable, locked
from shared.privacy.policy import PrivacyRefused, SitePolicy
from shared.training import DPConfig, EvalResult, TrainConfig, TrainResult, evaluate_model, train_local
from shared.training.local import check_delta, check_private_trainable
from shared.training.privacy import append_steps, epsilon_of, sample_rate_and_steps, state_from_history

# What the model sees: the label space's classes and the standard 12 leads. A cache built with
# other leads or classes gives a shape error at the first weight load, naming the tensor.
N_LEADS = 12
N_CLASSES = 5


def site_seed(cfg: DictConfig, site: str, server_round: int) -> int:
    """A seed that differs per site and round and is the same on every rerun (resume included)."""
    return (int(cfg.seed) * 1_000_003 + zlib.crc32(site.encode()) + 7919 * int(server_round)) % (2**31)


def new_model(cfg: DictConfig) -> nn.Module:
    """The global model's architecture (the Opacus-compatible form when DP is on)."""
    return build_model(cfg.model, cfg.preset, n_leads=N_LEADS, input_samples=input_samples(cfg),
                       n_classes=N_CLASSES, dp=bool(cfg.dp))


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor],
               site_local: Mapping[str, torch.Tensor] | None = None) -> None:
    """Global weights, then this site's own values of its site-local parameters (if kept)."""
    merged = dict(state)
    if site_local:
        merged.update(site_local)
    model.load_state_dict(merged, strict=True)


def site_local_state(model: nn.Module) -> dict[str, torch.Tensor]:
    names = set(getattr(model, "site_local_parameter_names", lambda: [])())
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


@dataclass
class SiteTrainOutcome:
    state: dict[str, torch.Tensor]
    result: TrainResult
    site_local: dict[str, torch.Tensor]
    dp_report: dict[str, Any] | None = None  # unit, units, sample rate, steps, noise, clip, delta, epsilon


def train_site(cfg: DictConfig, cache: Path, site: str, server_round: int,
               global_state: Mapping[str, torch.Tensor], *, dp_state: dict[str, Any] | None = None,
               site_local: Mapping[str, torch.Tensor] | None = None,
               proximal_mu: float = 0.0, state_dir: Path | None = None,
               policy: SitePolicy | None = None) -> SiteTrainOutcome:
    """Local epochs on the site's train split, starting from the global weights.

    Under DP (see docs/privacy.md): the items are privacy units (``dp-unit``), the site's
    ``policy`` is checked, and with a ``state_dir`` the site's ledger there is the accountant
    history (``dp_state`` is then ignored) and this round's spend is written to it before
    training. Raises :class:`PrivacyRefused` naming the value when the site must not train;
    nothing is trained or written then.
    """
    policy = policy or SitePolicy()
    if not cfg.dp:
        policy.check_run(dp=False, noise_multiplier=0.0, delta=0.0)
        if state_dir is not None and Ledger.trained_with_dp(Path(state_dir), cache):
            raise PrivacyRefused("this dataset has a privacy ledger at this site (it was trained with DP): a run "
                                 "without DP would release an unnoised update of it; refusing dp = false")
        return _train(cfg, cache, site_seed(cfg, site, server_round), global_state, site_local, proximal_mu,
                      unit="window", dp=None, dp_state=None, epochs=int(cfg.local_epochs), lr=float(cfg.lr),
                      batch_size=int(cfg.batch_size))
    # DP: crops, sampling and noise from the site's secret (never the coordinator's seed).
    unit = str(cfg.dp_unit)
    dataset = _train_dataset(cfg, cache, secrets.randbits(31), unit)
    n_units = len(dataset)
    dp = DPConfig(**dp_config_dict(cfg, n_units))
    if policy.secure_mode and not dp.secure_mode:
        dp = DPConfig(**{**dp.__dict__, "secure_mode": True})
    try:
        check_delta(dp.delta, n_units)
    except ValueError as exc:
        raise PrivacyRefused(str(exc)) from None
    policy.check_run(dp=True, noise_multiplier=dp.noise_multiplier, delta=dp.delta, unit=unit)
    epochs = dp_epochs(cfg)
    batch_size = dp_logical_batch(int(cfg.dp_batch_size), n_units)
    sample_rate, steps = sample_rate_and_steps(n_units, batch_size, epochs)
    if state_dir is None:  # no ledger (benchmarks, unit tests): the caller keeps dp_state
        outcome = _train(cfg, cache, 0, global_state, site_local, proximal_mu, unit=unit, dp=dp, dp_state=dp_state,
                         epochs=epochs, lr=float(cfg.dp_lr), batch_size=batch_size, dataset=dataset)
        return _with_report(outcome, unit, n_units, sample_rate, dp)
    state_dir = Path(state_dir)
    check_writable(state_dir)
    # Everything that can fail before training (the model, the global weights, the Opacus engine,
    # secure mode) is checked before the spend is committed: a run that cannot start spends nothing.
    model = new_model(cfg)
    load_state(model, global_state, site_local)
    with locked(state_dir):
        ledger = Ledger.open(state_dir, cache, site, unit, dp.accountant)
        dp = _at_ledger_delta(dp, ledger, policy, n_units)
        try:
            check_private_trainable(model, dp)
        except ValueError as exc:
            raise PrivacyRefused(str(exc)) from None
        history = ledger.history
        spent = epsilon_of(dp.accountant, history, dp.delta)
        planned = append_steps(history, dp.noise_multiplier, sample_rate, steps)
        after = epsilon_of(dp.accountant, planned, dp.delta)
        policy.check_spend(spent=spent, after=after, ledger=str(ledger.path))
        rounds_before = len(ledger.data.get("rounds", []))
        over_run_budget = dp.epsilon_budget is not None and after > dp.epsilon_budget
        if not over_run_budget:  # the spend is on disk before anything can leave the site
            ledger.commit(planned, {"round": int(server_round), "noise_multiplier": dp.noise_multiplier,
                                    "sample_rate": sample_rate, "steps": steps, "max_grad_norm": dp.max_grad_norm,
                                    "delta": dp.delta, "units": n_units, "epsilon_after": after},
                          delta=dp.delta)
    outcome = _train(cfg, cache, 0, global_state, site_local, proximal_mu, unit=unit, dp=dp,
                     dp_state=state_from_history(dp, history, rounds_before), epochs=epochs, lr=float(cfg.dp_lr),
                     batch_size=batch_size, dataset=dataset, model=model)
    if outcome.result.skipped_reason is None and [tuple(h) for h in outcome.result.dp_state_history()] != planned:
        raise RuntimeError(f"site {site}: Opacus counted other steps than the ledger recorded "
                           f"({outcome.result.dp_state_history()} vs {planned}); ledger {ledger.path}")
    return _with_report(outcome, unit, n_units, sample_rate, dp)


def _at_ledger_delta(dp: DPConfig, ledger: Ledger, policy: SitePolicy, n_units: int) -> DPConfig:
    """``dp`` at the ledger's delta: fixed at the dataset's first spend (the site's ``dp-max-delta``
    if set, else ``1/(10 N)``), so the coordinator cannot stretch the lifetime epsilon by raising
    delta from run to run. A run asking a larger delta is refused; a smaller one is accounted (and
    reported) at the ledger's delta."""
    ledger_delta = ledger.delta
    if ledger_delta is None:
        ledger_delta = policy.max_delta if policy.max_delta is not None else 1.0 / (10.0 * n_units)
    try:
        check_delta(ledger_delta, n_units)
    except ValueError as exc:
        raise PrivacyRefused(f"the site's ledger delta: {exc}") from None
    if dp.delta > ledger_delta:
        raise PrivacyRefused(f"this run asks for delta {dp.delta:g}, larger than the delta {ledger_delta:g} this "
                             "dataset's privacy ledger is accounted at (fixed at its first DP round)")
    return DPConfig(**{**dp.__dict__, "delta": ledger_delta})


def _with_report(outcome: SiteTrainOutcome, unit: str, n_units: int, sample_rate: float,
                 dp: DPConfig) -> SiteTrainOutcome:
    r = outcome.result
    outcome.dp_report = {"unit": unit, "units": n_units, "sample-rate": sample_rate, "steps": int(r.steps),
                         "noise-multiplier": dp.noise_multiplier, "max-grad-norm": dp.max_grad_norm,
                         "delta": dp.delta, "epsilon": float(r.epsilon if r.epsilon is not None else 0.0)}
    return outcome


def _train_dataset(cfg: DictConfig, cache: Path, seed: int, unit: str) -> WindowDataset:
    return WindowDataset(cache, "train", crop_samples=input_samples(cfg), train=True, seed=seed, unit=unit)


def _train(cfg, cache, seed, global_state, site_local, proximal_mu, *, unit, dp, dp_state, epochs, lr,
           batch_size, dataset=None, model=None) -> SiteTrainOutcome:
    if model is None:
        model = new_model(cfg)
        load_state(model, global_state, site_local)
    dataset = dataset if dataset is not None else _train_dataset(cfg, cache, seed, unit)
    train_cfg = TrainConfig(
        epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=float(cfg.weight_decay),
        proximal_mu=float(proximal_mu), seed=seed, device=str(cfg.device), dp=dp,
        max_physical_batch=int(cfg.dp_max_physical_batch), warmup_steps=int(cfg.dp_warmup_steps) if dp else 0,
    )
    result = train_local(model, dataset, train_cfg, global_arrays=None, dp_state=dp_state)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return SiteTrainOutcome(state=state, result=result, site_local=site_local_state(model))


def evaluate_site(cfg: DictConfig, cache: Path, global_state: Mapping[str, torch.Tensor],
                  site_local: Mapping[str, torch.Tensor] | None = None, *, split: str = "val") -> EvalResult:
    """The global model (with the site's local parameters, if any) on the site's ``split``.

    ``val`` by default: the per-round numbers (federated evaluation at the sites, the server's
    pooled curve) and any choice made from them use the validation split; the test split is
    scored once per final model (``simulations.compare``)."""
    from shared.training import select_device

    model = new_model(cfg)
    load_state(model, global_state, site_local)
    device = select_device(str(cfg.device))
    model.to(device)
    dataset = WindowDataset(cache, split, crop_samples=input_samples(cfg), train=False)
    return evaluate_model(model, dataset, device=device, batch_size=max(int(cfg.batch_size), 64),
                          bf16=device.type == "cuda")
