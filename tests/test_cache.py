"""The cache builder and cache validation: round trip, skips, determinism, resume, refusals."""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import signal as sps

from fake_site import FakeLabeler, FakeReader
from shared.data.cache import open_cache, validate_cache
from shared.data.errors import CacheError, DataError, DatasetRootError
from shared.data.preprocess import PreprocessConfig
from shared.data.prepare import prepare_cache
from shared.data.record import STANDARD_LEADS

CACHE_FILES = ("manifest.json", "signals.npy", "window_record.npy", "labels.npy", "label_mask.npy",
               "records.csv", "splits.json", "skips.csv")


def build(out, reader=None, **kw):
    kw.setdefault("labeler", FakeLabeler())
    kw.setdefault("progress", False)
    return prepare_cache(reader or FakeReader(), out, **kw)


def skips_of(out) -> dict[str, str]:
    with open(Path(out) / "skips.csv", newline="") as fh:
        return {row["path"]: row["reason"] for row in csv.DictReader(fh)}


def expected_windows(sig: np.ndarray, fs_in=500, fs=250, window=2500, leads=12) -> np.ndarray:
    """The preprocessing, written out with scipy directly (not via shared.data.preprocess)."""
    x = sps.resample_poly(sig[:leads].astype(np.float64), fs, fs_in, axis=-1)
    x = sps.sosfiltfilt(sps.butter(4, [0.5, 45], btype="bandpass", fs=fs, output="sos"), x, axis=-1)
    n = x.shape[-1] // window
    return np.stack([x[:, k * window:(k + 1) * window] for k in range(n)])


@pytest.fixture(scope="module")
def fake_cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "ptb"
    build(out, FakeReader(n=30, bad={1: "nan", 2: "error", 4: "crash", 7: "huge"}))
    return out


def test_round_trip_windows_labels_masks(fake_cache):
    cache = open_cache(fake_cache)
    reader = FakeReader(n=30)
    m = cache.manifest
    assert m["synthetic"] is False and m["complete"] is True
    assert m["fs"] == 250 and m["window_samples"] == 2500 and m["lead_names"] == list(STANDARD_LEADS)
    assert cache.signals.dtype == np.float16 and cache.signals.shape[1:] == (12, 2500)
    assert m["label_available"] == [True, True, False, True, True]
    skipped = {1, 2, 4, 7}
    kept = [i for i in range(30) if i not in skipped]
    assert [r["record_id"] for r in cache.records] == [f"r{i:03d}" for i in kept]
    for row in cache.records:
        i = int(row["record_id"][1:])
        want = expected_windows(reader.signal(i))
        first, n = int(row["first_window"]), int(row["n_windows"])
        assert n == (10 + (i * 7) % 25) // 10  # a 34 s record gives 3 windows
        assert (cache.window_record[first:first + n] == int(row["record_index"])).all()
        np.testing.assert_allclose(cache.signals[first:first + n].astype(np.float32), want, atol=2e-3, rtol=2e-3)
        labels, mask = cache.labels[int(row["record_index"])], cache.label_mask[int(row["record_index"])]
        assert mask.tolist() == [1, 1, 0, 1, 1]
        assert labels.tolist() == ([0, 1, 0, 0, 0] if i % 2 else [1, 0, 0, 0, 0])
        assert row["fs_native"] == "500" and int(row["n_samples_native"]) == 500 * (10 + (i * 7) % 25)


def test_counts_and_splits_are_patient_disjoint(fake_cache):
    cache = open_cache(fake_cache)
    m = cache.manifest
    assert sum(c["records"] for c in m["counts"].values()) == len(cache.records)
    assert sum(c["windows"] for c in m["counts"].values()) == len(cache.signals)
    patient_split = {}
    for row in cache.records:
        assert patient_split.setdefault(row["patient_id"], row["split"]) == row["split"]
    splits = json.loads((fake_cache / "splits.json").read_text())
    assert "patient id" in splits["method"]
    assert sorted(sum((splits[s] for s in ("train", "val", "test")), [])) == sorted(r["record_id"] for r in cache.records)
    mi = sum(c["positives"]["MI"] for c in m["counts"].values())
    assert mi == int(cache.labels[:, 1].sum()) and m["counts"]["train"]["positives"]["STTC"] == 0


def test_bad_records_are_skipped_with_their_reason(fake_cache):
    skips = skips_of(fake_cache)
    assert skips == {
        "fake-root/r001": "nan_values",
        "fake-root/r002.dat": "truncated_signal",
        "fake-root/r004": "unreadable",
        "fake-root/r007": "amplitude_out_of_range",
    }
    assert open_cache(fake_cache).manifest["skipped"] == {
        "total": 4, "by_reason": {"amplitude_out_of_range": 1, "nan_values": 1, "truncated_signal": 1, "unreadable": 1}
    }


def test_short_records_are_padded_or_skipped(tmp_path):
    padded = open_cache(build(tmp_path / "pad", FakeReader(n=3, bad={0: "short"})).out)
    row = padded.records[0]
    assert row["n_windows"] == "1"
    window = padded.signals[0].astype(np.float32)
    assert np.abs(window[:, :1000]).max() > 0.5 and (window[:, 1000:] == 0).all()  # 4 s of signal, then zeros
    build(tmp_path / "skip", FakeReader(n=3, bad={0: "short"}), preprocess=PreprocessConfig(short="skip"))
    assert skips_of(tmp_path / "skip") == {"fake-root/r000": "too_short"}


def test_leads_all_keeps_ptb_frank_leads_and_stride_overlaps(tmp_path):
    cfg = PreprocessConfig(leads="all", fs=100, window_seconds=5, stride_seconds=2.5)
    cache = open_cache(build(tmp_path / "c", FakeReader(n=2), preprocess=cfg).out)
    assert cache.lead_names[-3:] == ["vx", "vy", "vz"] and cache.signals.shape[1:] == (15, 500)
    assert cache.manifest["window_stride_samples"] == 250
    assert [r["n_windows"] for r in cache.records] == ["3", "5"]  # 10 s and 17 s records: (1700 - 500) // 250 + 1


def test_same_input_gives_byte_identical_files_and_resume_continues(tmp_path):
    reader = FakeReader(n=40, bad={3: "nan"})
    build(tmp_path / "a", reader, workers=1, chunk_records=8)
    interrupted = build(tmp_path / "b", reader, workers=1, chunk_records=8, stop_after_chunks=2)
    assert interrupted.status == "interrupted" and not (tmp_path / "b").exists()
    assert sorted(p.name for p in interrupted.out.glob("shards/*.json")) == ["shard-000000.json", "shard-000001.json"]
    resumed = build(tmp_path / "b", reader, workers=2, chunk_records=8)  # resumed with 2 worker processes
    assert resumed.status == "built" and resumed.n_processed == 40 - 16  # only the missing chunks
    assert not interrupted.out.exists()  # temporary directory removed
    for name in CACHE_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_resume_starts_over_when_the_dataset_changed(tmp_path):
    build(tmp_path / "c", FakeReader(n=20), chunk_records=8, stop_after_chunks=1)
    resumed = build(tmp_path / "c", FakeReader(n=21), chunk_records=8)  # a record was added meanwhile
    assert resumed.n_processed == 21 and len(open_cache(tmp_path / "c").records) == 21


def test_finished_cache_is_kept_other_config_refused_force_rebuilds(tmp_path):
    out = tmp_path / "c"
    build(out, FakeReader(n=4))
    assert build(out, FakeReader(n=4)).status == "up_to_date"
    with pytest.raises(CacheError, match="another config"):
        build(out, FakeReader(n=4), preprocess=PreprocessConfig(fs=100))
    rebuilt = build(out, FakeReader(n=4), preprocess=PreprocessConfig(fs=100), force=True)
    assert rebuilt.status == "built" and open_cache(out).manifest["fs"] == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no tmp/old directories left


def test_refuses_to_overwrite_a_non_cache_directory(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="holds no cache manifest"):
        build(tmp_path / "c", FakeReader(n=2))


def test_out_dir_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CacheError, match="is not a writable directory"):
        build(tmp_path / "file.txt" / "c", FakeReader(n=2))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_dir_is_a_clear_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(CacheError, match="cannot write here"):
            build(locked / "c", FakeReader(n=2))
    finally:
        locked.chmod(0o700)


def test_wrong_root_and_all_bad_records_are_clear_errors(tmp_path):
    with pytest.raises(DatasetRootError, match="expected patientNNN"):
        build(tmp_path / "c", FakeReader(root="wrong-root"))
    with pytest.raises(DataError, match="none of the 2 records could be used"):
        build(tmp_path / "d", FakeReader(n=2, bad={0: "nan", 1: "error"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no cache, no temporary directory


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "signals.npy").unlink(), "signals.npy: missing"),
        (lambda d: (d / "signals.npy").write_bytes((d / "signals.npy").read_bytes()[:5000]), "signals.npy: unreadable"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "unreadable manifest"),
        (lambda d: _edit_manifest(d, complete=False), "marked incomplete"),
        (lambda d: _edit_manifest(d, format_version=0), "format_version 0"),
        (lambda d: np.save(d / "window_record.npy", np.zeros(len(np.load(d / "window_record.npy")), np.int32)),
         "does not match first_window"),
        (lambda d: np.save(d / "labels.npy", np.ones_like(np.load(d / "labels.npy"))), "where label_mask says unknown"),
        (lambda d: (d / "splits.json").write_text('{"train": [], "val": [], "test": []}'), "splits.json"),
    ],
)
def test_validate_cache_names_the_damage(tmp_path, damage, message):
    out = tmp_path / "c"
    build(out, FakeReader(n=6))
    validate_cache(out)
    damage(out)
    with pytest.raises(CacheError, match=message):
        validate_cache(out)


def test_validate_cache_on_a_missing_directory(tmp_path):
    with pytest.raises(CacheError, match="run `python -m shared.data prepare`"):
        validate_cache(tmp_path / "nothing")


def _edit_manifest(d: Path, **changes) -> None:
    m = json.loads((d / "manifest.json").read_text())
    m.update(changes)
    (d / "manifest.json").write_text(json.dumps(m))


# --------------------------------------------------------------------------- real kit samples


def _link_tree(dest: Path, files: list[Path]) -> Path:
    """A dataset root made of symlinks to kit files (the kit is never copied)."""
    for f in files:
        target = dest / f.parent.name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(f)
    return dest


@pytest.fixture(scope="module")
def challenge_root(kit_data, tmp_path_factory):
    files = sorted((kit_data / "cinc").rglob("*.*")) + sorted((kit_data / "ptb-xl" / "challenge-format").glob("HR*"))
    return _link_tree(tmp_path_factory.mktemp("challenge") / "training", files)


def _real_prepare(site, root, out, **kw):
    from shared.data.prepare import LabelSpaceLabeler, build_reader

    reader = build_reader(site, root, reader_options=kw.pop("reader_options", None))
    return prepare_cache(reader, out, labeler=LabelSpaceLabeler(), progress=False, **kw)


def test_real_challenge_records_round_trip_and_exclude_ptb_sources(challenge_root, tmp_path):
    import wfdb

    from shared.data.labels import harmonise, record_mask

    cache = open_cache(_real_prepare("cinc", challenge_root, tmp_path / "cinc").out)
    ids = [r["record_id"] for r in cache.records]
    assert "A0001" in ids and "E07500" in ids and "JS00001" in ids
    # PTB (S*) and PTB-XL (HR*) patients sit on the ptb/ptbxl sites: excluded by default.
    assert not [i for i in ids if i.startswith(("S", "HR"))]
    assert cache.manifest["dataset"] == "challenge-2021" and cache.manifest["synthetic"] is False

    row = cache.records[ids.index("A0001")]  # CPSC, 500 Hz, 15 s -> one 10 s window at 250 Hz
    src = wfdb.rdrecord(str(challenge_root / "cpsc_2018" / "A0001"))
    assert row["fs_native"] == "500" and row["n_windows"] == "1" and row["n_samples_native"] == "7500"
    want = expected_windows(src.p_signal.T)
    got = cache.signals[int(row["first_window"]) : int(row["first_window"]) + 1].astype(np.float64)
    np.testing.assert_allclose(got, want, atol=3e-3, rtol=2e-3)
    dx = tuple(c.strip() for line in src.comments if line.startswith("Dx:") for c in line[3:].split(","))
    k = int(row["record_index"])
    assert cache.labels[k].tolist() == harmonise("cinc", dx).tolist()
    assert cache.label_mask[k].tolist() == record_mask("cinc", dx, subsource="cpsc").tolist()

    kept = open_cache(_real_prepare("cinc", challenge_root, tmp_path / "all",
                                    reader_options={"exclude_sources": ()}).out)
    kept_ids = {r["record_id"] for r in kept.records}
    assert {"S0001", "HR06001"} <= kept_ids  # visible, documented option to keep them


def test_real_ptb_record_with_all_15_leads(kit_data, tmp_path):
    import wfdb

    root = _link_tree(tmp_path / "ptbdb", sorted((kit_data / "ptbdb" / "patient001").glob("s0010_re.*")))
    cache = open_cache(_real_prepare("ptb", root, tmp_path / "ptb", preprocess=PreprocessConfig(leads="all")).out)
    assert cache.lead_names == list(STANDARD_LEADS) + ["vx", "vy", "vz"]
    (row,) = cache.records
    assert (row["record_id"], row["patient_id"], row["n_windows"]) == ("patient001/s0010_re", "patient001", "3")
    src = wfdb.rdrecord(str(root / "patient001" / "s0010_re"))  # 15 signals: .dat (12) + .xyz (3)
    order = [[n.lower() for n in src.sig_name].index(n.lower()) for n in cache.lead_names]
    want = expected_windows(src.p_signal.T[order], fs_in=1000, leads=15)
    np.testing.assert_allclose(cache.signals[:].astype(np.float64), want, atol=3e-3, rtol=2e-3)


def test_damaged_real_files_are_logged_skips_not_crashes(kit_data, tmp_path):
    """A truncated .mat and an unreadable header among good records: both skipped, run completes."""
    root = tmp_path / "training" / "georgia"
    root.mkdir(parents=True)
    for name in ("E07500", "E07501", "E07502"):
        for ext in (".hea", ".mat"):
            (root / (name + ext)).write_bytes((kit_data / "cinc" / "georgia" / (name + ext)).read_bytes())
    (root / "E07501.mat").write_bytes((root / "E07501.mat").read_bytes()[:2000])
    (root / "E07502.hea").write_text("this is not a WFDB header\n")
    result = _real_prepare("cinc", tmp_path / "training", tmp_path / "cache")
    assert [r["record_id"] for r in open_cache(result.out).records] == ["E07500"]
    skips = skips_of(tmp_path / "cache")
    assert skips == {str(root / "E07501.mat"): "truncated_signal", str(root / "E07502.hea"): "header_unreadable"}


def test_cli_wrong_root_is_one_clear_line(tmp_path, capsys):
    from shared.data.__main__ import main

    (tmp_path / "empty").mkdir()
    assert main(["prepare", "--site", "mimic", "--source", str(tmp_path / "empty"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a MIMIC-IV-ECG 1.0 root" in err and "record_list.csv" in err
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob("c.tmp-*"))


def test_cli_synthetic_cache_says_synthetic(tmp_path, capsys):
    from shared.data.__main__ import main

    args = ["prepare", "--site", "ptbxl", "--source", "synthetic", "--records", "12", "--seed", "3",
            "--out", str(tmp_path / "syn"), "--no-progress"]
    assert main(args) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    m = open_cache(tmp_path / "syn").manifest
    assert m["synthetic"] is True and m["source"].startswith("synthetic:") and "not real" in m["source"]
    assert m["config"]["synthetic_records"] == 12 and m["config"]["synthetic_seed"] == 3
    assert sum(c["records"] for c in m["counts"].values()) + m["skipped"]["total"] == 12
    assert "strat_fold" in json.loads((tmp_path / "syn" / "splits.json").read_text())["method"]
    assert main(args) == 0 and "up to date" in capsys.readouterr().out


def test_real_ptbxl_split_follows_strat_fold_and_missing_files_are_skipped(kit_data, tmp_path):
    root = tmp_path / "ptb-xl"
    root.mkdir()
    (root / "ptbxl_database.csv").symlink_to(kit_data / "ptb-xl" / "ptbxl_database_excerpt.csv")
    (root / "scp_statements.csv").symlink_to(kit_data / "labels" / "ptb-xl" / "scp_statements.csv")
    _link_tree(root / "records100", sorted((kit_data / "ptb-xl" / "records100" / "00000").glob("*")))  # -> records100/00000/
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the reader says records500/ is absent here
        cache = open_cache(_real_prepare("ptbxl", root, tmp_path / "c").out)
    folds = {r["ecg_id"].zfill(5): int(r["strat_fold"]) for r in csv.DictReader(open(root / "ptbxl_database.csv"))}
    assert [r["record_id"] for r in cache.records] == ["00001", "00002", "00003"]
    from shared.data.splits import fold_split

    assert all(r["split"] == fold_split(folds[r["record_id"]]) for r in cache.records)
    assert cache.records[0]["fs_native"] == "100"  # 100 Hz records upsampled to 250 Hz
    assert set(skips_of(tmp_path / "c").values()) == {"missing_file"}  # the excerpt's 6001-6009 have no waveform here


@pytest.mark.parametrize("fs_in", [500, 257, 1000, 100])
@pytest.mark.parametrize("n", [5000, 4000, 40, 3])
def test_cached_filters_equal_scipy_resample_poly_and_sosfiltfilt(fs_in, n):
    """The builder designs the FIR / filter state once; the result must equal scipy's own calls."""
    from fractions import Fraction

    from shared.data.preprocess import bandpass, resample

    x = np.random.default_rng(n).standard_normal((12, n)).astype(np.float32)
    r = Fraction(250 / fs_in).limit_denominator(1000)
    want = sps.resample_poly(x, r.numerator, r.denominator, axis=-1)
    got = resample(x, fs_in, 250)
    np.testing.assert_allclose(got, want, atol=1e-5)
    sos = sps.butter(4, [0.5, 45], btype="bandpass", fs=250, output="sos")
    y = got.astype(np.float64)
    if y.shape[-1] > 27:  # sosfiltfilt's default pad length; shorter inputs are padded less
        np.testing.assert_allclose(bandpass(y, 250, 0.5, 45), sps.sosfiltfilt(sos, y, axis=-1), atol=1e-5)
    else:
        np.testing.assert_allclose(bandpass(y, 250, 0.5, 45),
                                   sps.sosfiltfilt(sos, y, axis=-1, padlen=y.shape[-1] - 1), atol=1e-5)
