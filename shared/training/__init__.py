"""Flower-free training core: local training (FedProx, Opacus DP), evaluation, checkpoints.

``client/`` (Flower) and ``simulations/compare.py`` (baselines) call these functions; the
contract is in docs/architecture.md, section "Training".
"""

from .checkpoint import load_checkpoint, load_model, save_checkpoint
from .config import DPConfig, TrainConfig
from .device import autocast_context, bf16_supported, select_device
from .evaluate import EvalResult, evaluate_model, load_predictions, save_predictions
from .local import TrainResult, expected_steps, train_local
from .predict import data_config_for, predict_record

__all__ = [
    "DPConfig",
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "autocast_context",
    "bf16_supported",
    "data_config_for",
    "evaluate_model",
    "expected_steps",
    "load_checkpoint",
    "load_model",
    "load_predictions",
    "predict_record",
    "save_checkpoint",
    "save_predictions",
    "select_device",
    "train_local",
]
