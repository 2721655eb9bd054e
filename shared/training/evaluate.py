"""Evaluation on one site's split: masked BCE, record-level probabilities and macro AUROC.

Record-level: each record's probability is the mean of its items' probabilities (a record is
tiled into several windows/crops by the loader). AUROC is computed on records, NaN-safe: a class
unknown at the site, or with one value in its test set, has AUROC NaN and is left out of the mean.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from shared.metrics import masked_macro_auroc, record_level

from .device import autocast_context
from .losses import masked_bce_with_logits


@dataclass
class EvalResult:
    loss: float
    auroc_per_class: np.ndarray  # [K], NaN where undefined
    auroc_macro: float  # mean over defined classes; NaN when none is defined
    num_examples: int  # items (windows/crops) evaluated
    record_ids: np.ndarray  # [n_records] str
    probs: np.ndarray  # [n_records, K] float32
    targets: np.ndarray  # [n_records, K] float32
    mask: np.ndarray  # [n_records, K] float32, 1 where the label is known

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "record_ids": np.asarray(self.record_ids).astype(str),
            "probs": self.probs.astype(np.float32),
            "targets": self.targets.astype(np.float32),
            "mask": self.mask.astype(np.float32),
        }


@torch.no_grad()
def predict_items(
    model: nn.Module, dataset: Dataset, *, device="cpu", batch_size: int = 64, bf16: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Item-level ``probs, targets, mask`` and the mean masked BCE over items."""
    device = torch.device(device)
    model.to(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    probs, targets, masks = [], [], []
    loss_sum, seen = 0.0, 0
    try:
        for x, y, mask in loader:
            x, y, mask = x.to(device), y.to(device), mask.to(device)
            with autocast_context(device, bf16):
                logits = model(x)
            logits = logits.float()
            loss = masked_bce_with_logits(logits, y, mask)
            if torch.isfinite(loss):
                loss_sum += float(loss) * x.shape[0]
                seen += x.shape[0]
            probs.append(torch.sigmoid(logits).cpu().numpy())
            targets.append(y.cpu().numpy())
            masks.append(mask.cpu().numpy())
    finally:
        model.train(was_training)
    if not probs:
        raise ValueError("evaluate_model got an empty dataset")
    return (
        np.concatenate(probs).astype(np.float32),
        np.concatenate(targets).astype(np.float32),
        np.concatenate(masks).astype(np.float32),
        loss_sum / seen if seen else float("nan"),
    )


def evaluate_model(
    model: nn.Module, dataset: Dataset, *, device="cpu", batch_size: int = 64, bf16: bool = False
) -> EvalResult:
    """Record-level predictions and AUROC of ``model`` on ``dataset``. An empty split (a tiny
    cache can have one) scores nothing: NaN loss and AUROC, never 0.5 and never an error."""
    if len(dataset) == 0:
        k = int(dataset.n_classes)
        return EvalResult(loss=float("nan"), auroc_per_class=np.full(k, np.nan), auroc_macro=float("nan"),
                          num_examples=0, record_ids=np.array([], dtype=str), probs=np.zeros((0, k), np.float32),
                          targets=np.zeros((0, k), np.float32), mask=np.zeros((0, k), np.float32))
    item_probs, item_targets, item_mask, loss = predict_items(
        model, dataset, device=device, batch_size=batch_size, bf16=bf16
    )
    item_record = np.asarray(dataset.item_record)
    if len(item_record) != len(item_probs):
        raise ValueError(
            f"dataset.item_record has {len(item_record)} entries for {len(item_probs)} items"
        )
    records, probs = record_level(item_probs, item_record)
    _, targets = record_level(item_targets, item_record)
    _, mask = record_level(item_mask, item_record)
    per_class, macro = masked_macro_auroc(probs, targets, mask)
    return EvalResult(
        loss=float(loss),
        auroc_per_class=np.asarray(per_class, dtype=float),
        auroc_macro=float(macro),
        num_examples=len(item_probs),
        record_ids=_record_ids(dataset, np.asarray(records)),
        probs=np.asarray(probs, dtype=np.float32),
        targets=np.asarray(targets, dtype=np.float32),
        mask=np.asarray(mask, dtype=np.float32),
    )


def _record_ids(dataset: Dataset, records: np.ndarray) -> np.ndarray:
    """Record ids as strings: the dataset's ``record_ids`` where it has them, else the indices."""
    ids = getattr(dataset, "record_ids", None)
    if ids is None:
        return records.astype(str)
    ids = np.asarray(ids)
    return ids[records].astype(str)


def save_predictions(path: str | Path, result: EvalResult, classes: list[str], **extra) -> Path:
    """Record-level predictions as ``.npz`` (``record_ids, probs, targets, mask, classes``, plus
    ``extra`` arrays such as ``patient_ids`` and ``config_hash``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, classes=np.asarray(classes, dtype=str), **result.to_arrays(),
             **{k: np.asarray(v) for k, v in extra.items()})
    os.replace(tmp, path)
    return path


def load_predictions(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable predictions .npz ({exc})") from None
    missing = {"record_ids", "probs", "targets", "mask", "classes"} - set(out)
    if missing:
        raise ValueError(f"{path}: predictions file lacks {sorted(missing)}")
    return out
