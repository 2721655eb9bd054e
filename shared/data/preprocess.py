"""Signal preprocessing for the cache: lead selection -> resample -> band-pass -> windows.

Every site ends up at one sampling rate, one lead set and one window length, so the cache is a
single ``[n_windows, leads, window_samples]`` array whatever the source. Order of operations:

1. select the configured leads (by name, in the project's standard order);
2. resample to ``fs`` with :func:`scipy.signal.resample_poly` (polyphase, anti-aliased);
3. zero-phase Butterworth band-pass (:func:`scipy.signal.sosfiltfilt`) at the new rate;
4. cut non-overlapping (or ``stride``-spaced) windows; the tail shorter than a window is dropped.
   A record shorter than one window is zero-padded at the end (``short="pad"``, default) or
   skipped (``short="skip"``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np
from scipy import signal as sps

from .errors import RecordError
from .record import PTB_LEADS, STANDARD_LEADS, EcgRecord

LEAD_SETS: dict[str, tuple[str, ...]] = {"standard": STANDARD_LEADS, "all": PTB_LEADS}
#: A float16 cache holds |x| < 65504; real ECG is within tens of mV. Larger means broken gain.
MAX_ABS_MV = 1000.0


@dataclass(frozen=True)
class PreprocessConfig:
    """How records become windows. Part of the cache's config hash."""

    fs: float = 250.0
    window_seconds: float = 10.0
    stride_seconds: float | None = None  # None: non-overlapping (stride = window)
    leads: str = "standard"  # "standard" (12) or "all" (PTB's 15; other sites keep their 12)
    bandpass: tuple[float, float] | None = (0.5, 45.0)
    filter_order: int = 4
    short: str = "pad"  # records shorter than one window: "pad" with zeros or "skip"

    def __post_init__(self) -> None:
        if self.fs <= 0 or self.window_seconds <= 0:
            raise ValueError("fs and window_seconds must be positive")
        if self.stride_seconds is not None and self.stride_seconds <= 0:
            raise ValueError("stride_seconds must be positive")
        if self.leads not in LEAD_SETS:
            raise ValueError(f"leads must be one of {sorted(LEAD_SETS)}, got {self.leads!r}")
        if self.short not in ("pad", "skip"):
            raise ValueError(f"short must be 'pad' or 'skip', got {self.short!r}")
        if self.bandpass is not None:
            lo, hi = self.bandpass
            if not 0 < lo < hi < self.fs / 2:
                raise ValueError(
                    f"band-pass {lo}-{hi} Hz must satisfy 0 < low < high < fs/2 = {self.fs / 2:g} Hz"
                )

    @property
    def window_samples(self) -> int:
        return int(round(self.window_seconds * self.fs))

    @property
    def stride_samples(self) -> int:
        seconds = self.window_seconds if self.stride_seconds is None else self.stride_seconds
        return int(round(seconds * self.fs))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["bandpass"] = list(self.bandpass) if self.bandpass is not None else None
        d["window_samples"] = self.window_samples
        d["stride_samples"] = self.stride_samples
        return d


def lead_names_for(site: str, leads: str) -> tuple[str, ...]:
    """The cache's lead rows: PTB keeps its 15 leads with ``leads="all"``; others have 12."""
    if leads == "all" and site == "ptb":
        return PTB_LEADS
    return STANDARD_LEADS


def select_leads(record: EcgRecord, names: tuple[str, ...]) -> np.ndarray:
    """Rows of ``record.signal`` for ``names`` (raises ``RecordError`` if one is missing)."""
    if tuple(record.lead_names[: len(names)]) == names:
        return record.signal[: len(names)]
    index = {name: i for i, name in enumerate(record.lead_names)}
    missing = [n for n in names if n not in index]
    if missing:
        raise RecordError(record.source or record.record_id, "missing_leads", f"lacks {', '.join(missing)}")
    return record.signal[[index[n] for n in names]]


@lru_cache(maxsize=32)
def _resampler(fs_in: float, fs_out: float) -> tuple[int, int, np.ndarray]:
    """``up, down`` and the anti-aliasing FIR ``resample_poly`` would design (computed once)."""
    r = Fraction(fs_out / fs_in).limit_denominator(1000)
    up, down = r.numerator, r.denominator
    max_rate = max(up, down)
    fir = sps.firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))
    return up, down, fir


def resample(x: np.ndarray, fs_in: float, fs_out: float) -> np.ndarray:
    """Polyphase resampling along the last axis (float32 out).

    Same result as ``scipy.signal.resample_poly(x, up, down)`` with its default Kaiser window;
    the FIR is designed once per rate pair instead of per record.
    """
    if fs_in == fs_out:
        return x
    up, down, fir = _resampler(float(fs_in), float(fs_out))
    return sps.resample_poly(x, up, down, axis=-1, window=fir.astype(x.dtype)).astype(np.float32, copy=False)


@lru_cache(maxsize=32)
def _butter(lo: float, hi: float, fs: float, order: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Second-order sections, their steady-state initial conditions and the default pad length."""
    sos = sps.butter(order, [lo, hi], btype="bandpass", fs=fs, output="sos")
    ntaps = 2 * len(sos) + 1 - min(int((sos[:, 2] == 0).sum()), int((sos[:, 5] == 0).sum()))
    return sos, sps.sosfilt_zi(sos), 3 * ntaps


def bandpass(x: np.ndarray, fs: float, lo: float, hi: float, order: int = 4) -> np.ndarray:
    """Zero-phase Butterworth band-pass along the last axis of a 2-D array.

    The computation of ``scipy.signal.sosfiltfilt`` (odd extension, forward and backward
    ``sosfilt`` from steady-state initial conditions), with the filter and its initial
    conditions computed once per configuration instead of per record.
    """
    sos, zi, padlen = _butter(float(lo), float(hi), float(fs), int(order))
    n = x.shape[-1]
    pad = min(padlen, n - 1)
    x = np.asarray(x, dtype=np.float64)
    if pad > 0:  # odd extension, as sosfiltfilt's padtype="odd"
        ext = np.concatenate(
            [2 * x[:, :1] - x[:, pad:0:-1], x, 2 * x[:, -1:] - x[:, -2 : -pad - 2 : -1]], axis=-1
        )
    else:
        ext = x
    zi = zi[:, None, :]  # [sections, 1, 2] broadcast over leads
    y, _ = sps.sosfilt(sos, ext, axis=-1, zi=zi * ext[None, :, :1])
    y = y[:, ::-1]
    y, _ = sps.sosfilt(sos, y, axis=-1, zi=zi * y[None, :, :1])
    y = y[:, ::-1]
    if pad > 0:
        y = y[:, pad:-pad]
    return np.ascontiguousarray(y, dtype=np.float32)


def cut_windows(x: np.ndarray, window: int, stride: int, short: str, source: str = "") -> np.ndarray:
    """``[leads, n]`` -> ``[n_windows, leads, window]`` (a view-free copy)."""
    n = x.shape[-1]
    if n < window:
        if short == "skip":
            raise RecordError(source, "too_short", f"{n} samples < one window of {window}")
        padded = np.zeros((x.shape[0], window), dtype=x.dtype)
        padded[:, :n] = x
        return padded[None]
    starts = range(0, n - window + 1, stride)
    return np.stack([x[:, s : s + window] for s in starts])


def preprocess_record(record: EcgRecord, config: PreprocessConfig) -> np.ndarray:
    """One record -> float16 windows ``[n_windows, leads, window_samples]`` in mV."""
    source = record.source or record.record_id
    x = np.asarray(select_leads(record, lead_names_for(record.site, config.leads)), dtype=np.float32)
    if x.shape[-1] == 0:
        raise RecordError(source, "empty_signal", "no samples")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise RecordError(source, "nan_values", f"{bad} non-finite samples")
    x = resample(x, record.fs, config.fs)
    if config.bandpass is not None:
        x = bandpass(x, config.fs, config.bandpass[0], config.bandpass[1], config.filter_order)
    if np.abs(x).max(initial=0.0) > MAX_ABS_MV:
        raise RecordError(source, "amplitude_out_of_range", f"|x| up to {np.abs(x).max():.3g} mV (gain error?)")
    return cut_windows(x, config.window_samples, config.stride_samples, config.short, source).astype(np.float16)
