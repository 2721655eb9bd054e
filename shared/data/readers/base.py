"""The reader interface shared by the four sites and the synthetic generator.

A reader is built on a dataset root laid out exactly as PhysioNet distributes it. It lists
the records cheaply (metadata only, no waveform) and reads one record at a time, so the cache
builder can fan the reads out over worker processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

from ..record import EcgRecord


@dataclass(frozen=True)
class RecordRef:
    """A pointer to one record, produced by :meth:`SiteReader.list_records` (picklable)."""

    record_id: str
    path: str  # record path without extension
    patient_id: str | None = None
    native_labels: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


class SiteReader(ABC):
    """Reads one site's dataset from its native layout.

    Subclasses set :attr:`site`, :attr:`dataset_version`, and implement
    :meth:`validate_root`, :meth:`list_records` and :meth:`read`.
    Errors: :class:`~shared.data.errors.DatasetRootError` for a wrong root (message names what
    was expected and where), :class:`~shared.data.errors.RecordError` for one bad record.
    """

    site: ClassVar[str]
    dataset_version: ClassVar[str]

    def __init__(self, root: str | Path, **options: Any):
        self.root = Path(root)
        self.options = options

    @abstractmethod
    def validate_root(self) -> None:
        """Raise ``DatasetRootError`` unless ``self.root`` looks like this site's dataset."""

    @abstractmethod
    def list_records(self) -> list[RecordRef]:
        """All usable record references, in a deterministic order."""

    @abstractmethod
    def read(self, ref: RecordRef) -> EcgRecord:
        """Read one record (raises ``RecordError`` with a reason for a bad one)."""

    def split_key(self, ref: RecordRef) -> tuple[str, str]:
        """What the split is decided on: ``("patient", id)``, ``("fold", n)`` or ``("record", id)``."""
        if ref.patient_id is not None:
            return ("patient", ref.patient_id)
        return ("record", ref.record_id)

    def __iter__(self) -> Iterator[EcgRecord]:
        for ref in self.list_records():
            yield self.read(ref)
