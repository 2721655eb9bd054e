"""Dataset-root fixtures built in a temporary folder from the kit's real files (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path


def build_ptbxl_root(tmp: Path, kit_data: Path) -> Path:
    """A PTB-XL root: the excerpt CSV as ``ptbxl_database.csv``, ``scp_statements.csv``, ``records100/``."""
    root = Path(tmp) / "ptb-xl"
    root.mkdir(parents=True, exist_ok=True)
    os.symlink(kit_data / "ptb-xl" / "ptbxl_database_excerpt.csv", root / "ptbxl_database.csv")
    os.symlink(kit_data / "labels" / "ptb-xl" / "scp_statements.csv", root / "scp_statements.csv")
    os.symlink(kit_data / "ptb-xl" / "records100", root / "records100", target_is_directory=True)
    return root
