"""Site profiles: how each synthetic site mirrors its real counterpart, and its vocabulary.

What differs between the four sites (each point mirrors the real dataset, see docs/synthetic.md):
  * acquisition: sampling rate, record length, leads (PTB's 15), ADC resolution, device
    bandwidth, mains frequency (50 Hz in Germany/China/Russia, 60 Hz in the USA), noise;
  * population: heart rate, QRS voltage (body habitus), electrode-placement habits;
  * case mix: class prevalence and, within a class, the mix of subtypes (acute infarcts at
    PTB, old infarcts at PTB-XL, RBBB-rich CinC, ST depression in MIMIC's emergency patients);
  * labelling: which classes the site can state at all (PTB: one reason for admission, no
    ST/T class) and how mild a finding must be before the site labels it (``threshold``:
    machine statements over-call, cardiologists less so);
  * the native vocabulary: PTB reasons for admission, PTB-XL SCP codes, CinC SNOMED-CT codes,
    MIMIC machine statements.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ABNORMAL: tuple[str, ...] = ("MI", "STTC", "CD", "HYP")
CLASSES: tuple[str, ...] = ("NORM",) + ABNORMAL


@dataclass(frozen=True)
class Subsource:
    """One acquisition setting of a site (CinC has several source databases)."""

    name: str
    weight: float
    fs: float
    seconds: tuple[float, float]
    id_format: str            # record id, formatted with the record index i
    powerline_hz: float
    powerline_mv: tuple[float, float]
    emg_mv: tuple[float, float]
    wander_mv: tuple[float, float]
    lowpass_hz: float
    adc_gain: float           # ADC units per mV as stored
    gain_error: float         # systematic calibration factor of the site's devices
    voltage_scale: float      # population QRS/T voltage (habitus, age)


@dataclass(frozen=True)
class SiteProfile:
    site: str
    dataset: str
    subsources: tuple[Subsource, ...]
    leads: str                                  # "standard" (12) or "ptb" (15)
    records_per_patient: dict[int, float]       # distribution of records per patient
    has_patient_ids: bool
    hr: tuple[float, float]                     # mean, sd (bpm)
    prevalence: dict[str, float]                # per class (exclusive sites: per reason)
    exclusive: bool                             # one diagnosis per patient (PTB)
    subtypes: dict[str, dict[str, float]]
    mi_stage: dict[str, float]
    threshold: dict[str, float]                 # severity above which the site labels a finding
    subthreshold_rate: float                    # rate of mild, unlabelled findings per class
    unlabelled_rate: dict[str, float] = field(default_factory=dict)  # exclusive sites: comorbidity
    placement_sd: float = 0.06
    placement_bias_sd: float = 0.15


_STD_NOISE = dict(powerline_mv=(0.002, 0.012), emg_mv=(0.004, 0.015), wander_mv=(0.03, 0.12))

PROFILES: dict[str, SiteProfile] = {
    "ptb": SiteProfile(
        site="ptb", dataset="PTB Diagnostic ECG Database (synthetic stand-in)",
        subsources=(Subsource("ptb", 1.0, 1000.0, (30.0, 40.0), "patient{patient:03d}/s{i:04d}_re",
                              50.0, (0.005, 0.02), (0.003, 0.010), (0.05, 0.2), 300.0, 2000.0, 1.0, 1.0),),
        leads="ptb", records_per_patient={1: 0.45, 2: 0.3, 3: 0.15, 4: 0.1}, has_patient_ids=True,
        hr=(68.0, 10.0),
        prevalence={"MI": 0.52, "NORM": 0.24, "CD": 0.12, "HYP": 0.12}, exclusive=True,
        subtypes={"MI": {"inferior": 0.35, "anterior": 0.45, "lateral": 0.08, "inferolateral": 0.12},
                  "CD": {"lbbb": 0.5, "rbbb": 0.5}, "HYP": {"lvh": 0.5, "lvh_strain": 0.35, "rvh": 0.15},
                  "STTC": {"st_depression": 0.6, "t_inversion": 0.4}},
        mi_stage={"acute": 0.55, "evolving": 0.35, "old": 0.10},
        threshold={"MI": 0.0, "CD": 0.0, "HYP": 0.0, "STTC": 1.0}, subthreshold_rate=0.0,
        unlabelled_rate={"STTC": 0.2, "CD": 0.08, "HYP": 0.08},
    ),
    "ptbxl": SiteProfile(
        site="ptbxl", dataset="PTB-XL (synthetic stand-in)",
        subsources=(Subsource("ptbxl", 1.0, 500.0, (10.0, 10.0), "{i:05d}", 50.0,
                              adc_gain=1000.0, lowpass_hz=150.0, gain_error=1.0, voltage_scale=1.0,
                              **_STD_NOISE),),
        leads="standard", records_per_patient={1: 0.87, 2: 0.10, 3: 0.03}, has_patient_ids=True,
        hr=(70.0, 12.0),
        prevalence={"MI": 0.25, "STTC": 0.24, "CD": 0.22, "HYP": 0.12}, exclusive=False,
        subtypes={"MI": {"inferior": 0.5, "anterior": 0.38, "lateral": 0.04, "inferolateral": 0.08},
                  "STTC": {"flat_t": 0.5, "st_depression": 0.3, "t_inversion": 0.2},
                  "CD": {"lafb": 0.3, "irbbb": 0.2, "rbbb": 0.15, "lbbb": 0.1, "iavb": 0.15, "ivcd": 0.1},
                  "HYP": {"lvh": 0.6, "lvh_strain": 0.2, "lae": 0.12, "rvh": 0.08}},
        mi_stage={"acute": 0.05, "evolving": 0.35, "old": 0.60},
        threshold={"MI": 0.3, "STTC": 0.3, "CD": 0.25, "HYP": 0.3}, subthreshold_rate=0.12,
    ),
    "mimic": SiteProfile(
        site="mimic", dataset="MIMIC-IV-ECG (synthetic stand-in)",
        subsources=(Subsource("mimic", 1.0, 500.0, (10.0, 10.0), "{study:08d}", 60.0,
                              powerline_mv=(0.001, 0.004), emg_mv=(0.008, 0.03), wander_mv=(0.05, 0.25),
                              lowpass_hz=150.0, adc_gain=200.0, gain_error=0.93, voltage_scale=0.85),),
        leads="standard", records_per_patient={1: 0.5, 2: 0.3, 3: 0.2}, has_patient_ids=True,
        hr=(84.0, 16.0),
        prevalence={"MI": 0.18, "STTC": 0.35, "CD": 0.25, "HYP": 0.08}, exclusive=False,
        subtypes={"MI": {"inferior": 0.45, "anterior": 0.35, "lateral": 0.1, "inferolateral": 0.1},
                  "STTC": {"st_depression": 0.55, "flat_t": 0.3, "t_inversion": 0.15},
                  "CD": {"rbbb": 0.25, "lbbb": 0.2, "iavb": 0.3, "lafb": 0.15, "ivcd": 0.1},
                  "HYP": {"lvh": 0.55, "lvh_strain": 0.35, "rvh": 0.1}},
        mi_stage={"acute": 0.2, "evolving": 0.3, "old": 0.5},
        threshold={"MI": 0.15, "STTC": 0.12, "CD": 0.15, "HYP": 0.15}, subthreshold_rate=0.10,
    ),
    "cinc": SiteProfile(
        site="cinc", dataset="PhysioNet/CinC Challenge 2021 (synthetic stand-in)",
        subsources=(
            # Names and record-id prefixes as the real Challenge data (readers/cinc.py subsource_of).
            Subsource("cpsc", 0.2, 500.0, (6.0, 30.0), "A{i:04d}", 50.0, adc_gain=1000.0,
                      lowpass_hz=100.0, gain_error=1.05, voltage_scale=1.12, **_STD_NOISE),
            Subsource("cpsc_extra", 0.15, 500.0, (10.0, 30.0), "Q{i:04d}", 50.0, adc_gain=1000.0,
                      lowpass_hz=100.0, gain_error=1.05, voltage_scale=1.12, **_STD_NOISE),
            Subsource("georgia", 0.3, 500.0, (10.0, 10.0), "E{i:05d}", 60.0, adc_gain=1000.0,
                      lowpass_hz=150.0, gain_error=1.0, voltage_scale=0.9, **_STD_NOISE),
            Subsource("ningbo", 0.25, 500.0, (10.0, 10.0), "JS{ningbo:05d}", 50.0, adc_gain=1000.0,
                      lowpass_hz=40.0, gain_error=1.0, voltage_scale=1.1,
                      powerline_mv=(0.001, 0.004), emg_mv=(0.002, 0.008), wander_mv=(0.02, 0.08)),
            Subsource("incart", 0.1, 257.0, (30.0, 30.0), "I{i:04d}", 50.0, adc_gain=1000.0,
                      lowpass_hz=60.0, gain_error=0.97, voltage_scale=1.0,
                      powerline_mv=(0.005, 0.02), emg_mv=(0.004, 0.015), wander_mv=(0.05, 0.15)),
        ),
        leads="standard", records_per_patient={1: 1.0}, has_patient_ids=False,
        hr=(76.0, 15.0),
        prevalence={"MI": 0.12, "STTC": 0.30, "CD": 0.32, "HYP": 0.10}, exclusive=False,
        subtypes={"MI": {"inferior": 0.4, "anterior": 0.4, "lateral": 0.1, "inferolateral": 0.1},
                  "STTC": {"t_inversion": 0.4, "flat_t": 0.45, "st_depression": 0.15},
                  "CD": {"rbbb": 0.35, "iavb": 0.25, "lbbb": 0.15, "lafb": 0.1, "ivcd": 0.05, "irbbb": 0.1},
                  "HYP": {"lvh": 0.7, "lvh_strain": 0.15, "rvh": 0.15}},
        mi_stage={"acute": 0.3, "evolving": 0.4, "old": 0.3},
        threshold={"MI": 0.25, "STTC": 0.2, "CD": 0.2, "HYP": 0.25}, subthreshold_rate=0.08,
    ),
}

# --------------------------------------------------------------------------------------------
# Native vocabularies: (class, subtype) -> the label(s) the real site would write.
# --------------------------------------------------------------------------------------------

#: PTB "Reason for admission" (one per patient).
PTB_REASONS: dict[str, str] = {
    "NORM": "Healthy control", "MI": "Myocardial infarction",
    "CD": "Bundle branch block", "HYP": "Hypertrophy",
}

#: PTB-XL SCP-ECG statement codes (diagnostic statements of scp_statements.csv).
PTBXL_CODES: dict[tuple[str, str], str] = {
    ("NORM", ""): "NORM",
    ("MI", "inferior"): "IMI", ("MI", "anterior"): "ASMI", ("MI", "lateral"): "LMI",
    ("MI", "inferolateral"): "ILMI",
    ("STTC", "flat_t"): "NDT", ("STTC", "st_depression"): "ISC_", ("STTC", "t_inversion"): "ISCAL",
    ("CD", "lbbb"): "CLBBB", ("CD", "rbbb"): "CRBBB", ("CD", "irbbb"): "IRBBB", ("CD", "iavb"): "1AVB",
    ("CD", "lafb"): "LAFB", ("CD", "ivcd"): "IVCD",
    ("HYP", "lvh"): "LVH", ("HYP", "lvh_strain"): "LVH", ("HYP", "rvh"): "RVH", ("HYP", "lae"): "LAO/LAE",
}

PTBXL_RHYTHM = "SR"  # sinus rhythm: a rhythm statement, no diagnostic class

#: CinC 2020/2021 SNOMED-CT codes (dx_mapping_scored/unscored.csv).
CINC_CODES: dict[tuple[str, str], str] = {
    ("NORM", ""): "426783006",                       # sinus rhythm (and nothing else)
    ("MI", "acute"): "57054005",                     # acute myocardial infarction
    ("MI", "anterior"): "54329005",                  # anterior myocardial infarction
    ("MI", "old"): "164867002",                      # old myocardial infarction
    ("MI", ""): "164865005",                         # myocardial infarction
    ("STTC", "flat_t"): "164934002",                 # T wave abnormal
    ("STTC", "t_inversion"): "59931005",             # T wave inversion
    ("STTC", "st_depression"): "429622005",          # ST depression
    ("CD", "lbbb"): "164909002", ("CD", "rbbb"): "59118001", ("CD", "irbbb"): "713426002",
    ("CD", "iavb"): "270492004", ("CD", "lafb"): "445118002", ("CD", "ivcd"): "698252002",
    ("HYP", "lvh"): "164873001", ("HYP", "lvh_strain"): "164873001", ("HYP", "rvh"): "89792004",
}
CINC_SINUS_RHYTHM = "426783006"
#: Codes a CinC sub-source writes for a finding whose class it cannot state (no class, but
#: they exclude NORM): Q wave abnormal for an infarct, LV high voltage for hypertrophy.
CINC_UNSTATED: dict[str, str] = {"MI": "164917005", "HYP": "55827005"}

#: MIMIC-IV-ECG machine statements (report_0..report_17 of machine_measurements.csv).
MIMIC_STATEMENTS: dict[tuple[str, str], str] = {
    ("NORM", ""): "Normal ECG",
    ("MI", "inferior"): "Inferior infarct - age undetermined",
    ("MI", "anterior"): "Anteroseptal infarct - age undetermined",
    ("MI", "lateral"): "Lateral infarct - age undetermined",
    ("MI", "inferolateral"): "Inferior/lateral infarct - age undetermined",
    ("MI", "acute"): "Acute MI",
    ("STTC", "st_depression"): "ST depression",
    ("STTC", "flat_t"): "Nonspecific T wave abnormality",
    ("STTC", "t_inversion"): "T wave inversion",
    ("CD", "lbbb"): "Left bundle branch block", ("CD", "rbbb"): "Right bundle branch block",
    ("CD", "irbbb"): "Incomplete right bundle branch block", ("CD", "iavb"): "1st degree A-V block",
    ("CD", "lafb"): "Left anterior fascicular block", ("CD", "ivcd"): "IV conduction defect",
    ("HYP", "lvh"): "Left ventricular hypertrophy", ("HYP", "lvh_strain"): "Left ventricular hypertrophy",
    ("HYP", "rvh"): "Right ventricular hypertrophy",
}
MIMIC_RHYTHM = "Sinus rhythm"
MIMIC_ABNORMAL = "Abnormal ECG"


def native_labels(site: str, findings: list[dict]) -> tuple[str, ...]:
    """The site's native labels for the *labelled* findings (none labelled: a normal record).

    Subthreshold findings are not stated (a borderline-normal ECG). A CinC sub-source that
    cannot state a finding's class writes a class-less code that still excludes NORM.
    """
    shown = [f for f in findings if f["labelled"]]
    if site == "ptb":
        cls = shown[0]["cls"] if shown else "NORM"
        return (PTB_REASONS[cls],)
    if site == "ptbxl":
        codes = [PTBXL_CODES[(f["cls"], f["kind"])] for f in shown] or [PTBXL_CODES[("NORM", "")]]
        return tuple(dict.fromkeys(codes + [PTBXL_RHYTHM]))
    if site == "cinc":
        codes = [CINC_SINUS_RHYTHM]
        codes += [CINC_UNSTATED[f["cls"]] for f in findings if f.get("unstated") and f["cls"] in CINC_UNSTATED]
        for f in shown:
            if f["cls"] == "MI":
                key = ("MI", "acute") if f["stage"] == "acute" else (
                    ("MI", "old") if f["stage"] == "old" else
                    ("MI", "anterior") if f["kind"] == "anterior" else ("MI", ""))
                codes.append(CINC_CODES[key])
            else:
                codes.append(CINC_CODES[(f["cls"], f["kind"])])
        return tuple(dict.fromkeys(codes))
    if site == "mimic":
        if not shown:
            return (MIMIC_RHYTHM, MIMIC_STATEMENTS[("NORM", "")])
        lines = [MIMIC_RHYTHM]
        for f in shown:
            key = ("MI", "acute") if f["cls"] == "MI" and f["stage"] == "acute" else (f["cls"], f["kind"])
            lines.append(MIMIC_STATEMENTS[key])
        lines.append(MIMIC_ABNORMAL)
        return tuple(dict.fromkeys(lines))
    raise ValueError(f"unknown site {site!r}")
