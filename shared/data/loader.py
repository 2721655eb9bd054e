"""Training and evaluation batches from a prepared cache.

``WindowDataset(cache_dir, split, crop_samples=None, train=False, normalize="zscore")`` yields
``(x float32 [leads, L], y float32 [K], mask float32 [K])``:

* train mode: one item per privacy unit (``unit``): ``"window"`` (default) one item per window;
  ``"record"`` one item per record, each access draws one random window of it; ``"patient"``
  one item per patient (records with the same ``patient_id``; a record without one is its own
  patient), each access draws one random window of all that patient's records. Each access
  then takes a random crop of ``crop_samples`` (the whole window when ``crop_samples`` is None
  or equals the window). Under DP the unit is what one Poisson-sampled item protects;
* eval mode: every window is tiled into ``window // crop_samples`` non-overlapping crops (the
  tail is dropped); ``item_record`` maps every item to its record (row of ``records.csv``), so
  a record-level prediction is the mean of its items' probabilities
  (:func:`shared.metrics.record_level`).

``normalize="zscore"`` standardises each lead of each item over its own samples (per-lead
z-score, so amplitude differences between sites and devices do not leak into the model);
``"none"`` leaves millivolts.

Indexing with a list of indices returns a whole batch with one vectorised read of the float16
memmap; :func:`make_loader` uses that, so a batch costs one fancy-index + one conversion instead
of ``batch_size`` Python calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from .cache import Cache, open_cache

NORMALIZATIONS = ("zscore", "none")
UNITS = ("window", "record", "patient")
_EPS = 1e-6


def normalize_items(x: np.ndarray, normalize: str) -> np.ndarray:
    """Normalise float32 items ``[n, leads, L]`` in place and return them.

    ``zscore``: each lead of each item over its own samples; ``none``: unchanged. The one place
    this is defined, shared by the loader and single-record prediction.
    """
    if normalize == "zscore":
        x -= x.mean(axis=2, keepdims=True)
        x /= x.std(axis=2, keepdims=True) + _EPS
    elif normalize != "none":
        raise ValueError(f"unknown normalize {normalize!r} (one of {', '.join(NORMALIZATIONS)})")
    return x


class WindowDataset(Dataset):
    """Items of one split of a cache (see module docstring)."""

    def __init__(
        self,
        cache_dir: str | Path | Cache,
        split: str,
        crop_samples: int | None = None,
        train: bool = False,
        normalize: str = "zscore",
        seed: int = 0,
        unit: str = "window",
    ):
        self.cache = cache_dir if isinstance(cache_dir, Cache) else open_cache(cache_dir)
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        window = self.cache.window_samples
        self.crop_samples = int(crop_samples or window)
        if not 0 < self.crop_samples <= window:
            raise ValueError(f"crop_samples must be in 1..{window} (the cache's window), got {crop_samples}")
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        if unit != "window" and not train:
            raise ValueError(f"unit {unit!r} is for training items; evaluation tiles every window")
        self.split, self.train, self.normalize, self.seed = split, bool(train), normalize, int(seed)
        self.unit = unit
        self.windows = self.cache.split_windows(split)  # rows of signals.npy in this split
        self.unit_windows = self.unit_start = self.unit_count = None
        if self.train and unit != "window":
            self._group_windows_by_unit()
            self.item_window = self.unit_windows[self.unit_start]  # one (first) window per unit
            self.item_offset = None
        elif self.train:
            self.item_window = self.windows
            self.item_offset = None  # random per access
        else:
            tiles = window // self.crop_samples
            self.item_window = np.repeat(self.windows, tiles)
            self.item_offset = np.tile(np.arange(tiles, dtype=np.int64) * self.crop_samples, len(self.windows))
        self.item_record = self.cache.window_record[self.item_window].astype(np.int64)
        self._labels = torch.from_numpy(np.asarray(self.cache.labels, dtype=np.float32))
        self._mask = torch.from_numpy(np.asarray(self.cache.label_mask, dtype=np.float32))
        self._rng: np.random.Generator | None = None
        self._rng_owner: int | None = None

    def _group_windows_by_unit(self) -> None:
        """``unit_windows[unit_start[i] : unit_start[i] + unit_count[i]]`` are unit i's windows."""
        win_record = self.cache.window_record[self.windows].astype(np.int64)
        if self.unit == "record":
            keys = win_record.astype(str)
        else:
            patient = np.array([r.get("patient_id") or f"record:{r['record_id']}" for r in self.cache.records])
            keys = patient[win_record]
        order = np.argsort(keys, kind="stable")
        _, starts, counts = np.unique(keys[order], return_index=True, return_counts=True)
        self.unit_windows = self.windows[order]
        self.unit_start, self.unit_count = starts.astype(np.int64), counts.astype(np.int64)

    def __getstate__(self) -> dict:
        """Pickle the cache by path (a memmap would be pickled as a full in-memory copy)."""
        state = dict(self.__dict__)
        state["cache"] = str(self.cache.path)
        state["_rng"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.cache = open_cache(state["cache"])

    # ------------------------------------------------------------------ facts
    @property
    def n_leads(self) -> int:
        return int(self.cache.signals.shape[1])

    @property
    def n_classes(self) -> int:
        return int(self.cache.labels.shape[1])

    @property
    def classes(self) -> list[str]:
        return self.cache.classes

    @property
    def record_ids(self) -> np.ndarray:
        """Record id of every record of the cache, indexed like ``item_record``."""
        return np.array([r["record_id"] for r in self.cache.records])

    def __len__(self) -> int:
        return len(self.item_window)

    # ------------------------------------------------------------------ items
    def __getitem__(self, index):
        """An int gives one item; a sequence of ints gives a batch ``(x [B, ...], y [B, K], mask [B, K])``."""
        if isinstance(index, (int, np.integer)):
            x, y, m = self.get_batch([int(index)])
            return x[0], y[0], m[0]
        return self.get_batch(index)

    def __getitems__(self, indices: Sequence[int]):
        x, y, m = self.get_batch(indices)
        return list(zip(x, y, m))

    def get_batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} items")
        if self.unit_windows is not None:  # one random window of each drawn unit
            win = self.unit_windows[self.unit_start[idx] + self._generator().integers(0, self.unit_count[idx])]
        else:
            win = self.item_window[idx]
        L, W = self.crop_samples, self.cache.window_samples
        # One sorted fancy read of the memmap (sequential on disk), then back to batch order.
        order = np.argsort(win, kind="stable")
        raw = np.empty((len(idx), self.n_leads, W), dtype=np.float16)
        raw[order] = self.cache.signals[win[order]]
        if L == W:
            x = raw.astype(np.float32)
        else:
            offsets = self._random_offsets(len(idx), W - L) if self.train else self.item_offset[idx]
            cols = offsets[:, None] + np.arange(L)[None, :]
            x = np.take_along_axis(raw, cols[:, None, :], axis=2).astype(np.float32)
        normalize_items(x, self.normalize)
        rec = torch.from_numpy(self.cache.window_record[win].astype(np.int64))
        return torch.from_numpy(x), self._labels[rec], self._mask[rec]

    def _random_offsets(self, n: int, high: int) -> np.ndarray:
        return self._generator().integers(0, high + 1, size=n)

    def _generator(self) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        owner = -1 if info is None else info.id
        if self._rng is None or self._rng_owner != owner:
            base = self.seed if info is None else info.seed
            self._rng = np.random.default_rng([self.seed, base & 0xFFFFFFFF, owner + 1])
            self._rng_owner = owner
        return self._rng


class ContiguousBatchSampler(Sampler[list[int]]):
    """Batches of consecutive items in a shuffled batch order (for caches larger than RAM).

    Each batch is one contiguous run of windows, so a cold memmap is read sequentially; the
    order of batches is reshuffled every epoch. Less random than item shuffling: use it when
    the disk, not the CPU, is the bottleneck.
    """

    def __init__(self, n_items: int, batch_size: int, drop_last: bool = False, seed: int = 0):
        self.n, self.batch_size, self.drop_last, self.seed, self.epoch = n_items, batch_size, drop_last, seed, 0

    def __iter__(self):
        starts = np.arange(0, self.n, self.batch_size)
        if self.drop_last and self.n % self.batch_size:
            starts = starts[:-1]
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        for s in rng.permutation(starts):
            yield list(range(int(s), min(int(s) + self.batch_size, self.n)))

    @property
    def record_ids(self) -> np.ndarray:
        """Record id of every record of the cache, indexed like ``item_record``."""
        return np.array([r["record_id"] for r in self.cache.records])

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)


def make_loader(
    dataset: WindowDataset,
    batch_size: int = 32,
    *,
    shuffle: bool | None = None,
    drop_last: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    contiguous: bool = False,
) -> DataLoader:
    """A DataLoader yielding ``(x [B, leads, L], y [B, K], mask [B, K])`` batches.

    ``shuffle`` defaults to ``dataset.train``. Batches are fetched whole via
    :meth:`WindowDataset.get_batch` (``batch_size=None`` + a batch sampler).
    """
    shuffle = dataset.train if shuffle is None else shuffle
    if contiguous:
        sampler = ContiguousBatchSampler(len(dataset), batch_size, drop_last, seed)
    else:
        generator = torch.Generator().manual_seed(seed)
        base = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        sampler = BatchSampler(base, batch_size, drop_last)
    return DataLoader(
        dataset, sampler=sampler, batch_size=None, num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
