"""Site readers, one per native dataset layout. ``get_reader(site, root)`` picks one.

``read_record_path(site, path)`` reads one record given its path without extension (what
``python -m shared.data inspect`` does); for PTB-XL and MIMIC it finds the metadata tables at
the dataset root above the record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..record import EcgRecord
from .base import RecordRef, SiteReader
from .cinc import CincReader
from .mimic import MimicReader
from .ptb import PtbReader
from .ptbxl import PtbxlReader

READERS: dict[str, type[SiteReader]] = {
    "ptb": PtbReader,
    "ptbxl": PtbxlReader,
    "mimic": MimicReader,
    "cinc": CincReader,
}


def _reader_class(site: str) -> type[SiteReader]:
    try:
        return READERS[site]
    except KeyError:
        raise ValueError(f"unknown site {site!r}; expected one of {', '.join(READERS)}") from None


def get_reader(site: str, root: str | Path, **options: Any) -> SiteReader:
    """The reader for ``site`` on the dataset ``root`` (options are reader-specific)."""
    return _reader_class(site)(root, **options)


def ref_for_path(site: str, path: str | Path, **options: Any) -> tuple[SiteReader, RecordRef]:
    """Reader and record reference for one record path (without extension)."""
    text = str(path)
    for suffix in (".hea", ".dat", ".mat"):
        text = text.removesuffix(suffix)
    path = Path(text)
    return _reader_class(site).ref_for_path(path, **options)


def read_record_path(site: str, path: str | Path, **options: Any) -> EcgRecord:
    """Read one record of ``site`` from its path without extension."""
    reader, ref = ref_for_path(site, path, **options)
    return reader.read(ref)


__all__ = ["READERS", "RecordRef", "SiteReader", "get_reader", "read_record_path", "ref_for_path"]
