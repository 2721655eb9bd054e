"""Errors of the data layer. Every message names the file and what is wrong with it."""

from __future__ import annotations


class DataError(Exception):
    """Base class of every data-layer error."""


class DatasetRootError(DataError):
    """The dataset root is not laid out as the site's dataset is distributed."""


class RecordError(DataError):
    """One record cannot be used. ``path`` names it, ``reason`` says why (short, stable key)."""

    def __init__(self, path: str, reason: str, detail: str = ""):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        msg = f"{self.path}: {reason}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class CacheError(DataError):
    """A prepared cache is missing, incomplete or does not validate."""
