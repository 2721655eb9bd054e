"""Reader throughput: the fast WFDB reader vs ``wfdb.rdrecord`` on the real kit samples.

Usage: ``python bench/data_readers.py [--kit KIT_DATA_DIR] [--seconds 3]`` (the developers' kit of real
samples, beside the checkout)

Prints records/s (one process) for three groups of records: the 12-lead 500 Hz 10 s Challenge
``.mat`` records (CPSC/Georgia/Chapman/Ningbo/PTB-XL copies), 12-lead 500 Hz 10 s MIMIC-layout
``.dat`` records written to a temporary folder (synthetic waveforms, real layout), and every kit
record; for each: the raw fast reader, the full site reader (labels, lead order, checks) and
``wfdb.rdrecord``, with the ratio fast/wfdb. The prepare benchmark (resampling, filtering,
cache writes) lives in ``bench/data/`` and is not measured here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import wfdb

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from shared.data.readers import get_reader  # noqa: E402
from shared.data.readers.fastio import read_physical  # noqa: E402


def rate(fn, items, seconds: float) -> float:
    """Records per second of ``fn`` over ``items``, repeated for at least ``seconds``."""
    n, start = 0, time.perf_counter()
    while True:
        for it in items:
            fn(it)
        n += len(items)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


_POOL_READER = None


def _init_worker(site: str, root: str, options: dict) -> None:
    global _POOL_READER
    _POOL_READER = get_reader(site, root, **options)


def _read_one(ref) -> int:
    return _POOL_READER.read(ref).n_samples


def pool_rate(site: str, root: Path, options: dict, refs: list, workers: int, seconds: float) -> float:
    """Records/s of the site reader fanned out over ``workers`` processes (as the cache builder does)."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers, _init_worker, (site, str(root), options)) as pool:
        pool.map(_read_one, refs, chunksize=8)  # warm-up: imports, caches
        batch = refs * max(1, 2000 // len(refs))
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            pool.map(_read_one, batch, chunksize=32)
            n += len(batch)
        return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kit", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum time per measurement")
    ap.add_argument("--workers", type=int, default=2, help="processes for the pooled figure (default 2)")
    args = ap.parse_args()

    mat_500 = []
    for hea in sorted(args.kit.rglob("*.hea")):
        h = hea.read_text().split()
        if hea.with_suffix(".mat").exists() and h[1:4] == ["12", "500", "5000"]:
            mat_500.append(hea.with_suffix(""))
    everything = sorted(p.with_suffix("") for p in args.kit.rglob("*.hea"))

    from mimic_fixture import build_mimic_root

    with tempfile.TemporaryDirectory() as tmp:
        recs = build_mimic_root(Path(tmp) / "mimic", n_records=20, kit_mimic=args.kit / "mimic-iv-ecg")
        mimic_root = Path(tmp) / "mimic"
        mimic = [r.record_path(mimic_root) for r in recs]
        mimic_reader = get_reader("mimic", mimic_root)
        mimic_refs = mimic_reader.list_records()
        cinc_reader = get_reader("cinc", args.kit, exclude_sources=(), bad_leads="keep", strict_labels=False)
        cinc_refs = [cinc_reader._ref(p) for p in mat_500]

        rows = [
            ("Challenge .mat, 12 x 500 Hz x 10 s", mat_500, lambda: rate(lambda r: cinc_reader.read(r), cinc_refs, args.seconds)),
            ("MIMIC-layout .dat, 12 x 500 Hz x 10 s", mimic, lambda: rate(lambda r: mimic_reader.read(r), mimic_refs, args.seconds)),
            ("every kit record (mixed)", everything, None),
        ]
        print(f"{'records':40s} {'n':>4s} {'fast raw':>10s} {'site reader':>12s} {'wfdb':>8s} {'fast/wfdb':>10s}")
        for name, items, site_fn in rows:
            fast = rate(lambda p: read_physical(p), items, args.seconds)
            site = site_fn() if site_fn else float("nan")
            ref = rate(lambda p: wfdb.rdrecord(str(p)), items, args.seconds)
            print(f"{name:40s} {len(items):4d} {fast:10.0f} {site:12.0f} {ref:8.0f} {fast / ref:9.1f}x")
        print("records/s, one process; 'site reader' adds labels, lead order and NaN/flat checks")
        cinc_opts = {"exclude_sources": (), "bad_leads": "keep", "strict_labels": False}
        for name, site, root, opts, refs in (
            ("Challenge .mat, site reader", "cinc", args.kit, cinc_opts, cinc_refs),
            ("MIMIC-layout .dat, site reader", "mimic", mimic_root, {}, mimic_refs),
        ):
            r = pool_rate(site, root, opts, refs, args.workers, args.seconds)
            print(f"{name:40s} {args.workers} processes: {r:8.0f} records/s")


if __name__ == "__main__":
    main()
