"""``inspect``: one record as JSON, on every real kit sample and on MIMIC fixtures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mimic_fixture import build_mimic_root
from reader_fixtures import build_ptbxl_root
from shared.data.inspect import inspect_record
from shared.data.readers import read_record_path
from shared.data.readers.fastio import read_header
from shared.data.record import MIMIC_NATIVE_LEADS, PTB_LEADS, STANDARD_LEADS

REPO = Path(__file__).resolve().parents[1]
KEYS = {"site", "record", "fs", "n_leads", "lead_names", "n_samples", "native_labels", "labels", "label_available"}


def _check(out: dict, path: Path, site: str) -> None:
    assert KEYS <= set(out)
    header = read_header(path)
    assert out["site"] == site and out["fs"] == header.fs and out["n_samples"] == header.sig_len
    assert out["lead_names"] == list(PTB_LEADS if site == "ptb" else STANDARD_LEADS)
    assert out["n_leads"] == len(out["lead_names"])
    json.dumps(out)  # JSON-ready


def test_inspect_every_real_challenge_record_including_hr_and_s0001(kit_data):
    paths = sorted(p.with_suffix("") for p in (kit_data / "cinc").rglob("*.hea"))
    paths += sorted(p.with_suffix("") for p in (kit_data / "ptb-xl" / "challenge-format").glob("*.hea"))
    assert len(paths) == 55
    for path in paths:
        out = inspect_record(path, "cinc")
        _check(out, path, "cinc")
        assert out["record"] == path.name
    s0001 = inspect_record(kit_data / "cinc" / "ptb" / "S0001", "cinc")
    assert s0001["gain_fixed"] and s0001["labels"] == ["MI"] and s0001["meta"]["subsource"] == "ptb"
    js = inspect_record(kit_data / "cinc" / "chapman_shaoxing" / "JS00001", "cinc")
    assert js["labels"] == ["STTC", "CD"] and js["native_labels"] == ["164889003", "59118001", "164934002"]
    hr = inspect_record(kit_data / "ptb-xl" / "challenge-format" / "HR00001", "cinc")
    assert hr["native_labels"] == [] and hr["meta"]["label_issue"] == "no_labels"
    flat = inspect_record(kit_data / "cinc" / "ningbo" / "JS20008", "cinc")
    assert flat["meta"]["flat_leads"] == ["V2", "V4", "V6"]


def test_inspect_ptb_with_head_in_mv(kit_data):
    path = kit_data / "ptbdb" / "patient001" / "s0010_re"
    out = inspect_record(path, "ptb", head=4)
    _check(out, path, "ptb")
    assert out["native_labels"] == ["Myocardial infarction"] and out["labels"] == ["MI"]
    assert out["patient_id"] == "patient001" and out["stored_lead_names"][:3] == ["i", "ii", "iii"]
    assert out["label_available"] == {"NORM": True, "MI": True, "STTC": False, "CD": False, "HYP": False}
    assert list(out["head"]) == list(PTB_LEADS) and out["head"]["I"][0] == pytest.approx(-489 / 2000)
    signal = read_record_path("ptb", path).signal
    for k, name in enumerate(PTB_LEADS):
        np.testing.assert_allclose(out["head"][name], signal[k, :4], atol=1e-6)


def test_inspect_ptbxl_finds_the_database_above_the_record(tmp_path, kit_data):
    root = build_ptbxl_root(tmp_path, kit_data)
    for name in ("00001_lr", "00002_lr", "00003_lr"):
        path = root / "records100" / "00000" / name
        out = inspect_record(path, "ptbxl")
        _check(out, path, "ptbxl")
        assert out["labels"] == ["NORM"] and out["fs"] == 100 and out["n_samples"] == 1000
    assert out["patient_id"] == "20372" and out["meta"]["strat_fold"] == 5


def test_inspect_mimic_fixture_reorders_and_reads_metadata(tmp_path, kit_data):
    root = tmp_path / "mimic-iv-ecg"
    recs = build_mimic_root(root, n_records=3, kit_mimic=kit_data / "mimic-iv-ecg")
    out = inspect_record(recs[0].record_path(root), "mimic", head=5)
    _check(out, recs[0].record_path(root), "mimic")
    assert out["stored_lead_names"] == list(MIMIC_NATIVE_LEADS)
    assert out["patient_id"] == "10000032" and out["record"] == "40689238"
    assert out["labels"] == ["HYP"]
    for k, name in enumerate(STANDARD_LEADS):
        np.testing.assert_allclose(out["head"][name], recs[0].signal[k, :5], atol=1e-6)
    assert inspect_record(recs[1].record_path(root), "mimic")["labels"] == ["NORM"]


def test_cli_inspect_prints_json_and_fails_cleanly(tmp_path, kit_data):
    path = kit_data / "cinc" / "georgia" / "E07500"
    done = subprocess.run([sys.executable, "-m", "shared.data", "inspect", str(path), "--site", "cinc", "--head", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["record"] == "E07500" and out["labels"] == ["HYP"] and len(out["head"]["V6"]) == 2
    bad = subprocess.run([sys.executable, "-m", "shared.data", "inspect", str(kit_data / "ptb-xl" / "records100" / "00000" / "00001_lr"),
                          "--site", "ptbxl"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "ptbxl_database.csv" in bad.stderr and "Traceback" not in bad.stderr


def test_inspect_a_ptb_bundle_branch_block_record_shows_cd_unavailable(tmp_path, kit_data):
    # PTB has no CD negatives: a record admitted for bundle branch block states CD, but CD is
    # not available at PTB, so the record counts for no class positive (issue 13)
    src = kit_data / "ptbdb" / "patient001"
    dest = tmp_path / "ptbdb" / "patient001"
    dest.mkdir(parents=True)
    for ext in (".dat", ".xyz"):
        (dest / f"s0010_re{ext}").write_bytes((src / f"s0010_re{ext}").read_bytes())
    header = (src / "s0010_re.hea").read_text()
    (dest / "s0010_re.hea").write_text(header.replace("Reason for admission: Myocardial infarction",
                                                      "Reason for admission: Bundle branch block"))
    out = inspect_record(dest / "s0010_re", "ptb")
    assert out["labels"] == ["CD"]
    assert out["label_available"]["CD"] is False
    assert out["labels_counted"] == []
