"""The site's privacy ledger: every DP step ever taken on one dataset, on the site's own disk.

One JSON file per dataset in the site's state directory, ``privacy-ledger-<fp>.json``, keyed by
the dataset's fingerprint (a hash of the train split's record and patient ids, not of the cache's
files), so every run that trains on that data - a resumed run, a run after a node restart, a new
run, a rebuilt cache of the same records - spends from the same budget. Another state directory
starts another ledger: the site keeps one. It holds the Opacus accountant history ``[noise_multiplier, sample_rate,
steps]`` from which epsilon is recomputed, the privacy unit and accountant, and one entry per
round. ``privacy-index.json`` beside it lists every dataset ever trained with DP from this
directory, so a ledger that went missing is noticed instead of silently restarting at 0.

Decisions (:meth:`Ledger.open`):

* no ledger and the dataset is not in the index: a new, empty ledger (never trained on);
* the ledger's delta is fixed at its first spend (the site's ``dp-max-delta`` if set, else
  ``1/(10 N)``); every spend is accounted at it;
* no ledger but the dataset is in the index, an unreadable ledger or index, a ledger that
  names another dataset, another unit or another accountant: :class:`LedgerError` naming the file;
  nothing is trained.

A round's spend is written (atomically: temporary file, fsync, rename) *before* the site trains,
so it is on disk before the update can leave the site; a round that then fails is counted as
spent (conservative).
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .policy import PrivacyRefused

LEDGER_FORMAT = "fed-ecg privacy ledger"
LEDGER_VERSION = 1
INDEX_NAME = "privacy-index.json"
RECORDS_FILE = "records.csv"


class LedgerError(PrivacyRefused):
    """The ledger cannot be used; the message names the file and why."""


def dataset_fingerprint(cache: str | Path) -> str:
    """The identity of the training data: sha256 over the sorted ``(record id, patient id)`` pairs
    of the cache's train split (``records.csv``).

    Keyed to the records themselves, not the cache's files: re-preparing the same records (raw
    data moved, a new builder version, other preprocessing) keeps the dataset's budget. Another
    train split (other records or another split rule) is another dataset."""
    path = Path(cache) / RECORDS_FILE
    try:
        with open(path, newline="") as fh:
            rows = [(r["record_id"], r["patient_id"]) for r in csv.DictReader(fh) if r["split"] == "train"]
    except (OSError, KeyError, csv.Error) as exc:
        raise LedgerError(f"cannot read the train records of {path} for the privacy ledger ({exc})") from None
    h = hashlib.sha256(b"fed-ecg train units v1\0")
    for record_id, patient_id in sorted(rows):
        h.update(record_id.encode() + b"\0" + patient_id.encode() + b"\n")
    return h.hexdigest()


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_writable(state_dir: Path) -> None:
    """Refuse (before training) a state directory that cannot be created or written."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe = state_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise LedgerError(f"state directory {state_dir} cannot be written ({exc.strerror or exc}); "
                          "the privacy ledger must be kept there: give a writable --state-dir") from None


class Ledger:
    """One dataset's ledger, opened under the state directory's lock (use :func:`open_ledger`)."""

    def __init__(self, state_dir: Path, fingerprint: str, site: str, unit: str, accountant: str,
                 data: dict[str, Any] | None):
        self.state_dir, self.fingerprint, self.site = state_dir, fingerprint, site
        self.unit, self.accountant = unit, accountant
        self.path = state_dir / f"privacy-ledger-{fingerprint[:16]}.json"
        self.data = data or {
            "format": LEDGER_FORMAT, "version": LEDGER_VERSION, "dataset_fingerprint": fingerprint,
            "site": site, "unit": unit, "accountant": accountant, "history": [], "rounds": [],
        }

    @property
    def is_new(self) -> bool:
        return not self.data["history"]

    @property
    def delta(self) -> float | None:
        """The delta every spend on this dataset is accounted at, fixed at first use (None: new ledger)."""
        value = self.data.get("delta")
        return float(value) if value is not None else None

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(float(s), float(q), int(n)) for s, q, n in self.data["history"]]

    @classmethod
    def trained_with_dp(cls, state_dir: Path, cache: Path) -> bool:
        """Whether this dataset has a ledger (or an index entry) in ``state_dir``: DP was used on it."""
        state_dir = Path(state_dir)
        if not state_dir.is_dir():
            return False
        fp = dataset_fingerprint(cache)
        return (cls(state_dir, fp, "", "", "", None).path.exists()
                or fp in _read_index(state_dir / INDEX_NAME).get("trained", {}))

    @classmethod
    def open(cls, state_dir: Path, cache: Path, site: str, unit: str, accountant: str) -> Ledger:
        state_dir = Path(state_dir)
        check_writable(state_dir)
        fp = dataset_fingerprint(cache)
        ledger = cls(state_dir, fp, site, unit, accountant, None)
        index = _read_index(state_dir / INDEX_NAME)
        if not ledger.path.exists():
            if fp in index.get("trained", {}):
                raise LedgerError(
                    f"privacy ledger {ledger.path} is missing, but {state_dir / INDEX_NAME} says this dataset "
                    f"({cache}) was trained with DP from this directory before: its spent epsilon is unknown; "
                    "restore the ledger from a backup (refusing to start a new budget)")
            return ledger
        try:
            data = json.loads(ledger.path.read_text())
            history = [(float(s), float(q), int(n)) for s, q, n in data["history"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LedgerError(f"privacy ledger {ledger.path} is unreadable ({exc}); refusing to train "
                              "(its spent epsilon is unknown): restore it from a backup") from None
        del history
        if data.get("format") != LEDGER_FORMAT or data.get("dataset_fingerprint") != fp:
            raise LedgerError(f"privacy ledger {ledger.path} belongs to another dataset (fingerprint "
                              f"{str(data.get('dataset_fingerprint'))[:16]}..., this dataset {cache} is {fp[:16]}...); "
                              "refusing to train")
        if data.get("unit") != unit:
            raise LedgerError(f"privacy ledger {ledger.path} accounts the privacy unit {data.get('unit')!r}; "
                              f"this run asks for dp-unit = {unit!r}: one dataset keeps one unit")
        if data.get("accountant") != accountant:
            raise LedgerError(f"privacy ledger {ledger.path} was accounted with {data.get('accountant')!r}; "
                              f"this run asks for {accountant!r}")
        ledger.data = data
        return ledger

    def commit(self, history: list[tuple[float, float, int]], entry: dict[str, Any], *, delta: float) -> None:
        """Record the history after this round (the ledger first, then the index, both atomic).

        ``delta`` is the ledger's delta: written at the first commit, never changed after. A crash
        between the two writes leaves a ledger without an index entry: it is opened normally and
        indexed at the next commit (the other order would strand the dataset)."""
        if self.delta is not None and delta != self.delta:
            raise LedgerError(f"privacy ledger {self.path} is accounted at delta {self.delta:g}, not {delta:g}")
        data = dict(self.data)
        data["delta"] = float(delta)
        data["history"] = [[float(s), float(q), int(n)] for s, q, n in history]
        data["rounds"] = list(data.get("rounds", [])) + [{**entry, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
        _atomic_write_json(self.path, data)
        self.data = data
        index_path = self.state_dir / INDEX_NAME
        index = _read_index(index_path)
        trained = index.setdefault("trained", {})
        if self.fingerprint not in trained:
            trained[self.fingerprint] = {"ledger": self.path.name, "site": self.site}
            _atomic_write_json(index_path, index)


def _read_index(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data.get("trained", {}), dict):
            raise ValueError("'trained' is not a mapping")
        return data
    except (OSError, ValueError) as exc:
        raise LedgerError(f"privacy index {path} is unreadable ({exc}); refusing to train: restore it "
                          "from a backup") from None


@contextmanager
def locked(state_dir: Path):
    """Hold the state directory's lock (one site's rounds never interleave their ledger updates)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".privacy.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
