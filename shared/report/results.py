"""The long-form results CSV: one row per number, written atomically, resumable.

Columns: ``method, train_sites, test_site, metric, value, seed, config_hash, round, synthetic,
results_version``.

* ``method``: ``local``, ``pooled``, ``federated-<strategy>``, ``federated-<strategy>+dp``;
* ``train_sites``: ``+``-joined site names; ``own-site`` for the local rows where every site's
  own model is scored on its own test split (the diagonal of the cross-site matrix);
* ``test_site``: a site, ``pooled`` (AUROC of the concatenated test predictions of all sites,
  never an average) or ``mean-of-sites`` (mean of the site AUROCs, labelled as such);
* ``metric``: ``auroc_macro``, ``auroc_<CLASS>``, ``auprc_macro``, ``auprc_<CLASS>``, ``n_records``
  for the final model on the test split;
  ``epsilon``, ``delta`` (DP, cumulative at the last round the site trained); ``round_<metric>``
  for the server's per-round numbers (``round`` is then that round);
* ``round``: the final round (local/pooled: the round-equivalent budget, see compare.py);
* ``results_version``: the format of the row (:data:`RESULTS_VERSION`). A file written by another
  version of the project (other columns, another version) is refused with a message naming it:
  its rows were computed under other rules (issue 13: label masks, validation curves).

Predictions (``.npz`` under ``<predictions>/<config_hash>/<method>/seed<k>/``) carry the config
hash and the patient id of every record, so an interval always comes from the point estimate's
config and can resample patients.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_VERSION = 2  # 2: label mask = availability only, per-round curves on validation, AUPRC rows
COLUMNS = ("method", "train_sites", "test_site", "metric", "value", "seed", "config_hash", "round", "synthetic",
           "results_version")
POOLED = "pooled"
MEAN_OF_SITES = "mean-of-sites"
OWN_SITE = "own-site"


def config_hash(config: Mapping[str, Any]) -> str:
    """Short stable hash of a JSON-able config (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def make_row(*, method: str, train_sites: str, test_site: str, metric: str, value: float, seed: int,
             config_hash: str, round: int, synthetic: bool) -> dict[str, Any]:
    return {
        "method": method,
        "train_sites": train_sites,
        "test_site": test_site,
        "metric": metric,
        "value": float(value),
        "seed": int(seed),
        "config_hash": config_hash,
        "round": int(round),
        "synthetic": bool(synthetic),
        "results_version": RESULTS_VERSION,
    }


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of the CSV with typed values (empty list when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is not None and tuple(reader.fieldnames) == COLUMNS[:-1]:
            raise ValueError(
                f"{path}: written by an earlier version of the project (results format 1, no results_version "
                f"column; its label masks kept positives of unavailable classes and its curves used the test "
                f"split): write the comparison to a new out_dir")
        if reader.fieldnames is None or tuple(reader.fieldnames) != COLUMNS:
            raise ValueError(f"{path}: header {reader.fieldnames} is not the results format {list(COLUMNS)}")
        rows = []
        for i, r in enumerate(reader, start=2):
            try:
                rows.append({
                    **r,
                    "value": float(r["value"]) if r["value"] not in ("", "nan") else float("nan"),
                    "seed": int(r["seed"]),
                    "round": int(r["round"]),
                    "synthetic": r["synthetic"].strip().lower() == "true",
                    "results_version": int(r["results_version"]),
                })
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}, line {i}: bad value ({exc})") from None
            if rows[-1]["results_version"] != RESULTS_VERSION:
                raise ValueError(
                    f"{path}, line {i}: results_version {rows[-1]['results_version']} (method {r['method']!r}, "
                    f"config {r['config_hash']}), this project writes and reads version {RESULTS_VERSION}: "
                    f"rows of another project version cannot share a report; write to a new out_dir")
    return rows


def _format(row: Mapping[str, Any]) -> list[str]:
    v = float(row["value"])
    return [
        str(row["method"]), str(row["train_sites"]), str(row["test_site"]), str(row["metric"]),
        "nan" if np.isnan(v) else repr(v), str(int(row["seed"])), str(row["config_hash"]),
        str(int(row["round"])), "true" if row["synthetic"] else "false",
        str(int(row.get("results_version", RESULTS_VERSION))),
    ]


def append_results(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Add ``rows`` to the CSV: existing rows + new ones written to a temporary file, then renamed."""
    path = Path(path)
    existing = read_results(path)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in [*existing, *rows]:
        missing = set(COLUMNS) - set(row)
        if missing:
            raise ValueError(f"result row lacks {sorted(missing)}: {row}")
        writer.writerow(_format(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)
    return path


def finished_runs(path: str | Path) -> set[tuple[str, int, str]]:
    """``(method, seed, config_hash)`` of the runs already in the CSV (compare skips them)."""
    return {(r["method"], r["seed"], r["config_hash"]) for r in read_results(path)}


def predictions_path(predictions_dir: str | Path, method: str, seed: int, train_sites: str, test_site: str,
                     config_hash: str, split: str = "test") -> Path:
    """Where the record-level predictions of one (config, method, seed, train sites, test site,
    split) live; ``split`` is ``test`` or ``val`` (thresholds are chosen on ``val``)."""
    suffix = "" if split == "test" else f"__{split}"
    return (Path(predictions_dir) / str(config_hash) / method / f"seed{int(seed)}"
            / f"{train_sites}__{test_site}{suffix}.npz")
