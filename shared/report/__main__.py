"""``python -m shared.report RESULTS.csv PREDICTIONS_DIR OUT_DIR``: write report.md and plots."""

from __future__ import annotations

import argparse
import sys

from .build import build_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.report", description=__doc__)
    parser.add_argument("results_csv")
    parser.add_argument("predictions_dir", nargs="+", help="one or more predictions directories")
    parser.add_argument("out_dir")
    parser.add_argument("--bootstrap", type=int, default=1000, help="patient-level bootstrap replicates")
    parser.add_argument("--config-hash", help="the config to report when the CSV holds several")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.results_csv, args.predictions_dir, args.out_dir, n_boot=args.bootstrap,
                            config_hash=args.config_hash)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
