"""CinC subjects: sub-sources that repeat subjects without saying which records share one (INCART,
and the Challenge copies of PTB and PTB-XL) are excluded by default, as a visible option."""

from __future__ import annotations

from pathlib import Path

from shared.data.readers import get_reader
from shared.data.readers.cinc import DEFAULT_EXCLUDE, SUBJECTS, SUBSOURCES

REPO = Path(__file__).resolve().parents[1]


def _incart_copy(root: Path, kit_data: Path) -> None:
    """A CPSC record saved under an INCART name (I0001): the reader knows sub-sources by name."""
    src = kit_data / "cinc" / "cpsc_2018"
    (root / "incart").mkdir(parents=True)
    (root / "cpsc").mkdir()
    for name in ("A0001", "A0002"):
        for ext in (".hea", ".mat"):
            (root / "cpsc" / f"{name}{ext}").write_bytes((src / f"{name}{ext}").read_bytes())
    (root / "incart" / "I0001.mat").write_bytes((src / "A0001.mat").read_bytes())
    (root / "incart" / "I0001.hea").write_text((src / "A0001.hea").read_text().replace("A0001", "I0001"))


def test_ungroupable_subsources_are_excluded_by_default_and_can_be_kept(tmp_path, kit_data):
    assert set(DEFAULT_EXCLUDE) == {"incart", "ptb", "ptbxl"}
    assert set(SUBJECTS) == set(SUBSOURCES)
    assert all(SUBJECTS[s][0] == "ungroupable" for s in DEFAULT_EXCLUDE)
    _incart_copy(tmp_path, kit_data)
    default = get_reader("cinc", tmp_path).list_records()
    assert [r.record_id for r in default] == ["A0001", "A0002"]
    kept = get_reader("cinc", tmp_path, exclude_sources=()).list_records()
    assert {r.record_id: r.meta["subsource"] for r in kept}["I0001"] == "incart"
    assert get_reader("cinc", tmp_path).split_key(kept[0])[0] == "record"


def test_cli_include_sources_accepts_incart(tmp_path, capsys):
    from shared.data.__main__ import main

    # argparse accepts the choice (a refused choice exits 2 before anything runs); the missing
    # source is then reported as the error
    code = main(["prepare", "--site", "cinc", "--source", str(tmp_path / "none"), "--out", str(tmp_path / "c"),
                 "--include-sources", "incart", "--no-progress", "--workers", "1"])
    err = capsys.readouterr().err
    assert code != 0 and "invalid choice" not in err and "none" in err
