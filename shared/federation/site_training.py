"""One site's work for one message: build the model, load the global weights, train or evaluate.

Flower-free (plain dicts and torch state dicts in, plain results out); ``client/app.py``
translates Flower messages to and from these calls, and the tests and benchmarks call them too.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from shared.federation.run_config import dp_config_dict, input_samples
from shared.data.loader import WindowDataset
from shared.models import build_model
from shared.training import DPConfig, EvalResult, TrainConfig, TrainResult, evaluate_model, train_local

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


def train_site(cfg: DictConfig, cache: Path, site: str, server_round: int,
               global_state: Mapping[str, torch.Tensor], *, dp_state: dict[str, Any] | None = None,
               site_local: Mapping[str, torch.Tensor] | None = None,
               proximal_mu: float = 0.0) -> SiteTrainOutcome:
    """Local epochs on the site's train split, starting from the global weights."""
    seed = site_seed(cfg, site, server_round)
    model = new_model(cfg)
    load_state(model, global_state, site_local)
    dataset = WindowDataset(cache, "train", crop_samples=input_samples(cfg), train=True, seed=seed)
    dp = dp_config_dict(cfg)
    train_cfg = TrainConfig(
        epochs=int(cfg.local_epochs), lr=float(cfg.lr), batch_size=int(cfg.batch_size),
        weight_decay=float(cfg.weight_decay), proximal_mu=float(proximal_mu), seed=seed,
        device=str(cfg.device), dp=DPConfig(**dp) if dp else None,
    )
    result = train_local(model, dataset, train_cfg, global_arrays=None, dp_state=dp_state)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return SiteTrainOutcome(state=state, result=result, site_local=site_local_state(model))


def evaluate_site(cfg: DictConfig, cache: Path, global_state: Mapping[str, torch.Tensor],
                  site_local: Mapping[str, torch.Tensor] | None = None, *, split: str = "test") -> EvalResult:
    """The global model (with the site's local parameters, if any) on the site's test split."""
    from shared.training import select_device

    model = new_model(cfg)
    load_state(model, global_state, site_local)
    device = select_device(str(cfg.device))
    model.to(device)
    dataset = WindowDataset(cache, split, crop_samples=input_samples(cfg), train=False)
    return evaluate_model(model, dataset, device=device, batch_size=max(int(cfg.batch_size), 64),
                          bf16=device.type == "cuda")
