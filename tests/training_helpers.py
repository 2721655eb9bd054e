"""Small stand-ins shared by the training/privacy tests: a tiny Opacus-compatible model and an
in-memory dataset with the loader's interface (``(x, y, mask)`` items and ``item_record``)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset


class TinyEcgNet(nn.Module):
    """Conv1d -> GroupNorm -> ReLU -> mean-pool -> Linear; valid under Opacus (no BatchNorm)."""

    def __init__(self, n_leads: int = 3, n_classes: int = 2, width: int = 8):
        super().__init__()
        self.conv = nn.Conv1d(n_leads, width, kernel_size=5, padding=2)
        self.norm = nn.GroupNorm(2, width)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv(x)))
        return self.head(h.mean(dim=2))


class ArrayDataset(Dataset):
    """Items ``(x [leads, L], y [K], mask [K])``; class 0 depends on the signal mean, so it is learnable."""

    def __init__(self, n: int = 64, n_leads: int = 3, length: int = 32, n_classes: int = 2,
                 seed: int = 0, items_per_record: int = 1):
        rng = np.random.default_rng(seed)
        n_records = n // items_per_record
        y_rec = (rng.random((n_records, n_classes)) < 0.5).astype(np.float32)
        mask_rec = np.ones((n_records, n_classes), dtype=np.float32)
        mask_rec[:, -1] = rng.random(n_records) < 0.7  # some unknown labels
        self.item_record = np.repeat(np.arange(n_records), items_per_record)
        self.y = y_rec[self.item_record]
        self.mask = mask_rec[self.item_record]
        x = rng.normal(size=(len(self.item_record), n_leads, length)).astype(np.float32)
        x += 1.5 * self.y[:, :1, None]  # shift by the class-0 label
        self.x = x
        self.record_ids = np.array([f"rec{i:03d}" for i in range(n_records)])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return torch.from_numpy(self.x[i]), torch.from_numpy(self.y[i]), torch.from_numpy(self.mask[i])
