"""PhysioNet/CinC Challenge 2020 and 2021 training data: ``*.hea`` + ``*.mat`` (any folder tree).

Each record's sub-source comes from its name prefix (or, for ``JS``, its folder):

| prefix | sub-source | fs |
|---|---|---|
| ``A`` | ``cpsc`` (CPSC 2018) | 500 |
| ``Q`` | ``cpsc_extra`` | 500 |
| ``I`` | ``incart`` (St Petersburg INCART) | 257 |
| ``S`` | ``ptb`` (the PTB Diagnostic ECG Database) | 1000 |
| ``HR`` | ``ptbxl`` (PTB-XL) | 500 |
| ``E`` | ``georgia`` (G12EC) | 500 |
| ``JS`` | ``chapman`` (JS00001-JS10646) or ``ningbo`` (JS10647-JS45551); a ``chapman_shaoxing`` or ``ningbo`` folder name wins | 500 |

Native labels are the ``# Dx:`` SNOMED-CT codes.

Subjects: the Challenge headers carry no subject (patient) id (only ``# Age`` / ``# Sex``), so a
record's split key is its record id, and a split is patient-disjoint only for sub-sources whose
records are one per subject. :data:`SUBJECTS` says, per sub-source, what is known: where a source
is known to repeat subjects and gives no way to group them (``incart``: 75 records of 32
subjects; the Challenge copies of ``ptb``: 549 records of 290 patients, and ``ptbxl``: 21,799
records of 18,869 patients), it is excluded by default, so that one subject cannot sit in train
and test: option ``exclude_sources=("ptb", "ptbxl", "incart")`` (:data:`DEFAULT_EXCLUDE`). The
``ptb`` and ``ptbxl`` sub-sources are moreover the same patients as this project's ``ptb`` and
``ptbxl`` sites. Pass ``exclude_sources=()`` (or ``include_sources=...``) to keep them, knowing
that their records are then split by record.

Known defect, fixed here and flagged: the Challenge 2020 PTB headers (``S0001`` ...) declare a
gain of 2000000/mV, but the stored values are microvolts (``S0001`` is ``ptbdb`` ``s0010_re``
at half its digital values). With ``fix_ptb_gain=True`` (default) a gain of 2000000 is read as
1000/mV and ``meta['gain_fixed']`` records it; any other gain above 100000/mV (a full int16 range
below 0.33 mV) is rejected as ``implausible_gain``.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ..errors import DatasetRootError, RecordError
from ..record import STANDARD_LEADS, EcgRecord
from .base import RecordRef, SiteReader
from .common import check_native_labels, comment_value, read_leads
from .fastio import Header, read_header

SUBSOURCES = ("cpsc", "cpsc_extra", "incart", "ptb", "ptbxl", "georgia", "chapman", "ningbo", "unknown")
#: What each sub-source reveals about subjects: ``one_per_subject`` (records can be split by
#: record), ``ungroupable`` (subjects repeat and no id says which records share one: excluded by
#: default), with the source of the statement.
SUBJECTS: dict[str, tuple[str, str]] = {
    "cpsc": ("one_per_subject", "CPSC 2018: one recording per patient, no subject id"),
    "cpsc_extra": ("one_per_subject", "CPSC 2018 extra: one recording per patient, no subject id"),
    "incart": ("ungroupable", "St Petersburg INCART: 75 records of 32 subjects, no subject id in the headers"),
    "ptb": ("ungroupable", "the PTB Diagnostic ECG Database: 549 records of 290 patients, no patient id in the "
                           "Challenge headers (and the same patients as the ptb site)"),
    "ptbxl": ("ungroupable", "PTB-XL: 21,799 records of 18,869 patients, no patient id in the Challenge headers "
                             "(and the same patients as the ptbxl site)"),
    "georgia": ("one_per_subject", "G12EC: no subject id published; taken as one record per subject"),
    "chapman": ("one_per_subject", "Chapman-Shaoxing: 10,646 patients, one ECG each"),
    "ningbo": ("one_per_subject", "Ningbo: no subject id published; taken as one record per subject"),
    "unknown": ("one_per_subject", "unrecognised prefix: no subject id; split by record"),
}
#: Sub-sources left out unless asked for: every ``ungroupable`` one (INCART, PTB, PTB-XL).
DEFAULT_EXCLUDE = tuple(s for s, (kind, _) in SUBJECTS.items() if kind == "ungroupable")
PREFIXES = (("HR", "ptbxl"), ("JS", "js"), ("A", "cpsc"), ("Q", "cpsc_extra"), ("I", "incart"), ("S", "ptb"), ("E", "georgia"))
#: Last Chapman-Shaoxing record number in the Challenge 2021 data; Ningbo starts after it.
CHAPMAN_LAST = 10646
BROKEN_PTB_GAIN = 2_000_000.0
FIXED_PTB_GAIN = 1000.0
IMPLAUSIBLE_GAIN = 100_000.0
_JS_NUMBER = re.compile(r"^JS(\d+)$")


def subsource_of(record_path: str | Path) -> str:
    """Sub-source of a Challenge record from its name (and, for ``JS``, its folder)."""
    p = Path(record_path)
    name = p.name
    for prefix, sub in PREFIXES:
        if name.startswith(prefix):
            if sub != "js":
                return sub
            folders = {part.lower() for part in p.parts[:-1]}
            if "ningbo" in folders:
                return "ningbo"
            if "chapman_shaoxing" in folders or "chapman" in folders:
                return "chapman"
            m = _JS_NUMBER.match(name)
            if m:
                return "chapman" if int(m.group(1)) <= CHAPMAN_LAST else "ningbo"
            return "unknown"
    return "unknown"


def parse_dx(comments: tuple[str, ...]) -> tuple[str, ...]:
    """SNOMED-CT codes of the ``# Dx:`` comment (``NaN`` and empty entries dropped)."""
    value = comment_value(comments, "Dx")
    if value is None:
        return ()
    codes = [c.strip() for c in value.split(",")]
    return tuple(c for c in codes if c and c.lower() != "nan")


def fix_gain(header: Header, path: str, enabled: bool = True) -> tuple[Header, dict]:
    """Repair the Challenge-2020 PTB gain bug (see module docstring); reject other absurd gains."""
    gains = [s.gain for s in header.signals]
    if max(abs(g) for g in gains) <= IMPLAUSIBLE_GAIN:
        return header, {}
    if enabled and all(g == BROKEN_PTB_GAIN for g in gains):
        fixed = tuple(dataclasses.replace(s, gain=FIXED_PTB_GAIN) for s in header.signals)
        return dataclasses.replace(header, signals=fixed), {
            "gain_fixed": True, "header_gain": BROKEN_PTB_GAIN, "gain_used": FIXED_PTB_GAIN,
        }
    raise RecordError(path, "implausible_gain", f"gain {max(gains):g}/mV puts the whole int16 range below 0.33 mV")


class CincReader(SiteReader):
    """Options: ``exclude_sources`` (default ``("incart", "ptb", "ptbxl")``: the sub-sources whose
    records cannot be grouped by subject) or ``include_sources`` (keep
    exactly these sub-sources), ``fix_ptb_gain`` (True),
    ``bad_leads`` (``skip``|``zero``|``keep``), ``strict_labels`` (True)."""

    site = "cinc"
    dataset_version = "challenge-2020/2021 training"
    lead_names = STANDARD_LEADS

    def __init__(self, root, **options):
        super().__init__(root, **options)
        include = options.get("include_sources")
        if include is not None and "exclude_sources" in options:
            raise ValueError("give include_sources or exclude_sources, not both")
        if include is not None:  # keep exactly these sub-sources
            bad = set(include) - set(SUBSOURCES)
            if bad:
                raise ValueError(f"include_sources: unknown sub-source(s) {sorted(bad)}; known: {SUBSOURCES}")
            exclude = tuple(s for s in SUBSOURCES if s not in include)
        else:
            exclude = tuple(options.get("exclude_sources", DEFAULT_EXCLUDE))
        unknown = set(exclude) - set(SUBSOURCES)
        if unknown:
            raise ValueError(f"exclude_sources: unknown sub-source(s) {sorted(unknown)}; known: {SUBSOURCES}")
        self.exclude_sources = exclude

    def validate_root(self) -> None:
        if not self.root.is_dir():
            raise DatasetRootError(f"CinC root {self.root} is not a directory (expected Challenge training data)")
        if next(self.root.rglob("*.hea"), None) is None:
            raise DatasetRootError(
                f"{self.root} holds no Challenge records: expected *.hea + *.mat files (e.g. "
                "training/cpsc_2018/g1/A0001.hea) anywhere below it"
            )

    def _ref(self, path: Path) -> RecordRef:
        rec = path.with_suffix("") if path.suffix == ".hea" else path
        return RecordRef(record_id=rec.name, path=str(rec), patient_id=None, meta={"subsource": subsource_of(rec)})

    def list_records(self) -> list[RecordRef]:
        """Every record below the root, sorted by path, minus the excluded sub-sources."""
        self.validate_root()
        refs, seen = [], set()
        for hea in sorted(self.root.rglob("*.hea")):
            ref = self._ref(hea)
            if ref.meta["subsource"] in self.exclude_sources or ref.record_id in seen:
                continue  # excluded sub-source, or the same record in a second copy of the data
            seen.add(ref.record_id)
            refs.append(ref)
        return refs

    def split_key(self, ref: RecordRef) -> tuple[str, str]:
        return ("record", ref.record_id)

    @classmethod
    def ref_for_path(cls, path: str | Path, **options) -> tuple["CincReader", RecordRef]:
        p = Path(path)
        reader = cls(p.parent, **options)
        return reader, reader._ref(p)

    def read(self, ref: RecordRef) -> EcgRecord:
        sub = ref.meta.get("subsource") or subsource_of(ref.path)
        if sub in self.exclude_sources:
            raise RecordError(ref.path, "excluded_source", f"sub-source {sub} is excluded (exclude_sources={self.exclude_sources})")
        header = read_header(ref.path)
        labels = parse_dx(header.comments)
        meta = {"subsource": sub}
        meta.update(check_native_labels(self.site, labels, ref.path, self.options.get("strict_labels", True)))
        header, gain_meta = fix_gain(header, ref.path, self.options.get("fix_ptb_gain", True))
        meta.update(gain_meta)
        header, signal, read_meta = read_leads(ref.path, STANDARD_LEADS, bad_leads=self.options.get("bad_leads", "skip"), header=header)
        meta.update(read_meta)
        return EcgRecord(
            site=self.site, record_id=ref.record_id, patient_id=None, signal=signal, fs=header.fs,
            lead_names=STANDARD_LEADS, native_labels=labels, source=ref.path, meta=meta,
        )
