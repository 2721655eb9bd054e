"""Site readers and the fast WFDB reader, on the real kit samples and MIMIC fixtures."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import wfdb

from mimic_fixture import build_mimic_root, write_mimic_wfdb
from reader_fixtures import build_ptbxl_root
from shared.data.errors import DatasetRootError, RecordError
from shared.data.readers import get_reader, read_record_path
from shared.data.readers.cinc import subsource_of
from shared.data.readers.fastio import read_physical
from shared.data.record import MIMIC_NATIVE_LEADS, PTB_LEADS, STANDARD_LEADS


def kit_records(kit_data: Path) -> list[Path]:
    return sorted(p.with_suffix("") for p in kit_data.rglob("*.hea"))


@pytest.fixture()
def mimic_root(tmp_path, kit_data):
    root = tmp_path / "mimic-iv-ecg"
    return root, build_mimic_root(root, n_records=4, kit_mimic=kit_data / "mimic-iv-ecg")


# --- fast reader ---------------------------------------------------------------------------

def test_fast_reader_equals_wfdb_sample_for_sample_on_every_kit_record(kit_data):
    records = kit_records(kit_data)
    assert len(records) >= 59  # ptb, ptb-xl (records100 + challenge-format), cpsc, georgia, chapman, ningbo, S0001
    for rec in records:
        header, values, fast = read_physical(rec)
        assert fast, f"{rec} fell back to wfdb"
        ref = wfdb.rdrecord(str(rec)).p_signal.T.astype(np.float32)
        assert values.shape == ref.shape, rec
        np.testing.assert_array_equal(values, ref, err_msg=str(rec))
        assert header.sig_names == tuple(wfdb.rdheader(str(rec)).sig_name)


def test_fast_reader_equals_wfdb_on_mimic_fixtures_with_nan_samples(tmp_path, mimic_root):
    root, recs = mimic_root
    for r in recs:
        _, values, fast = read_physical(r.record_path(root))
        assert fast
        np.testing.assert_array_equal(values, wfdb.rdrecord(str(r.record_path(root))).p_signal.T.astype(np.float32))
    nan_rec = tmp_path / "nan" / "1"
    write_mimic_wfdb(nan_rec, recs[0].signal, nan_leads=("V3",))
    _, values, _ = read_physical(nan_rec)
    ref = wfdb.rdrecord(str(nan_rec)).p_signal.T.astype(np.float32)
    np.testing.assert_array_equal(values, ref)  # equal_nan is the default for assert_array_equal
    assert np.isnan(values[MIMIC_NATIVE_LEADS.index("V3"), 100:110]).all()


# --- ptb ------------------------------------------------------------------------------------

def test_ptb_reads_15_leads_at_1000hz_with_reason_for_admission(kit_data):
    reader = get_reader("ptb", kit_data / "ptbdb")
    refs = reader.list_records()  # no RECORDS file in the kit: found by globbing patient*/
    assert [r.record_id for r in refs] == ["patient001/s0010_re"]
    rec = reader.read(refs[0])
    assert rec.signal.dtype == np.float32 and rec.signal.shape == (15, 38400)
    assert rec.lead_names == PTB_LEADS and rec.fs == 1000
    assert rec.native_labels == ("Myocardial infarction",) and rec.patient_id == "patient001"
    assert reader.split_key(refs[0]) == ("patient", "patient001")
    # header: i first value -489 at gain 2000/mV, vz (from the .xyz) first value -18
    assert rec.signal[0, 0] == pytest.approx(-489 / 2000) and rec.signal[14, 0] == pytest.approx(-18 / 2000)


def test_ptb_uses_records_file_when_present(tmp_path, kit_data):
    root = tmp_path / "ptbdb"
    root.mkdir()
    (root / "patient001").symlink_to(kit_data / "ptbdb" / "patient001", target_is_directory=True)
    (root / "RECORDS").write_text("patient001/s0010_re\n")
    assert [r.record_id for r in get_reader("ptb", root).list_records()] == ["patient001/s0010_re"]


# --- ptbxl ----------------------------------------------------------------------------------

def test_ptbxl_reads_records100_with_scp_codes_fold_and_patient(tmp_path, kit_data):
    root = build_ptbxl_root(tmp_path, kit_data)
    reader = get_reader("ptbxl", root)  # asks for 500 Hz; the kit only has records100
    with pytest.warns(UserWarning, match="records500"):
        refs = reader.list_records()
    assert len(refs) == 11 and reader.rate == 100
    rec = reader.read(refs[0])
    assert rec.record_id == "00001" and rec.patient_id == "15709" and rec.fs == 100
    assert rec.signal.shape == (12, 1000) and rec.lead_names == STANDARD_LEADS
    assert rec.native_labels == ("NORM", "LVOLT", "SR")
    assert rec.meta["scp_likelihoods"] == {"NORM": 100.0, "LVOLT": 0.0, "SR": 0.0}
    assert rec.meta["strat_fold"] == 3 and "rate_fallback" in rec.meta
    assert reader.split_key(refs[0]) == ("fold", "3")
    # ecg 6001 has no waveform in the kit: a clear per-record error, not a crash
    with pytest.raises(RecordError) as err:
        reader.read(refs[3])
    assert err.value.reason == "missing_file"


def test_ptbxl_rate_100_reads_without_warning(tmp_path, kit_data):
    reader = get_reader("ptbxl", build_ptbxl_root(tmp_path, kit_data), rate=100)
    assert reader.read(reader.list_records()[1]).signal.shape == (12, 1000)


# --- mimic ----------------------------------------------------------------------------------

def test_mimic_reorders_leads_by_name_into_standard_order(mimic_root):
    root, recs = mimic_root
    reader = get_reader("mimic", root)
    refs = reader.list_records()
    assert [r.record_id for r in refs] == [r.study_id for r in recs]
    for ref, fx in zip(refs, recs):
        rec = reader.read(ref)
        assert rec.meta["stored_lead_order"] == list(MIMIC_NATIVE_LEADS)
        assert rec.lead_names == STANDARD_LEADS and rec.fs == 500
        np.testing.assert_array_equal(rec.signal, fx.signal)  # each lead a distinct sine: order is checked
        assert rec.patient_id == fx.subject_id and rec.native_labels == fx.reports
    assert refs[0].native_labels == ("Sinus rhythm", "Possible right atrial abnormality", "Borderline ECG")
    assert reader.split_key(refs[0]) == reader.split_key(refs[1]) == ("patient", "10000032")


def test_mimic_nan_lead_policy(tmp_path, kit_data):
    root = tmp_path / "m"
    recs = build_mimic_root(root, n_records=1, kit_mimic=kit_data / "mimic-iv-ecg")
    write_mimic_wfdb(recs[0].record_path(root), recs[0].signal, nan_leads=("aVL",))
    ref = get_reader("mimic", root).list_records()[0]
    with pytest.raises(RecordError) as err:
        get_reader("mimic", root).read(ref)
    assert err.value.reason == "nan_values" and "aVL" in err.value.detail
    rec = get_reader("mimic", root, bad_leads="zero").read(ref)
    assert rec.meta["nan_leads"] == ["aVL"] and not np.isnan(rec.signal).any()
    assert (rec.signal[STANDARD_LEADS.index("aVL"), 100:110] == 0).all()


def test_mimic_flat_lead_policy(tmp_path, kit_data):
    root = tmp_path / "m"
    recs = build_mimic_root(root, n_records=1, kit_mimic=kit_data / "mimic-iv-ecg")
    flat = recs[0].signal.copy()
    flat[STANDARD_LEADS.index("V5")] = 0.25
    write_mimic_wfdb(recs[0].record_path(root), flat)
    ref = get_reader("mimic", root).list_records()[0]
    with pytest.raises(RecordError, match="V5") as err:
        get_reader("mimic", root).read(ref)
    assert err.value.reason == "flat_lead"
    rec = get_reader("mimic", root, bad_leads="zero").read(ref)
    assert rec.meta["flat_leads"] == ["V5"] and (rec.signal[STANDARD_LEADS.index("V5")] == 0).all()


# --- cinc -----------------------------------------------------------------------------------

def test_cinc_subsources_and_default_exclusion_of_ptb_and_ptbxl(kit_data):
    default = get_reader("cinc", kit_data / "cinc").list_records()
    subs = {r.meta["subsource"] for r in default}
    assert subs == {"cpsc", "georgia", "chapman", "ningbo"} and len(default) == 45
    everything = get_reader("cinc", kit_data, exclude_sources=()).list_records()
    by_id = {r.record_id: r.meta["subsource"] for r in everything}
    assert by_id["S0001"] == "ptb" and by_id["HR06001"] == "ptbxl" and by_id["A0001"] == "cpsc"
    assert by_id["E07500"] == "georgia" and by_id["JS00001"] == "chapman" and by_id["JS20000"] == "ningbo"
    assert {r.record_id for r in get_reader("cinc", kit_data).list_records()}.isdisjoint({"S0001", "HR06001"})
    only = get_reader("cinc", kit_data, include_sources=("ptbxl",)).list_records()
    assert {r.meta["subsource"] for r in only} == {"ptbxl"} and len(only) == 9
    assert all(get_reader("cinc", kit_data).split_key(r)[0] == "record" for r in default)
    # JS numbering when no folder says which: Chapman up to JS10646, Ningbo after it
    assert subsource_of("x/JS10646") == "chapman" and subsource_of("x/JS10647") == "ningbo"
    assert subsource_of("x/Q0001") == "cpsc_extra" and subsource_of("x/I0001") == "incart"


def test_cinc_reads_each_subsource_at_its_rate_with_dx_codes(kit_data):
    rec = read_record_path("cinc", kit_data / "cinc" / "chapman_shaoxing" / "JS00001")
    assert rec.native_labels == ("164889003", "59118001", "164934002") and rec.patient_id is None
    assert rec.fs == 500 and rec.signal.shape == (12, 5000) and rec.lead_names == STANDARD_LEADS
    assert read_record_path("cinc", kit_data / "cinc" / "cpsc_2018" / "A0001").signal.shape == (12, 7500)


def test_cinc_s0001_broken_gain_is_fixed_and_matches_ptbdb(kit_data):
    s0001 = read_record_path("cinc", kit_data / "cinc" / "ptb" / "S0001", exclude_sources=())
    assert s0001.meta["gain_fixed"] and s0001.meta["header_gain"] == 2_000_000
    ptb = read_record_path("ptb", kit_data / "ptbdb" / "patient001" / "s0010_re")
    assert s0001.signal.shape == (12, ptb.n_samples)
    # same recording: S0001 stores microvolts, ptbdb half-microvolts -> equal up to 0.5 uV rounding
    np.testing.assert_allclose(s0001.signal, ptb.signal[:12], rtol=0, atol=0.51e-3)
    assert np.abs(ptb.signal[:12]).max() > 1.0  # a real ECG amplitude, not the 1/2000 of the raw header
    with pytest.raises(RecordError) as err:
        read_record_path("cinc", kit_data / "cinc" / "ptb" / "S0001", exclude_sources=(), fix_ptb_gain=False)
    assert err.value.reason == "implausible_gain"


def test_cinc_real_ningbo_records_with_flat_leads_are_skipped_by_default(kit_data):
    with pytest.raises(RecordError) as err:
        read_record_path("cinc", kit_data / "cinc" / "ningbo" / "JS20004")
    assert err.value.reason == "flat_lead" and "V2" in err.value.detail
    assert read_record_path("cinc", kit_data / "cinc" / "ningbo" / "JS20004", bad_leads="keep").meta["flat_leads"] == ["V2", "V4", "V6"]


# --- bad inputs -------------------------------------------------------------------------------

def _copy_record(src: Path, dst_dir: Path, name: str | None = None) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    name = name or src.name
    for f in src.parent.glob(src.name + ".*"):
        text_suffix = f.suffix == ".hea"
        target = dst_dir / (name + f.suffix)
        if text_suffix:
            target.write_text(f.read_text().replace(src.name, name))
        else:
            shutil.copyfile(f, target)
    return dst_dir / name


def _reason(site, path, **options) -> str:
    with pytest.raises(RecordError) as err:
        read_record_path(site, path, **options)
    assert str(path.name) in str(err.value)  # the message names the file
    return err.value.reason


def test_bad_records_give_stable_reasons(tmp_path, kit_data):
    src = kit_data / "cinc" / "georgia" / "E07500"
    reasons = {}

    rec = _copy_record(src, tmp_path / "trunc")
    data = (rec.parent / "E07500.mat").read_bytes()
    (rec.parent / "E07500.mat").write_bytes(data[: len(data) // 2])
    with pytest.raises(RecordError) as err:
        read_record_path("cinc", rec)
    reasons["truncated"] = err.value.reason  # the MAT header still says 5000 columns

    rec = _copy_record(src, tmp_path / "len")
    hea = rec.with_suffix(".hea")
    hea.write_text(hea.read_text().replace("E07500 12 500 5000", "E07500 12 500 4000", 1))
    reasons["length"] = _reason("cinc", rec)

    rec = _copy_record(kit_data / "ptb-xl" / "records100" / "00000" / "00001_lr", tmp_path / "dat")
    dat = rec.with_suffix(".dat")
    dat.write_bytes(dat.read_bytes()[:-240])
    with pytest.raises(RecordError) as err:
        read_physical(rec)
    reasons["truncated_dat"] = err.value.reason

    rec = _copy_record(src, tmp_path / "leads")
    hea = rec.with_suffix(".hea")
    hea.write_text(hea.read_text().replace(" V4\n", " X4\n"))
    reasons["leads"] = _reason("cinc", rec)

    rec = _copy_record(src, tmp_path / "hdr")
    rec.with_suffix(".hea").write_text("this is not a header\n")
    reasons["header"] = _reason("cinc", rec)

    rec = _copy_record(src, tmp_path / "codes")
    hea = rec.with_suffix(".hea")
    hea.write_text(hea.read_text().replace("67741000119109,426177001", "999999999"))
    reasons["codes"] = _reason("cinc", rec)

    reasons["no_labels"] = _reason("cinc", kit_data / "ptb-xl" / "challenge-format" / "HR00001", exclude_sources=())

    rec = _copy_record(src, tmp_path / "nan")
    mat = bytearray(rec.with_suffix(".mat").read_bytes())
    mat[24 + 2 * 12 * 7: 24 + 2 * 12 * 7 + 2] = (-32768).to_bytes(2, "little", signed=True)
    rec.with_suffix(".mat").write_bytes(bytes(mat))
    reasons["nan"] = _reason("cinc", rec)

    assert reasons == {
        "truncated": "truncated_signal", "length": "length_mismatch", "truncated_dat": "truncated_signal",
        "leads": "missing_leads", "header": "header_unreadable", "codes": "unknown_codes",
        "no_labels": "no_labels", "nan": "nan_values",
    }


def test_dat_with_more_samples_than_header_is_a_length_mismatch(tmp_path, kit_data):
    rec = _copy_record(kit_data / "ptb-xl" / "records100" / "00000" / "00002_lr", tmp_path)
    hea = rec.with_suffix(".hea")
    hea.write_text(hea.read_text().replace("00002_lr 12 100 1000", "00002_lr 12 100 900", 1))
    with pytest.raises(RecordError) as err:
        read_physical(rec)
    assert err.value.reason == "length_mismatch"


@pytest.mark.parametrize("site", ["ptb", "ptbxl", "mimic", "cinc"])
def test_wrong_dataset_root_names_what_was_expected(tmp_path, site):
    (tmp_path / "notes.txt").write_text("not a dataset")
    with pytest.raises(DatasetRootError) as err:
        get_reader(site, tmp_path).list_records()
    assert str(tmp_path) in str(err.value) and "expected" in str(err.value)


def test_unknown_site_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown site"):
        get_reader("nowhere", tmp_path)
