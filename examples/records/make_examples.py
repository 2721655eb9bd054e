"""Rebuild the example records in this folder from a copy of the real public ECG samples.

Usage (from the repository root)::

    python examples/records/make_examples.py KIT_DATA [--out examples/records] [--ptb-seconds 10]

``KIT_DATA`` is a folder of real PhysioNet samples laid out as below (the developers' sample
kit; the same files are in the PhysioNet datasets named in ``README.md``)::

    ptb-xl/records100/00000/00001_lr.{hea,dat}      PTB-XL 1.0.3
    ptb-xl/ptbxl_database_excerpt.csv               rows of PTB-XL's ptbxl_database.csv
    ptb-xl/challenge-format/HR00001.{hea,mat}       PTB-XL ecg_id 1 at 500 Hz (Challenge 2020)
    labels/ptb-xl/scp_statements.csv                PTB-XL 1.0.3
    cinc/georgia/E07500.{hea,mat}                   Challenge 2021, Georgia
    ptbdb/patient001/s0010_re.{hea,dat,xyz}         PTB Diagnostic ECG Database 1.0.0
    mimic-iv-ecg/{record_list,machine_measurements}.csv   MIMIC-IV-ECG 1.0 (one study)

What it does (README.md says the same, per record):

* PTB-XL ``00001_lr``, Georgia ``E07500``: copied byte for byte. ``ptbxl_database.csv`` and
  ``scp_statements.csv``: the header line and the rows this record needs, copied verbatim.
* PTB ``s0010_re``: the first ``--ptb-seconds`` seconds, rewritten with ``wfdb`` in the same
  two-file layout (12 leads in ``.dat``, vx/vy/vz in ``.xyz``, format 16, gain 2000/mV, same
  header comments); only the length, the initial values and the checksums change.
* MIMIC-IV-ECG study 40689238: the two CSV files copied verbatim (real rows). There is no real
  waveform: the project's MIMIC writer (``tests/mimic_fixture.write_mimic_wfdb``: format 16,
  200/mV, MIMIC's stored lead order I, II, III, aVR, aVF, aVL, V1-V6, base time = ``ecg_time``)
  writes the real PTB-XL ECG ``HR00001`` (500 Hz, 10 s) there.
"""

from __future__ import annotations

import argparse
import ast
import shutil
import sys
from pathlib import Path

import numpy as np
import wfdb

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

PTBXL_RECORD = "records100/00000/00001_lr"
PTBXL_ECG_ID = "1"
CINC_RECORD = "cinc/georgia/E07500"
PTB_RECORD = "ptbdb/patient001/s0010_re"
MIMIC_WAVEFORM_SOURCE = "ptb-xl/challenge-format/HR00001"


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _lines(path: Path) -> list[bytes]:
    """The file's lines with their own line endings (the PTB-XL files use CRLF)."""
    return path.read_bytes().splitlines(keepends=True)


def make_ptbxl(kit: Path, out: Path) -> None:
    root = out / "ptb-xl"
    for ext in (".hea", ".dat"):
        _copy(kit / "ptb-xl" / (PTBXL_RECORD + ext), root / (PTBXL_RECORD + ext))
    db = _lines(kit / "ptb-xl" / "ptbxl_database_excerpt.csv")
    row = [ln for ln in db[1:] if ln.split(b",", 1)[0] == PTBXL_ECG_ID.encode()]
    assert len(row) == 1, f"ecg_id {PTBXL_ECG_ID} not found once in the excerpt"
    (root / "ptbxl_database.csv").write_bytes(db[0] + row[0])
    codes = ast.literal_eval(row[0].decode().split('"')[1])  # the scp_codes dict of this row
    scp = _lines(kit / "labels" / "ptb-xl" / "scp_statements.csv")
    rows = [ln for ln in scp[1:] if ln.split(b",", 1)[0].decode() in codes]
    assert len(rows) == len(codes), f"scp_statements.csv lacks some of {sorted(codes)}"
    (root / "scp_statements.csv").write_bytes(scp[0] + b"".join(rows))


def make_cinc(kit: Path, out: Path) -> None:
    for ext in (".hea", ".mat"):
        _copy(kit / (CINC_RECORD + ext), out / (CINC_RECORD + ext))


def make_ptb(kit: Path, out: Path, seconds: float) -> None:
    src = kit / PTB_RECORD
    rec = wfdb.rdrecord(str(src), physical=False)
    n = int(round(seconds * rec.fs))
    if not 0 < n <= rec.sig_len:
        raise SystemExit(f"--ptb-seconds {seconds}: the record has {rec.sig_len / rec.fs:g} s")
    rec.d_signal = np.ascontiguousarray(rec.d_signal[:n])
    rec.sig_len = n
    rec.init_value = [int(v) for v in rec.d_signal[0]]
    rec.checksum = rec.calc_checksum()
    dst = out / PTB_RECORD
    dst.parent.mkdir(parents=True, exist_ok=True)
    rec.wrsamp(write_dir=str(dst.parent))  # one .dat and one .xyz, as the header's file names say


def make_mimic(kit: Path, out: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from mimic_fixture import write_mimic_wfdb  # the project's MIMIC-IV-ECG writer

    from shared.data.readers import read_record_path

    root = out / "mimic-iv-ecg"
    for name in ("record_list.csv", "machine_measurements.csv"):
        _copy(kit / "mimic-iv-ecg" / name, root / name)
    import csv

    with open(root / "record_list.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1
    # The real PTB-XL waveform, in the standard lead order and mV, read by the project's reader.
    source = read_record_path("cinc", kit / MIMIC_WAVEFORM_SOURCE, exclude_sources=(), strict_labels=False)  # its Dx is NaN
    assert source.fs == 500 and source.n_samples == 5000, (source.fs, source.n_samples)
    write_mimic_wfdb(root / rows[0]["path"], source.signal, ecg_time=rows[0]["ecg_time"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kit", type=Path, help="folder of real public ECG samples (layout in this script's docstring)")
    parser.add_argument("--out", type=Path, default=HERE, help="where to write (default: this folder)")
    parser.add_argument("--ptb-seconds", type=float, default=10.0, help="seconds of the PTB record to keep (default 10)")
    args = parser.parse_args(argv)
    make_ptbxl(args.kit, args.out)
    make_cinc(args.kit, args.out)
    make_ptb(args.kit, args.out, args.ptb_seconds)
    make_mimic(args.kit, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
