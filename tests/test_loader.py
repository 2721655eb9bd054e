"""WindowDataset / make_loader: shapes, crops, tiling, normalisation, record aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fake_site import FakeLabeler, FakeReader
from shared.data.loader import ContiguousBatchSampler, WindowDataset, make_loader
from shared.data.prepare import prepare_cache
from shared.metrics import record_level


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "ptb"
    prepare_cache(FakeReader(n=24), out, labeler=FakeLabeler(), progress=False)
    return out


def test_train_items_are_random_crops_of_their_window(cache_dir):
    ds = WindowDataset(cache_dir, "train", crop_samples=1000, train=True, normalize="none")
    assert len(ds) == len(ds.windows) > 0 and ds.n_leads == 12 and ds.n_classes == 5
    offsets = set()
    for _ in range(6):
        x, y, mask = ds[0]
        assert x.shape == (12, 1000) and x.dtype == torch.float32
        window = ds.cache.signals[ds.windows[0]].astype(np.float32)
        matches = [o for o in range(0, 1501) if np.array_equal(window[:, o:o + 1000], x.numpy())]
        assert len(matches) == 1
        offsets.add(matches[0])
        record = ds.item_record[0]
        assert y.tolist() == ds.cache.labels[record].astype(float).tolist()
        assert mask.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert len(offsets) > 1  # crops move between accesses


def test_eval_tiles_each_window_into_non_overlapping_crops(cache_dir):
    ds = WindowDataset(cache_dir, "train", crop_samples=1000, normalize="none")
    assert len(ds) == 2 * len(ds.windows)  # 2500 // 1000 = 2 crops, tail dropped
    x, _, _ = ds[list(range(4))]
    w0, w1 = (ds.cache.signals[w].astype(np.float32) for w in ds.windows[:2])
    for got, want in zip(x.numpy(), (w0[:, :1000], w0[:, 1000:2000], w1[:, :1000], w1[:, 1000:2000])):
        np.testing.assert_array_equal(got, want)
    assert (ds.item_record == np.repeat(ds.cache.window_record[ds.windows], 2)).all()


def test_zscore_normalises_each_lead_of_each_item(cache_dir):
    x, _, _ = WindowDataset(cache_dir, "train", normalize="zscore")[list(range(3))]
    np.testing.assert_allclose(x.mean(dim=2).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(x.std(dim=2, unbiased=False).numpy(), 1, atol=1e-3)


def test_make_loader_batches_cover_every_item_once(cache_dir):
    ds = WindowDataset(cache_dir, "train", crop_samples=500)
    seen = []
    for x, y, mask in make_loader(ds, batch_size=8):
        assert x.shape[1:] == (12, 500) and y.shape == mask.shape == (x.shape[0], 5)
        seen.append(x)
    assert sum(len(b) for b in seen) == len(ds)
    first = next(iter(make_loader(ds, batch_size=8)))[0]
    np.testing.assert_array_equal(first.numpy(), ds[list(range(8))][0].numpy())  # eval: sequential


def test_shuffled_loader_is_seeded_and_plain_dataloader_works(cache_dir):
    ds = WindowDataset(cache_dir, "train", crop_samples=500, train=True, seed=3)
    batches = [b[1] for b in make_loader(ds, batch_size=4, seed=1)]
    again = [b[1] for b in make_loader(WindowDataset(cache_dir, "train", crop_samples=500, train=True), 4, seed=1)]
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    x, y, mask = next(iter(DataLoader(ds, batch_size=5)))  # standard collation via __getitems__
    assert x.shape == (5, 12, 500) and y.shape == (5, 5)


def test_contiguous_sampler_covers_all_items_in_shuffled_blocks():
    sampler = ContiguousBatchSampler(23, 5, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    assert sorted(i for b in batches for i in b) == list(range(23))
    assert all(b == list(range(b[0], b[0] + len(b))) for b in batches)
    assert any(list(sampler) != batches for _ in range(5))  # a new batch order per epoch


def test_record_level_mean_of_items(cache_dir):
    ds = WindowDataset(cache_dir, "test", crop_samples=1250)
    probs = np.random.default_rng(0).random((len(ds), 5))
    records, rec_probs = record_level(probs, ds.item_record)
    assert list(records) == sorted(set(ds.item_record.tolist()))
    for r, p in zip(records, rec_probs):
        np.testing.assert_allclose(p, probs[ds.item_record == r].mean(axis=0))
    assert list(ds.record_ids[records]) == [ds.cache.records[r]["record_id"] for r in records]


def test_bad_arguments_are_refused(cache_dir):
    with pytest.raises(ValueError, match="crop_samples"):
        WindowDataset(cache_dir, "train", crop_samples=3000)
    with pytest.raises(ValueError, match="split"):
        WindowDataset(cache_dir, "holdout")
    with pytest.raises(ValueError, match="normalize"):
        WindowDataset(cache_dir, "train", normalize="minmax")


def test_dataset_pickles_by_path_not_by_content(cache_dir):
    import pickle

    ds = WindowDataset(cache_dir, "val", crop_samples=500)
    blob = pickle.dumps(ds)
    assert len(blob) < ds.cache.signals.nbytes / 4  # the float16 windows are not copied
    again = pickle.loads(blob)
    assert torch.equal(again[list(range(len(again)))][0], ds[list(range(len(ds)))][0])
