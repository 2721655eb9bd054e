"""Synthetic generator benchmark: generation speed and the cross-site AUROC gap.

Usage: ``python bench/synthetic/run.py [--records 2000] [--workers 2] [--train 400 --test 300]
[--skip-gap]``

Prints, from one run:
  1. records/s of ten-second 12-lead 500 Hz records (the ``ptbxl`` profile: the issue's target
     unit), in one process and in ``--workers`` processes, plus records/s of every site's own
     records (PTB: 30-40 s, 15 leads, 1000 Hz) and the time to generate the default sizes;
  2. the quick cross-site baseline (:mod:`shared.data.synthetic.baseline`): macro AUROC of each
     site's local model and the pooled model on every site's test records, and the gap summary.
Every figure is SYNTHETIC data.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from shared.data.record import SITES  # noqa: E402
from shared.data.synthetic import DEFAULT_RECORDS, SyntheticReader  # noqa: E402


def _generate(args: tuple[str, int, int, int]) -> int:
    site, n, start, stop = args
    reader = SyntheticReader(site, n, seed=0)
    refs = reader.list_records()[start:stop]
    total = 0
    for ref in refs:
        total += reader.read(ref).signal.size
    return total


def cpu_rate(site: str, n: int) -> float:
    """Records per CPU-second (``time.process_time``) in this process: what one core gives
    when it is not shared; wall-clock rates on a busy machine understate it."""
    _generate((site, 4, 0, 4))
    start = time.process_time()
    _generate((site, n, 0, n))
    return n / (time.process_time() - start)


def rate(site: str, n: int, workers: int) -> tuple[float, float]:
    """(records/s, samples/s) wall clock, generating ``n`` records of ``site`` with ``workers`` processes."""
    bounds = [(site, n, i * n // workers, (i + 1) * n // workers) for i in range(workers)]
    _generate((site, 4, 0, 4))  # warm-up (imports, noise bank)
    start = time.perf_counter()
    if workers == 1:
        samples = _generate(bounds[0])
    else:
        with mp.get_context("fork").Pool(workers, initializer=_generate, initargs=((site, 4, 0, 4),)) as pool:
            start = time.perf_counter()
            samples = sum(pool.map(_generate, bounds))
    elapsed = time.perf_counter() - start
    return n / elapsed, samples / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=2000, help="10 s 12-lead 500 Hz records to time")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--train", type=int, default=400, help="baseline training records per site")
    ap.add_argument("--test", type=int, default=300, help="baseline test records per site")
    ap.add_argument("--skip-gap", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    print("# Synthetic generator (SYNTHETIC data)")
    print(f"cpus visible: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    cpu = cpu_rate("ptbxl", args.records)
    one, _ = rate("ptbxl", args.records, 1)
    many, _ = rate("ptbxl", args.records, args.workers)
    print(f"10 s 12-lead 500 Hz records (ptbxl profile), {args.records} records:")
    print(f"  per CPU-second (1 process): {cpu:,.0f} records/s")
    print(f"  wall clock: 1 process {one:,.0f} records/s; {args.workers} processes {many:,.0f} records/s "
          f"(x{many / one:.2f})")
    total = 0.0
    for site in SITES:
        n = DEFAULT_RECORDS[site]
        r, s = rate(site, n, 1)
        total += n / r
        print(f"  {site:6s}: {r:8,.0f} records/s, {s / 1e6:6.1f} M samples/s (wall, 1 process, {n} records)")
    print(f"default sizes {DEFAULT_RECORDS}: {total:.2f} s (wall) to generate in 1 process")

    if args.skip_gap:
        return
    from shared.data.synthetic.baseline import cross_site_table, format_table, gap_summary

    start = time.perf_counter()
    table = cross_site_table({s: args.train for s in SITES}, {s: args.test for s in SITES}, seed=0)
    gap = gap_summary(table)
    print(f"\n## Cross-site baseline (SYNTHETIC; {args.train} train / {args.test} test records per site; "
          f"logistic regression on median-beat features; {time.perf_counter() - start:.0f} s)")
    print("Macro AUROC, rows: trained on, columns: tested on")
    print(format_table(table))
    print(f"\nSame-class comparison over {gap['pairs']} (train, test) site pairs: "
          f"in-site {gap['in_site']:.3f}, cross-site {gap['cross_site']:.3f} "
          f"(gap {gap['in_site'] - gap['cross_site']:+.3f}), pooled {gap['pooled']:.3f}")


if __name__ == "__main__":
    main()
