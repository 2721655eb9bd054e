"""``python -m shared.data.labels.coverage [--records N] [--seed S]``: per site and sub-source, which
classes can be stated (``label_available``) and the positive / negative counts the label mask
leaves, on the embedded synthetic data (the real datasets: run ``prepare`` and read the cache's
``manifest.json`` counts). Prints a Markdown table (docs/labels.md).

A stated positive of a class the site (sub-source) cannot state is counted under ``dropped``: it
contributes nothing there (issue 13).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from . import DEFAULT_SPACE, get_label_space, harmonise, masked_labels

SITES = ("ptb", "ptbxl", "mimic", "cinc")


def coverage(site: str, n_records: int, seed: int = 0, space: str = DEFAULT_SPACE) -> dict[str, dict]:
    """``{sub-source: {"records", "available" [K] bool, "pos" [K], "neg" [K], "dropped" [K]}}``."""
    from ..synthetic import SyntheticReader

    ls = get_label_space(space)
    out: dict[str, dict] = defaultdict(lambda: {"records": 0, "available": None, "pos": np.zeros(ls.n_classes, int),
                                                "neg": np.zeros(ls.n_classes, int),
                                                "dropped": np.zeros(ls.n_classes, int)})
    for ref in SyntheticReader(site, n_records, seed=seed).list_records():
        sub = ref.meta.get("subsource") if site == "cinc" else None
        labels, mask = masked_labels(site, ref.native_labels, ls, subsource=sub)
        stated = harmonise(site, ref.native_labels, ls)
        row = out[sub or site]
        row["records"] += 1
        row["available"] = mask.astype(bool)
        row["pos"] += labels
        row["neg"] += (mask.astype(bool) & ~labels.astype(bool))
        row["dropped"] += (stated.astype(bool) & ~mask.astype(bool))
    return dict(out)


def markdown(n_records: int, seed: int = 0, space: str = DEFAULT_SPACE) -> str:
    ls = get_label_space(space)
    lines = ["| site | sub-source | records | " + " | ".join(ls.classes) + " | stated positives dropped |",
             "|---|---|---|" + "---|" * ls.n_classes + "---|"]
    for site in SITES:
        for sub, row in sorted(coverage(site, n_records, seed, space).items()):
            cells = [f"{row['pos'][k]} / {row['neg'][k]}" if row["available"][k] else "unavailable"
                     for k in range(ls.n_classes)]
            dropped = ", ".join(f"{c} {row['dropped'][k]}" for k, c in enumerate(ls.classes) if row["dropped"][k])
            lines.append(f"| {site} | {sub if site == 'cinc' else '-'} | {row['records']} | " + " | ".join(cells)
                         + f" | {dropped or '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.data.labels.coverage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=400, help="synthetic records per site (default 400)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(markdown(args.records, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
