"""Hyper-parameters of one local training call (one federated round at one site)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ACCOUNTANTS = ("rdp", "prv")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class DPConfig:
    """Sample-level DP-SGD with Opacus: per-sample clipping to ``max_grad_norm`` + Gaussian noise.

    ``epsilon_budget`` (optional) is the most epsilon a site may spend over all its rounds; a round
    that would go past it is not trained. ``secure_mode`` draws the noise from a cryptographically
    secure generator (Opacus ``secure_mode``; needs the ``torchcsprng`` package): off by default,
    as in Opacus, which warns about it; turn it on for a production model.
    """

    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    epsilon_budget: float | None = None
    accountant: str = "rdp"
    secure_mode: bool = False

    def __post_init__(self) -> None:
        if self.noise_multiplier <= 0:
            raise ValueError(f"DPConfig.noise_multiplier must be > 0, got {self.noise_multiplier}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"DPConfig.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0 < self.delta < 1:
            raise ValueError(f"DPConfig.delta must be in (0, 1), got {self.delta}")
        if self.epsilon_budget is not None and self.epsilon_budget <= 0:
            raise ValueError(f"DPConfig.epsilon_budget must be > 0 or None, got {self.epsilon_budget}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"DPConfig.accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")


@dataclass
class TrainConfig:
    """One local training call: ``epochs`` local epochs of AdamW on the site's train split.

    Under DP, ``batch_size`` is the logical batch (the Poisson sample's expected size, sample rate
    ``1 / ceil(N / batch_size)``); ``max_physical_batch`` bounds what is in memory at once, and the
    random draws come from the site's secret, not ``seed``. ``grad_clip`` (global-norm clipping) applies without DP only; under DP the per-sample clipping
    is ``dp.max_grad_norm``. ``bf16`` autocast is used on CUDA devices that support it, never on
    CPU and never under DP. ``warmup_steps``: the learning rate rises linearly from ``lr /
    warmup_steps`` to ``lr`` over the call's first optimiser steps (0 = none). Each call starts a
    fresh AdamW, whose first bias-corrected steps move every weight by about ``lr`` in the sign of
    the gradient; under DP that gradient is mostly noise, so each federated round would start
    with a random step of full size (docs/privacy.md, "Benchmark").
    """

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.0
    grad_clip: float | None = None
    proximal_mu: float = 0.0
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    dp: DPConfig | None = None
    num_workers: int = 0
    max_physical_batch: int = 128  # DP only: the most items in memory at once (BatchMemoryManager)
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.dp, dict):
            self.dp = DPConfig(**self.dp)
        if self.epochs < 1:
            raise ValueError(f"TrainConfig.epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"TrainConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.proximal_mu < 0:
            raise ValueError(f"TrainConfig.proximal_mu must be >= 0, got {self.proximal_mu}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_physical_batch < 1:
            raise ValueError(f"TrainConfig.max_physical_batch must be >= 1, got {self.max_physical_batch}")
        if self.device not in DEVICES:
            raise ValueError(f"TrainConfig.device must be one of {DEVICES}, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
