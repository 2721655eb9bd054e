"""Predict one WFDB record with a trained model, exactly as the cache and loader would see it.

Path: ``read_record_path`` (the site's reader) -> ``preprocess_record`` (the cache's resample,
band-pass and windows) -> crops tiled as in the loader's eval mode -> per-lead z-score (the
loader's ``normalize``) -> model -> sigmoid -> mean over crops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.data.loader import normalize_items



def data_config_for(dataset) -> dict[str, Any]:
    """The ``data_config`` of a checkpoint trained on ``dataset`` (a ``WindowDataset``)."""
    manifest = dataset.cache.manifest
    return {
        "preprocess": dict(manifest["config"]["preprocess"]),
        "fs": float(manifest["fs"]),
        "window_samples": int(manifest["window_samples"]),
        "crop_samples": int(dataset.crop_samples),
        "lead_names": list(manifest["lead_names"]),
        "classes": list(manifest["classes"]),
        "normalize": dataset.normalize,
    }


def preprocess_config_of(data_config: dict[str, Any]):
    """The cache's ``PreprocessConfig``: ``data_config["preprocess"]`` when present (as
    :func:`data_config_for` writes it), else the cache defaults at ``fs`` / ``window_samples``."""
    from shared.data.preprocess import PreprocessConfig

    if "preprocess" not in data_config:
        fs = float(data_config["fs"])
        return PreprocessConfig(fs=fs, window_seconds=int(data_config["window_samples"]) / fs)
    p = dict(data_config["preprocess"])
    known = set(PreprocessConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in p.items() if k in known}
    if kwargs.get("bandpass") is not None:
        kwargs["bandpass"] = tuple(kwargs["bandpass"])
    return PreprocessConfig(**kwargs)


def record_items(windows: np.ndarray, crop_samples: int, normalize: str) -> np.ndarray:
    """``[n_windows, leads, W]`` -> normalised eval items ``[n_items, leads, crop]`` (float32)."""
    windows = np.asarray(windows, dtype=np.float32)
    n, leads, w = windows.shape
    tiles = w // crop_samples
    items = windows[:, :, : tiles * crop_samples].reshape(n, leads, tiles, crop_samples)
    items = items.transpose(0, 2, 1, 3).reshape(n * tiles, leads, crop_samples).copy()
    return normalize_items(items, normalize)


@torch.no_grad()
def predict_record(
    model: nn.Module, wfdb_path: str | Path, site: str, *, data_config: dict[str, Any] | None = None
) -> dict[str, float]:
    """``{class: probability}`` for the WFDB record at ``wfdb_path`` (no extension) of ``site``.

    ``data_config`` defaults to ``model.data_config`` (attached by :func:`load_model`).
    """
    from shared.data.preprocess import preprocess_record
    from shared.data.readers import read_record_path

    data_config = data_config or getattr(model, "data_config", None)
    if not data_config:
        raise ValueError(
            "predict_record needs the data_config the model was trained with "
            "(load the model with shared.training.load_model, or pass data_config=)"
        )
    record = read_record_path(site, str(wfdb_path))
    windows = preprocess_record(record, preprocess_config_of(data_config))
    items = record_items(windows, int(data_config["crop_samples"]), data_config["normalize"])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        logits = model(torch.from_numpy(items).to(device)).float()
    finally:
        model.train(was_training)
    probs = torch.sigmoid(logits).mean(dim=0).cpu().numpy()
    classes = list(data_config["classes"])
    if len(classes) != len(probs):
        raise ValueError(f"model gives {len(probs)} outputs but data_config lists {len(classes)} classes")
    return {c: float(p) for c, p in zip(classes, probs)}
