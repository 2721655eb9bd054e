"""The project's models: Hierarchical Transformer (arXiv 2411.00755) and Cardioformer (arXiv 2505.05538).

``build_model(name, preset, n_leads=, input_samples=, n_classes=, dp=False, **overrides)``
returns an ``nn.Module`` mapping ``x [B, leads, L]`` to logits ``[B, K]``, with ``model.config``
(rebuild with :func:`rebuild_model`), ``model.site_local_parameter_names()`` and
``model.explain(x)``. ``PRESETS[name][preset]`` gives each preset's hyper-parameters and the
``fs``/``seconds`` it is meant for. See docs/models.md.
"""

from __future__ import annotations

from .factory import build_model, get_preset, list_models, parse_overrides, preset_input_samples, rebuild_model
from .registry import MODEL_REGISTRY
from .state import arrays_to_state, load_checkpoint, save_checkpoint, state_keys, state_to_arrays

#: ``PRESETS[name][preset]`` -> that preset's hyper-parameters (a live view of the registry).
PRESETS = {name: entry.presets for name, entry in MODEL_REGISTRY.items()}

__all__ = [
    "MODEL_REGISTRY", "PRESETS", "arrays_to_state", "build_model", "get_preset", "list_models",
    "load_checkpoint", "parse_overrides", "preset_input_samples", "rebuild_model", "save_checkpoint", "state_keys",
    "state_to_arrays",
]
