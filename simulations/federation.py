"""Run a Flower app as a simulation in an isolated Flower home, and say whether it succeeded.

:func:`run_federation` starts its own local SuperLink (its own ``FLWR_HOME``, its own port found
at run time), submits the app with ``flwr run``, waits for the run to finish, reads the run's
status with ``flwr ls --run-id ID --format json`` (``flwr run`` itself exits 0 even when the run
fails) and always stops the SuperLink it started, by PID (its whole process tree: the
simulation and Ray processes it spawned), on success, failure or exception alike; should the
calling process die first, even by SIGKILL, the SuperLink's tree goes with it
(``shared.processes.start``).

Used by ``python -m simulations.run`` (the checked entry point), ``simulations/compare.py``, the
tests and ``bench/fl``.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx

from shared import processes
from shared.processes import free_port, tree_rss_mb  # noqa: F401 - part of this module's API

DEFAULT_APP_DIR = Path(__file__).resolve().parent / "four_sites"
SUPERLINK_STARTUP_TIMEOUT = 30.0
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL when the SuperLink's tree is stopped


@dataclass
class FederationResult:
    status: str  # "finished:completed" on success; "finished:failed", "timeout", ... otherwise
    run_id: str | None
    out_dir: Path | None
    log: str  # the run's log (ServerApp and ClientApp output)
    wall_s: float
    startup_s: float  # SuperLink start + submission until the run was accepted
    peak_rss_mb: float = 0.0  # peak summed RSS of the SuperLink's process tree (Ray included)
    details: str = ""  # Flower's status details (e.g. the exception of a failed run)

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


class FederationError(RuntimeError):
    pass


def format_overrides(run_config: Mapping[str, Any]) -> str:
    """``{"lr": 0.01, "model": "cardioformer"}`` -> ``lr=0.01 model="cardioformer"`` for --run-config."""
    parts = []
    for key, value in run_config.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = json.dumps(str(value))
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _bin(name: str) -> str:
    """A Flower executable from this interpreter's environment (the venv's ``bin/``)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if not found:
        raise FederationError(f"`{name}` not found next to {sys.executable} nor on PATH: is flwr installed?")
    return found


def _env(flwr_home: Path, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(port)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    # The SuperLink spawns flwr-simulation / flwr-serverapp by bare name.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def write_connection(flwr_home: Path, port: int) -> Path:
    """A Flower config whose default connection is our SuperLink's explicit address.

    With the ``:local:`` magic address, ``flwr`` starts a detached SuperLink of its own whenever
    a 0.4 s health probe fails (easily, on a loaded machine), which nobody would stop; an
    explicit address is never auto-started.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        '[superlink]\ndefault = "fed-ecg"\n\n'
        f'[superlink.fed-ecg]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    return path


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success
    except httpx.HTTPError:
        return False


def start_superlink(flwr_home: Path, port: int, env: dict[str, str]) -> subprocess.Popen:
    """A local simulation SuperLink exactly as ``flwr run`` would start it, but owned by us."""
    if _healthy(port):
        raise FederationError(f"port {port} already serves a SuperLink; refusing to reuse it")
    runtime = flwr_home / "local-superlink"
    runtime.mkdir(parents=True, exist_ok=True)
    cmd = [_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
           "--host", "127.0.0.1", "--port", str(port), "--database", str(runtime / "state.db"),
           "--log-file", str(runtime / "superlink.log")]
    proc = processes.start(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           grace=STOP_GRACE)
    try:
        processes.wait_until(lambda: _healthy(port), timeout=SUPERLINK_STARTUP_TIMEOUT,
                             what=f"its health check http://127.0.0.1:{port}/health", proc=proc,
                             log=runtime / "superlink.log")
    except processes.WaitError as exc:
        processes.stop(proc, grace=STOP_GRACE)
        raise FederationError(str(exc)) from None
    return proc


class _MemorySampler(threading.Thread):
    def __init__(self, pid: int, every: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak = pid, every, 0.0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.peak = max(self.peak, tree_rss_mb(self.pid))
            self.stop_event.wait(self.every)


def _flwr(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([_bin("flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def run_status(run_id: str, env: dict[str, str], cwd: Path) -> tuple[str, str]:
    """``(status, status-details)`` of a run, from ``flwr ls --run-id ID --format json``."""
    proc = _flwr(["ls", "--run-id", str(run_id), "--format", "json"], env, cwd)
    try:
        run = json.loads(proc.stdout)["runs"][0]
        return str(run["status"]), str(run.get("status-details", ""))
    except (ValueError, KeyError, IndexError):
        return f"unknown ({(proc.stdout + proc.stderr).strip()[-300:]})", ""


def _pass_on(stream: TextIO, echo: TextIO | None, lines: list[str]) -> None:
    """Read the run's streamed log to its end into ``lines``, copying it to ``echo`` if given."""
    for line in stream:
        lines.append(line)
        if echo is not None:
            echo.write(line)
            echo.flush()


def run_federation(
    app_dir: str | Path = DEFAULT_APP_DIR,
    run_config: Mapping[str, Any] | None = None,
    *,
    num_supernodes: int | None = None,
    client_cpus: int | None = None,
    client_gpus: float | None = None,
    flwr_home: str | Path | None = None,
    port: int | None = None,
    timeout: float = 1800.0,
    echo: TextIO | None = None,
) -> FederationResult:
    """Run ``app_dir`` with ``run_config`` overrides on ``num_supernodes`` simulated nodes.

    ``None`` keeps Flower's default for the node count (2) and the resources per node (2 CPUs,
    no GPU), as a plain ``flwr run`` does; the server deals the sites over the nodes there are.

    Returns when the run has finished (or after ``timeout`` seconds, status ``timeout``); the
    SuperLink started here is stopped in every case. ``echo`` (e.g. ``sys.stdout``) receives
    the run's log lines live.
    """
    app_dir = Path(app_dir).resolve()
    run_config = dict(run_config or {})
    out_dir = Path(run_config["out-dir"]).expanduser().resolve() if run_config.get("out-dir") else None
    own_home = flwr_home is None
    home = Path(tempfile.mkdtemp(prefix="fed-ecg-flwr-")) if own_home else Path(flwr_home)
    port = port or free_port()
    env = _env(home, port)
    write_connection(home, port)
    t0 = time.monotonic()
    superlink = start_superlink(home, port, env)
    sampler = _MemorySampler(superlink.pid)
    sampler.start()
    streamer = None
    run_id = None
    try:
        args = ["run", str(app_dir), "--format", "json"]
        federation = " ".join(f"{key}={value}" for key, value in (
            ("num-supernodes", num_supernodes), ("client-resources-num-cpus", client_cpus),
            ("client-resources-num-gpus", client_gpus)) if value is not None)
        if federation:
            args += ["--federation-config", federation]
        if run_config:
            args += ["--run-config", format_overrides(run_config)]
        proc = _flwr(args, env, app_dir.parent)
        try:
            run_id = str(json.loads(proc.stdout)["run-id"])
        except (ValueError, KeyError, TypeError):
            raise FederationError(f"flwr run did not start a run: {(proc.stdout + proc.stderr).strip()[-2000:]}") from None
        startup_s = time.monotonic() - t0
        # `flwr log --stream` ends when the run does: wait for it rather than polling `flwr ls`
        # (every `flwr` call is a Python start-up, about a CPU-second taken from the run).
        streamer = processes.start([_bin("flwr"), "log", run_id, "--stream"], env=env, cwd=app_dir.parent,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        streamed: list[str] = []
        pump = threading.Thread(target=_pass_on, args=(streamer.stdout, echo, streamed), daemon=True)
        pump.start()
        status, details = "timeout", f"not finished after {timeout:.0f} s"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                streamer.wait(timeout=max(0.0, min(30.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
            current, current_details = run_status(run_id, env, app_dir.parent)
            if current.startswith("finished"):
                status, details = current, current_details
                break
            if streamer.poll() is not None:  # the stream ended early (a broken connection): poll
                time.sleep(2.0)
        pump.join(timeout=5.0)
        log = "".join(streamed)
        if streamer.poll() is None or not status.startswith("finished"):  # not the whole log
            log = _flwr(["log", run_id, "--show"], env, app_dir.parent).stdout
        if out_dir is None:
            found = re.search(r"; output (\S+)", log)
            out_dir = Path(found.group(1)) if found else None
        sampler.stop_event.set()
        return FederationResult(status, run_id, out_dir, log, time.monotonic() - t0, startup_s,
                                sampler.peak, details)
    finally:
        sampler.stop_event.set()
        if streamer is not None:
            processes.stop(streamer, grace=2.0)
        processes.stop(superlink, grace=STOP_GRACE)
        if own_home:
            shutil.rmtree(home, ignore_errors=True)
