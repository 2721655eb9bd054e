"""The cache builder: a site's records -> one memory-mappable window cache (format_version 1).

Top to bottom:

1. The reader validates the dataset root and lists the records (metadata only).
2. Each record gets its split from its split key (:mod:`shared.data.splits`).
3. Worker processes read + preprocess records (:mod:`shared.data.preprocess`) and harmonise
   their labels; a bad record becomes a skip entry, never an exception that stops the run.
4. Records are processed ``chunk_records`` at a time (listing order); each chunk becomes one
   shard in ``<out>.tmp-<config hash>/shards/``, written by the worker that processed it (tmp +
   rename, its ``.json`` last). An interrupted run finds the shards already written and
   processes only the missing chunks (resumable).
5. When every chunk is done the shards are assembled into the cache files in
   ``<out>.tmp-<hash>/cache/``, which is renamed to ``<out>`` only when complete (atomic).

The same input and config give byte-identical files (no timestamps, deterministic order),
whatever the number of workers. A finished cache with the same config hash is left as is;
a different config is refused unless ``force``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from . import cache as C
from .errors import CacheError, DataError, RecordError
from .preprocess import PreprocessConfig, lead_names_for, preprocess_record
from .readers.base import RecordRef, SiteReader
from .record import EcgRecord
from .splits import SPLITS, assign_split, check_disjoint, split_method

#: PhysioNet project of each site (used when a reader does not name its dataset).
DATASETS: dict[str, str] = {
    "ptb": "ptbdb", "ptbxl": "ptb-xl", "mimic": "mimic-iv-ecg", "cinc": "challenge-2021",
}
DEFAULT_CHUNK_RECORDS = 64
#: Bump when a code change alters the cache content for the same config (invalidates old caches).
BUILDER_VERSION = 2  # 2: the label mask is the site's availability only (issue 13)


class Labeler(Protocol):
    """Native labels -> the harmonised label space (the default wraps :mod:`shared.data.labels`)."""

    space: str
    classes: tuple[str, ...]

    def available(self, site: str) -> np.ndarray: ...  # bool [K]: the site-level mask

    def label(self, site: str, record: EcgRecord) -> tuple[np.ndarray, np.ndarray]: ...  # uint8 [K] x2


class LabelSpaceLabeler:
    """The project's label tables (``shared.data.labels``) for one label space.

    A record's mask is the site's (or CinC sub-source's) availability (``labels.record_mask``);
    labels are 1 only where the mask is 1 (a stated positive of an unavailable class is dropped).
    """

    def __init__(self, space: str = "superclass"):
        from .labels import get_label_space

        self.space = space
        self._space = get_label_space(space)
        self.classes = tuple(self._space.classes)

    def available(self, site: str) -> np.ndarray:
        from .labels import availability

        return np.asarray(availability(site, self._space), dtype=bool)

    def label(self, site: str, record: EcgRecord) -> tuple[np.ndarray, np.ndarray]:
        from .labels import masked_labels

        labels, mask = masked_labels(site, record.native_labels, self._space, subsource=record.meta.get("subsource"))
        return np.asarray(labels, dtype=np.uint8), np.asarray(mask, dtype=np.uint8)


@dataclass
class PrepareResult:
    out: Path
    manifest: dict[str, Any]
    status: str  # "built", "up_to_date" or "interrupted" (``stop_after_chunks``; ``out`` is the tmp dir)
    n_processed: int = 0  # records read in this run (0 when up to date or fully resumed)
    skips: list[tuple[str, str, str]] = field(default_factory=list)


def build_reader(
    site: str,
    source: str | Path,
    *,
    reader_options: dict[str, Any] | None = None,
    synthetic_records: int | None = None,
    synthetic_seed: int = 0,
) -> SiteReader:
    """The reader for ``--source``: a dataset root, or ``synthetic`` for the generator."""
    if str(source) == "synthetic":
        from .synthetic import SyntheticReader

        n = 200 if synthetic_records is None else int(synthetic_records)
        return SyntheticReader(site, n_records=n, seed=int(synthetic_seed))
    from .readers import get_reader

    return get_reader(site, source, **(reader_options or {}))


def is_synthetic(reader: SiteReader) -> bool:
    return bool(getattr(reader, "synthetic", False)) or type(reader).__name__ == "SyntheticReader"


def describe_source(reader: SiteReader, source: str | Path) -> str:
    if is_synthetic(reader):
        n = getattr(reader, "n_records", "?")
        seed = getattr(reader, "seed", "?")
        return (
            f"synthetic: generated by shared.data.synthetic ({n} records, seed {seed}); "
            "not real patient ECGs"
        )
    return str(Path(source).resolve())


def split_key_of(reader: SiteReader, ref: RecordRef) -> tuple[str, str]:
    """PTB-XL by ``strat_fold``; every other site by the reader's key (patient, else record)."""
    if reader.site == "ptbxl" and ref.meta.get("strat_fold") not in (None, ""):
        return ("fold", str(int(ref.meta["strat_fold"])))
    kind, value = reader.split_key(ref)
    return (str(kind), str(value))


def config_of(
    reader: SiteReader,
    preprocess: PreprocessConfig,
    labeler: Labeler,
    limit: int | None,
) -> dict[str, Any]:
    """Everything that decides the cache's content (not the source path, not workers)."""
    synthetic = is_synthetic(reader)
    return {
        "format_version": C.FORMAT_VERSION,
        "site": reader.site,
        "builder_version": BUILDER_VERSION,
        "dataset": f"synthetic {reader.site}-like" if synthetic
        else getattr(reader, "dataset", DATASETS.get(reader.site, reader.site)),
        "dataset_version": str(getattr(reader, "dataset_version", "unknown")),
        "synthetic": synthetic,
        "synthetic_records": getattr(reader, "n_records", None) if synthetic else None,
        "synthetic_seed": getattr(reader, "seed", None) if synthetic else None,
        "reader_options": {k: _jsonable(v) for k, v in sorted(reader.options.items())}
        if hasattr(reader, "options") and isinstance(reader.options, dict) else {},
        "preprocess": preprocess.as_dict(),
        "label_space": labeler.space,
        "classes": list(labeler.classes),
        "limit": limit,
    }


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def prepare_cache(
    reader: SiteReader,
    out: str | Path,
    *,
    preprocess: PreprocessConfig = PreprocessConfig(),
    labeler: Labeler | None = None,
    source: str | Path | None = None,
    workers: int = 1,
    limit: int | None = None,
    force: bool = False,
    progress: bool = True,
    chunk_records: int = DEFAULT_CHUNK_RECORDS,
    stop_after_chunks: int | None = None,
) -> PrepareResult:
    """Build (or resume, or confirm) the cache of ``reader``'s site in ``out``.

    ``stop_after_chunks`` stops after writing that many new shards, leaving the temporary
    directory as an interrupted run would (used to test resuming).
    """
    out = Path(out)
    labeler = labeler or LabelSpaceLabeler()
    source = reader.root if source is None else source
    config = config_of(reader, preprocess, labeler, limit)
    chash = config_hash(config)

    if _up_to_date(out, chash, force):
        return PrepareResult(out, C.read_manifest(out), "up_to_date")
    _check_writable(out)

    reader.validate_root()
    refs = list(reader.list_records())
    if limit is not None:
        refs = refs[: int(limit)]
    if not refs:
        raise DataError(f"{source}: no records found for site {reader.site!r}")

    tmp = Path(f"{out}.tmp-{chash}")
    shards = tmp / "shards"
    _start_or_resume(tmp, refs, chunk_records)
    chunks = [refs[i : i + chunk_records] for i in range(0, len(refs), chunk_records)]
    pending = [k for k in range(len(chunks)) if not (shards / f"shard-{k:06d}.json").is_file()]
    n_done = len(refs) - sum(len(chunks[k]) for k in pending)

    bar = tqdm(total=len(refs), initial=n_done, unit="rec", desc=f"prepare {reader.site}",
               disable=not progress, dynamic_ncols=True)
    tasks = [(k, chunks[k], str(shards)) for k in pending]
    done = _run_chunks(reader, labeler, preprocess, tasks, workers)
    n_processed = 0
    try:
        for written, (_k, n) in enumerate(done, 1):
            bar.update(n)
            n_processed += n
            if stop_after_chunks is not None and written >= stop_after_chunks and written < len(tasks):
                return PrepareResult(tmp, {}, "interrupted", n_processed)
    finally:
        done.close()  # stops the worker pool, also on an exception or Ctrl-C
        bar.close()

    split_keys = [split_key_of(reader, ref) for ref in refs]
    assembled = tmp / "cache"
    if assembled.exists():
        shutil.rmtree(assembled)
    assembled.mkdir()
    try:
        manifest, skips = _assemble(assembled, shards, len(chunks), refs, split_keys, reader, labeler,
                                    preprocess, config, chash, source)
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing worth resuming
        raise
    _swap_into_place(assembled, out, chash)
    shutil.rmtree(tmp, ignore_errors=True)
    return PrepareResult(out, manifest, "built", n_processed, skips)


def _start_or_resume(tmp: Path, refs: list[RecordRef], chunk_records: int) -> None:
    """Create ``tmp/shards``; keep shards of an interrupted run only if it listed the same records."""
    plan = {"chunk_records": chunk_records,
            "records": hashlib.sha256("\n".join(f"{r.record_id}\t{r.path}" for r in refs).encode()).hexdigest()}
    plan_file = tmp / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()) != plan:
        shutil.rmtree(tmp)  # the dataset changed since the interrupted run: start over
    try:
        (tmp / "shards").mkdir(parents=True, exist_ok=True)
        _atomic_write_text(plan_file, json.dumps(plan, sort_keys=True))
    except OSError as exc:
        raise CacheError(f"{tmp}: cannot create the temporary cache directory ({exc.strerror or exc})") from exc


# --------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _init_worker(reader: SiteReader, labeler: Labeler, preprocess: PreprocessConfig) -> None:
    _WORKER.update(reader=reader, labeler=labeler, preprocess=preprocess)


def _process(ref: RecordRef) -> dict[str, Any]:
    """Read + preprocess one record in a worker; a failure becomes a skip entry."""
    reader: SiteReader = _WORKER["reader"]
    labeler: Labeler = _WORKER["labeler"]
    try:
        record = reader.read(ref)
        windows = preprocess_record(record, _WORKER["preprocess"])
        labels, mask = labeler.label(reader.site, record)
        return {
            "ok": True, "record_id": record.record_id, "patient_id": record.patient_id,
            "windows": windows, "labels": labels, "mask": mask, "fs_native": float(record.fs),
            "n_samples_native": int(record.n_samples),
        }
    except RecordError as exc:
        return {"ok": False, "path": exc.path, "reason": exc.reason, "detail": exc.detail}
    except Exception as exc:  # one bad file never kills the run: log it as a skip
        return {"ok": False, "path": ref.path or ref.record_id, "reason": "unreadable",
                "detail": f"{type(exc).__name__}: {exc}"}


def _process_chunk(task: tuple[int, list[RecordRef], str]) -> tuple[int, int]:
    """Read + preprocess one chunk of records and write its shard (in a worker)."""
    k, refs, shards = task
    _write_shard(Path(shards), k, [_process(ref) for ref in refs])
    return k, len(refs)


def _run_chunks(reader, labeler, preprocess, tasks: list, workers: int) -> Iterator[tuple[int, int]]:
    """Process chunks in ``workers`` processes (1: in this process); yields ``(chunk, n_records)``
    as each shard is written. Shards are named by chunk, so completion order does not matter."""
    if workers <= 1 or len(tasks) < 2:
        _init_worker(reader, labeler, preprocess)
        for task in tasks:
            yield _process_chunk(task)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(reader, labeler, preprocess)) as pool:
        yield from pool.imap_unordered(_process_chunk, tasks)


# --------------------------------------------------------------------------- shards


def _write_shard(shards: Path, k: int, results: list[dict]) -> None:
    ok = [r for r in results if r["ok"]]
    arrays = {
        "signals": np.concatenate([r["windows"] for r in ok]) if ok else np.zeros((0,), np.float16),
        "n_windows": np.array([len(r["windows"]) for r in ok], dtype=np.int64),
        "labels": np.stack([r["labels"] for r in ok]).astype(np.uint8) if ok else np.zeros((0,), np.uint8),
        "mask": np.stack([r["mask"] for r in ok]).astype(np.uint8) if ok else np.zeros((0,), np.uint8),
    }
    meta = [
        {k2: r[k2] for k2 in ("ok", "record_id", "patient_id", "fs_native", "n_samples_native")}
        if r["ok"] else {k2: r[k2] for k2 in ("ok", "path", "reason", "detail")}
        for r in results
    ]
    npz = shards / f"shard-{k:06d}.npz"
    with open(npz.with_suffix(".npz.part"), "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(npz.with_suffix(".npz.part"), npz)
    _atomic_write_text(shards / f"shard-{k:06d}.json", json.dumps(meta))


# --------------------------------------------------------------------------- assembly


def _assemble(dest, shards, n_chunks, refs, split_keys, reader, labeler, preprocess, config, chash, source):
    """Write the cache files into ``dest`` from the shards; returns ``(manifest, skips)``."""
    site = reader.site
    lead_names = lead_names_for(site, preprocess.leads)
    metas = [json.loads((shards / f"shard-{k:06d}.json").read_text()) for k in range(n_chunks)]
    flat = [m for meta in metas for m in meta]
    if len(flat) != len(refs):
        raise CacheError(f"{shards}: shards hold {len(flat)} records, the listing {len(refs)}; delete it and re-run")
    kept = [i for i, m in enumerate(flat) if m["ok"]]
    skips = [(m["path"], m["reason"], m["detail"]) for m in flat if not m["ok"]]
    if not kept:
        reasons = Counter(r for _, r, _ in skips)
        raise DataError(
            f"{source}: none of the {len(refs)} records could be used "
            f"(skipped: {dict(sorted(reasons.items()))}); first: {skips[0][0]}: {skips[0][1]} {skips[0][2]}"
        )

    window_counts, labels, label_mask = _read_shard_tables(shards, n_chunks)
    _copy_signals(dest / C.SIGNALS, shards, n_chunks,
                  (sum(window_counts), len(lead_names), preprocess.window_samples))

    available = labeler.available(site).astype(bool)

    rows = []
    record_splits: dict[str, str] = {}
    record_groups: dict[str, str] = {}
    first = 0
    for index, (i, count) in enumerate(zip(kept, window_counts)):
        m = flat[i]
        split = assign_split(site, split_keys[i])
        record_splits[m["record_id"]] = split
        record_groups[m["record_id"]] = m["patient_id"] or m["record_id"]
        rows.append([index, m["record_id"], m["patient_id"] or "", split, first, count,
                     f"{m['fs_native']:g}", m["n_samples_native"]])
        first += count
    try:
        check_disjoint(record_splits, record_groups)
    except ValueError as exc:
        raise DataError(f"{source}: split is not patient-disjoint: {exc}") from exc
    window_record = np.repeat(np.arange(len(rows), dtype=np.int32), window_counts)

    np.save(dest / C.WINDOW_RECORD, window_record)
    np.save(dest / C.LABELS, labels)
    np.save(dest / C.LABEL_MASK, label_mask)
    _write_csv(dest / C.RECORDS, C.RECORD_COLUMNS, rows)
    _write_csv(dest / C.SKIPS, ("path", "reason", "detail"), skips)
    splits = {"method": split_method(site, {k for k, _ in split_keys}),
              **{s: [r[1] for r in rows if r[3] == s] for s in SPLITS}}
    _atomic_write_text(dest / C.SPLITS_FILE, json.dumps(splits, indent=1) + "\n")

    counts = _split_counts(rows, labels, labeler.classes)
    manifest = {
        "format_version": C.FORMAT_VERSION,
        "site": site,
        "synthetic": bool(config["synthetic"]),
        "source": describe_source(reader, source),
        "dataset": config["dataset"],
        "dataset_version": config["dataset_version"],
        "label_space": labeler.space,
        "classes": list(labeler.classes),
        "label_available": [bool(a) for a in available],
        "fs": preprocess.fs,
        "window_samples": preprocess.window_samples,
        "window_stride_samples": preprocess.stride_samples,
        "lead_names": list(lead_names),
        "config": config,
        "config_hash": chash,
        "counts": counts,
        "skipped": {"total": len(skips), "by_reason": dict(sorted(Counter(r for _, r, _ in skips).items()))},
        "complete": True,
    }
    _atomic_write_text(dest / C.MANIFEST, json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    C.validate_cache(dest)
    return manifest, skips


def _read_shard_tables(shards: Path, n_chunks: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Windows per kept record, labels and label mask (labels 0 wherever the mask is 0)."""
    window_counts: list[int] = []
    label_rows, mask_rows = [], []
    for k in range(n_chunks):
        with np.load(shards / f"shard-{k:06d}.npz", allow_pickle=False) as z:
            window_counts.extend(int(n) for n in z["n_windows"])
            if len(z["n_windows"]):
                label_rows.append(z["labels"])
                mask_rows.append(z["mask"])
    mask = (np.concatenate(mask_rows) > 0).astype(np.uint8)
    labels = ((np.concatenate(label_rows) > 0) & (mask > 0)).astype(np.uint8)
    return window_counts, labels, mask


def _copy_signals(path: Path, shards: Path, n_chunks: int, shape: tuple[int, int, int]) -> None:
    """Concatenate the shards' windows into one float16 ``.npy`` written through a memmap."""
    signals = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
    pos = 0
    for k in range(n_chunks):
        with np.load(shards / f"shard-{k:06d}.npz", allow_pickle=False) as z:
            part = z["signals"]
        if part.size:
            signals[pos : pos + len(part)] = part
            pos += len(part)
    if pos != shape[0]:
        raise CacheError(f"{shards}: shards hold {pos} windows, their tables {shape[0]}; delete it and re-run")
    signals.flush()
    del signals


def _split_counts(rows: list[list], labels: np.ndarray, classes: Sequence[str]) -> dict[str, dict]:
    """``counts`` of the manifest: records, windows, patients and positives per split."""
    counts = {}
    for split in SPLITS:
        sel = np.array([r[3] == split for r in rows], dtype=bool)
        chosen = [r for r, keep in zip(rows, sel) if keep]
        counts[split] = {
            "records": len(chosen),
            "windows": int(sum(r[5] for r in chosen)),
            "patients": len({r[2] or r[1] for r in chosen}),
            "positives": {c: int(labels[sel, j].sum()) for j, c in enumerate(classes)},
        }
    return counts


def _swap_into_place(assembled: Path, out: Path, chash: str) -> None:
    if out.exists():
        old = Path(f"{out}.old-{chash}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(assembled, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(assembled, out)


# --------------------------------------------------------------------------- helpers


def _up_to_date(out: Path, chash: str, force: bool) -> bool:
    """True if ``out`` is a finished cache of this config; refuse to clobber anything else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise CacheError(f"{out}: exists and is not a directory")
    if not (out / C.MANIFEST).is_file():
        if any(out.iterdir()) and not force:
            raise CacheError(f"{out}: exists, is not empty and holds no cache manifest; "
                             "choose another --out or pass --force to replace it")
        return False
    try:
        old = C.read_manifest(out)
    except CacheError:
        if force:
            return False
        raise
    if old.get("config_hash") == chash and old.get("complete") is True:
        try:
            C.validate_cache(out)
            return True
        except CacheError:
            if force:
                return False
            raise
    if force:
        return False
    raise CacheError(
        f"{out}: holds a cache built with another config (hash {old.get('config_hash')}, this run "
        f"{chash}); pass --force to rebuild it or choose another --out"
    )


def _check_writable(out: Path) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise CacheError(f"{out}: cannot write here ({probe} is not a writable directory)")


def _atomic_write_text(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    _atomic_write_text(path, buf.getvalue())


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items())}
    return str(value)
