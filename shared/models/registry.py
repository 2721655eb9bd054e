"""The models the factory can build: one line per model.

Each entry is ``name: ModelEntry(builder, presets, dp_defaults)`` where

- ``builder(*, n_leads, input_samples, n_classes, dp, **hparams) -> nn.Module`` builds the model
  (and raises ``ValueError`` naming the values to change for a configuration that cannot work);
- ``presets`` maps a preset name to its hyper-parameters, including the ``fs`` and ``seconds``
  it is meant for and its default ``n_leads`` and ``n_classes`` (the builder ignores those four);
- ``dp_defaults`` are the hyper-parameters the DP form changes (applied before overrides).

To add a model, import its module and add one entry.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from torch import nn

from . import hierarchical


class ModelEntry(NamedTuple):
    builder: Callable[..., nn.Module]
    presets: dict[str, dict[str, Any]]
    dp_defaults: dict[str, Any] = {}


MODEL_REGISTRY: dict[str, ModelEntry] = {
    "hierarchical": ModelEntry(hierarchical.build, hierarchical.PRESETS, hierarchical.DP_DEFAULTS),
}
