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


def test_masked_bce_is_each_samples_masked_mean_then_the_batch_mean():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 5), torch.randint(0, 2, (6, 5)).float()
    mask = torch.ones(6, 5)
    mask[:, 2] = 0
    mask[0, 0] = 0
    loss = masked_bce_with_logits(logits, targets, mask)
    known = mask.bool()
    per_sample = [F.binary_cross_entropy_with_logits(logits[i][known[i]], targets[i][known[i]]) for i in range(6)]
    assert loss.item() == pytest.approx(torch.stack(per_sample).mean().item())
    # with equal masks in every row it is also the mean over all known entries
    mask = torch.ones(6, 5)
    mask[:, 2] = 0
    known = mask.bool()
    loss = masked_bce_with_logits(logits, targets, mask)
    assert loss.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits[known], targets[known]).item())


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_per_sample_gradient_does_not_depend_on_other_samples_masks():
    """DP-SGD's per-sample sensitivity: Opacus's per-sample gradient of sample 0 stays the same when
    sample 1's mask changes (a batch-wide mask count made it change)."""
    from opacus import GradSampleModule

    torch.manual_seed(0)
    x, targets = torch.randn(3, 8), torch.randint(0, 2, (3, 5)).float()
    base = torch.nn.Linear(8, 5)

    def grad_of_sample0(mask):
        model = GradSampleModule(torch.nn.Linear(8, 5))
        model._module.load_state_dict(base.state_dict())
        masked_bce_with_logits(model(x), targets, mask).backward()
        return model._module.weight.grad_sample[0].clone() * x.shape[0]  # Opacus scales by 1/B for mean

    mask_a = torch.ones(3, 5)
    mask_b = mask_a.clone()
    mask_b[1, 1:] = 0  # sample 1 now knows one class only
    mask_b[2, :2] = 0
    g_a, g_b = grad_of_sample0(mask_a), grad_of_sample0(mask_b)
    assert torch.allclose(g_a, g_b, atol=1e-7)
    # The check can fail: the old batch-wide normalisation does change sample 0's gradient.
    def old_loss(logits, y, m):
        per_entry = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        return (per_entry * m).sum() / m.sum()

    def old_grad(mask):
        model = GradSampleModule(torch.nn.Linear(8, 5))
        model._module.load_state_dict(base.state_dict())
        old_loss(model(x), targets, mask).backward()
        return model._module.weight.grad_sample[0].clone()

    assert not torch.allclose(old_grad(mask_a), old_grad(mask_b), atol=1e-7)


def test_empty_batch_is_a_zero_loss():
    logits = torch.zeros(0, 5, requires_grad=True)
    loss = masked_bce_with_logits(logits, torch.zeros(0, 5), torch.zeros(0, 5))
    loss.backward()
    assert loss.item() == 0.0


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
