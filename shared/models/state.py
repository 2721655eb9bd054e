"""Model weights <-> lists of numpy arrays (what Flower's ArrayRecord carries), and checkpoints.

:func:`state_to_arrays` returns one array per ``state_dict`` entry, in ``state_dict`` order,
buffers included: BatchNorm's ``running_mean``/``running_var`` and its ``num_batches_tracked``
(a 0-d ``int64`` array). Non-persistent buffers (e.g. the fixed sinusoidal position tables) are
not part of ``state_dict`` and never travel. A model wrapped by Opacus (``GradSampleModule``,
whose keys gain a ``_module.`` prefix) is unwrapped first, so DP and non-DP sites exchange the
same list. The round trip is exact (same dtypes, bit-identical values).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside an Opacus ``GradSampleModule`` (or the model itself)."""
    while hasattr(model, "_module") and isinstance(model._module, nn.Module):
        model = model._module
    return model


def state_keys(model: nn.Module) -> list[str]:
    """The ``state_dict`` keys, in the order :func:`state_to_arrays` uses."""
    return list(unwrap(model).state_dict().keys())


def state_to_arrays(model: nn.Module) -> list[np.ndarray]:
    """One numpy array per ``state_dict`` entry (parameters and persistent buffers), in order."""
    return [v.detach().cpu().numpy().copy() for v in unwrap(model).state_dict().values()]


def arrays_to_state(model: nn.Module, arrays: list[np.ndarray]) -> None:
    """Load arrays produced by :func:`state_to_arrays` (same architecture) into ``model``.

    Raises ``ValueError`` naming the first key whose count, shape or dtype does not match.
    """
    target = unwrap(model)
    reference = target.state_dict()
    if len(arrays) != len(reference):
        raise ValueError(f"got {len(arrays)} arrays for a model with {len(reference)} state entries")
    new_state = {}
    for (key, ref), arr in zip(reference.items(), arrays):
        arr = np.asarray(arr)
        if tuple(arr.shape) != tuple(ref.shape):
            raise ValueError(f"state entry {key}: array shape {arr.shape} != model shape {tuple(ref.shape)}")
        tensor = torch.from_numpy(np.ascontiguousarray(arr))
        if tensor.dtype != ref.dtype:
            raise ValueError(f"state entry {key}: array dtype {tensor.dtype} != model dtype {ref.dtype}")
        new_state[key] = tensor
    target.load_state_dict(new_state, strict=True)


def save_checkpoint(path: str | Path, model: nn.Module, extra: dict[str, Any] | None = None) -> None:
    """Write ``{'config', 'state_dict', 'extra'}`` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = unwrap(model)
    payload = {"config": plain.config, "state_dict": plain.state_dict(), "extra": extra or {}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model stored by :func:`save_checkpoint`; returns ``(model, extra)``.

    Also accepts a dict with ``model_config`` / ``model_state`` keys, and a federation
    checkpoint (``shared.training.save_checkpoint``: ``model_config``, ``state_dict`` or
    ``arrays``, ``data_config``), whose ``data_config["classes"]`` become ``extra["classes"]``.
    """
    from .factory import rebuild_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict):
        raise ValueError(f"checkpoint {path}: expected a dict with 'config' and 'state_dict'")
    config = payload.get("config", payload.get("model_config"))
    state = payload.get("state_dict", payload.get("model_state", payload.get("arrays")))
    if config is None or state is None:
        raise ValueError(f"checkpoint {path}: needs 'config' and 'state_dict' keys, has {sorted(payload)}")
    model = rebuild_model(config)
    if isinstance(state, (list, tuple)):
        arrays_to_state(model, [np.asarray(a) for a in state])
    else:
        model.load_state_dict(state, strict=True)
    extra = dict(payload.get("extra") or {})
    data_config = payload.get("data_config") or {}
    if "classes" not in extra and data_config.get("classes"):
        extra["classes"] = list(data_config["classes"])
    return model, extra
