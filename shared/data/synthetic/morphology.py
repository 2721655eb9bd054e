"""Beat morphology: the normal beat as a set of dipole waves, and how each class changes it.

A beat is a handful of *waves*. Each wave is a 3-D dipole vector (mV, Frank coordinates, see
:mod:`.leads`) times a time course: a Gaussian (``centre``, ``width`` = standard deviation, in
seconds from the R peak) or, for the ST segment, a plateau (logistic rise at ``centre``, logistic
fall at ``end``, edge ``width``). Projected through the lead vectors, a sequence of Gaussians
with turning directions draws the vectorcardiographic loop, so Q, R and S appear in the leads
that face the corresponding forces, as in a real ECG.

Normal beat (adult values; Surawicz & Knilans, *Chou's Electrocardiography*, 6th ed.;
AHA/ACCF/HRS 2009 recommendations for ECG interpretation, parts I-VI):
  * P: right atrium (anterior-inferior) then left atrium (leftward-posterior), ~100 ms,
    <= 0.25 mV in II; PR 120-200 ms.
  * QRS ~80-100 ms: small *septal* forces rightward-anterior (the septal q of I, aVL, V5-V6 and
    the r of V1), the main left-ventricular force leftward-inferior-posterior (frontal axis
    -30..+90 degrees; R progression V1 -> V5), small terminal forces rightward-superior-posterior
    (the s of I and V6).
  * ST: isoelectric (no plateau force).
  * T: concordant with the QRS (frontal QRS-T angle small), slightly more anterior, asymmetric
    (slow upstroke, faster downstroke); QT by Bazett, QTc ~400 ms.

Class morphology (each function documents its criteria). Every abnormality has a *severity*
``s`` in ``[0, 1]`` that scales its effect; a site labels a condition positive above its own
threshold, and below it the mild finding is present but unlabelled (see :mod:`.profiles`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .leads import DOWER

GAUSS, PLATEAU = 0, 1


@dataclass
class Wave:
    """One dipole wave: ``vec`` [3] mV; time course (seconds relative to the R peak)."""

    centre: float
    width: float
    vec: np.ndarray
    kind: int = GAUSS
    end: float = 0.0


@dataclass
class Beat:
    """The waves of one record's beat plus the intervals that place them (seconds)."""

    waves: dict[str, Wave]
    qrs_onset: float
    qrs_end: float
    pr: float
    qt: float


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / math.sqrt(float(v @ v))


def _direction(frontal_deg: float, z: float) -> np.ndarray:
    """A unit vector with the given frontal-plane axis (0 = leftward, +90 = inferior) and z."""
    a = np.deg2rad(frontal_deg)
    return _unit([np.cos(a), np.sin(a), z])


def normal_beat(rng: np.random.Generator, anatomy: dict, rr: float) -> Beat:
    """A normal beat for one record.

    ``anatomy`` holds the patient's fixed traits (``axis`` deg, ``z`` posterior fraction,
    ``r_mag`` mV, ``t_mag`` mV, ``qtc`` s, ``pr`` s): records of one patient look alike.
    ``rr`` is the record's mean RR interval (s), which sets the QT (Bazett: QT = QTc sqrt(RR)).
    """
    jit = lambda sd: 1.0 + rng.normal(0.0, sd)  # noqa: E731 - record-to-record variation
    axis = anatomy["axis"] + rng.normal(0.0, 4.0)
    main = _direction(axis, anatomy["z"]) * anatomy["r_mag"] * jit(0.05)
    septal = _unit([-0.6, 0.1, -0.8]) * anatomy["q_mag"] * jit(0.1)
    terminal = _unit([-0.5, -0.45, 0.75]) * anatomy["s_mag"] * jit(0.1)
    w_r = anatomy["r_width"]
    waves = {
        "q": Wave(-0.030, 0.008, septal),
        "r": Wave(0.0, w_r, main),
        "s": Wave(0.026, 0.010, terminal),
    }
    qrs_onset, qrs_end = -0.050, 0.052
    pr = anatomy["pr"] * jit(0.03)
    p_on = qrs_onset - pr
    p_scale = anatomy["p_mag"]
    waves["p_ra"] = Wave(p_on + 0.035, 0.013, np.array([0.05, 0.12, -0.05]) * p_scale)
    waves["p_la"] = Wave(p_on + 0.062, 0.015, np.array([0.12, 0.06, 0.08]) * p_scale)
    qt = anatomy["qtc"] * np.sqrt(rr)
    t_end = qrs_onset + qt
    t_peak = t_end - 0.080
    t_dir = _direction(0.5 * axis + 22.0 + anatomy["t_axis_offset"], -0.25)  # normal T axis ~+15..+65
    t_vec = t_dir * anatomy["t_mag"] * jit(0.08)
    waves["t_up"] = Wave(t_peak - 0.028, 0.040, 0.5 * t_vec)
    waves["t"] = Wave(t_peak, 0.033, 0.7 * t_vec)
    waves["st"] = Wave(qrs_end, 0.010, np.zeros(3), PLATEAU, end=t_peak - 0.040)
    return Beat(waves, qrs_onset, qrs_end, pr, qt)


def _clip(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else float(x)


def sample_anatomy(rng: np.random.Generator, voltage_scale: float, hr_mean: float, hr_sd: float) -> dict:
    """A patient's fixed traits: heart axis, voltages, intervals, resting heart rate."""
    return {
        "axis": _clip(rng.normal(45.0, 20.0), -25.0, 95.0),
        "z": _clip(rng.normal(0.35, 0.12), 0.05, 0.7),
        "r_mag": float(voltage_scale * np.exp(rng.normal(np.log(1.25), 0.18))),
        "q_mag": float(rng.uniform(0.08, 0.22)),
        "s_mag": float(voltage_scale * rng.uniform(0.2, 0.45)),
        "r_width": float(rng.uniform(0.0095, 0.0125)),
        "p_mag": float(rng.uniform(0.7, 1.3)),
        "pr": float(rng.uniform(0.13, 0.185)),
        "qtc": _clip(rng.normal(0.40, 0.018), 0.36, 0.44),
        "t_mag": float(voltage_scale * rng.uniform(0.28, 0.5)),
        "t_axis_offset": float(rng.normal(0.0, 10.0)),
        "hr": _clip(rng.normal(hr_mean, hr_sd), 48.0, 115.0),
    }


# --------------------------------------------------------------------------------------------
# Myocardial infarction
# --------------------------------------------------------------------------------------------

#: Outward normal of each infarct territory (Frank coordinates). The leads facing it:
#: inferior -> II, III, aVF; anterior(-septal) -> V1-V4; lateral -> I, aVL, V5-V6.
MI_TERRITORY: dict[str, np.ndarray] = {
    "inferior": _unit([0.0, 1.0, 0.1]),
    "anterior": _unit([0.25, 0.0, -1.0]),
    "lateral": _unit([1.0, -0.45, 0.1]),
    "inferolateral": _unit([0.7, 0.7, 0.0]),
}


def apply_mi(beat: Beat, rng: np.random.Generator, s: float, territory: str, stage: str) -> None:
    """Myocardial infarction in ``territory`` at ``stage`` (``acute``, ``evolving``, ``old``).

    Criteria (Fourth Universal Definition of MI, Thygesen et al., Circulation 2018;
    Minnesota code 1-1): dead myocardium generates no force, so the initial QRS vector points
    *away* from the territory: a pathological Q wave >= 40 ms (or >= 30 ms and >= 0.1 mV deep)
    and loss of R amplitude in >= 2 contiguous leads facing it (QS in V1-V3 for anterior MI).
    Acute injury current: ST elevation >= 0.1 mV in the territory's leads (reciprocal ST
    depression opposite) and hyperacute T. Evolving: T inversion in the territory's leads.
    Old ("age undetermined"): Q waves with T inversion fading towards normal.
    """
    u = MI_TERRITORY[territory]
    w = beat.waves
    depth = 0.28 + 0.35 * s
    w["q"] = Wave(-0.032, 0.013 + 0.004 * s, -u * depth + 0.3 * w["q"].vec)
    r_proj = float(w["r"].vec @ u)
    if r_proj > 0:
        w["r"].vec = w["r"].vec - (0.45 + 0.4 * s) * r_proj * u
    w["r"].centre += 0.004
    beat.qrs_onset = min(beat.qrs_onset, -0.032 - 2.5 * w["q"].width)
    t_vec = w["t"].vec + w["t_up"].vec
    t_proj = float(t_vec @ u)
    if stage == "acute":
        w["st"].vec = w["st"].vec + u * (0.12 + 0.25 * s)
        w["t"].vec = w["t"].vec + u * (0.15 + 0.2 * s)
    else:
        fade = 1.0 if stage == "evolving" else 0.55
        inversion = (max(t_proj, 0.0) + 0.12 + 0.25 * s) * fade
        w["t"].vec = w["t"].vec - 0.6 * inversion * u
        w["t_up"].vec = w["t_up"].vec - 0.4 * inversion * u


# --------------------------------------------------------------------------------------------
# ST/T change (ischaemic and non-specific)
# --------------------------------------------------------------------------------------------

def apply_sttc(beat: Beat, rng: np.random.Generator, s: float, kind: str) -> None:
    """ST/T change of ``kind``: ``st_depression``, ``flat_t`` or ``t_inversion``.

    Criteria (AHA/ACCF/HRS 2009 part VI; Minnesota codes 4 and 5): horizontal or downsloping
    ST depression >= 0.05 mV in >= 2 contiguous leads, from diffuse subendocardial ischaemia,
    whose injury vector points away from the left ventricle (depression in I, II, V4-V6 and
    elevation in aVR); T wave flattening (|T| < 10 % of R, Minnesota 5-3) or inversion
    (Minnesota 5-1/5-2) in leads with dominant R.
    """
    w = beat.waves
    lv = _unit(w["r"].vec)
    if kind == "st_depression":
        w["st"].vec = w["st"].vec - lv * (0.06 + 0.18 * s)
        for name in ("t", "t_up"):
            w[name].vec = w[name].vec * (0.75 - 0.35 * s)
    elif kind == "flat_t":
        for name in ("t", "t_up"):
            w[name].vec = w[name].vec * (0.3 - 0.25 * s)
    elif kind == "t_inversion":
        for name in ("t", "t_up"):
            w[name].vec = -w[name].vec * (0.3 + 0.6 * s)
    else:
        raise ValueError(f"unknown ST/T change {kind!r}")


# --------------------------------------------------------------------------------------------
# Conduction disturbance
# --------------------------------------------------------------------------------------------

def apply_cd(beat: Beat, rng: np.random.Generator, s: float, kind: str) -> None:
    """Conduction disturbance of ``kind``: lbbb, rbbb, iavb, lafb, ivcd, irbbb.

    Criteria (AHA/ACCF/HRS 2009 part III, Surawicz et al.):
      * LBBB: QRS >= 120 ms; septum activated right-to-left, so no septal q in I, V5-V6;
        broad notched R in I, aVL, V5-V6; QS/rS in V1-V3; ST-T discordant to the QRS.
      * RBBB: QRS >= 120 ms; late rightward-anterior forces from the slowly activated right
        ventricle: rsR' in V1-V2, broad S in I and V6; T inverted in V1-V2.
      * First-degree AV block: PR > 200 ms, QRS normal.
      * LAFB: frontal axis -45 to -90 degrees, qR in aVL, rS in II/III/aVF, QRS < 120 ms.
      * Non-specific IVCD: QRS > 110 ms without a bundle-branch pattern.
      * Incomplete RBBB: rsr' in V1 with QRS 110-120 ms.
    """
    w = beat.waves
    mag = float(np.linalg.norm(w["r"].vec))
    if kind == "lbbb":
        main = _unit([1.0, 0.25, 0.95]) * mag * (1.15 + 0.3 * s)
        notch = 0.034 + 0.016 * s
        w["q"] = Wave(-0.036, 0.012, _unit([0.6, 0.2, 0.5]) * 0.3 * mag)
        w["r"] = Wave(0.0, 0.016, 0.6 * main)
        w["r2"] = Wave(notch, 0.016, 0.6 * main)
        w["s"] = Wave(notch + 0.024, 0.010, 0.08 * w["s"].vec)
        beat.qrs_onset, beat.qrs_end = -0.066, notch + 0.05
        disc = -_unit(main)
        w["st"] = Wave(beat.qrs_end, 0.012, disc * (0.10 + 0.1 * s), PLATEAU, end=w["st"].end)
        t_mag = float(np.linalg.norm(w["t"].vec + w["t_up"].vec))
        w["t"].vec = disc * 0.55 * max(t_mag, 0.3)
        w["t_up"].vec = disc * 0.35 * max(t_mag, 0.3)
        _shift_after_qrs(beat, beat.qrs_end - 0.052)
    elif kind in ("rbbb", "irbbb"):
        complete = kind == "rbbb"
        amp = (0.8 + 0.4 * s) if complete else (0.25 + 0.15 * s)
        centre = (0.066 + 0.015 * s) if complete else 0.042
        width = 0.022 if complete else 0.012
        w["rprime"] = Wave(centre, width, _unit([-0.55, 0.05, -0.85]) * amp)
        w["s"].vec = w["s"].vec * 0.5
        beat.qrs_end = centre + 2.2 * width
        if complete:
            w["t"].vec = w["t"].vec + np.array([0.0, 0.0, 0.22])
        _shift_after_qrs(beat, beat.qrs_end - 0.052)
    elif kind == "iavb":
        extra = 0.215 + 0.1 * s - beat.pr
        if extra > 0:
            for name in ("p_ra", "p_la"):
                w[name].centre -= extra
            beat.pr += extra
    elif kind == "lafb":
        axis = -50.0 - 20.0 * s
        w["r"].vec = _direction(axis, 0.3) * mag * 1.1
        w["q"].vec = _unit([-0.2, 0.9, -0.2]) * 0.15
        w["r"].width *= 1.15
        beat.qrs_end += 0.008
    elif kind == "ivcd":
        factor = 1.45 + 0.35 * s
        for name in ("q", "r", "s"):
            w[name].width *= factor
            w[name].centre *= factor
        beat.qrs_onset *= factor
        beat.qrs_end *= factor
        _shift_after_qrs(beat, beat.qrs_end - 0.052)
    else:
        raise ValueError(f"unknown conduction disturbance {kind!r}")


def _shift_after_qrs(beat: Beat, delay: float) -> None:
    """Move the ST start to the new J point (repolarisation keeps its timing but starts later)."""
    w = beat.waves
    if delay > 0:
        w["st"].centre = beat.qrs_end
        for name in ("t", "t_up"):
            w[name].centre += 0.5 * delay
        beat.qt += 0.5 * delay


# --------------------------------------------------------------------------------------------
# Hypertrophy
# --------------------------------------------------------------------------------------------

def apply_hyp(beat: Beat, rng: np.random.Generator, s: float, kind: str) -> None:
    """Hypertrophy of ``kind``: ``lvh``, ``lvh_strain``, ``rvh`` or ``lae``.

    Criteria (Hancock et al., AHA/ACCF/HRS 2009 part V):
      * LVH: more LV mass, larger leftward-posterior QRS forces: Sokolow-Lyon S(V1) + R(V5 or
        V6) > 3.5 mV, Cornell R(aVL) + S(V3) > 2.8 mV (men); QRS slightly prolonged
        (~100-110 ms). "Strain": down-sloping ST depression and asymmetric T inversion in
        I, aVL, V5-V6 (repolarisation opposite to the enlarged QRS).
      * RVH: dominant R in V1 (R/S > 1), right axis deviation, T inversion V1-V3.
      * Left atrial enlargement (P mitrale): P >= 120 ms, notched, large terminal negative
        P in V1.
    """
    w = beat.waves
    if kind in ("lvh", "lvh_strain"):
        mag = float(np.linalg.norm(w["r"].vec))
        d = _unit(w["r"].vec / mag + np.array([0.25, -0.1, 0.35]))
        # Scale the LV force so that its Sokolow-Lyon projection (V5 lead vector minus V1 lead
        # vector, Dower) reaches 3.6-5.2 mV: voltage criteria met, as in a labelled LVH.
        sokolow_per_mv = float((DOWER[6] - DOWER[2]) @ d)
        target = (3.6 + 1.6 * s) / max(sokolow_per_mv, 0.5)
        w["r"].vec = d * max(target, 1.4 * mag)
        w["s"].vec = w["s"].vec * (1.0 + 0.4 * s)
        w["r"].width *= 1.12
        beat.qrs_end += 0.006
        if kind == "lvh_strain":
            w["st"].vec = w["st"].vec - d * (0.06 + 0.12 * s)
            for name in ("t", "t_up"):
                w[name].vec = -d * np.linalg.norm(w[name].vec) * (0.5 + 0.6 * s)
    elif kind == "rvh":
        mag = float(np.linalg.norm(w["r"].vec))
        w["r"].vec = w["r"].vec * 0.55 + _unit([-0.6, 0.55, -0.9]) * mag * (0.7 + 0.5 * s)
        w["t"].vec = w["t"].vec + np.array([0.0, 0.0, 0.2])
    elif kind == "lae":
        w["p_la"] = Wave(w["p_la"].centre + 0.02, 0.02, w["p_la"].vec * 1.2 + np.array([0.0, 0.0, 0.08 + 0.06 * s]))
        w["p_ra"].centre -= 0.01
    else:
        raise ValueError(f"unknown hypertrophy {kind!r}")


#: The class -> modifier function. NORM has none (the normal beat).
APPLY = {"MI": apply_mi, "STTC": apply_sttc, "CD": apply_cd, "HYP": apply_hyp}
#: Order in which findings are laid over one another (conduction first: it reshapes the QRS
#: that hypertrophy scales and that infarction and ischaemia then act on).
APPLY_ORDER: tuple[str, ...] = ("CD", "HYP", "MI", "STTC")


def build_beat(rng: np.random.Generator, anatomy: dict, rr: float, findings: list[dict]) -> Beat:
    """The record's beat: the normal beat with each finding applied in :data:`APPLY_ORDER`.

    ``findings``: dicts with ``cls``, ``kind`` (subtype), ``severity`` and for MI ``stage``.
    """
    beat = normal_beat(rng, anatomy, rr)
    for cls in APPLY_ORDER:
        for f in findings:
            if f["cls"] != cls:
                continue
            if cls == "MI":
                apply_mi(beat, rng, f["severity"], f["kind"], f["stage"])
            else:
                APPLY[cls](beat, rng, f["severity"], f["kind"])
    return beat
