"""A fast WFDB reader for the formats ECG datasets actually use, with wfdb as the fallback.

``wfdb.rdrecord`` manages about 130 records/s per core; most of that time goes into header
parsing through pandas and per-signal bookkeeping. Nearly every record of the four sites is
WFDB **format 16** (little-endian int16, signals interleaved frame by frame): PTB's ``.dat`` and
``.xyz``, PTB-XL's ``.dat``, MIMIC-IV-ECG's ``.dat``, and the Challenge ``.mat`` files, whose
headers declare ``16+24`` (format 16 after the 24-byte MATLAB v4 header of the ``val`` matrix,
stored column-major, i.e. frame by frame). This module reads those with one ``np.fromfile`` per
signal file and converts to physical units exactly as wfdb does
(``(digital - baseline) / gain``, with the invalid-sample value -32768 read as NaN).
Anything else (other formats, several samples per frame, skew) goes to ``wfdb.rdrecord``.

The header is parsed with wfdb's own line grammar (``wfdb.io.header.rx_record`` and
``rx_signal``) and the same defaults (gain 0 or missing -> 200, baseline defaults to ADC zero).
Tests cross-check every real sample sample-for-sample against ``wfdb.rdrecord``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import wfdb
from wfdb.io.header import rx_record, rx_signal

from ..errors import RecordError

#: Formats read natively here; every other format is handed to wfdb.
FAST_FORMATS = frozenset({"16"})
#: The digital value WFDB format 16 reserves for "no sample" (read as NaN, as wfdb does).
FORMAT16_INVALID = -32768
#: Size of the MATLAB v4 header of a Challenge ``.mat`` file holding one matrix named ``val``.
MAT_V4_HEADER_BYTES = 24
#: wfdb's default gain when a header gives none (or 0).
DEFAULT_GAIN = 200.0


@dataclass(frozen=True)
class SignalSpec:
    """One signal line of a WFDB header."""

    file_name: str
    fmt: str
    samps_per_frame: int
    skew: int
    byte_offset: int
    gain: float
    baseline: int
    units: str
    adc_zero: int
    name: str


@dataclass(frozen=True)
class Header:
    """A parsed single-segment WFDB header."""

    record_name: str
    n_sig: int
    fs: float
    sig_len: int | None
    signals: tuple[SignalSpec, ...]
    comments: tuple[str, ...] = field(default=())

    @property
    def sig_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.signals)

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(s.units for s in self.signals)


def _int(text: str, default: int | None) -> int | None:
    return int(text) if text else default


def parse_header_text(text: str, path: str | os.PathLike = "") -> Header:
    """Parse the text of a ``.hea`` file (single-segment records only).

    Raises ``RecordError(path, "header_unreadable", ...)`` for anything it cannot parse.
    """
    lines = []
    comments = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            comments.append(line[1:].strip())
        else:
            lines.append(line)
    if not lines:
        raise RecordError(str(path), "header_unreadable", "no record line")
    m = rx_record.match(lines[0])
    if m is None:
        raise RecordError(str(path), "header_unreadable", f"bad record line {lines[0]!r}")
    if m.group("n_seg"):
        raise RecordError(str(path), "header_unreadable", "multi-segment records are not supported")
    try:
        n_sig = int(m.group("n_sig"))
        fs = float(m.group("fs")) if m.group("fs") else 250.0  # WFDB's default frequency
        sig_len = _int(m.group("sig_len"), None)
    except ValueError as exc:
        raise RecordError(str(path), "header_unreadable", f"bad record line {lines[0]!r}") from exc
    sig_lines = lines[1 : 1 + n_sig]
    if len(sig_lines) != n_sig:
        raise RecordError(
            str(path), "header_unreadable", f"record line declares {n_sig} signals, found {len(sig_lines)} signal lines"
        )
    signals = []
    for line in sig_lines:
        s = rx_signal.match(line)
        if s is None or not s.group("fmt"):
            raise RecordError(str(path), "header_unreadable", f"bad signal line {line!r}")
        try:
            gain = float(s.group("adc_gain")) if s.group("adc_gain") else DEFAULT_GAIN
            adc_zero = _int(s.group("adc_zero"), 0)
            baseline = _int(s.group("baseline"), adc_zero)
        except ValueError as exc:
            raise RecordError(str(path), "header_unreadable", f"bad signal line {line!r}") from exc
        signals.append(
            SignalSpec(
                file_name=s.group("file_name"),
                fmt=s.group("fmt"),
                samps_per_frame=_int(s.group("samps_per_frame"), 1) or 1,
                skew=_int(s.group("skew"), 0) or 0,
                byte_offset=_int(s.group("byte_offset"), 0) or 0,
                gain=gain if gain != 0 else DEFAULT_GAIN,
                baseline=baseline,
                units=s.group("units") or "mV",
                adc_zero=adc_zero,
                name=(s.group("sig_name") or "").strip(),
            )
        )
    return Header(m.group("record_name"), n_sig, fs, sig_len, tuple(signals), tuple(comments))


def read_header(record_path: str | os.PathLike) -> Header:
    """Parse ``<record_path>.hea``."""
    hea = f"{os.fspath(record_path)}.hea"
    try:
        with open(hea, "rb") as fh:
            text = fh.read().decode("latin-1")
    except FileNotFoundError as exc:
        raise RecordError(hea, "missing_file", "header file not found") from exc
    except OSError as exc:
        raise RecordError(hea, "header_unreadable", str(exc)) from exc
    return parse_header_text(text, hea)


def _fast_path_ok(header: Header) -> bool:
    return all(
        s.fmt in FAST_FORMATS and s.samps_per_frame == 1 and s.skew == 0 and s.file_name and s.file_name != "~"
        for s in header.signals
    )


def _check_mat_header(path: str, raw: bytes, n_sig: int, offset: int) -> int | None:
    """Validate a MATLAB v4 header of a Challenge ``.mat`` and return its number of columns."""
    if offset != MAT_V4_HEADER_BYTES or len(raw) < MAT_V4_HEADER_BYTES:
        return None
    mopt, mrows, ncols, imagf, namlen = struct.unpack("<5i", raw[:20])
    # MOPT = M*1000 + O*100 + P*10 + T: M=0 little-endian, P=3 int16, T=0 full numeric matrix.
    if not (0 <= mopt < 1000) or (mopt // 10) % 10 != 3 or mopt % 10 != 0 or imagf != 0 or namlen != 4:
        raise RecordError(path, "signal_unreadable", f"not a MATLAB v4 int16 'val' matrix (type {mopt})")
    if mrows != n_sig:
        raise RecordError(path, "length_mismatch", f"matrix has {mrows} rows, header declares {n_sig} signals")
    return ncols


def read_digital(record_path: str | os.PathLike, header: Header) -> np.ndarray:
    """Digital samples ``int16 [n_sig, sig_len]`` of a format-16 record (fast path only)."""
    base_dir = Path(record_path).parent
    by_file: dict[str, list[int]] = {}
    for i, s in enumerate(header.signals):
        by_file.setdefault(s.file_name, []).append(i)
    parts: list[np.ndarray | None] = [None] * header.n_sig
    sig_len = header.sig_len
    for file_name, chans in by_file.items():
        fpath = base_dir / file_name
        offset = header.signals[chans[0]].byte_offset
        try:
            with open(fpath, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError as exc:
            raise RecordError(str(fpath), "missing_file", "signal file not found") from exc
        except OSError as exc:
            raise RecordError(str(fpath), "signal_unreadable", str(exc)) from exc
        mat_cols = None
        if file_name.endswith(".mat"):
            mat_cols = _check_mat_header(str(fpath), raw, len(chans), offset)
        body = len(raw) - offset
        frame = 2 * len(chans)
        if body < 0:
            raise RecordError(str(fpath), "truncated_signal", f"file has {len(raw)} bytes, header says data start at byte {offset}")
        n_avail = body // frame
        n_want = sig_len if sig_len is not None else n_avail
        if mat_cols is not None and mat_cols != n_want:
            raise RecordError(
                str(fpath), "length_mismatch", f"matrix has {mat_cols} samples per lead, header declares {n_want}"
            )
        if n_avail < n_want:
            raise RecordError(
                str(fpath), "truncated_signal", f"{n_avail} samples per lead on disk, header declares {n_want}"
            )
        if n_avail > n_want or body % frame:
            raise RecordError(
                str(fpath), "length_mismatch",
                f"{body} data bytes hold {body / frame:g} frames of {len(chans)} signals, header declares {n_want}",
            )
        sig_len = n_want
        block = np.frombuffer(raw, dtype="<i2", count=n_want * len(chans), offset=offset).reshape(n_want, len(chans))
        for j, ch in enumerate(chans):
            parts[ch] = block[:, j]
    return np.stack(parts, axis=0)


def physical(digital: np.ndarray, header: Header) -> np.ndarray:
    """Physical values ``float32 [n_sig, n]`` computed as wfdb does (float64, then cast)."""
    gain = np.array([s.gain for s in header.signals], dtype=np.float64)[:, None]
    baseline = np.array([s.baseline for s in header.signals], dtype=np.float64)[:, None]
    out = (digital.astype(np.float64) - baseline) / gain
    invalid = digital == FORMAT16_INVALID
    if invalid.any():
        out[invalid] = np.nan
    return out.astype(np.float32)


def read_physical(record_path: str | os.PathLike, header: Header | None = None) -> tuple[Header, np.ndarray, bool]:
    """Read a record: ``(header, float32 [n_sig, n_samples] physical values, used_fast_path)``.

    Signal rows are in the order of the header's signal lines, values in the header's units.
    """
    record_path = os.fspath(record_path)
    if header is None:
        header = read_header(record_path)
    if _fast_path_ok(header):
        return header, physical(read_digital(record_path, header), header), True
    return header, _read_with_wfdb(record_path), False


def _read_with_wfdb(record_path: str) -> np.ndarray:
    try:
        rec = wfdb.rdrecord(record_path)
    except FileNotFoundError as exc:
        raise RecordError(record_path, "missing_file", str(exc)) from exc
    except Exception as exc:  # wfdb raises many kinds for damaged files
        raise RecordError(record_path, "signal_unreadable", f"wfdb: {type(exc).__name__}: {exc}") from exc
    if rec.p_signal is None:
        raise RecordError(record_path, "signal_unreadable", "wfdb returned no physical signal")
    return np.ascontiguousarray(rec.p_signal.T, dtype=np.float32)
