"""Vectorised signal synthesis: rhythm, beat template, overlap-add, noise, device.

One record is built in a few array operations, without a Python loop over samples or beats:

1. **Rhythm.** RR intervals around the patient's rate with respiratory sinus arrhythmia
   (RSA, at the breathing frequency), a Mayer wave (~0.1 Hz) and random beat-to-beat jitter:
   the standard HRV components (Task Force of the ESC/NASPE, Circulation 1996).
2. **Template.** The record's beat (:mod:`.morphology`) is rendered once at the site's sampling
   rate as a ``[3, T]`` dipole template: each wave is a Gaussian (or a plateau for ST) times its
   vector. The device's anti-aliasing/low-pass filter is applied analytically: a Gaussian of
   width w through a Gaussian low-pass of width k is a Gaussian of width sqrt(w^2 + k^2).
3. **Beats.** Every beat's copy of the template is added at its R time with one
   ``np.bincount`` (overlap-add); each beat's dipole is scaled per axis with the respiratory
   phase (breathing moves the heart and changes the QRS axis and amplitude beat to beat).
   The QT follows the record's mean RR (not beat-to-beat RR), a simplification.
4. **Leads.** The dipole is projected onto the record's lead vectors (:mod:`.leads`).
5. **Noise per electrode** (so that Einthoven's relations hold for the noise too): baseline
   wander (respiration and slow electrode drift), EMG (broadband Gaussian noise), powerline
   interference at the site's mains frequency (50 or 60 Hz).
6. **Device.** Gain calibration error and ADC quantisation (the site's units per mV).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from .leads import ELECTRODE_TO_LEADS, LIMB_TO_STANDARD
from .morphology import GAUSS, Beat

#: Template span around the R peak (s): long PR (first-degree block) and slow-rate T fit in.
PRE_S, POST_S = 0.45, 0.62


@dataclass(frozen=True)
class Acquisition:
    """How one record is acquired: rate, length, device and noise levels."""

    fs: float
    n_samples: int
    lowpass_hz: float
    adc_gain: float          # ADC units per mV (quantisation step 1 / adc_gain mV)
    gain: float              # overall calibration gain (site error x record jitter)
    powerline_hz: float
    powerline_mv: float      # per-electrode interference amplitude (mV)
    emg_mv: float            # per-electrode EMG standard deviation (mV)
    wander_mv: float         # per-electrode baseline wander amplitude (mV)


def rr_series(rng: np.random.Generator, hr: float, seconds: float, resp_hz: float) -> np.ndarray:
    """R-peak times (s) covering ``[-POST_S, seconds + PRE_S]``.

    RR_n = RR0 * (1 + a_rsa sin(2 pi f_resp t_n + phi) + a_mayer sin(2 pi 0.1 t_n + psi) + e_n).
    """
    rr0 = 60.0 / hr
    n = int((seconds + PRE_S + POST_S) / (rr0 * 0.8)) + 3
    t_nom = np.arange(n) * rr0
    a_rsa, a_mayer = rng.uniform(0.01, 0.05), rng.uniform(0.005, 0.025)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    rr = rr0 * (
        1.0
        + a_rsa * np.sin(2 * np.pi * resp_hz * t_nom + phase[0])
        + a_mayer * np.sin(2 * np.pi * 0.1 * t_nom + phase[1])
        + rng.normal(0.0, 0.012, size=n)
    )
    times = np.cumsum(rr) - POST_S - rng.uniform(0.0, rr0)
    return times[(times > -POST_S) & (times < seconds + PRE_S)]


def render_template(beat: Beat, fs: float, lowpass_hz: float) -> tuple[int, np.ndarray]:
    """The beat as a dipole template ``[3, T]`` at ``fs``; returns (samples before R, template)."""
    pre, post = int(round(PRE_S * fs)), int(round(POST_S * fs))
    t = (np.arange(-pre, post + 1) / fs)[None, :]
    waves = list(beat.waves.values())
    centre = np.array([w.centre for w in waves])[:, None]
    width = np.array([w.width for w in waves])[:, None]
    kind = np.array([w.kind for w in waves])
    vec = np.array([w.vec for w in waves])  # [W, 3]
    # Gaussian low-pass with -3 dB at lowpass_hz: sigma = sqrt(ln 2) / (2 pi f).
    k = np.sqrt(np.log(2.0)) / (2 * np.pi * lowpass_hz)
    eff = np.sqrt(width**2 + k**2)
    shapes = np.empty((len(waves), t.shape[1]))
    g = kind == GAUSS
    shapes[g] = (width[g] / eff[g]) * np.exp(-0.5 * ((t - centre[g]) / eff[g]) ** 2)
    if (~g).any():
        end = np.array([w.end for w in waves])[:, None]
        shapes[~g] = expit((t - centre[~g]) / eff[~g]) * expit((end[~g] - t) / eff[~g])
    return pre, vec.T @ shapes


def place_beats(template: np.ndarray, pre: int, r_idx: np.ndarray, scale: np.ndarray, n: int) -> np.ndarray:
    """Overlap-add the ``[3, T]`` template at sample indices ``r_idx`` with per-beat, per-axis
    ``scale`` ``[B, 3]``; returns the dipole ``[3, n]`` (beats cut at the record's edges)."""
    length = template.shape[1]
    pad = length
    idx = (r_idx[:, None] - pre + pad) + np.arange(length)[None, :]      # [B, T]
    total = n + 2 * pad
    out = np.empty((3, n))
    flat = idx.ravel()
    for axis in range(3):
        weights = (scale[:, axis, None] * template[axis][None, :]).ravel()
        out[axis] = np.bincount(flat, weights=weights, minlength=total)[pad:pad + n]
    return out


#: Length of the shared bank of unit white noise (float32, 16 MiB).
_BANK_SIZE = 1 << 22
_bank: np.ndarray | None = None


def white_noise(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """``[rows, n]`` unit Gaussian white noise: windows of a fixed, seeded noise bank at random
    offsets. Drawing 45,000 fresh normals per record costs more than the rest of the record;
    reading slices of a bank is deterministic too (the bank's seed is a constant)."""
    global _bank
    if _bank is None:
        _bank = np.random.default_rng(0x5EC6).standard_normal(_BANK_SIZE, dtype=np.float32)
    if n > _BANK_SIZE // 4:
        return rng.standard_normal((rows, n), dtype=np.float32)
    starts = rng.integers(0, _BANK_SIZE - n, size=rows)
    return np.stack([_bank[a:a + n] for a in starts])


def noise_sources(
    rng: np.random.Generator, acq: Acquisition, resp_hz: float, n_el: int
) -> tuple[np.ndarray, np.ndarray]:
    """Noise sources and their weights at ``n_el`` electrodes.

    Returns ``basis`` ``float32 [5 + n_el, n]`` (respiratory wander, two slow drifts, powerline
    sine and cosine, then unit white EMG noise per electrode) and ``weights`` ``[n_el, 5 + n_el]``
    (mV): electrode noise = ``weights @ basis``.
    """
    n = acq.n_samples
    t = np.arange(n, dtype=np.float32) / np.float32(acq.fs)
    f = np.array([resp_hz, rng.uniform(0.03, 0.12), rng.uniform(0.12, 0.25), acq.powerline_hz, acq.powerline_hz])
    ph = rng.uniform(0, 2 * np.pi, size=5)
    ph[4] = ph[3] + np.pi / 2
    basis = np.empty((5 + n_el, n), dtype=np.float32)
    np.sin((2 * np.pi * f[:, None]).astype(np.float32) * t[None, :] + ph[:, None].astype(np.float32), out=basis[:5])
    basis[5:] = white_noise(rng, n_el, n)
    weights = np.zeros((n_el, 5 + n_el))
    weights[:, :3] = rng.normal(0.0, acq.wander_mv, size=(n_el, 3))
    weights[:, 3:5] = rng.normal(0.0, acq.powerline_mv, size=(n_el, 2))
    weights[:, 5:] = np.eye(n_el) * acq.emg_mv
    return basis, weights


#: Column block of the mixing product: small enough that OpenBLAS stays single-threaded
#: (12 x 17 x 1024 multiply-adds; 5000 columns at once starts its threads, measured).
_BLOCK = 1024


def _mix(coef: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """``coef @ sources`` in column blocks. One large thin product makes OpenBLAS start its
    threads, which on a busy 2-core machine costs 10-100x the arithmetic (measured)."""
    n = sources.shape[1]
    out = np.empty((coef.shape[0], n), dtype=np.float32)
    for a in range(0, n, _BLOCK):
        np.matmul(coef, sources[:, a:a + _BLOCK], out=out[:, a:a + _BLOCK])
    return out


def synthesise(
    rng: np.random.Generator,
    beat: Beat,
    acq: Acquisition,
    hr: float,
    lead_matrix: np.ndarray,
    frank: bool = False,
    noise: bool = True,
) -> np.ndarray:
    """The record's signal ``float32 [12 (+3 Frank), n]`` in mV, standard lead order.

    All sources (dipole x, y, z; noise basis) are stacked into one ``float32`` matrix and mixed
    into the output leads with one matrix product (:func:`_mix`).
    """
    seconds = acq.n_samples / acq.fs
    resp_hz = rng.uniform(0.18, 0.33)
    times = rr_series(rng, hr, seconds, resp_hz)
    pre, template = render_template(beat, acq.fs, acq.lowpass_hz)
    mod = rng.uniform(0.02, 0.08, size=3)
    ph = rng.uniform(0, 2 * np.pi)
    scale = 1.0 + mod[None, :] * np.sin(2 * np.pi * resp_hz * times[:, None] + ph)
    r_idx = np.round(times * acq.fs).astype(np.int64)
    dipole = place_beats(template, pre, r_idx, scale, acq.n_samples)                 # [3, n]
    to_std = LIMB_TO_STANDARD @ lead_matrix                                           # [12, 3]
    n_out = 15 if frank else 12
    blocks = [dipole.astype(np.float32)]
    mix = [np.zeros((n_out, 3))]
    mix[0][:12] = to_std
    if frank:
        mix[0][12:] = np.eye(3)
    if noise:
        basis, weights = noise_sources(rng, acq, resp_hz, 9)
        m = np.zeros((n_out, basis.shape[0]))
        m[:12] = LIMB_TO_STANDARD @ ELECTRODE_TO_LEADS @ weights
        blocks.append(basis)
        mix.append(m)
        if frank:
            fbasis, fweights = noise_sources(rng, acq, resp_hz, 3)
            m = np.zeros((n_out, fbasis.shape[0]))
            m[12:] = 0.7 * fweights
            blocks.append(fbasis)
            mix.append(m)
    sources = np.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]
    coef = (np.concatenate(mix, axis=1) * acq.gain).astype(np.float32)
    out = _mix(coef, sources)
    if acq.adc_gain > 0:
        out *= np.float32(acq.adc_gain)
        np.round(out, out=out)
        out /= np.float32(acq.adc_gain)
    return out
