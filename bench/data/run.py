"""Data-layer benchmark: prepare throughput (records/s) and loader throughput (windows/s).

    python bench/data/run.py [--records 2000] [--workers 2] [--work-dir DIR]

1. Writes a stand-in MIMIC-IV-ECG root: ``--records`` 12-lead, 500 Hz, 10 s WFDB format-16
   records (``wfdb.wrsamp``; MIMIC's stored lead order; ``record_list.csv`` and
   ``machine_measurements.csv`` as the real dataset lays them out). The waveforms are
   synthetic (sines + noise): only their format and size matter here.
2. Times ``prepare`` on it through the real ``mimic`` reader (fastio fast path) with
   ``--workers`` processes: records/s, against the target of 500 records/s on 2 cores.
3. Times the loader: windows/s delivered as shuffled training batches of 32 with random crops,
   at each tiny model's input length.
4. Times one training step (batch 32, forward + backward + AdamW) of each model's ``tiny``
   preset, and prints the loader/consumption ratio against the target of 10x.
Every figure is measured in this run; nothing is read from a file.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import wfdb

from shared.data.loader import WindowDataset, make_loader
from shared.data.prepare import LabelSpaceLabeler, prepare_cache
from shared.data.preprocess import PreprocessConfig
from shared.data.readers import get_reader
from shared.data.record import MIMIC_NATIVE_LEADS

FS, SECONDS, GAIN = 500, 10, 200.0
STATEMENTS = (("Sinus rhythm", "Normal ECG"), ("Sinus rhythm", "Left ventricular hypertrophy", "Abnormal ECG"),
              ("Atrial fibrillation", "Right bundle branch block", "Abnormal ECG"))
PREPARE_TARGET = 500.0  # records/s on 2 cores
LOADER_TARGET_RATIO = 10.0


def write_standin_mimic(root: Path, n: int) -> None:
    """A MIMIC-IV-ECG-shaped root with ``n`` synthetic format-16 records."""
    root.mkdir(parents=True, exist_ok=True)
    t = np.arange(FS * SECONDS) / FS
    rng = np.random.default_rng(0)
    base = np.stack([0.5 * np.sin(2 * np.pi * (1.1 + 0.1 * k) * t) for k in range(12)])
    rl, mm = [], []
    for i in range(n):
        subject, study = 10000000 + i // 2, 40000000 + i
        rel = f"files/p{str(subject)[:4]}/p{subject}/s{study}/{study}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sig = base * (1 + 0.2 * rng.random((12, 1))) + 0.05 * rng.standard_normal(base.shape)
        wfdb.wrsamp(str(study), fs=FS, units=["mV"] * 12, sig_name=list(MIMIC_NATIVE_LEADS),
                    d_signal=np.round(sig.T * GAIN).astype(np.int16), fmt=["16"] * 12, adc_gain=[GAIN] * 12,
                    baseline=[0] * 12, write_dir=str((root / rel).parent))
        rl.append([subject, study, study, "2180-01-01 00:00:00", rel])
        reports = list(STATEMENTS[i % len(STATEMENTS)]) + [""] * (18 - len(STATEMENTS[i % len(STATEMENTS)]))
        mm.append([subject, study, 1, "2180-01-01 00:00:00", *reports])
    with open(root / "record_list.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject_id", "study_id", "file_name", "ecg_time", "path"])
        w.writerows(rl)
    with open(root / "machine_measurements.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject_id", "study_id", "cart_id", "ecg_time", *[f"report_{k}" for k in range(18)]])
        w.writerows(mm)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the prepare workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_prepare(root: Path, out: Path, workers: int) -> tuple[float, float, dict]:
    """Wall seconds and CPU seconds (parent + workers) of one full prepare."""
    if out.exists():
        shutil.rmtree(out)
    reader = get_reader("mimic", root)
    c0, t0 = cpu_seconds(), time.perf_counter()
    result = prepare_cache(reader, out, preprocess=PreprocessConfig(), labeler=LabelSpaceLabeler(),
                           workers=workers, progress=False)
    return time.perf_counter() - t0, cpu_seconds() - c0, result.manifest


def bench_loader(cache: Path, crop: int, seconds: float = 3.0, batch: int = 32) -> float:
    ds = WindowDataset(cache, "train", crop_samples=crop, train=True)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for x, _y, _m in make_loader(ds, batch, drop_last=True):
            n += x.shape[0]
            if time.perf_counter() - t0 >= seconds:
                break
    return n / (time.perf_counter() - t0)


def bench_training_step(name: str, batch: int = 32, steps: int = 5) -> tuple[float, int]:
    """Median windows/s one training step of model ``name`` (preset tiny) consumes."""
    from shared.models import build_model, get_preset
    from shared.training.losses import masked_bce_with_logits

    preset = get_preset(name, "tiny")
    samples = int(round(preset["fs"] * preset["seconds"]))
    model = build_model(name, "tiny", n_leads=12, input_samples=samples, n_classes=5)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y, m = torch.randn(batch, 12, samples), torch.randint(0, 2, (batch, 5)).float(), torch.ones(batch, 5)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        masked_bce_with_logits(model(x), y, m).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times[1:]), samples


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work-dir", type=Path, default=None, help="keep the stand-in data here (reused if present)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-data-"))
    root = work / f"mimic-standin-{args.records}"
    if not (root / "machine_measurements.csv").is_file():
        t0 = time.perf_counter()
        write_standin_mimic(root, args.records)
        print(f"wrote {args.records} stand-in records (12 leads, 500 Hz, 10 s, WFDB fmt 16) "
              f"in {time.perf_counter() - t0:.1f} s")
    load_before = os.getloadavg()[0]
    elapsed, cpu, manifest = bench_prepare(root, work / "cache", args.workers)
    rate = args.records / elapsed
    n_windows = sum(c["windows"] for c in manifest["counts"].values())
    print(f"prepare: {args.records} records -> {n_windows} windows in {elapsed:.2f} s with --workers "
          f"{args.workers}: {rate:.0f} records/s (target {PREPARE_TARGET:.0f}: {rate / PREPARE_TARGET:.2f}x)")
    print(f"prepare CPU: {1000 * cpu / args.records:.2f} CPU-ms per record (parent + workers) = "
          f"{args.records / cpu:.0f} records per CPU-second; 1-min load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs")

    from shared.models import list_models

    consumption = {}
    for name in list_models():
        consumption[name] = bench_training_step(name)
        print(f"training step {name}/tiny (batch 32, {consumption[name][1]} samples): "
              f"{consumption[name][0]:.0f} windows/s consumed")
    if not consumption:
        print("no model registered in shared.models: loader/consumption ratio not computed")
    fastest = max(consumption, key=lambda k: consumption[k][0]) if consumption else None
    for name, (consumed, crop) in consumption.items():
        delivered = bench_loader(work / "cache", crop)
        print(f"loader (train, batch 32, crop {crop}): {delivered:.0f} windows/s = "
              f"{delivered / consumed:.0f}x what {name}/tiny consumes"
              + (f" (fastest model; target {LOADER_TARGET_RATIO:.0f}x)" if name == fastest else ""))
    for crop in sorted({250, 2500} - {c for _, c in consumption.values()}):
        print(f"loader (train, batch 32, crop {crop}): {bench_loader(work / 'cache', crop):.0f} windows/s "
              "(no registered tiny model takes this length)")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
