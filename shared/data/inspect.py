"""What ``python -m shared.data inspect <record> --site <site>`` prints: one record as a dict.

The record is read by the site's reader exactly as the cache builder reads it, except that a
record with missing or unknown labels is still shown (with ``label_issue``) and NaN or flat
leads are reported rather than rejected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .labels import DEFAULT_SPACE, get_label_space, harmonise, masked_labels
from .readers import ref_for_path
from .readers.fastio import read_header


def inspect_record(path: str | Path, site: str, head: int | None = None, space: str = DEFAULT_SPACE,
                   **reader_options: Any) -> dict[str, Any]:
    """Describe one record (path without extension) of ``site`` as a JSON-ready dict.

    ``head=N`` adds ``head``: the first N samples of every lead in mV, standard lead order.
    CinC records of every sub-source are shown (``exclude_sources=()``) unless told otherwise.
    """
    options = {"strict_labels": False, "bad_leads": "keep", **reader_options}
    if site == "cinc":
        options.setdefault("exclude_sources", ())
    reader, ref = ref_for_path(site, path, **options)
    record = reader.read(ref)
    header = read_header(record.source)
    ls = get_label_space(space)
    labels = harmonise(site, record.native_labels, ls)
    counted, mask = masked_labels(site, record.native_labels, ls, subsource=record.meta.get("subsource"))
    meta = {k: v for k, v in record.meta.items() if k not in ("fast_path", "stored_lead_order")}
    out: dict[str, Any] = {
        "site": site,
        "record": record.record_id,
        "path": str(record.source),
        "patient_id": record.patient_id,
        "fs": record.fs,
        "n_leads": record.n_leads,
        "lead_names": list(record.lead_names),
        "stored_lead_names": list(header.sig_names),
        "n_samples": record.n_samples,
        "seconds": round(record.seconds, 3),
        "native_labels": list(record.native_labels),
        "label_space": ls.name,
        "labels": ls.names(labels),
        # per class: can this site (CinC: sub-source) state it both ways? Where not, the class
        # contributes nothing for this record, a stated positive included (``labels_counted``).
        "label_available": {c: bool(m) for c, m in zip(ls.classes, mask)},
        "labels_counted": ls.names(counted),
        "gain_fixed": bool(record.meta.get("gain_fixed", False)),
        "meta": meta,
    }
    if head:
        n = int(head)
        out["head"] = {name: [None if np.isnan(v) else round(float(v), 6) for v in row[:n]]
                       for name, row in zip(record.lead_names, record.signal)}
    return out
