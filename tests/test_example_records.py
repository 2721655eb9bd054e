"""The real example records shipped in ``examples/records/`` (one per site).

* each record is read by its site's own reader class (``shared/data/readers/``) and its fs,
  leads, length, amplitudes and labels are what ``examples/records/README.md`` says;
* every record-level command that ``README.md`` (and ``examples/records/README.md``) shows is
  run as written, from the repository root, on the shipped records (``OUT_DIR/checkpoint.pt``
  and the output PNG replaced by temporary paths; the checkpoint is a small untrained one in
  the format the federation writes);
* ``examples/records/README.md`` names a licence for every record.

Nothing here reads the developers' sample kit: these files are what a fresh clone has.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import wfdb

from shared.data.labels import get_label_space, harmonise
from shared.data.readers import get_reader, ref_for_path
from shared.data.readers.cinc import CincReader
from shared.data.readers.mimic import MimicReader
from shared.data.readers.ptb import PtbReader
from shared.data.readers.ptbxl import PtbxlReader
from shared.data.readers.fastio import read_header
from shared.data.record import MIMIC_NATIVE_LEADS, PTB_LEADS, STANDARD_LEADS

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "records"
LICENCE_README = EXAMPLES / "README.md"
COMMAND_TIMEOUT_S = 90
MAX_RECORD_BYTES = 400_000

CC_BY = ("CC BY 4.0", "https://creativecommons.org/licenses/by/4.0/")
ODC_BY = ("ODC-By 1.0", "https://opendatacommons.org/licenses/by/1-0/")
ODBL = ("ODbL 1.0", "https://opendatacommons.org/licenses/odbl/1-0/")


@dataclass(frozen=True)
class Shipped:
    site: str
    path: str  # below examples/records/, without extension
    root: str  # the dataset root the site's reader lists (below examples/records/)
    reader: type
    fs: float
    n_leads: int
    seconds: float
    native_labels: tuple[str, ...]
    licences: tuple[tuple[str, str], ...]

    @property
    def record(self) -> Path:
        return EXAMPLES / self.path


SHIPPED = (
    Shipped("ptbxl", "ptb-xl/records100/00000/00001_lr", "ptb-xl", PtbxlReader, 100.0, 12, 10.0,
            ("NORM", "LVOLT", "SR"), (CC_BY,)),
    Shipped("cinc", "cinc/georgia/E07500", "cinc", CincReader, 500.0, 12, 10.0,
            ("67741000119109", "426177001"), (CC_BY,)),
    Shipped("ptb", "ptbdb/patient001/s0010_re", "ptbdb", PtbReader, 1000.0, 15, 10.0,
            ("Myocardial infarction",), (ODC_BY,)),
    Shipped("mimic", "mimic-iv-ecg/files/p1000/p10000032/s40689238/40689238", "mimic-iv-ecg", MimicReader,
            500.0, 12, 10.0, ("Sinus rhythm", "Possible right atrial abnormality", "Borderline ECG"), (ODBL, CC_BY)),
)
IDS = [s.site for s in SHIPPED]


def record_files(shipped: Shipped) -> list[Path]:
    return sorted(shipped.record.parent.glob(shipped.record.name + ".*"))


def test_every_shipped_record_is_described_here():
    on_disk = sorted(p.relative_to(EXAMPLES).with_suffix("").as_posix() for p in EXAMPLES.rglob("*.hea"))
    assert on_disk == sorted(s.path for s in SHIPPED)


@pytest.mark.parametrize("shipped", SHIPPED, ids=IDS)
def test_shipped_record_is_small(shipped):
    files = record_files(shipped)
    assert {f.suffix for f in files} >= {".hea"} and len(files) >= 2
    assert sum(f.stat().st_size for f in files) < MAX_RECORD_BYTES


@pytest.mark.parametrize("shipped", SHIPPED, ids=IDS)
def test_site_reader_reads_the_shipped_record(shipped):
    # Default options: strict labels, and NaN or flat leads rejected (bad_leads="skip").
    reader, ref = ref_for_path(shipped.site, shipped.record)
    assert type(reader) is shipped.reader
    rec = reader.read(ref)
    leads = PTB_LEADS if shipped.site == "ptb" else STANDARD_LEADS
    assert rec.site == shipped.site
    assert rec.fs == shipped.fs
    assert tuple(rec.lead_names) == leads and rec.signal.shape == (len(leads), int(shipped.fs * shipped.seconds))
    assert rec.n_leads == shipped.n_leads and rec.seconds == pytest.approx(shipped.seconds)
    assert np.isfinite(rec.signal).all()
    span = rec.signal.max(axis=1) - rec.signal.min(axis=1)  # mV, per lead
    assert (span > 0.05).all() and (span < 20).all(), dict(zip(leads, span.round(3)))
    assert tuple(rec.native_labels) == shipped.native_labels
    labels = get_label_space().names(harmonise(shipped.site, rec.native_labels))
    assert labels, f"{shipped.site}: {rec.native_labels} map to no class"


@pytest.mark.parametrize("shipped", SHIPPED, ids=IDS)
def test_the_shipped_folder_is_a_dataset_root_for_its_site(shipped):
    options = {"rate": 100} if shipped.site == "ptbxl" else {}  # only records100/ is shipped
    reader = get_reader(shipped.site, EXAMPLES / shipped.root, **options)
    refs = reader.list_records()
    assert [Path(r.path) for r in refs] == [shipped.record]


def test_ptbxl_metadata_rows_are_the_records_own():
    with open(EXAMPLES / "ptb-xl" / "ptbxl_database.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["ecg_id"] == "1" and rows[0]["filename_lr"] == "records100/00000/00001_lr"
    codes = ast.literal_eval(rows[0]["scp_codes"])
    with open(EXAMPLES / "ptb-xl" / "scp_statements.csv", newline="") as fh:
        statements = [r[""] for r in csv.DictReader(fh)]
    assert sorted(statements) == sorted(codes)


def test_ptb_example_keeps_the_native_two_file_layout():
    path = EXAMPLES / "ptbdb" / "patient001" / "s0010_re"
    header = read_header(path)
    assert [s.file_name for s in header.signals] == ["s0010_re.dat"] * 12 + ["s0010_re.xyz"] * 3
    assert [s.name for s in header.signals] == [n.lower() for n in PTB_LEADS]
    assert {s.fmt for s in header.signals} == {"16"} and {s.gain for s in header.signals} == {2000.0}
    assert "Reason for admission: Myocardial infarction" in header.comments
    assert len(header.comments) == 48  # every comment line of the original header
    assert (path.parent / "s0010_re.dat").stat().st_size == 12 * 2 * header.sig_len
    assert (path.parent / "s0010_re.xyz").stat().st_size == 3 * 2 * header.sig_len
    rec = wfdb.rdrecord(str(path), physical=False)
    assert rec.checksum == rec.calc_checksum() and list(rec.init_value) == list(rec.d_signal[0])


def test_mimic_example_is_laid_out_as_mimic_iv_ecg():
    root = EXAMPLES / "mimic-iv-ecg"
    with open(root / "record_list.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["path"] == "files/p1000/p10000032/s40689238/40689238"
    assert row["path"] == f"files/p{row['subject_id'][:4]}/p{row['subject_id']}/s{row['study_id']}/{row['file_name']}"
    header = read_header(root / row["path"])
    assert header.sig_names == MIMIC_NATIVE_LEADS  # stored as MIMIC stores it; the reader reorders
    assert (header.fs, header.sig_len) == (500.0, 5000)
    rec = wfdb.rdheader(str(root / row["path"]))
    assert f"{rec.base_date} {rec.base_time}" == row["ecg_time"]


# ------------------------------------------------------------------------------ README commands


def record_commands(markdown: Path) -> list[str]:
    """Command lines in the file's ```bash blocks that run on a shipped record."""
    text = markdown.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if "examples/records/" in line and line.startswith(("python -m shared.", "python -c ")):
                commands.append(line)
    return commands


README_COMMANDS = record_commands(REPO / "README.md")
ALL_COMMANDS = list(dict.fromkeys(README_COMMANDS + record_commands(LICENCE_README)))


def command_id(command: str) -> str:
    """``inspect-ptbxl``, ``explain-cinc-checkpoint``, ``predict-cinc``, ..."""
    argv = shlex.split(command)
    if argv[1] == "-c":
        verb, site = "predict", re.search(r"'(\w+)'\)\)", command).group(1)
    else:
        verb, site = argv[3], argv[argv.index("--site") + 1]
    return "-".join([verb, site] + (["checkpoint"] if "OUT_DIR/checkpoint.pt" in command else []))


def test_readme_shows_the_record_level_commands_on_shipped_records():
    text = " ".join(README_COMMANDS)
    assert "shared.data inspect examples/records/" in text
    assert "shared.models explain" in text and "--checkpoint OUT_DIR/checkpoint.pt" in text
    assert "predict_record" in text
    for command in README_COMMANDS:  # every shipped path a command names exists
        for path in re.findall(r"examples/records/[\w./-]+", command):
            assert any((REPO / (path + ext)).exists() for ext in ("", ".hea")), path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained hierarchical/tiny checkpoint in the format the federation writes
    (``shared.training.save_checkpoint`` with a ``data_config``: the server's defaults)."""
    import torch

    from shared.data.preprocess import PreprocessConfig
    from shared.models import build_model, get_preset
    from shared.training import save_checkpoint

    torch.manual_seed(0)
    preset = get_preset("hierarchical", "tiny")
    model = build_model("hierarchical", "tiny", n_leads=12, input_samples=int(preset["fs"] * preset["seconds"]),
                        n_classes=5, fs=preset["fs"])
    pre = PreprocessConfig()
    data_config = {"preprocess": asdict(pre), "fs": float(pre.fs), "window_samples": int(pre.fs * pre.window_seconds),
                   "crop_samples": model.config["input_samples"], "lead_names": list(STANDARD_LEADS),
                   "classes": ["NORM", "MI", "STTC", "CD", "HYP"], "normalize": "zscore"}
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    return save_checkpoint(path, model_config=model.config, state_dict=model.state_dict(), round=1, data_config=data_config)


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=[command_id(c) for c in ALL_COMMANDS])
def test_readme_command_runs_on_the_shipped_records(command, checkpoint, tmp_path):
    png = tmp_path / "leads.png"
    command = command.replace("OUT_DIR/checkpoint.pt", str(checkpoint))
    argv = shlex.split(command)
    assert argv[0] == "python"
    argv[0] = sys.executable
    if "--out" in argv:
        argv[argv.index("--out") + 1] = str(png)
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "2"}
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    if argv[1:3] == ["-m", "shared.data"]:
        out = json.loads(done.stdout)
        assert out["site"] == argv[argv.index("--site") + 1]
        assert out["n_samples"] > 0 and out["native_labels"] and out["labels"]
        if "--head" in argv:
            assert all(len(v) == int(argv[argv.index("--head") + 1]) for v in out["head"].values())
    elif argv[1:3] == ["-m", "shared.models"]:
        out = json.loads(done.stdout.strip().splitlines()[-1])
        assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
        assert out["trained"] is ("--checkpoint" in argv)
        assert len(out["lead_importance"]) == 12 and sum(out["lead_importance"].values()) == pytest.approx(1, abs=1e-3)
    else:
        probs = ast.literal_eval(done.stdout.strip().splitlines()[-1])
        assert list(probs) == ["NORM", "MI", "STTC", "CD", "HYP"]
        assert all(0.0 <= p <= 1.0 for p in probs.values())


# ------------------------------------------------------------------------------ licences


def licence_sections() -> dict[str, str]:
    """``### `path` `` sections of examples/records/README.md, by path."""
    text = LICENCE_README.read_text()
    parts = re.split(r"^### `([^`]+)`\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1].split("\n## ")[0] for i in range(1, len(parts), 2)}


@pytest.mark.parametrize("shipped", SHIPPED, ids=IDS)
def test_licence_readme_names_a_licence_for_the_record(shipped):
    sections = licence_sections()
    assert shipped.path in sections, f"examples/records/README.md has no section for {shipped.path}"
    section = sections[shipped.path]
    assert "**Licence:**" in section and "**Attribution:**" in section
    licence = section.split("**Licence:**", 1)[1].split("- **", 1)[0]
    for name, url in shipped.licences:
        assert name in licence and url in licence, (shipped.path, name)


def test_no_shipped_file_points_at_the_developers_kit():
    files = [p for p in EXAMPLES.rglob("*") if p.is_file() and p.suffix in (".md", ".py", ".csv", ".hea")]
    files.append(REPO / "README.md")
    for path in files:
        text = path.read_text(errors="replace")
        assert "../shared" not in text and "REFERENCES" not in text, path
