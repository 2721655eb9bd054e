"""Command line of the data layer: ``python -m shared.data {prepare,inspect,download} ...``.

User errors (wrong dataset root, bad cache, unwritable output, failed download) exit with
status 2 and one clear line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import DataError
from .record import SITES


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="build a site's window cache from its dataset root (or synthetic data)")
    p.add_argument("--site", required=True, choices=SITES)
    p.add_argument("--source", required=True, help="dataset root as PhysioNet lays it out, or 'synthetic'")
    p.add_argument("--out", required=True, help="cache directory to create")
    p.add_argument("--fs", type=float, default=250.0, help="target sampling rate in Hz (default 250)")
    p.add_argument("--window-seconds", type=float, default=10.0, help="window length (default 10 s)")
    p.add_argument("--stride-seconds", type=float, default=None,
                   help="distance between window starts (default: window length, no overlap)")
    p.add_argument("--leads", choices=("standard", "all"), default="standard",
                   help="standard: the 12 leads; all: PTB keeps its 15 (12 + Frank vx vy vz)")
    filt = p.add_mutually_exclusive_group()
    filt.add_argument("--bandpass", nargs=2, type=float, metavar=("LO", "HI"), default=(0.5, 45.0),
                      help="Butterworth band-pass in Hz (default 0.5 45)")
    filt.add_argument("--no-filter", action="store_true", help="no band-pass filter")
    p.add_argument("--short", choices=("pad", "skip"), default="pad",
                   help="records shorter than one window: zero-pad (default) or skip")
    p.add_argument("--label-space", default="superclass", help="harmonised label space (default superclass)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes reading and preprocessing records (default: CPU count)")
    p.add_argument("--limit", type=int, default=None, help="only the first N listed records")
    p.add_argument("--records", type=int, default=None, help="synthetic: number of records (default 200)")
    p.add_argument("--seed", type=int, default=0, help="synthetic: generator seed (default 0)")
    p.add_argument("--include-sources", nargs="+", default=None, metavar="SOURCE", choices=("ptb", "ptbxl", "incart"),
                   help="cinc: keep these Challenge sub-sources that are excluded by default "
                        "(ptb, ptbxl: the same patients as the ptb/ptbxl sites; keep them only "
                        "when those sites are not in the federation; incart: 75 records of 32 "
                        "subjects with no subject id, so split by record)")
    p.add_argument("--force", action="store_true", help="replace a cache built with another config")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print one record as JSON")
    p.add_argument("record", help="record path without extension")
    p.add_argument("--site", required=True, choices=SITES)
    p.add_argument("--head", type=int, default=0, help="also print the first N samples of every lead (mV)")


def _add_download(sub) -> None:
    p = sub.add_parser("download", help="download a site's open PhysioNet dataset, verifying SHA-256")
    p.add_argument("--site", required=True, choices=SITES)
    p.add_argument("--out", required=True, help="directory to download into")
    p.add_argument("--base-url", default=None, help="PhysioNet files URL (default https://physionet.org/files)")
    p.add_argument("--include", action="append", default=None, metavar="GLOB",
                   help="only files matching this glob (repeatable), e.g. 'records100/*'")
    p.add_argument("--jobs", type=int, default=4, help="parallel downloads (default 4)")
    p.add_argument("--recheck", action="store_true", help="re-hash files already downloaded")
    p.add_argument("--no-progress", action="store_true")


def cmd_prepare(args) -> int:
    from .preprocess import PreprocessConfig
    from .prepare import LabelSpaceLabeler, build_reader, prepare_cache

    reader_options = {}
    if args.include_sources is not None:
        if args.site != "cinc":
            raise DataError("--include-sources applies to --site cinc only")
        from .readers.cinc import DEFAULT_EXCLUDE

        reader_options["exclude_sources"] = tuple(s for s in DEFAULT_EXCLUDE if s not in args.include_sources)
    try:
        config = PreprocessConfig(
            fs=args.fs, window_seconds=args.window_seconds, stride_seconds=args.stride_seconds,
            leads=args.leads, bandpass=None if args.no_filter else tuple(args.bandpass), short=args.short,
        )
    except ValueError as exc:
        raise DataError(f"bad preprocessing option: {exc}") from exc
    if args.source != "synthetic" and (args.records is not None):
        raise DataError("--records applies to --source synthetic only")
    reader = build_reader(args.site, args.source, reader_options=reader_options,
                          synthetic_records=args.records, synthetic_seed=args.seed)
    result = prepare_cache(
        reader, args.out, preprocess=config, labeler=LabelSpaceLabeler(args.label_space),
        source=args.source, workers=args.workers, limit=args.limit, force=args.force,
        progress=not args.no_progress,
    )
    m = result.manifest
    if result.status == "up_to_date":
        print(f"{args.out}: up to date (config {m['config_hash']}); nothing to do")
        return 0
    counts = ", ".join(f"{s} {c['records']} records/{c['windows']} windows" for s, c in m["counts"].items())
    print(f"{args.out}: {m['site']} cache{' (SYNTHETIC data)' if m['synthetic'] else ''}: {counts}")
    if m["skipped"]["total"]:
        reasons = ", ".join(f"{r} {n}" for r, n in m["skipped"]["by_reason"].items())
        print(f"skipped {m['skipped']['total']} records ({reasons}); see {args.out}/skips.csv")
    return 0


def cmd_inspect(args) -> int:
    from .inspect import inspect_record

    print(json.dumps(inspect_record(args.record, args.site, head=args.head or None), indent=1))
    return 0


def cmd_download(args) -> int:
    from .download import DEFAULT_BASE_URL, download_dataset

    result = download_dataset(
        args.site, args.out, base_url=args.base_url or DEFAULT_BASE_URL, include=args.include,
        jobs=args.jobs, recheck=args.recheck, progress=not args.no_progress,
    )
    if result.complete:
        print(f"{args.out}: complete ({len(result.fetched)} fetched, {len(result.skipped)} already verified)")
        return 0
    for path, reason in sorted(result.failed.items())[:20]:
        print(f"failed: {path}: {reason}", file=sys.stderr)
    print(f"error: {args.out}: incomplete, {len(result.failed)} of "
          f"{len(result.failed) + len(result.fetched) + len(result.skipped)} files failed; "
          "re-run the same command to resume", file=sys.stderr)
    return 1


COMMANDS = {"prepare": cmd_prepare, "inspect": cmd_inspect, "download": cmd_download}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.data",
                                     description="ECG data layer: prepare a site cache, inspect a record, download a dataset.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prepare(sub)
    _add_inspect(sub)
    _add_download(sub)
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permission denied, ... while writing
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
