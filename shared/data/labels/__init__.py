"""One harmonised label space for the four sites, read from reviewable CSV tables.

Each site states diagnoses in its own vocabulary: PTB a reason for admission, PTB-XL SCP codes,
the Challenge SNOMED-CT codes, MIMIC-IV-ECG free-text machine statements. The tables in
``tables/`` map each native label to a class of a label space (default ``superclass``:
NORM, MI, STTC, CD, HYP), one row per native label with a justification a clinician can check
and correct without touching code:

* ``<space>_<site>.csv``: ``native`` (the code, text, or for MIMIC a case-insensitive regular
  expression searched in each statement), ``class`` (empty: maps to no class), ``blocks_norm``
  (1: the statement is an abnormal finding, so the record cannot be NORM where the site's NORM
  rule is ``exclusive``), ``justification``.
* ``<space>_availability.csv``: per site (and per CinC sub-source, ``cinc:<subsource>``) which
  classes are ``known`` or ``unknown`` there, and the site's NORM rule:
  ``benchmark`` (PTB-XL: classes as the table says, no exclusivity), ``exclusive`` (NORM only
  when no other class is positive and no statement blocks it), ``single_reason`` (PTB: one
  reason per record).

A class that is unknown at a site (or CinC sub-source) contributes nothing there, positives
included: :func:`availability` gives the site-level mask and :func:`record_mask` the per-record
one, which is that availability and nothing else. A stated positive of a class the site cannot
also state negatively (PTB's "Bundle branch block" admission -> CD) is masked out, because a
class with positives but no negatives at one site lets a model learn "this site" in place of
"this disease" (issue 13).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np

TABLES_DIR = Path(__file__).resolve().parent / "tables"

#: Label spaces and their classes, in output order.
SPACES: dict[str, tuple[str, ...]] = {
    "superclass": ("NORM", "MI", "STTC", "CD", "HYP"),
    # Second space: rhythm (sinus rhythm, atrial fibrillation, atrial flutter, sinus brady-/tachycardia).
    "rhythm": ("SR", "AF", "AFL", "SB", "STACH"),
}
DEFAULT_SPACE = "superclass"
#: Sites whose native labels are matched exactly (code or text) vs by regular expression.
REGEX_SITES = frozenset({"mimic"})
NORM_RULES = ("benchmark", "exclusive", "single_reason")


@dataclass(frozen=True)
class LabelSpace:
    """A named, ordered set of classes."""

    name: str
    classes: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def index(self, cls: str) -> int:
        return self.classes.index(cls)

    def names(self, vector: Iterable[int]) -> list[str]:
        """Class names where ``vector`` is non-zero."""
        return [c for c, v in zip(self.classes, vector) if v]


@dataclass(frozen=True)
class MappingRow:
    native: str
    cls: str  # "" for no class
    blocks_norm: bool
    justification: str


@dataclass(frozen=True)
class SiteMapping:
    site: str
    space: LabelSpace
    rows: tuple[MappingRow, ...]
    exact: dict  # normalised native label -> MappingRow (exact-match sites)
    patterns: tuple  # (compiled regex, MappingRow) (regex sites)


def get_label_space(name: str | LabelSpace = DEFAULT_SPACE) -> LabelSpace:
    """The label space called ``name`` (``superclass`` by default)."""
    if isinstance(name, LabelSpace):
        return name
    if name not in SPACES:
        raise KeyError(f"unknown label space {name!r}; known: {', '.join(SPACES)}")
    return LabelSpace(name, SPACES[name])


def _key(site: str, label: str) -> str:
    """How native labels are compared: PTB reasons case-insensitively, codes as written."""
    label = str(label).strip()
    return label.lower() if site == "ptb" else label


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"label table {path} is missing")
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@lru_cache(maxsize=None)
def load_mapping(site: str, space: str = DEFAULT_SPACE) -> SiteMapping:
    """Read ``tables/<space>_<site>.csv`` and check that every class belongs to the space."""
    ls = get_label_space(space)
    path = TABLES_DIR / f"{ls.name}_{site}.csv"
    rows = []
    for i, r in enumerate(_read_csv(path), start=2):
        cls = (r.get("class") or "").strip()
        if cls and cls not in ls.classes:
            raise ValueError(f"{path}:{i}: class {cls!r} is not in label space {ls.name} {ls.classes}")
        rows.append(MappingRow(r["native"].strip(), cls, r.get("blocks_norm", "0").strip() == "1",
                               r.get("justification", "")))
    exact: dict[str, MappingRow] = {}
    patterns = []
    if site in REGEX_SITES:
        patterns = [(re.compile(row.native, re.IGNORECASE), row) for row in rows]
    else:
        for row in rows:
            k = _key(site, row.native)
            if k in exact:
                raise ValueError(f"{path}: native label {row.native!r} is listed twice")
            exact[k] = row
    return SiteMapping(site, ls, tuple(rows), exact, tuple(patterns))


@lru_cache(maxsize=None)
def _availability_table(space: str) -> dict[str, tuple[tuple[bool, ...], str]]:
    ls = get_label_space(space)
    path = TABLES_DIR / f"{ls.name}_availability.csv"
    out = {}
    for i, r in enumerate(_read_csv(path), start=2):
        flags = []
        for c in ls.classes:
            v = (r.get(c) or "").strip()
            if v not in ("known", "unknown"):
                raise ValueError(f"{path}:{i}: {c} must be 'known' or 'unknown', got {v!r}")
            flags.append(v == "known")
        rule = r["norm_rule"].strip()
        if rule not in NORM_RULES:
            raise ValueError(f"{path}:{i}: norm_rule must be one of {NORM_RULES}, got {rule!r}")
        out[r["site"].strip()] = (tuple(flags), rule)
    return out


def _site_row(site: str, space: str, subsource: str | None) -> tuple[tuple[bool, ...], str]:
    table = _availability_table(get_label_space(space).name)
    if subsource is not None and f"{site}:{subsource}" in table:
        return table[f"{site}:{subsource}"]
    if site not in table:
        raise KeyError(f"site {site!r} has no row in the {space} availability table")
    return table[site]


def availability(site: str, space: str | LabelSpace = DEFAULT_SPACE, subsource: str | None = None) -> np.ndarray:
    """``bool[K]``: which classes the site (or CinC sub-source) can state both ways."""
    ls = get_label_space(space)
    return np.array(_site_row(site, ls.name, subsource)[0], dtype=bool)


@lru_cache(maxsize=1 << 16)
def _rows_for(site: str, space: str, label: str) -> tuple[MappingRow, ...]:
    m = load_mapping(site, space)
    if m.patterns:
        return tuple(row for rx, row in m.patterns if rx.search(label))
    row = m.exact.get(_key(site, label))
    return (row,) if row is not None else ()


def matched_rows(site: str, native_labels: Iterable[str], space: str | LabelSpace = DEFAULT_SPACE) -> list[tuple[str, MappingRow]]:
    """``(native label, table row)`` for every row that matches a native label, in order."""
    name = get_label_space(space).name
    return [(label, row) for label in native_labels for row in _rows_for(site, name, str(label))]


def unknown_labels(site: str, native_labels: Iterable[str], space: str | LabelSpace = DEFAULT_SPACE) -> list[str]:
    """Native labels the site's table does not list (always empty for free-text sites)."""
    ls = get_label_space(space)
    if site in REGEX_SITES:
        return []
    m = load_mapping(site, ls.name)
    return [lab for lab in native_labels if _key(site, lab) not in m.exact]


def harmonise(site: str, native_labels: Iterable[str], space: str | LabelSpace = DEFAULT_SPACE) -> np.ndarray:
    """``uint8[K]`` multi-hot vector of the classes the native labels state (1 = positive).

    0 means negative only where :func:`availability` / :func:`record_mask` say the class is known.
    Native labels missing from the table are ignored (readers reject a record none of whose
    labels is listed, reason ``unknown_codes``).
    """
    ls = get_label_space(space)
    _, rule = _site_row(site, ls.name, None)
    positives: set[str] = set()
    blocked = False
    for _, row in matched_rows(site, native_labels, ls):
        if row.cls:
            positives.add(row.cls)
        blocked |= row.blocks_norm
    if rule == "exclusive" and "NORM" in positives and (blocked or len(positives) > 1):
        positives.discard("NORM")
    return np.array([c in positives for c in ls.classes], dtype=np.uint8)


def record_mask(
    site: str, native_labels: Iterable[str], space: str | LabelSpace = DEFAULT_SPACE, subsource: str | None = None
) -> np.ndarray:
    """``uint8[K]``: 1 where this record's label counts, i.e. the site's (or sub-source's) availability.

    Stated positives of an unavailable class are *not* added back: such a class contributes
    nothing at that site (training loss, evaluation, pooled test). ``native_labels`` is kept in
    the signature so callers stay per-record; the mask does not depend on it.
    """
    del native_labels
    return availability(site, space, subsource).astype(np.uint8)


def masked_labels(
    site: str, native_labels: Iterable[str], space: str | LabelSpace = DEFAULT_SPACE, subsource: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, mask)``, both ``uint8[K]``: :func:`harmonise` zeroed where :func:`record_mask` is 0."""
    labels = tuple(native_labels)
    mask = record_mask(site, labels, space, subsource)
    return (harmonise(site, labels, space) * mask).astype(np.uint8), mask


def explain(site: str, native_labels: Iterable[str], space: str | LabelSpace = DEFAULT_SPACE) -> list[dict[str, str]]:
    """Which table row each native label matched, with its class and justification."""
    return [
        {"native": lab, "rule": row.native, "class": row.cls, "justification": row.justification}
        for lab, row in matched_rows(site, native_labels, space)
    ]


__all__ = [
    "DEFAULT_SPACE", "LabelSpace", "SPACES", "TABLES_DIR", "availability", "explain", "get_label_space",
    "harmonise", "load_mapping", "masked_labels", "matched_rows", "record_mask", "unknown_labels",
]
