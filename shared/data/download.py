"""Download an open PhysioNet dataset, resumably, verifying PhysioNet's SHA-256 checksums.

PhysioNet publishes ``SHA256SUMS.txt`` for every project version
(``https://physionet.org/files/<slug>/<version>/SHA256SUMS.txt``), one ``<sha256>  <path>`` per
file. :func:`download_dataset` fetches it, then every listed file:

* into ``<file>.part``, continuing an existing ``.part`` with an HTTP ``Range`` request;
* the finished ``.part`` is hashed; only a file whose hash matches is renamed to its real name,
  so a file under its real name has been verified (a mismatch deletes the ``.part`` and fetches
  the file again from scratch, once; a second mismatch is reported);
* ``<out>/.complete`` is written last, only when every listed file has verified. Without it the
  directory is a partial download, whatever it contains. Re-running skips verified files.
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import json
import os
import posixpath
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .errors import DataError

DEFAULT_BASE_URL = "https://physionet.org/files"
#: PhysioNet project slug and version of each site's open dataset.
PHYSIONET_PROJECTS: dict[str, tuple[str, str]] = {
    "ptb": ("ptbdb", "1.0.0"),
    "ptbxl": ("ptb-xl", "1.0.3"),
    "mimic": ("mimic-iv-ecg", "1.0"),
    "cinc": ("challenge-2021", "1.0.3"),
}
COMPLETE_MARKER = ".complete"
CHECKSUMS = "SHA256SUMS.txt"
_BLOCK = 1 << 20


class DownloadError(DataError):
    """The download could not be completed (the message says which files and why)."""


@dataclass
class DownloadResult:
    out: Path
    complete: bool
    fetched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already verified
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason


def project_url(site: str, base_url: str = DEFAULT_BASE_URL) -> str:
    if site not in PHYSIONET_PROJECTS:
        raise DownloadError(f"unknown site {site!r}; expected one of {sorted(PHYSIONET_PROJECTS)}")
    slug, version = PHYSIONET_PROJECTS[site]
    return f"{base_url.rstrip('/')}/{slug}/{version}/"


def parse_checksums(text: str, source: str = CHECKSUMS) -> list[tuple[str, str]]:
    """``[(relative path, sha256)]`` from a ``sha256sum``-style listing; rejects unsafe paths."""
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64 or any(c not in "0123456789abcdefABCDEF" for c in parts[0]):
            raise DownloadError(f"{source}: line {n} is not '<sha256>  <path>': {line[:80]!r}")
        digest, path = parts[0].lower(), parts[1].lstrip("*").strip()
        norm = posixpath.normpath(path)
        if path.startswith("/") or norm.startswith("..") or norm == ".":
            raise DownloadError(f"{source}: line {n}: unsafe path {path!r}")
        entries.append((norm, digest))
    if not entries:
        raise DownloadError(f"{source}: lists no files")
    return entries


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_BLOCK):
            h.update(chunk)
    return h.hexdigest()


def download_dataset(
    site: str,
    out: str | Path,
    *,
    base_url: str = DEFAULT_BASE_URL,
    include: list[str] | None = None,
    jobs: int = 4,
    recheck: bool = False,
    progress: bool = True,
    timeout: float = 60.0,
) -> DownloadResult:
    """Fetch the site's dataset into ``out`` (see module docstring).

    ``include``: glob patterns (e.g. ``records100/*``); only matching files are fetched and the
    completion marker records the patterns. ``recheck`` re-hashes files already present.
    """
    out = Path(out)
    url = project_url(site, base_url)
    marker = out / COMPLETE_MARKER
    scope = {"site": site, "url": url, "include": sorted(include or [])}
    if marker.is_file() and not recheck:
        try:
            if json.loads(marker.read_text()).get("scope") == scope:
                return DownloadResult(out, True)
        except (OSError, json.JSONDecodeError):
            pass
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"{out}: cannot create the download directory ({exc.strerror})") from exc
    if marker.exists():
        marker.unlink()  # a different scope, or a recheck: not complete until proven again

    checksums_text = _fetch_bytes(url + CHECKSUMS, timeout).decode("utf-8", errors="replace")
    entries = parse_checksums(checksums_text, url + CHECKSUMS)
    if include:
        entries = [(p, d) for p, d in entries if any(fnmatch.fnmatch(p, pat) for pat in include)]
        if not entries:
            raise DownloadError(f"{url}{CHECKSUMS}: no listed file matches {include}")
    _atomic_write(out / CHECKSUMS, checksums_text.encode())

    result = DownloadResult(out, False)
    bar = tqdm(total=len(entries), unit="file", desc=f"download {site}", disable=not progress)

    def one(entry: tuple[str, str]) -> tuple[str, str, str | None]:
        path, digest = entry
        try:
            return path, _fetch_verified(url + path, out / path, digest, timeout, recheck), None
        except (OSError, DownloadError, urllib.error.URLError, http.client.HTTPException) as exc:
            return path, "failed", str(exc)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for path, status, error in pool.map(one, entries):
            bar.update(1)
            if status == "fetched":
                result.fetched.append(path)
            elif status == "present":
                result.skipped.append(path)
            else:
                result.failed[path] = error or status
    bar.close()
    if not result.failed:
        _atomic_write(marker, json.dumps({"scope": scope, "files": len(entries)}, sort_keys=True).encode())
        result.complete = True
    return result


def _fetch_verified(url: str, dest: Path, digest: str, timeout: float, recheck: bool) -> str:
    """Make ``dest`` a verified copy of ``url``: "present" (already verified) or "fetched"."""
    if dest.is_file():
        if not recheck or sha256_file(dest) == digest:
            return "present"
        dest.unlink()  # corrupted since it was verified: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in (1, 2):
        _fetch_resumable(url, part, timeout)
        got = sha256_file(part)
        if got == digest:
            os.replace(part, dest)
            return "fetched"
        part.unlink()  # a resumed prefix or the whole file is bad: start over once
    raise DownloadError(f"{url}: sha256 mismatch (expected {digest}, got {got}) after 2 attempts")


def _fetch_resumable(url: str, part: Path, timeout: float) -> None:
    """Download ``url`` into ``part``, continuing from its current size with a Range request."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch: the .part is whole (or wrong)
            return
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    with response:
        # 206: the server continues where the .part stops; 200: it ignored Range, start over.
        mode = "ab" if have and response.status == 206 else "wb"
        expected = response.headers.get("Content-Length")
        written = 0
        with open(part, mode) as fh:
            try:
                while chunk := response.read(_BLOCK):
                    fh.write(chunk)
                    written += len(chunk)
            except http.client.IncompleteRead as exc:
                fh.write(exc.partial)
                written += len(exc.partial)
            except (ConnectionError, TimeoutError, OSError):
                pass  # keep what arrived; the length check below reports it
        if expected is not None and written < int(expected):
            raise DownloadError(
                f"{url}: transfer interrupted after {written} of {expected} bytes; "
                "the .part file is kept and a re-run resumes it"
            )


def _fetch_bytes(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason} (wrong --site or --base-url?)") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"{url}: cannot connect ({reason})") from exc


def _atomic_write(path: Path, data: bytes) -> None:
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    os.replace(part, path)
