"""The harmonised label space: the mapping tables, availability masks, expected labels of real records."""

from __future__ import annotations

import ast
import csv
import re

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from shared.data.labels import (
    TABLES_DIR, availability, get_label_space, harmonise, load_mapping, masked_labels, record_mask, unknown_labels,
)
from shared.data.readers.cinc import parse_dx
from shared.data.readers.fastio import read_header
from shared.data.record import SITES

SUPER = get_label_space("superclass")


def vec(*classes):
    return np.array([c in classes for c in SUPER.classes], dtype=np.uint8)


def test_default_space_is_the_five_ptbxl_superclasses():
    assert get_label_space().classes == ("NORM", "MI", "STTC", "CD", "HYP")
    with pytest.raises(KeyError):
        get_label_space("nonexistent")


@pytest.mark.parametrize("space", ["superclass", "rhythm"])
@pytest.mark.parametrize("site", SITES)
def test_every_table_row_has_a_valid_class_and_a_justification(site, space):
    m = load_mapping(site, space)
    assert m.rows
    for row in m.rows:
        assert row.cls in ("", *get_label_space(space).classes)
        assert len(row.justification) > 10, row
    assert availability(site, space).shape == (5,)
    if site != "mimic":  # exact-match sites: every space lists the same native vocabulary
        assert {r.native for r in m.rows} == {r.native for r in load_mapping(site, "superclass").rows}


def test_ptbxl_table_agrees_with_the_kit_scp_statements(kit_data):
    scp = pd.read_csv(kit_data / "labels" / "ptb-xl" / "scp_statements.csv", index_col=0)
    expected = {code: (r.diagnostic_class if r.diagnostic == 1 else "") for code, r in scp.iterrows()}
    table = {row.native: row.cls for row in load_mapping("ptbxl").rows}
    assert table == expected


def test_cinc_table_lists_exactly_the_challenge_codes_with_their_names(kit_data):
    kit = {}
    for name in ("dx_mapping_scored.csv", "dx_mapping_unscored.csv"):
        for r in csv.DictReader(open(kit_data / "labels" / "cinc2021" / name)):
            kit[r["SNOMEDCTCode"]] = r["Dx"].strip()
    with open(TABLES_DIR / "superclass_cinc.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["native"]: r["name"] for r in rows} == kit
    for name in ("dx_mapping_scored.csv", "dx_mapping_unscored.csv"):  # 2020 codes are a subset
        for r in csv.DictReader(open(kit_data / "labels" / "cinc2020" / name)):
            assert r["SNOMED CT Code"] in kit


def test_ptb_table_covers_every_reason_for_admission_in_ptbdb(kit_data):
    reasons = {r["Reason for admission"] for r in csv.DictReader(open(kit_data / "labels" / "ptbdb" / "Record_info.csv"))}
    table = {row.native for row in load_mapping("ptb").rows}
    assert table == reasons - {"n/a"}  # n/a: no label, the reader rejects the record (no_labels)


def test_mimic_patterns_match_their_examples_and_not_the_wrong_statements():
    with open(TABLES_DIR / "superclass_mimic.csv") as fh:
        for r in csv.DictReader(fh):
            for example in r["example"].split("|"):
                assert re.search(r["native"], example.strip(), re.IGNORECASE), (r["native"], example)
    assert harmonise("mimic", ["Abnormal ECG"]).sum() == 0  # 'abnormal' does not read as 'normal ECG'
    assert harmonise("mimic", ["Sinus rhythm"]).sum() == 0
    assert (harmonise("mimic", ["Sinus bradycardia", "Otherwise normal ECG"]) == vec("NORM")).all()
    assert (harmonise("mimic", ["Incomplete right bundle branch block", "Otherwise normal ECG"]) == vec("CD")).all()
    assert (harmonise("mimic", ["Atrial fibrillation", "Normal ECG"]) == vec()).all()  # blocked NORM


def test_real_mimic_row_maps_to_hyp_only(kit_data):
    row = pd.read_csv(kit_data / "mimic-iv-ecg" / "machine_measurements.csv").iloc[0]
    statements = [row[f"report_{i}"] for i in range(18) if isinstance(row[f"report_{i}"], str)]
    assert statements == ["Sinus rhythm", "Possible right atrial abnormality", "Borderline ECG"]
    assert (harmonise("mimic", statements) == vec("HYP")).all()  # RAO/RAE is HYP in PTB-XL


@pytest.mark.parametrize("record, expected", [
    ("cinc/georgia/E07500", ("HYP",)),            # left atrial enlargement + sinus bradycardia
    ("cinc/chapman_shaoxing/JS00001", ("STTC", "CD")),  # AF, RBBB, T wave abnormal
    ("cinc/ptb/S0001", ("MI",)),
    ("cinc/cpsc_2018/A0002", ("NORM",)),          # sinus rhythm alone
    ("cinc/cpsc_2018/A0003", ()),                 # AF alone: no superclass, and not NORM
    ("cinc/georgia/E07512", ("NORM",)),           # sinus bradycardia alone
    ("cinc/ningbo/JS20005", ("HYP",)),            # PAC, RVH, sinus tachycardia, PVC
])
def test_expected_labels_of_real_cinc_records(kit_data, record, expected):
    codes = parse_dx(read_header(kit_data / record).comments)
    assert SUPER.names(harmonise("cinc", codes)) == list(expected)


def test_ptb_reason_labels(kit_data):
    reason = "Myocardial infarction"
    assert reason in " ".join(read_header(kit_data / "ptbdb" / "patient001" / "s0010_re").comments)
    assert (harmonise("ptb", [reason]) == vec("MI")).all()
    assert (harmonise("ptb", ["healthy control"]) == vec("NORM")).all()  # case-insensitive reasons
    assert (harmonise("ptb", ["Dysrhythmia"]) == vec()).all()


def test_challenge_copy_of_ptbxl_gets_the_same_abnormal_classes_as_ptbxl(kit_data):
    db = pd.read_csv(kit_data / "ptb-xl" / "ptbxl_database_excerpt.csv", index_col="ecg_id")
    compared = 0
    for hea in sorted((kit_data / "ptb-xl" / "challenge-format").glob("HR0600*.hea")):
        codes = parse_dx(read_header(hea.with_suffix("")).comments)
        scp = list(ast.literal_eval(db.loc[int(hea.stem[2:]), "scp_codes"]))
        a, b = harmonise("cinc", codes), harmonise("ptbxl", scp)
        assert (a[1:] == b[1:]).all(), hea.stem  # MI, STTC, CD, HYP agree
        if b[1:].sum() == 0:
            assert a[0] == b[0], hea.stem  # NORM agrees unless PTB-XL pairs NORM with an abnormal class
        compared += 1
    assert compared == 8


def test_availability_marks_classes_a_site_cannot_state_as_unknown():
    assert availability("ptb").tolist() == [True, True, False, False, False]
    for site in ("ptbxl", "mimic", "cinc"):
        assert availability(site).all()
    assert availability("cinc", subsource="cpsc").tolist() == [True, False, True, True, False]
    assert availability("cinc", subsource="unlisted").all()  # falls back to the site row


def test_unknown_classes_contribute_nothing_positives_included():
    # a PTB bundle-branch-block patient: PTB cannot state CD negatives, so its CD positive is
    # masked out too (a positives-only class would let a model learn the site, issue 13)
    assert record_mask("ptb", ["Bundle branch block"]).tolist() == [1, 1, 0, 0, 0]
    assert record_mask("ptb", ["Myocardial infarction"]).tolist() == [1, 1, 0, 0, 0]
    labels, mask = masked_labels("ptb", ["Bundle branch block"])
    assert labels.tolist() == [0, 0, 0, 0, 0] and mask.tolist() == [1, 1, 0, 0, 0]
    assert harmonise("ptb", ["Bundle branch block"]).tolist() == [0, 0, 0, 1, 0]  # still stated
    # an MI code in a CinC sub-source that cannot state MI is masked out as well
    labels, mask = masked_labels("cinc", ["164865005"], subsource="georgia")
    assert mask[SUPER.index("MI")] == 0 and labels[SUPER.index("MI")] == 0
    # a CPSC record cannot say 'no MI'
    assert record_mask("cinc", ["426783006"], subsource="cpsc").tolist() == [1, 0, 1, 1, 0]
    labels = harmonise("cinc", ["426783006"])
    mask = record_mask("cinc", ["426783006"], subsource="cpsc")
    assert labels[SUPER.index("MI")] == 0 and mask[SUPER.index("MI")] == 0


def test_unknown_native_labels_are_reported_and_ignored():
    assert unknown_labels("cinc", ["164889003", "999"]) == ["999"]
    assert (harmonise("cinc", ["59118001", "999"]) == vec("CD")).all()
    assert unknown_labels("ptbxl", ["NORM", "XYZ"]) == ["XYZ"]
    assert unknown_labels("mimic", ["anything at all"]) == []


def test_exclusive_norm_rule_vs_ptbxl_benchmark_convention():
    assert (harmonise("cinc", ["426783006", "164934002"]) == vec("STTC")).all()
    assert (harmonise("cinc", ["426783006", "39732003"]) == vec("NORM")).all()  # axis deviation is neutral
    assert (harmonise("ptbxl", ["NORM", "IRBBB"]) == vec("NORM", "CD")).all()  # benchmark: both kept


# --- second label space: rhythm -------------------------------------------------------------

RHYTHM = get_label_space("rhythm")


def test_rhythm_space_classes_and_ptbxl_agreement(kit_data):
    assert RHYTHM.classes == ("SR", "AF", "AFL", "SB", "STACH")
    scp = pd.read_csv(kit_data / "labels" / "ptb-xl" / "scp_statements.csv", index_col=0)
    mapped = {row.native: row.cls for row in load_mapping("ptbxl", "rhythm").rows if row.cls}
    assert mapped == {"SR": "SR", "AFIB": "AF", "AFLT": "AFL", "SBRAD": "SB", "STACH": "STACH"}
    assert all(scp.loc[code, "rhythm"] == 1 for code in mapped)


@pytest.mark.parametrize("record, expected", [
    ("cinc/chapman_shaoxing/JS00001", ["AF"]),
    ("cinc/georgia/E07500", ["SB"]),
    ("cinc/cpsc_2018/A0003", ["AF"]),
    ("ptb-xl/challenge-format/HR06003", ["SR", "STACH"]),
])
def test_expected_rhythm_labels_of_real_records(kit_data, record, expected):
    codes = parse_dx(read_header(kit_data / record).comments)
    assert RHYTHM.names(harmonise("cinc", codes, "rhythm")) == expected


def test_rhythm_availability():
    assert not availability("ptb", "rhythm").any()  # PTB never states the rhythm
    assert availability("cinc", "rhythm", subsource="ningbo").tolist() == [True, False, True, True, True]
    assert RHYTHM.names(harmonise("mimic", ["Sinus arrhythmia", "Atrial flutter"], "rhythm")) == ["AFL"]


def test_the_cache_labeler_leaves_no_positives_only_class_at_any_synthetic_site():
    # what training, federated/pooled evaluation and the pooled test read: the cache's labels and
    # mask from LabelSpaceLabeler. A class a site cannot state contributes nothing there.
    from shared.data.prepare import LabelSpaceLabeler
    from shared.data.synthetic import SyntheticReader

    labeler = LabelSpaceLabeler()
    for site in ("ptb", "cinc"):
        reader = SyntheticReader(site, 120, seed=0)
        stated_unavailable = 0
        for ref in reader.list_records():
            rec = SimpleNamespace(native_labels=ref.native_labels, meta=ref.meta)  # what label() reads of a record
            labels, mask = labeler.label(site, rec)
            sub = rec.meta.get("subsource")
            assert mask.tolist() == availability(site, subsource=sub).astype(int).tolist()
            assert not (labels.astype(bool) & ~mask.astype(bool)).any()
            stated_unavailable += int((harmonise(site, rec.native_labels).astype(bool) & ~mask.astype(bool)).any())
        if site == "ptb":  # its generator states CD/HYP admissions: the rule is exercised
            assert stated_unavailable > 0


def test_coverage_table_counts_what_the_mask_leaves():
    from shared.data.labels.coverage import coverage, markdown

    ptb = coverage("ptb", 120)["ptb"]
    cd = SUPER.index("CD")
    assert not ptb["available"][cd] and ptb["pos"][cd] == 0 and ptb["neg"][cd] == 0 and ptb["dropped"][cd] > 0
    assert ptb["pos"][0] + ptb["neg"][0] == ptb["records"] == 120
    assert "| ptb | - | 120 | " in markdown(120)
