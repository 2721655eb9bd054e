"""The federation's run config: Flower's flat kebab-case keys -> one validated omegaconf object.

Flower-free on purpose: the ServerApp, the ClientApp, the simulation wrapper and the benchmarks
all read the run config through :func:`load_run_config`, so a bad value is refused with the same
clear message everywhere and before any node trains.

The defaults live in ``simulations/four_sites/pyproject.toml`` (``[tool.flwr.app.config]``);
:data:`DEFAULTS` mirrors them so that a config missing a key (an older app dir, a test) still
validates. Keys are kebab-case in Flower and snake_case here (``num-server-rounds`` ->
``num_server_rounds``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from shared.data.record import SITES

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedtrimmedavg", "krum")
SERVER_EVAL = ("auto", "on", "off")
DP_UNITS = ("record", "patient", "window")

# Mirrors simulations/four_sites/pyproject.toml; every key a user may override.
DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 8,
    "local-epochs": 2,
    "fraction-train": 1.0,
    "fraction-evaluate": 1.0,
    "min-nodes": 0,
    "min-replies": 0,
    "node-wait-timeout": 120.0,
    "round-timeout": 3600.0,
    "model": "hierarchical",
    "preset": "tiny",
    "sites": "ptb,ptbxl,mimic,cinc",
    "strategy": "fedavg",
    "lr": 3e-3,
    "batch-size": 32,
    "weight-decay": 0.0,
    "proximal-mu": 0.01,
    "server-lr": 0.01,
    "trimmed-beta": 0.2,
    "krum-byzantine": 0,
    "dp": False,
    "dp-noise-multiplier": 1.0,
    "dp-max-grad-norm": 1.0,
    "dp-delta": 0.0,
    "dp-epsilon-budget": 0.0,
    "dp-unit": "record",
    "dp-batch-size": 0,
    "dp-lr": 0.01,
    "dp-local-epochs": 4,
    "dp-warmup-steps": 2,
    "dp-max-physical-batch": 128,
    "dp-secure-mode": False,
    "site-policy": "",
    "site-local": False,
    "seed": 0,
    "device": "auto",
    "synthetic-records": 0,
    "cache-ptb": "",
    "cache-ptbxl": "",
    "cache-mimic": "",
    "cache-cinc": "",
    "server-eval": "auto",
    "out-dir": "",
    "resume": False,
    "verbose": False,
}

# Synthetic records per site when ``synthetic-records = 0`` (small enough for the 5-minute
# default run on 2 CPU cores; the synthetic generator's own default is larger).
DEFAULT_SYNTHETIC_RECORDS = 400


class ConfigError(ValueError):
    """A run-config value is unknown or out of range; the message names the key."""


def cache_root() -> Path:
    """Where synthetic caches are generated: ``$FED_ECG_CACHE`` or ``~/.cache/fed-ecg``."""
    return Path(os.environ.get("FED_ECG_CACHE") or Path.home() / ".cache" / "fed-ecg").expanduser()


def load_run_config(run_config: Mapping[str, Any]) -> DictConfig:
    """Validate Flower's run config and return it as an omegaconf object with snake_case keys.

    Raises :class:`ConfigError` naming the first bad key; unknown keys are refused too (a typo
    in an override must not be silently ignored).
    """
    unknown = sorted(set(run_config) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown run-config key(s) {unknown}; known keys: {sorted(DEFAULTS)}")
    merged = {**DEFAULTS, **dict(run_config)}
    cfg = OmegaConf.create({k.replace("-", "_"): v for k, v in merged.items()})
    _validate(cfg)
    cfg.site_list = [s.strip() for s in str(cfg.sites).split(",") if s.strip()]
    cfg.min_nodes = int(cfg.min_nodes) or len(cfg.site_list)
    cfg.min_replies = int(cfg.min_replies) or len(cfg.site_list) // 2 + 1
    if cfg.min_replies > len(cfg.site_list):
        raise ConfigError(f"run config: min-replies = {cfg.min_replies} is invalid: the run has only "
                          f"{len(cfg.site_list)} sites {cfg.site_list}")
    if cfg.strategy == "fedtrimmedavg" and int(float(cfg.trimmed_beta) * cfg.min_replies) < 1:
        # Flower's trimmed mean cuts int(beta x replies) updates at each end: below 1 it is FedAvg
        raise ConfigError(
            f"run config: trimmed-beta = {cfg.trimmed_beta!r} is invalid: FedTrimmedAvg cuts int(beta x replies) "
            f"site updates at each end, and a round may aggregate {cfg.min_replies} replies "
            f"({len(cfg.site_list)} sites, min-replies {cfg.min_replies}), so it would trim nobody; use "
            f"trimmed-beta >= {1 / cfg.min_replies:.3f} (below 0.5) or another strategy")
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _validate(cfg: DictConfig) -> None:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"run config: {key} = {cfg[key.replace('-', '_')]!r} is invalid: {what}")

    need(_is_int(cfg.num_server_rounds) and cfg.num_server_rounds >= 1, "num-server-rounds", "must be an integer >= 1")
    need(_is_int(cfg.local_epochs) and cfg.local_epochs >= 1, "local-epochs", "must be an integer >= 1")
    need(_is_num(cfg.fraction_train) and 0 < cfg.fraction_train <= 1, "fraction-train", "must be in (0, 1]")
    need(_is_num(cfg.fraction_evaluate) and 0 <= cfg.fraction_evaluate <= 1, "fraction-evaluate", "must be in [0, 1]")
    need(_is_int(cfg.min_nodes) and cfg.min_nodes >= 0, "min-nodes", "must be an integer >= 0 (0 = every site)")
    need(_is_int(cfg.min_replies) and cfg.min_replies >= 0, "min-replies",
         "must be an integer >= 0 (0 = a majority of the sites)")
    need(_is_num(cfg.node_wait_timeout) and cfg.node_wait_timeout > 0, "node-wait-timeout", "must be > 0 seconds")
    need(_is_num(cfg.round_timeout) and cfg.round_timeout > 0, "round-timeout", "must be > 0 seconds")
    need(cfg.strategy in STRATEGIES, "strategy", f"choose one of {list(STRATEGIES)}")
    need(_is_num(cfg.lr) and cfg.lr > 0, "lr", "must be > 0")
    need(_is_int(cfg.batch_size) and cfg.batch_size >= 1, "batch-size", "must be an integer >= 1")
    need(_is_num(cfg.weight_decay) and cfg.weight_decay >= 0, "weight-decay", "must be >= 0")
    need(_is_num(cfg.proximal_mu) and cfg.proximal_mu >= 0, "proximal-mu", "must be >= 0")
    need(_is_num(cfg.server_lr) and cfg.server_lr > 0, "server-lr", "must be > 0")
    need(_is_num(cfg.trimmed_beta) and 0 <= cfg.trimmed_beta < 0.5, "trimmed-beta", "must be in [0, 0.5)")
    need(_is_int(cfg.krum_byzantine) and cfg.krum_byzantine >= 0, "krum-byzantine", "must be an integer >= 0")
    need(isinstance(cfg.dp, bool), "dp", "must be true or false")
    need(_is_num(cfg.dp_noise_multiplier) and cfg.dp_noise_multiplier > 0, "dp-noise-multiplier", "must be > 0")
    need(_is_num(cfg.dp_max_grad_norm) and cfg.dp_max_grad_norm > 0, "dp-max-grad-norm", "must be > 0")
    need(_is_num(cfg.dp_delta) and 0 <= cfg.dp_delta < 1, "dp-delta", "must be in [0, 1) (0 = 1/(10 N) at each site)")
    need(cfg.dp_unit in DP_UNITS, "dp-unit", f"choose one of {list(DP_UNITS)}")
    need(_is_int(cfg.dp_batch_size) and cfg.dp_batch_size >= 0, "dp-batch-size",
         "must be an integer >= 0 (0 = min(512, N // 3) at each site)")
    need(_is_num(cfg.dp_lr) and cfg.dp_lr > 0, "dp-lr", "must be > 0")
    need(_is_int(cfg.dp_local_epochs) and cfg.dp_local_epochs >= 0, "dp-local-epochs", "must be an integer >= 0 (0 = local-epochs)")
    need(_is_int(cfg.dp_warmup_steps) and cfg.dp_warmup_steps >= 0, "dp-warmup-steps", "must be an integer >= 0 (0 = none)")
    need(_is_int(cfg.dp_max_physical_batch) and cfg.dp_max_physical_batch >= 1, "dp-max-physical-batch", "must be an integer >= 1")
    need(isinstance(cfg.dp_secure_mode, bool), "dp-secure-mode", "must be true or false")
    need(isinstance(cfg.site_policy, str), "site-policy", "must be a string like 'mimic: dp-required=true dp-max-epsilon=8; ptb: ...'")
    need(_is_num(cfg.dp_epsilon_budget) and cfg.dp_epsilon_budget >= 0, "dp-epsilon-budget", "must be >= 0 (0 = no budget)")
    need(_is_int(cfg.seed), "seed", "must be an integer")
    need(cfg.device in ("auto", "cpu", "cuda"), "device", "choose auto, cpu or cuda")
    need(_is_int(cfg.synthetic_records) and cfg.synthetic_records >= 0, "synthetic-records", "must be an integer >= 0 (0 = default)")
    need(cfg.server_eval in SERVER_EVAL, "server-eval", f"choose one of {list(SERVER_EVAL)}")
    need(isinstance(cfg.resume, bool), "resume", "must be true or false")
    need(isinstance(cfg.site_local, bool), "site-local", "must be true or false")
    need(isinstance(cfg.verbose, bool), "verbose", "must be true or false")
    sites = [s.strip() for s in str(cfg.sites).split(",") if s.strip()]
    need(bool(sites) and all(s in SITES for s in sites) and len(set(sites)) == len(sites),
         "sites", f"a comma-separated list of distinct sites from {list(SITES)}")
    for site in SITES:
        need(isinstance(cfg[f"cache_{site}"], str), f"cache-{site}", "must be a string path ('' = synthetic)")
    need(cfg.resume is False or bool(cfg.out_dir), "resume", "resume = true needs an explicit out-dir to resume from")
    if cfg.strategy == "krum":
        need(len(sites) > 2 * cfg.krum_byzantine + 2, "krum-byzantine",
             f"Krum needs more than 2 * krum-byzantine + 2 sites ({len(sites)} sites)")
    _validate_model(cfg)


def _validate_model(cfg: DictConfig) -> None:
    from shared.models import PRESETS

    if cfg.model not in PRESETS:
        raise ConfigError(f"run config: model = {cfg.model!r} is invalid: choose one of {sorted(PRESETS)}")
    if cfg.preset not in PRESETS[cfg.model]:
        raise ConfigError(
            f"run config: preset = {cfg.preset!r} is invalid for model {cfg.model!r}: "
            f"choose one of {sorted(PRESETS[cfg.model])}"
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def synthetic_records(cfg: DictConfig) -> int:
    return int(cfg.synthetic_records) or DEFAULT_SYNTHETIC_RECORDS


def site_cache_setting(cfg: DictConfig, site: str) -> str:
    """The run config's cache path for ``site`` ('' = the embedded synthetic data)."""
    return str(cfg[f"cache_{site}"])


def input_samples(cfg: DictConfig) -> int:
    """Crop length the model expects: the preset's ``fs * seconds``."""
    from shared.models import PRESETS

    preset = PRESETS[cfg.model][cfg.preset]
    return int(round(float(preset["fs"]) * float(preset["seconds"])))


def dp_config_dict(cfg: DictConfig, n_units: int | None = None) -> dict[str, Any] | None:
    """The ``DPConfig`` fields for ``shared.training`` (None when DP is off).

    ``dp-delta = 0`` means ``1 / (10 N)`` for a site with ``n_units`` privacy units.
    """
    if not cfg.dp:
        return None
    return {
        "noise_multiplier": float(cfg.dp_noise_multiplier),
        "max_grad_norm": float(cfg.dp_max_grad_norm),
        "delta": dp_delta(cfg, n_units),
        "epsilon_budget": float(cfg.dp_epsilon_budget) or None,
        "secure_mode": bool(cfg.dp_secure_mode),
    }


def dp_delta(cfg: DictConfig, n_units: int | None) -> float:
    """The run's delta at a site with ``n_units`` units (``dp-delta = 0``: ``1 / (10 N)``)."""
    if float(cfg.dp_delta) > 0:
        return float(cfg.dp_delta)
    if not n_units:
        raise ConfigError("run config: dp-delta = 0 (automatic) needs the site's number of units")
    return 1.0 / (10.0 * n_units)


def dp_epochs(cfg: DictConfig) -> int:
    """Local epochs per round under DP: ``dp-local-epochs``, or ``local-epochs`` where it is 0."""
    return int(cfg.dp_local_epochs) or int(cfg.local_epochs)


#: The DP logical batch where ``dp-batch-size = 0``: ``min(DP_BATCH_CAP, N // 3)`` at a site of N units.
DP_BATCH_CAP = 512


def dp_logical_batch(requested: int, n_units: int) -> int:
    """The DP logical batch (expected Poisson sample) at a site of ``n_units`` units.

    ``requested > 0`` is used as given; ``0`` means ``min(512, N // 3)`` (at least 1): large
    batches cost less epsilon per unit of noise removed (docs/privacy.md, "The DP defaults"),
    and at most a third of the site's units keeps the sampling's privacy amplification (a batch
    of every unit is sampled with rate 1). N is a public count (docs/privacy.md)."""
    if requested > 0:
        return int(requested)
    return max(1, min(DP_BATCH_CAP, int(n_units) // 3))


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The config back as Flower's kebab-case dict (for checkpoints and the summary)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("site_list", None)
    return {k.replace("_", "-"): v for k, v in data.items()}
