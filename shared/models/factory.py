"""Build any registered model from ``(name, preset, input shape, classes, overrides)``.

The model carries ``model.config``: a JSON-serialisable dict from which :func:`rebuild_model`
builds the same architecture again (checkpoints store it beside the weights).
"""

from __future__ import annotations

import copy
import json
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


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["dropout=0", 'augmentations=["none"]', "attention=differential"]`` -> overrides for
    :func:`build_model`: each ``KEY=VALUE`` with VALUE read as JSON, else kept as a string."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


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
    fs: float | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build model ``name`` with preset ``preset``'s hyper-parameters, changed by ``overrides``.

    ``dp=True`` gives the Opacus-compatible form (e.g. GroupNorm instead of BatchNorm). ``fs``
    (Hz) only records the sampling rate of the data in ``model.config["fs"]`` (default: the
    preset's), which the explain command resamples records to. Raises
    ``ValueError`` for an unknown model, preset or override key, or for a configuration that
    cannot work (the message names the values to change).
    """
    presets = get_preset(name, preset)  # validates name and preset
    misplaced = sorted(set(overrides) & set(META_KEYS))
    if misplaced:
        raise ValueError(
            f"{misplaced} describe the data, not the architecture: pass n_leads, input_samples "
            "(= fs x seconds), n_classes and fs as arguments"
        )
    model = MODEL_REGISTRY[name].builder(
        preset, n_leads=int(n_leads), input_samples=int(input_samples), n_classes=int(n_classes), dp=bool(dp),
        **copy.deepcopy(overrides),
    )
    config = dict(getattr(model, "config", None) or {})
    config.update({
        "name": name,
        "preset": preset,
        "n_leads": int(n_leads),
        "input_samples": int(input_samples),
        "n_classes": int(n_classes),
        "dp": bool(dp),
        "overrides": _jsonable(overrides),
        "fs": float(fs) if fs is not None else presets["fs"],
    })
    model.config = _jsonable(config)
    return model


def rebuild_model(config: dict[str, Any]) -> nn.Module:
    """Build the architecture described by a model's ``config`` dict (e.g. from a checkpoint)."""
    missing = [k for k in ("name", "preset", "n_leads", "input_samples", "n_classes") if k not in config]
    if missing:
        raise ValueError(f"model config lacks {missing}: it is not a config written by build_model")
    return build_model(
        config["name"], config["preset"], n_leads=config["n_leads"], input_samples=config["input_samples"],
        n_classes=config["n_classes"], dp=config.get("dp", False), fs=config.get("fs"),
        **dict(config.get("overrides") or {}),
    )
