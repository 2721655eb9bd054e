"""Patient-disjoint, deterministic train/val/test splits.

A record's split is decided by its *split key* alone, never by listing order or by which other
records happen to be present, so a subset (``--limit``), a re-download or a second machine gives
every record the same split:

* ``ptbxl``: the dataset's own ``strat_fold`` (patient-disjoint by construction): folds 1-8
  train, 9 val, 10 test, as in the PTB-XL benchmark.
* ``ptb`` and ``mimic``: a stable hash of ``(site, patient id)`` mapped to ``[0, 1)``;
  below 0.8 train, below 0.9 val, else test. Every record of a patient lands in one split.
* ``cinc``: the Challenge data has no patient ids, so the same hash of the record id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Default fractions of split keys (patients or records) in train / val / test.
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
PTBXL_FOLDS: dict[str, tuple[int, ...]] = {
    "train": (1, 2, 3, 4, 5, 6, 7, 8), "val": (9,), "test": (10,),
}


def stable_unit(site: str, key: str) -> float:
    """A number in ``[0, 1)`` fixed by ``(site, key)``: the first 8 bytes of a SHA-256."""
    digest = hashlib.sha256(f"{site}\x1f{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def fold_split(fold: int) -> str:
    """PTB-XL ``strat_fold`` -> split name."""
    for split, folds in PTBXL_FOLDS.items():
        if int(fold) in folds:
            return split
    raise ValueError(f"strat_fold must be 1..10, got {fold!r}")


def assign_split(
    site: str,
    split_key: tuple[str, str],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> str:
    """The split of one record from its split key ``(kind, value)``.

    ``kind`` is ``"fold"`` (value: PTB-XL ``strat_fold``), ``"patient"`` or ``"record"``.
    """
    kind, value = split_key
    if kind == "fold":
        return fold_split(int(value))
    if kind not in ("patient", "record"):
        raise ValueError(f"unknown split key kind {kind!r} (expected fold, patient or record)")
    train, val, _test = _check_fractions(fractions)
    u = stable_unit(site, f"{kind}:{value}")
    if u < train:
        return "train"
    if u < train + val:
        return "val"
    return "test"


def split_method(site: str, kinds: Iterable[str], fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """A plain-words description of how a site's records were split (stored in splits.json)."""
    kinds = sorted(set(kinds))
    if kinds == ["fold"]:
        return "ptbxl strat_fold: folds 1-8 train, 9 val, 10 test"
    train, val, test = _check_fractions(fractions)
    by = " / ".join({"patient": "patient id", "record": "record id (no patient ids)"}.get(k, k) for k in kinds)
    return (
        f"sha256 of ({site}, {by}) -> [0, 1): < {train:g} train, < {train + val:g} val, else test "
        f"({train:g}/{val:g}/{test:g}); all records of a patient share its split"
    )


def check_disjoint(record_splits: Mapping[str, str], record_groups: Mapping[str, str]) -> None:
    """Raise ``ValueError`` if any group (patient) has records in two splits."""
    seen: dict[str, str] = {}
    for record_id, split in record_splits.items():
        group = record_groups[record_id]
        if seen.setdefault(group, split) != split:
            raise ValueError(
                f"patient {group!r} is in both {seen[group]!r} and {split!r} (record {record_id!r})"
            )


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions!r}")
    return float(fractions[0]), float(fractions[1]), float(fractions[2])
