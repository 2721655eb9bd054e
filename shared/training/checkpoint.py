"""Checkpoints: the global model, its config and the round number, written atomically.

A checkpoint is a ``torch.save`` dict that loads with ``weights_only=True`` (tensors and plain
Python only): ``format_version, model_config, state_dict | arrays, round, run_config,
strategy_state, data_config``. One line gives back a ready model::

    from shared.training import load_model; model = load_model("runs/.../checkpoint.pt")
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT_VERSION = 1


def save_checkpoint(
    path: str | Path,
    *,
    model_config: Mapping[str, Any],
    arrays: Sequence[np.ndarray] | None = None,
    state_dict: Mapping[str, Any] | None = None,
    round: int,
    run_config: Mapping[str, Any] | None = None,
    strategy_state: Any = None,
    data_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write the checkpoint to ``path`` via a temporary file and ``os.replace``.

    Give the weights either as ``state_dict`` or as ``arrays`` (a list in ``state_dict`` order,
    what Flower's ``ArrayRecord`` carries).
    """
    if (arrays is None) == (state_dict is None):
        raise ValueError("save_checkpoint needs exactly one of arrays= or state_dict=")
    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model_config": _plain(dict(model_config)),
        "round": int(round),
        "run_config": _plain(dict(run_config or {})),
        "strategy_state": _plain(strategy_state),
        "data_config": _plain(dict(data_config)) if data_config is not None else None,
    }
    if state_dict is not None:
        payload["state_dict"] = {k: _tensor(v) for k, v in state_dict.items()}
    else:
        payload["arrays"] = [_tensor(a) for a in arrays]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict; a clear error for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        raise ValueError(f"{path}: not a readable fed-ecg checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a fed-ecg checkpoint of format_version {FORMAT_VERSION}")
    if "state_dict" not in ckpt and "arrays" not in ckpt:
        raise ValueError(f"{path}: checkpoint holds no weights")
    return ckpt


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model from the checkpoint's ``model_config`` and load its weights (eval mode).

    The checkpoint's ``data_config`` (sampling rate, window, classes, normalisation) is attached as
    ``model.data_config`` for :func:`shared.training.predict_record`.
    """
    from shared.models import arrays_to_state, rebuild_model

    ckpt = load_checkpoint(path)
    model = rebuild_model(ckpt["model_config"])
    if "arrays" in ckpt:
        arrays_to_state(model, [a.numpy() for a in ckpt["arrays"]])
    else:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    model.data_config = ckpt.get("data_config")
    model.checkpoint_round = ckpt["round"]
    return model.to(device).eval()


def _tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    return torch.from_numpy(np.array(value, copy=True, order="C"))  # keeps 0-d arrays 0-d


def _plain(value: Any) -> Any:
    """Plain Python (and tensors) only, so the file loads with ``weights_only=True``."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, copy=True, order="C"))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")
