"""``SyntheticReader``: a site reader whose records come from the synthetic generator.

It yields exactly what the real site's reader yields (native rate, length, leads in standard
order, native labels), so the cache builder treats it like any other reader; every record's
``meta`` says ``synthetic: True``.

Determinism: record ``i`` of a site is fixed by ``(seed, site, i)`` alone. Patient-level traits
(anatomy, diagnosis) come from ``default_rng([seed, site_index, 1, patient])``, the record's
signal from ``default_rng([seed, site_index, 2, i])``, so records can be read in any order, in
any worker process, and a larger ``n_records`` only appends records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..record import PTB_LEADS, SITES, STANDARD_LEADS, EcgRecord
from ..readers.base import RecordRef, SiteReader
from ..errors import RecordError
from ..labels import availability, get_label_space
from .leads import lead_matrix
from .morphology import build_beat, sample_anatomy
from .profiles import ABNORMAL, PROFILES, SiteProfile, Subsource, native_labels
from .waveform import Acquisition, synthesise

#: First Ningbo record number in the Challenge data (readers/cinc.py: Chapman ends at JS10646).
_CHAPMAN_LAST = 10646
_STREAM_PATIENTS, _STREAM_PATIENT, _STREAM_RECORD = 0, 1, 2
#: Fixed seed of each site's *character* (electrode-placement habits): the same for every
#: ``seed``, because it is a property of the site, not of the sample drawn from it.
_SITE_CHARACTER_SEED = 20240917


def _choice(rng: np.random.Generator, probs: dict) -> Any:
    keys = list(probs)
    p = np.array([probs[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def sample_findings(rng: np.random.Generator, profile: SiteProfile, known: dict[str, bool]) -> list[dict]:
    """A patient's findings: ``[{cls, kind, stage, severity, labelled}]``.

    Exclusive sites (PTB) draw one reason for admission, and comorbid findings that nothing
    states (``unlabelled_rate``). The others draw each abnormal class independently with the
    site's prevalence, plus mild *subthreshold* findings that the site does not label. A class
    the site (or CinC sub-source) cannot state (``known[cls]`` False, from the label package's
    availability table) still occurs with its prevalence, but unlabelled.
    """
    findings: list[dict] = []

    def add(cls: str, lo: float, hi: float, labelled: bool, unstated: bool = False) -> None:
        kind = _choice(rng, profile.subtypes[cls])
        stage = _choice(rng, profile.mi_stage) if cls == "MI" else ""
        findings.append({"cls": cls, "kind": kind, "stage": stage, "severity": float(rng.uniform(lo, hi)),
                         "labelled": labelled, "unstated": unstated})

    if profile.exclusive:
        reason = _choice(rng, profile.prevalence)
        if reason != "NORM":
            add(reason, 0.0, 1.0, True)
            for cls, rate in profile.unlabelled_rate.items():
                if rng.random() < rate:
                    add(cls, 0.0, 1.0, False, unstated=True)
        return findings
    for cls in ABNORMAL:
        u = rng.random()
        t = profile.threshold[cls]
        if u < profile.prevalence[cls]:
            add(cls, t, 1.0, known[cls], unstated=not known[cls])
        elif u < profile.prevalence[cls] + profile.subthreshold_rate:
            add(cls, 0.0, t, False)
    return findings


def findings_classes(findings: list[dict]) -> list[str]:
    """The classes the record truly has (``NORM`` when it has no finding above threshold).

    This is the ground truth of the generator, whether or not the site states it; the site's
    labels (``native_labels``) state only what its vocabulary can.
    """
    present = [f["cls"] for f in findings if f["labelled"] or f.get("unstated", False)]
    return [c for c in ABNORMAL if c in present] if present else ["NORM"]


class SyntheticReader(SiteReader):
    """Synthetic records of one site (``root`` is ignored: ``None`` or ``"synthetic"``).

    Options: ``noise`` (default True; False gives clean signals for measurements),
    ``findings`` (a list of finding dicts forced on every record, for tests/demos).
    """

    dataset_version = "synthetic-1"
    synthetic = True  # the cache builder writes ``synthetic: true`` for this reader

    def __init__(self, site: str, n_records: int, seed: int = 0, root: str | Path | None = None, **options: Any):
        if site not in PROFILES:
            raise ValueError(f"unknown synthetic site {site!r} (expected one of {', '.join(SITES)})")
        if int(n_records) < 1:
            raise ValueError(f"n_records must be >= 1, got {n_records!r}")
        super().__init__(root if root is not None else "synthetic", **options)
        self.site = site  # instance attribute: one class serves the four sites
        self.profile = PROFILES[site]
        self.n_records = int(n_records)
        self.seed = int(seed)
        self.site_index = SITES.index(site)
        self.noise = bool(options.get("noise", True))
        self.forced_findings = options.get("findings")
        char = np.random.default_rng([_SITE_CHARACTER_SEED, self.site_index])
        self.site_offset = char.normal(0.0, self.profile.placement_bias_sd, size=(8, 3))
        self.site_offset[:2] *= 0.3  # limb electrodes: placement matters little

    # -- SiteReader interface -----------------------------------------------------------------
    def validate_root(self) -> None:
        """Nothing to validate: the records are generated."""

    def list_records(self) -> list[RecordRef]:
        refs: list[RecordRef] = []
        patient = 0
        while len(refs) < self.n_records:
            prng = np.random.default_rng([self.seed, self.site_index, _STREAM_PATIENTS, patient])
            k = int(_choice(prng, self.profile.records_per_patient))
            sub = self._patient_subsource(patient)
            findings = self._patient_findings(patient, sub)
            for _ in range(k):
                if len(refs) == self.n_records:
                    break
                refs.append(self._ref(len(refs), patient, sub, findings))
            patient += 1
        return refs

    def read(self, ref: RecordRef) -> EcgRecord:
        m = ref.meta
        if not all(k in m for k in ("index", "patient_index", "subsource", "findings")):
            raise RecordError(ref.path, "not_synthetic", "this reference was not listed by a SyntheticReader")
        i, patient = int(m["index"]), int(m["patient_index"])
        anatomy = self._anatomy(patient)
        rng = np.random.default_rng([self.seed, self.site_index, _STREAM_RECORD, i])
        findings = [dict(f, severity=float(np.clip(f["severity"] + rng.normal(0, 0.03), 0, 1)))
                    for f in m["findings"]]
        sub = self._subsource(m["subsource"])
        seconds = rng.uniform(*sub.seconds)
        n = int(round(seconds * sub.fs))
        hr = anatomy["hr"] * (1.0 + rng.normal(0.0, 0.05))
        beat = build_beat(rng, anatomy, 60.0 / hr, findings)
        acq = Acquisition(
            fs=sub.fs, n_samples=n, lowpass_hz=sub.lowpass_hz, adc_gain=sub.adc_gain,
            gain=sub.gain_error * (1.0 + rng.normal(0.0, 0.02)),
            powerline_hz=sub.powerline_hz, powerline_mv=rng.uniform(*sub.powerline_mv),
            emg_mv=rng.uniform(*sub.emg_mv), wander_mv=rng.uniform(*sub.wander_mv),
        )
        leads = lead_matrix(rng, self.profile.placement_sd, self.site_offset)
        signal = synthesise(rng, beat, acq, hr, leads, frank=self.profile.leads == "ptb", noise=self.noise)
        meta = dict(m)
        meta.update({"synthetic": True, "classes": findings_classes(findings), "heart_rate": float(hr),
                     "findings": findings})
        return EcgRecord(
            site=self.site, record_id=ref.record_id, patient_id=ref.patient_id, signal=signal,
            fs=float(sub.fs), lead_names=PTB_LEADS if self.profile.leads == "ptb" else STANDARD_LEADS,
            native_labels=ref.native_labels, source=ref.path, meta=meta,
        )

    def split_key(self, ref: RecordRef) -> tuple[str, str]:
        """As the real readers: PTB-XL by ``strat_fold``, PTB/MIMIC by patient, CinC by record."""
        if self.site == "ptbxl":
            return ("fold", str(ref.meta["strat_fold"]))
        return super().split_key(ref)

    # -- internals ----------------------------------------------------------------------------
    def _patient_rng(self, patient: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.site_index, _STREAM_PATIENT, patient])

    def _anatomy(self, patient: int) -> dict:
        rng = self._patient_rng(patient)
        sub = self._pick_subsource(rng.random())  # the patient stream's first draw (see _patient_subsource)
        return sample_anatomy(rng, sub.voltage_scale, *self.profile.hr)

    def _patient_subsource(self, patient: int) -> Subsource:
        return self._pick_subsource(self._patient_rng(patient).random())

    def _pick_subsource(self, u: float) -> Subsource:
        subs = self.profile.subsources
        if len(subs) == 1:
            return subs[0]
        weights = np.cumsum([s.weight for s in subs])
        return subs[int(np.searchsorted(weights / weights[-1], u, side="right"))]

    def _patient_findings(self, patient: int, sub: Subsource) -> list[dict]:
        if self.forced_findings is not None:
            return [dict(f, labelled=f.get("labelled", True), stage=f.get("stage", ""),
                         severity=float(f.get("severity", 0.7))) for f in self.forced_findings]
        rng = np.random.default_rng([self.seed, self.site_index, _STREAM_PATIENT, patient, 1])
        return sample_findings(rng, self.profile, known_classes(self.site, sub.name))

    def _subsource(self, name: str) -> Subsource:
        for sub in self.profile.subsources:
            if sub.name == name:
                return sub
        raise ValueError(f"site {self.site}: unknown subsource {name!r}")

    def _ref(self, i: int, patient: int, sub: Subsource, findings: list[dict]) -> RecordRef:
        prof = self.profile
        record_id = sub.id_format.format(i=i + 1, patient=patient + 1, study=40000000 + i + 1,
                                         ningbo=_CHAPMAN_LAST + 1 + i)
        patient_id = None
        if prof.has_patient_ids:
            patient_id = f"patient{patient + 1:03d}" if self.site == "ptb" else str(10000000 + patient + 1)
        meta = {"synthetic": True, "index": i, "patient_index": patient, "subsource": sub.name,
                "findings": findings, "classes": findings_classes(findings)}
        if self.site == "ptbxl":
            meta["strat_fold"] = int(_fold(self.seed, patient))
        return RecordRef(record_id=record_id, path=f"synthetic/{self.site}/{record_id}", patient_id=patient_id,
                         native_labels=native_labels(self.site, findings), meta=meta)


def known_classes(site: str, subsource: str) -> dict[str, bool]:
    """Which abnormal classes the site (CinC: sub-source) states, from the label package."""
    known = availability(site, "superclass", subsource=subsource if site == "cinc" else None)
    return {cls: bool(k) for cls, k in zip(get_label_space("superclass").classes, known)}


def _fold(seed: int, patient: int) -> int:
    """A PTB-XL-like ``strat_fold`` (1-10) per patient, fixed by (seed, patient)."""
    return int(np.random.default_rng([seed, SITES.index("ptbxl"), 3, patient]).integers(1, 11))
