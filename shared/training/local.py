"""Local training at one site: ``cfg.epochs`` epochs of AdamW, optionally FedProx and Opacus DP.

The same function serves a federated round (called by the ClientApp), the local-only baseline and
the pooled baseline (called by ``simulations/compare.py``).
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .config import TrainConfig
from .device import autocast_context, select_device
from .losses import masked_bce_with_logits
from .privacy import (
    append_steps,
    check_state_matches,
    epsilon_of,
    history_from_state,
    sample_rate_and_steps,
    state_from_history,
)


@dataclass
class TrainResult:
    num_examples: int
    steps: int
    mean_loss: float
    epsilon: float | None = None
    delta: float | None = None
    dp_state: dict[str, Any] | None = None
    skipped_reason: str | None = None

    def dp_state_history(self) -> list[tuple[float, float, int]]:
        """The accountant history after this call (empty without DP)."""
        return history_from_state(self.dp_state)


def train_local(
    model: nn.Module,
    train_dataset: Dataset,
    cfg: TrainConfig,
    *,
    global_arrays: Sequence[np.ndarray] | Mapping[str, Any] | None = None,
    dp_state: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``train_dataset``; see docs/architecture.md ("Training")."""
    n = len(train_dataset)
    if n == 0:
        raise ValueError("train_local got an empty training dataset")
    device = select_device(cfg.device)
    if cfg.dp is not None:
        check_delta(cfg.dp.delta, n)
    # Under DP every random draw (Poisson sampling, noise, dropout) comes from the site's own
    # secret, never from the public seed the coordinator chose: with that seed the coordinator
    # could regenerate the noise. Without DP the public seed keeps runs reproducible.
    seed = secrets.randbits(63) if cfg.dp is not None else cfg.seed
    torch.manual_seed(seed)
    model.to(device)
    model.train()

    reference = _proximal_reference(model, global_arrays, device) if cfg.proximal_mu > 0 else None
    generator = torch.Generator().manual_seed(secrets.randbits(63) if cfg.dp is not None else cfg.seed)
    loader = DataLoader(
        train_dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=cfg.num_workers,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(int(cfg.warmup_steps), 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))

    if cfg.dp is None:
        steps, mean_loss = _run_epochs(model, loader, optimizer, schedule, cfg, device, reference, dp=False)
        return TrainResult(num_examples=n, steps=steps, mean_loss=mean_loss)
    return _train_private(model, loader, optimizer, schedule, cfg, device, reference, dp_state, n)


def check_delta(delta: float, n_units: int) -> None:
    """Delta must be below 1/N (N privacy units): a larger delta allows releasing one unit outright."""
    if not delta < 1.0 / n_units:
        raise ValueError(f"DP delta = {delta:g} is not below 1/N = 1/{n_units} = {1.0 / n_units:.3g} "
                         f"(N = {n_units} privacy units at this site); choose delta <= 1/(10 N)")


def check_private_trainable(model: nn.Module, dp) -> None:
    """Raise ``ValueError`` when Opacus cannot train ``model`` under ``dp``: the model does not
    validate, or the ``PrivacyEngine`` cannot be built (``secure_mode`` needs ``torchcsprng``).
    Called before a site commits its spend, so a run that cannot start spends nothing."""
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        listed = "; ".join(str(e) for e in errors[:5])
        raise ValueError(
            f"model is not compatible with Opacus DP ({len(errors)} problem(s): {listed}); "
            "build it with dp=True"
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            PrivacyEngine(accountant=dp.accountant, secure_mode=dp.secure_mode)
    except ImportError as exc:
        raise ValueError(f"DP secure mode cannot start: {exc} (Opacus secure_mode needs the torchcsprng "
                         "package, which is not installed here)") from None


def _train_private(model, loader, optimizer, schedule, cfg, device, reference, dp_state, n) -> TrainResult:
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    from . import conv1d_grad_sample  # noqa: F401  (registers the Conv1d per-sample gradient)

    dp = cfg.dp
    check_private_trainable(model, dp)
    check_state_matches(dp, dp_state)
    history = history_from_state(dp_state)
    rounds_before = int(dp_state.get("rounds_trained", 0)) if dp_state else 0

    # Poisson sampling, planned exactly as Opacus runs and accounts it (see sample_rate_and_steps).
    sample_rate, planned_steps = sample_rate_and_steps(n, cfg.batch_size, cfg.epochs)
    if dp.epsilon_budget is not None:
        would_be = epsilon_of(
            dp.accountant,
            append_steps(history, dp.noise_multiplier, sample_rate, planned_steps),
            dp.delta,
        )
        if would_be > dp.epsilon_budget:
            spent = epsilon_of(dp.accountant, history, dp.delta)
            state = state_from_history(dp, history, rounds_before)
            return TrainResult(
                num_examples=n,
                steps=0,
                mean_loss=float("nan"),
                epsilon=spent,
                delta=dp.delta,
                dp_state=state,
                skipped_reason=(
                    f"epsilon budget {dp.epsilon_budget:g} would be exceeded: this round's "
                    f"{planned_steps} steps would bring epsilon from {spent:.3f} to {would_be:.3f} "
                    f"(delta {dp.delta:g}); not training"
                ),
            )

    with warnings.catch_warnings():
        # Opacus warns when secure_mode is off; the generators below are seeded from the site's secret.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=dp.accountant, secure_mode=dp.secure_mode)
    engine.accountant.history = list(history)
    noise_generator = None
    if not dp.secure_mode:  # secure_mode: Opacus's CSPRNG for both noise and sampling
        noise_generator = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
        noise_generator=noise_generator,
    )
    try:
        with warnings.catch_warnings():
            # Opacus's hooks on the first layer fire although the input needs no gradient: harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            # The logical (Poisson) batch is cfg.batch_size in expectation; memory holds at most
            # cfg.max_physical_batch items at a time (Opacus BatchMemoryManager).
            with BatchMemoryManager(data_loader=private_loader, max_physical_batch_size=cfg.max_physical_batch,
                                    optimizer=private_optimizer) as memory_loader:
                _, mean_loss = _run_epochs(
                    private_model, memory_loader, private_optimizer, schedule, cfg, device, reference, dp=True
                )
    finally:
        private_model.to_standard_module()  # removes Opacus hooks; ``model`` keeps the weights
    history = [tuple(h) for h in engine.accountant.history]
    steps = sum(h[2] for h in history) - sum(h[2] for h in history_from_state(dp_state))
    state = state_from_history(dp, history, rounds_before + 1)
    return TrainResult(
        num_examples=n,
        steps=int(steps),
        mean_loss=mean_loss,
        epsilon=state["epsilon"],
        delta=dp.delta,
        dp_state=state,
    )


def _run_epochs(model, loader, optimizer, schedule, cfg, device, reference, *, dp: bool) -> tuple[int, float]:
    use_autocast = cfg.bf16 and not dp
    steps, loss_sum, seen = 0, 0.0, 0
    for _ in range(cfg.epochs):
        for x, y, mask in loader:
            x, y, mask = x.to(device), y.to(device), mask.to(device)
            optimizer.zero_grad(set_to_none=True)
            with autocast_context(device, use_autocast):
                logits = model(x)
            loss = masked_bce_with_logits(logits.float(), y, mask)
            loss.backward()
            if dp:
                # DP: clip + noise first; the proximal gradient is data-independent post-processing.
                if optimizer.pre_step():
                    _add_proximal_gradient(model, reference, cfg.proximal_mu)
                    optimizer.original_optimizer.step()
                    schedule.step()
            else:
                _add_proximal_gradient(model, reference, cfg.proximal_mu)
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                schedule.step()
            steps += 1
            b = int(x.shape[0])
            if b > 0 and torch.isfinite(loss):
                loss_sum += float(loss.detach()) * b
                seen += b
    return steps, (loss_sum / seen if seen else float("nan"))


def _add_proximal_gradient(model: nn.Module, reference, mu: float) -> None:
    """FedProx: add grad of ``mu/2 * ||w - w_global||^2`` = ``mu * (w - w_global)``."""
    if reference is None or mu <= 0:
        return
    with torch.no_grad():
        for name, p in _named_trainable(model):
            ref = reference.get(name)
            if ref is None:
                continue
            prox = mu * (p.detach() - ref)
            if p.grad is None:
                p.grad = prox.clone()
            else:
                p.grad.add_(prox)


def _named_trainable(model: nn.Module):
    """Parameters by their name in the unwrapped model (Opacus prefixes ``_module.``)."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            yield name.removeprefix("_module."), p


def _proximal_reference(model: nn.Module, global_arrays, device) -> dict[str, torch.Tensor]:
    """The global weights the proximal term pulls towards, keyed by parameter name."""
    trainable = dict(_named_trainable(model))
    if global_arrays is None:
        return {k: p.detach().clone() for k, p in trainable.items()}
    if isinstance(global_arrays, Mapping):
        by_name = dict(global_arrays)
    else:
        keys = list(model.state_dict().keys())
        if len(keys) != len(global_arrays):
            raise ValueError(
                f"global_arrays has {len(global_arrays)} arrays but the model's state_dict has "
                f"{len(keys)} entries; they must be in state_dict order"
            )
        by_name = dict(zip(keys, global_arrays))
    reference = {}
    for name, p in trainable.items():
        if name not in by_name:
            raise ValueError(f"global_arrays has no entry for parameter {name!r}")
        t = torch.as_tensor(np.asarray(by_name[name]), dtype=p.dtype, device=device)
        if t.shape != p.shape:
            raise ValueError(f"global array for {name!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
        reference[name] = t
    return reference


def expected_steps(n_examples: int, batch_size: int, epochs: int) -> int:
    """Optimiser steps of one call: ``epochs * ceil(n / batch_size)`` (DP and non-DP alike)."""
    return epochs * math.ceil(n_examples / batch_size)
