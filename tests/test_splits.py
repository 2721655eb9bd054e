"""Splits are deterministic, independent of listing order and subset, and patient-disjoint."""

from __future__ import annotations

import random

import pytest

from shared.data.splits import (
    SPLITS, assign_split, check_disjoint, fold_split, split_method, stable_unit,
)


def _patients(n: int) -> list[str]:
    return [f"{10000000 + 7 * i}" for i in range(n)]


def test_stable_unit_is_fixed_and_in_range():
    values = [stable_unit("mimic", p) for p in _patients(2000)]
    assert all(0.0 <= v < 1.0 for v in values)
    # A fixed value: changing the hash would silently move patients between splits.
    assert stable_unit("mimic", "patient:10000032") == pytest.approx(0.25791716224946953, abs=0)
    assert assign_split("mimic", ("patient", "10000032")) == "train"
    assert stable_unit("mimic", "a") != stable_unit("ptb", "a")


def test_split_of_a_key_does_not_depend_on_order_or_subset():
    keys = _patients(3000)
    full = {k: assign_split("mimic", ("patient", k)) for k in keys}
    shuffled = keys[:]
    random.Random(1).shuffle(shuffled)
    subset = shuffled[:500]
    assert {k: assign_split("mimic", ("patient", k)) for k in subset} == {k: full[k] for k in subset}


def test_fractions_are_close_to_80_10_10():
    splits = [assign_split("cinc", ("record", k)) for k in _patients(20000)]
    for name, expected in zip(SPLITS, (0.8, 0.1, 0.1)):
        assert splits.count(name) / len(splits) == pytest.approx(expected, abs=0.015)


def test_records_of_one_patient_share_a_split():
    # 5 records per patient: the split is decided by the patient, so they can never diverge.
    records = {f"r{p}_{j}": p for p in _patients(1000) for j in range(5)}
    record_splits = {r: assign_split("ptb", ("patient", p)) for r, p in records.items()}
    check_disjoint(record_splits, records)  # raises if a patient is in two splits
    assert set(record_splits.values()) == set(SPLITS)


def test_check_disjoint_catches_a_patient_in_two_splits():
    with pytest.raises(ValueError, match="patient 'p1' is in both"):
        check_disjoint({"a": "train", "b": "test"}, {"a": "p1", "b": "p1"})


def test_ptbxl_strat_folds():
    assert [fold_split(f) for f in range(1, 11)] == ["train"] * 8 + ["val", "test"]
    assert assign_split("ptbxl", ("fold", "9")) == "val"
    with pytest.raises(ValueError):
        fold_split(11)


def test_bad_fractions_and_kinds_are_refused():
    with pytest.raises(ValueError, match="sum"):
        assign_split("ptb", ("patient", "1"), fractions=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="unknown split key kind"):
        assign_split("ptb", ("hospital", "1"))
    assert "patient id" in split_method("ptb", {"patient"})
    assert "strat_fold" in split_method("ptbxl", {"fold"})
