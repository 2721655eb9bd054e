"""Masked BCE and masked AUROC honour the label-availability mask."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from shared.metrics import masked_auroc_per_class, masked_macro_auroc, record_level
from shared.training.losses import masked_bce_with_logits


def test_masked_bce_is_the_mean_over_known_entries():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 5), torch.randint(0, 2, (6, 5)).float()
    mask = torch.ones(6, 5)
    mask[:, 2] = 0
    mask[0, 0] = 0
    loss = masked_bce_with_logits(logits, targets, mask)
    known = mask.bool()
    assert loss.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits[known], targets[known]).item())


def test_unknown_entries_get_zero_gradient_whatever_their_target():
    logits = torch.randn(4, 3, requires_grad=True)
    mask = torch.tensor([[1, 0, 1]] * 4, dtype=torch.float32)
    targets = torch.tensor([[1, float("nan"), 0]] * 4)  # even a NaN target where unknown
    masked_bce_with_logits(logits, targets, mask).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[:, 1] == 0).all() and (logits.grad[:, [0, 2]] != 0).all()


def test_batch_without_known_entries_is_zero_loss_and_zero_gradient():
    logits = torch.randn(3, 5, requires_grad=True)
    loss = masked_bce_with_logits(logits, torch.ones(3, 5), torch.zeros(3, 5))
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="same shape"):
        masked_bce_with_logits(torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(2, 4))


def test_masked_auroc_equals_sklearn_on_known_entries_and_nan_where_undefined():
    rng = np.random.default_rng(0)
    n = 200
    targets = rng.integers(0, 2, (n, 4))
    probs = np.clip(targets * 0.3 + rng.random((n, 4)) * 0.7, 0, 1)
    mask = np.ones((n, 4))
    mask[rng.random(n) < 0.4, 0] = 0  # class 0 partly unknown
    mask[:, 1] = 0  # class 1 unknown at this site
    targets[:, 2] = 1  # class 2 has one value only
    per_class, macro = masked_macro_auroc(probs, targets, mask)
    known = mask[:, 0] > 0
    assert per_class[0] == pytest.approx(roc_auc_score(targets[known, 0], probs[known, 0]))
    assert per_class[0] != pytest.approx(roc_auc_score(targets[:, 0], probs[:, 0]))  # the mask matters
    assert math.isnan(per_class[1]) and math.isnan(per_class[2])
    assert per_class[3] == pytest.approx(roc_auc_score(targets[:, 3], probs[:, 3]))
    assert macro == pytest.approx((per_class[0] + per_class[3]) / 2)


def test_macro_auroc_is_nan_when_no_class_is_defined():
    per_class, macro = masked_macro_auroc(np.full((3, 2), 0.5), np.ones((3, 2)), np.ones((3, 2)))
    assert np.isnan(per_class).all() and math.isnan(macro)
    assert np.isnan(masked_auroc_per_class(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1))).all()


def test_record_level_averages_items_per_record():
    records, means = record_level(np.array([[0.2], [0.4], [0.9], [0.0]]), np.array([5, 5, 2, 5]))
    assert records.tolist() == [2, 5]
    np.testing.assert_allclose(means[:, 0], [0.9, 0.2])
