"""The embedded synthetic federation: realistic, site-shifted, deterministic, honestly labelled.

Class features are measured on noise-free records (``noise=False``) from a median beat, with
simple, documented measurements (``_measure``): QRS duration from the spatial velocity (sum over
the 12 leads of |dV/dt|) above 10 % of its peak (gaps under 20 ms bridged); the isoelectric
level 12 ms before QRS onset; ST level at J + 40 ms; PR from the onset of the P wave in lead II
(10 % of its peak); Q-wave duration = the initial run of the QRS at or below the isoelectric
level in one lead; Sokolow-Lyon = S(V1) + max(R(V5), R(V6)) within the QRS.
"""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import find_peaks

from shared.data.labels import availability, get_label_space, harmonise, record_mask
from shared.data.record import PTB_LEADS, SITES, STANDARD_LEADS
from shared.data.synthetic import DEFAULT_RECORDS, SyntheticReader
from shared.data.synthetic import profiles
from shared.data.synthetic.baseline import cross_site_table, gap_summary

SPACE = get_label_space("superclass")
LEAD = {name: i for i, name in enumerate(STANDARD_LEADS)}
SEEDS = range(8)


def _clean(findings: list[dict], seed: int):
    reader = SyntheticReader("ptbxl", 1, seed=seed, noise=False, findings=findings)
    return reader.read(reader.list_records()[0])


def _measure(rec) -> dict:
    fs = rec.fs
    x = rec.signal[:12].astype(np.float64)
    slope = np.abs(np.diff(x, axis=1)).sum(axis=0)
    peaks, _ = find_peaks(slope, distance=int(0.3 * fs), height=0.5 * slope.max())
    pre, post = int(0.5 * fs), int(0.6 * fs)
    peaks = peaks[(peaks >= pre) & (peaks < x.shape[1] - post)]
    beat = np.median(x[:, peaks[:, None] + np.arange(-pre, post)], axis=1)
    r = pre
    v = np.abs(np.diff(beat, axis=1)).sum(axis=0)
    thr = 0.1 * v[r - int(0.1 * fs): r + int(0.1 * fs)].max()
    on = r
    while on > r - int(0.2 * fs) and v[on - int(0.02 * fs): on].max() > thr:
        on -= 1
    off = r
    while off < r + int(0.2 * fs) and v[off: off + int(0.02 * fs)].max() > thr:
        off += 1
    b = beat - beat[:, on - int(0.012 * fs)][:, None]
    qrs = b[:, on:off]
    seg = b[LEAD["II"], on - int(0.4 * fs): on - int(0.04 * fs)]
    p_peaks, _ = find_peaks(seg, prominence=0.03)
    pr = np.nan
    if len(p_peaks):
        pk = p_start = int(p_peaks[-1])
        while p_start > 0 and seg[p_start] > 0.1 * seg[pk]:
            p_start -= 1
        pr = (len(seg) - p_start + int(0.04 * fs)) / fs
    q_dur = np.array([np.argmax(np.append(lead > 0.005, True)) for lead in qrs]) / fs
    t_win = b[:, off + int(0.08 * fs): off + int(0.32 * fs)]
    t_amp = np.where(np.abs(t_win.max(1)) > np.abs(t_win.min(1)), t_win.max(1), t_win.min(1))
    return {"qrs": (off - on) / fs, "pr": pr, "st": b[:, off + int(0.04 * fs)], "q_dur": q_dur,
            "q_depth": -qrs[:, : int(0.04 * fs)].min(axis=1), "r": qrs.max(axis=1), "s": -qrs.min(axis=1),
            "t": t_amp}


def _cases(findings: list[dict]) -> list[dict]:
    return [_measure(_clean(findings, seed)) for seed in SEEDS]


# --- form: rates, lengths, leads, identities, honesty ----------------------------------------

@pytest.mark.parametrize("site", SITES)
def test_records_have_the_sites_native_form(site):
    reader = SyntheticReader(site, 40, seed=3)
    refs = reader.list_records()
    assert len(refs) == 40 and len({r.record_id for r in refs}) == 40
    recs = [reader.read(r) for r in refs[:12]]
    for rec in recs:
        assert rec.signal.dtype == np.float32 and np.isfinite(rec.signal).all()
        assert rec.meta["synthetic"] is True and rec.meta["classes"]
        assert rec.site == site
        assert 0.05 < np.abs(rec.signal).max() < 15.0
    if site == "ptb":
        assert all(r.lead_names == PTB_LEADS and r.fs == 1000 and 30 <= r.seconds <= 40 for r in recs)
        counts = np.unique([r.patient_id for r in refs], return_counts=True)[1]
        assert counts.max() >= 2, "PTB patients have several records"
    else:
        assert all(r.lead_names == STANDARD_LEADS for r in recs)
    if site in ("ptbxl", "mimic"):
        assert all(r.fs == 500 and r.n_samples == 5000 for r in recs)
    if site == "cinc":
        all_recs = [reader.read(r) for r in refs]
        assert {r.fs for r in all_recs} == {500.0, 257.0}
        assert len({round(r.seconds) for r in all_recs}) >= 3
        assert all(r.patient_id is None for r in refs)
    if site == "ptbxl":
        assert all(reader.split_key(r)[0] == "fold" for r in refs)


def test_limb_leads_obey_einthoven_and_goldberger():
    rec = SyntheticReader("mimic", 1, seed=5).read(SyntheticReader("mimic", 1, seed=5).list_records()[0])
    s = rec.signal.astype(np.float64)
    i, ii, iii, avr, avl, avf = (s[LEAD[n]] for n in ("I", "II", "III", "aVR", "aVL", "aVF"))
    tol = 2.0 / 200.0  # two quantisation steps of MIMIC's 200 units/mV
    assert np.abs(iii - (ii - i)).max() <= tol
    assert np.abs(avr + (i + ii) / 2).max() <= tol
    assert np.abs(avl - (i - ii / 2)).max() <= tol
    assert np.abs(avf - (ii - i / 2)).max() <= tol


def test_default_sizes_cover_every_site():
    assert set(DEFAULT_RECORDS) == set(SITES)
    assert all(50 <= n <= 5000 for n in DEFAULT_RECORDS.values())


# --- determinism -------------------------------------------------------------------------------

def test_same_seed_same_bytes_in_any_order_and_different_seed_differs():
    a = SyntheticReader("cinc", 10, seed=7)
    b = SyntheticReader("cinc", 25, seed=7)  # more records: the first ten are unchanged
    refs_a, refs_b = a.list_records(), b.list_records()[:10]
    assert [r.record_id for r in refs_a] == [r.record_id for r in refs_b]
    forward = [a.read(r).signal.tobytes() for r in refs_a]
    backward = [b.read(r).signal.tobytes() for r in reversed(refs_b)][::-1]
    assert forward == backward
    other = SyntheticReader("cinc", 10, seed=8)
    assert other.read(other.list_records()[0]).signal.tobytes() != forward[0]


# --- labels ------------------------------------------------------------------------------------

def test_every_native_label_in_the_vocabularies_maps_to_its_class():
    for (cls, _kind), code in profiles.PTBXL_CODES.items():
        assert SPACE.names(harmonise("ptbxl", [code, profiles.PTBXL_RHYTHM])) == [cls], code
    for (cls, _kind), code in profiles.CINC_CODES.items():
        assert SPACE.names(harmonise("cinc", [profiles.CINC_SINUS_RHYTHM, code])) == [cls], code
    for (cls, _kind), line in profiles.MIMIC_STATEMENTS.items():
        lines = [profiles.MIMIC_RHYTHM, line] + ([] if cls == "NORM" else [profiles.MIMIC_ABNORMAL])
        assert SPACE.names(harmonise("mimic", lines)) == [cls], line
    for cls, reason in profiles.PTB_REASONS.items():
        assert SPACE.names(harmonise("ptb", [reason])) == [cls], reason


@pytest.mark.parametrize("site", SITES)
def test_native_labels_harmonise_to_the_generated_classes(site):
    reader = SyntheticReader(site, 400, seed=0)
    counts = np.zeros(SPACE.n_classes)
    for ref in reader.list_records():
        y = harmonise(site, ref.native_labels, SPACE).astype(bool)
        mask = record_mask(site, ref.native_labels, SPACE, subsource=ref.meta["subsource"]).astype(bool)
        truth = np.array([c in ref.meta["classes"] for c in SPACE.classes])
        stated = {f["cls"] for f in ref.meta["findings"] if f["labelled"]}
        if not stated and not any(f["unstated"] and site == "cinc" for f in ref.meta["findings"]):
            stated = {"NORM"}  # CinC writes a NORM-excluding code for a finding it cannot class
        assert SPACE.names(y) == [c for c in SPACE.classes if c in stated], ref.native_labels
        assert not (y & ~truth).any()  # a stated class is physiologically present
        assert (y[mask] == truth[mask]).all() or site == "ptb", (ref.record_id, ref.native_labels)
        counts += y
    known = availability(site, SPACE)
    assert (counts[known] >= 10).all(), f"{site}: every known class occurs ({counts})"


# --- class morphology, measured ----------------------------------------------------------------

def test_normal_beat_has_normal_intervals():
    for m in _cases([]):
        assert 0.06 <= m["qrs"] < 0.11 and 0.12 <= m["pr"] <= 0.20
        assert np.abs(m["st"][: LEAD["aVF"] + 1]).max() < 0.1   # limb leads: ST < 0.1 mV
        assert np.abs(m["st"]).max() < 0.2                     # V2-V3 up to 0.2 mV is normal
        assert m["r"][LEAD["V5"]] > m["r"][LEAD["V1"]]            # R-wave progression
        assert m["t"][LEAD["II"]] > 0 and m["t"][LEAD["V5"]] > 0  # upright T


@pytest.mark.parametrize("kind", ["lbbb", "rbbb"])
def test_bundle_branch_block_widens_the_qrs(kind):
    for m in _cases([{"cls": "CD", "kind": kind, "severity": 0.5}]):
        assert m["qrs"] >= 0.12
        if kind == "rbbb":  # terminal R' in V1
            assert m["r"][LEAD["V1"]] > 0.4
        else:  # dominant S (QS/rS) in V1, dominant broad R in V6
            assert m["s"][LEAD["V1"]] > m["r"][LEAD["V1"]] and m["r"][LEAD["V6"]] > m["s"][LEAD["V6"]]


def test_first_degree_av_block_prolongs_pr():
    for m in _cases([{"cls": "CD", "kind": "iavb", "severity": 0.3}]):
        assert m["pr"] > 0.20 and m["qrs"] < 0.11


def test_lvh_meets_sokolow_lyon_and_strain_inverts_lateral_t():
    for m in _cases([{"cls": "HYP", "kind": "lvh", "severity": 0.3}]):
        assert m["s"][LEAD["V1"]] + max(m["r"][LEAD["V5"]], m["r"][LEAD["V6"]]) > 3.5
    for m in _cases([{"cls": "HYP", "kind": "lvh_strain", "severity": 0.6}]):
        assert m["t"][LEAD["V6"]] < 0 and m["st"][LEAD["V6"]] < -0.03
    normal = [m["s"][LEAD["V1"]] + m["r"][LEAD["V5"]] for m in _cases([])]
    assert np.median(normal) < 3.0


def test_old_inferior_mi_has_pathological_q_waves():
    for m in _cases([{"cls": "MI", "kind": "inferior", "stage": "old", "severity": 0.4}]):
        inferior = [LEAD["III"], LEAD["aVF"]]
        assert max(m["q_dur"][inferior]) >= 0.04 and max(m["q_depth"][inferior]) >= 0.1


def test_acute_anterior_mi_elevates_st_in_v1_v4():
    for m in _cases([{"cls": "MI", "kind": "anterior", "stage": "acute", "severity": 0.4}]):
        assert (m["st"][LEAD["V1"]: LEAD["V4"] + 1] >= 0.1).sum() >= 2


def test_sttc_depresses_st_or_flattens_t():
    lateral = [LEAD[n] for n in ("I", "II", "aVF", "V4", "V5", "V6")]
    for m in _cases([{"cls": "STTC", "kind": "st_depression", "severity": 0.5}]):
        assert (m["st"][lateral] <= -0.05).sum() >= 2
    def t_to_r(m: dict) -> float:
        return abs(m["t"][LEAD["V5"]]) / m["r"][LEAD["V5"]]

    flat = [t_to_r(m) for m in _cases([{"cls": "STTC", "kind": "flat_t", "severity": 0.5}])]
    normal = [t_to_r(m) for m in _cases([])]
    assert max(flat) < 0.15 < min(normal)


# --- the synthetic cache is a cache like any other --------------------------------------------

def test_synthetic_cache_validates_and_is_byte_identical(tmp_path: Path):
    from shared.data.cache import validate_cache
    from shared.data.prepare import prepare_cache

    outs = []
    for name, workers in (("a", 1), ("b", 2)):
        out = tmp_path / name
        prepare_cache(SyntheticReader("cinc", 30, seed=2), out, source="synthetic", workers=workers, progress=False)
        manifest = validate_cache(out)
        assert manifest["synthetic"] is True and "synthetic" in manifest["source"]
        outs.append(out)
    files = sorted(p.name for p in outs[0].iterdir())
    match, mismatch, errors = filecmp.cmpfiles(outs[0], outs[1], files, shallow=False)
    assert not mismatch and not errors and "signals.npy" in match


# --- the cross-site gap ------------------------------------------------------------------------

def test_site_shift_costs_auroc_and_pooling_helps():
    table = cross_site_table({s: 220 for s in SITES}, {s: 160 for s in SITES}, seed=0)
    gap = gap_summary(table)
    assert gap["in_site"] > gap["cross_site"] + 0.02, gap
    assert gap["pooled"] >= gap["cross_site"], gap
