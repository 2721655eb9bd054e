"""The models the factory can build: one entry per model.

Each entry is ``name: ModelEntry(builder, presets)`` where

- ``builder(preset, *, n_leads, input_samples, n_classes, dp=False, **overrides) -> nn.Module``
  builds the model from ``presets[preset]`` changed by ``overrides`` (``dp=True``: the
  Opacus-compatible form) and raises ``ValueError`` naming the values to change for an unknown
  override or a configuration that cannot work. It may set ``model.config`` (a dict); the
  factory adds the keys every model shares (name, preset, shape, dp, overrides, fs).
- ``presets`` maps a preset name to its hyper-parameters, including the ``fs`` and ``seconds``
  it is meant for and its default ``n_leads`` and ``n_classes``.

To add a model, import its module and add one entry.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from torch import nn

from . import cardioformer, hierarchical


class ModelEntry(NamedTuple):
    builder: Callable[..., nn.Module]
    presets: dict[str, dict[str, Any]]


MODEL_REGISTRY: dict[str, ModelEntry] = {
    "hierarchical": ModelEntry(hierarchical.build, hierarchical.PRESETS),
    "cardioformer": ModelEntry(cardioformer.build, cardioformer.PRESETS),
}
