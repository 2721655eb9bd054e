"""Build any registered model from ``(name, preset, input shape, classes, overrides)``.

The model carries ``model.config``: a JSON-serialisable dict from which :func:`rebuild_model`
builds the same architecture again (checkpoints store it beside the weights).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .registry import MODEL_REGISTRY

#: Preset keys that describe the data a preset is meant for, not the architecture.
META_KEYS: tuple[str, ...] = ("fs", "seconds", "n_leads", "n_classes")


def list_models() -> list[str]:
    """Names of the registered models."""
    return sorted(MODEL_REGISTRY)


def get_preset(name: str, preset: str) -> dict[str, Any]:
    """A copy of ``PRESETS[name][preset]``; ``ValueError`` naming the valid choices otherwise."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}: choose one of {list_models()}")
    presets = MODEL_REGISTRY[name].presets
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for model {name!r}: choose one of {sorted(presets)}")
    return copy.deepcopy(presets[preset])


def preset_input_samples(name: str, preset: str) -> int:
    """Input length (samples) a preset is meant for: ``fs x seconds``."""
    p = get_preset(name, preset)
    return int(round(p["fs"] * p["seconds"]))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def build_model(
    name: str,
    preset: str,
    *,
    n_leads: int,
    input_samples: int,
    n_classes: int,
    dp: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build model ``name`` with preset ``preset``'s hyper-parameters, changed by ``overrides``.

    ``dp=True`` gives the Opacus-compatible form (the model's ``dp_defaults``, e.g. GroupNorm
    instead of BatchNorm). Raises ``ValueError`` for an unknown model, preset or override key, or
    for a configuration that cannot work (the message names the values to change).
    """
    hparams = get_preset(name, preset)
    unknown = sorted(set(overrides) - set(hparams) | set(overrides) & set(META_KEYS))
    if unknown:
        allowed = sorted(set(hparams) - set(META_KEYS))
        raise ValueError(
            f"unknown override(s) {unknown} for model {name!r}; "
            f"n_leads/input_samples/n_classes are arguments, and the hyper-parameters are {allowed}"
        )
    entry = MODEL_REGISTRY[name]
    if dp:
        hparams.update(copy.deepcopy(entry.dp_defaults))
    hparams.update(copy.deepcopy(overrides))
    arch = {k: v for k, v in hparams.items() if k not in META_KEYS}
    model = entry.builder(n_leads=int(n_leads), input_samples=int(input_samples), n_classes=int(n_classes), dp=bool(dp), **arch)
    model.config = {
        "name": name,
        "preset": preset,
        "n_leads": int(n_leads),
        "input_samples": int(input_samples),
        "n_classes": int(n_classes),
        "dp": bool(dp),
        "overrides": _jsonable(overrides),
        "hparams": _jsonable(arch),
        "fs": hparams["fs"],
    }
    return model


def rebuild_model(config: dict[str, Any]) -> nn.Module:
    """Build the architecture described by a model's ``config`` dict (e.g. from a checkpoint).

    Uses the stored ``hparams`` (the resolved hyper-parameters) so a checkpoint still rebuilds
    the same model if a preset's defaults change later.
    """
    missing = [k for k in ("name", "preset", "n_leads", "input_samples", "n_classes") if k not in config]
    if missing:
        raise ValueError(f"model config lacks {missing}: it is not a config written by build_model")
    overrides = dict(config.get("hparams") or config.get("overrides") or {})
    preset = get_preset(config["name"], config["preset"])
    overrides = {k: v for k, v in overrides.items() if k in preset and k not in META_KEYS}
    model = build_model(
        config["name"], config["preset"], n_leads=config["n_leads"], input_samples=config["input_samples"],
        n_classes=config["n_classes"], dp=config.get("dp", False), **overrides,
    )
    model.config["overrides"] = _jsonable(config.get("overrides", {}))
    return model
