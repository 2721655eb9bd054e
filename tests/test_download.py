"""`download` against a local PhysioNet-like HTTP server: verify, resume, never look complete early."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shared.data.__main__ import main
from shared.data.download import COMPLETE_MARKER, DownloadError, download_dataset, parse_checksums

PREFIX = "/files/ptb-xl/1.0.3/"


def _tree() -> dict[str, bytes]:
    files = {
        "ptbxl_database.csv": b"ecg_id,patient_id,strat_fold\n1,15709.0,3\n",
        "records100/00000/00001_lr.hea": b"00001_lr 12 100 1000\n",
        "records100/00000/00001_lr.dat": bytes(range(256)) * 400,  # 100 kB
        "records500/00000/00001_hr.dat": bytes(reversed(range(256))) * 300,
    }
    sums = "".join(f"{hashlib.sha256(b).hexdigest()}  {p}\n" for p, b in files.items())
    return {**files, "SHA256SUMS.txt": sums.encode()}


class PhysioNetLike:
    """Serves ``files`` under /files/ptb-xl/1.0.3/ with Range support and injectable faults."""

    def __init__(self):
        self.files = _tree()
        self.cut_once: set[str] = set()  # send half the body, then drop the connection
        self.corrupt: dict[str, int] = {}  # path -> number of times to serve flipped bytes
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path[len(PREFIX):] if self.path.startswith(PREFIX) else None
                rng = self.headers.get("Range")
                server.requests.append((path, rng))
                if path not in server.files:
                    self.send_error(404)
                    return
                body = server.files[path]
                if server.corrupt.get(path, 0) > 0:
                    server.corrupt[path] -= 1
                    body = bytes(b ^ 0xFF for b in body[:10]) + body[10:]
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(body) and rng:
                    self.send_response(416)
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if path in server.cut_once:
                    server.cut_once.discard(path)
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/files"

    def ranges_for(self, path):
        return [r for p, r in self.requests if p == path]


@pytest.fixture
def server():
    s = PhysioNetLike()
    thread = threading.Thread(target=s.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def fetch(server, out, **kw):
    return download_dataset("ptbxl", out, base_url=server.base_url, progress=False, jobs=2, timeout=5, **kw)


def test_downloads_and_verifies_every_listed_file(server, tmp_path):
    result = fetch(server, tmp_path / "ptbxl")
    assert result.complete and not result.failed and len(result.fetched) == 4
    for path, body in server.files.items():
        assert (tmp_path / "ptbxl" / path).read_bytes() == body
    assert (tmp_path / "ptbxl" / COMPLETE_MARKER).is_file()
    assert not list((tmp_path / "ptbxl").rglob("*.part"))
    n_requests = len(server.requests)
    assert fetch(server, tmp_path / "ptbxl").complete and len(server.requests) == n_requests  # nothing refetched


def test_interrupted_download_is_not_complete_and_resumes_with_range(server, tmp_path):
    big = "records100/00000/00001_lr.dat"
    server.cut_once.add(big)
    first = fetch(server, tmp_path / "d")
    assert not first.complete and big in first.failed and "interrupted" in first.failed[big]
    assert not (tmp_path / "d" / COMPLETE_MARKER).exists() and not (tmp_path / "d" / big).exists()
    part = tmp_path / "d" / (big + ".part")
    assert part.stat().st_size == len(server.files[big]) // 2
    second = fetch(server, tmp_path / "d")
    assert second.complete and second.fetched == [big] and len(second.skipped) == 3
    assert server.ranges_for(big) == [None, f"bytes={len(server.files[big]) // 2}-"]
    assert (tmp_path / "d" / big).read_bytes() == server.files[big]


def test_corrupted_transfer_is_refetched_once_then_reported(server, tmp_path):
    path = "records500/00000/00001_hr.dat"
    server.corrupt[path] = 1
    result = fetch(server, tmp_path / "d")
    assert result.complete and (tmp_path / "d" / path).read_bytes() == server.files[path]
    assert len(server.ranges_for(path)) == 2  # bad copy discarded, fetched again

    server.corrupt[path] = 5  # the server keeps serving a bad copy
    bad = fetch(server, tmp_path / "e")
    assert not bad.complete and "sha256 mismatch" in bad.failed[path]
    assert not (tmp_path / "e" / path).exists() and not (tmp_path / "e" / COMPLETE_MARKER).exists()


def test_recheck_finds_a_file_damaged_on_disk(server, tmp_path):
    fetch(server, tmp_path / "d")
    damaged = tmp_path / "d" / "ptbxl_database.csv"
    damaged.write_bytes(b"tampered")
    assert fetch(server, tmp_path / "d", recheck=True).fetched == ["ptbxl_database.csv"]
    assert damaged.read_bytes() == server.files["ptbxl_database.csv"]


def test_include_fetches_a_subset(server, tmp_path):
    result = fetch(server, tmp_path / "d", include=["records100/*"])
    assert result.complete and sorted(result.fetched) == ["records100/00000/00001_lr.dat", "records100/00000/00001_lr.hea"]
    assert not (tmp_path / "d" / "ptbxl_database.csv").exists()


def test_unsafe_or_malformed_checksum_lists_are_refused():
    with pytest.raises(DownloadError, match="unsafe path"):
        parse_checksums(f"{'a' * 64}  ../etc/passwd\n")
    with pytest.raises(DownloadError, match="line 1"):
        parse_checksums("not a checksum line\n")


def test_cli_reports_wrong_base_url_in_one_line(server, tmp_path, capsys):
    assert main(["download", "--site", "ptb", "--out", str(tmp_path / "x"), "--base-url", server.base_url,
                 "--no-progress"]) == 2  # this server has no ptbdb
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "HTTP 404" in err and "\n" not in err
    assert main(["download", "--site", "ptbxl", "--out", str(tmp_path / "y"), "--base-url", server.base_url,
                 "--no-progress"]) == 0
    assert "complete (4 fetched" in capsys.readouterr().out
