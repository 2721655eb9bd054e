"""Real-process harness for the deployment tests: start SuperLinks and SuperNodes on 127.0.0.1,
wait for them, and stop every process by PID (its whole process tree), also when a test fails.

Process control is ``shared.processes``: each process runs in its own session, under a guard that
stops its tree should pytest itself be killed; stopping it signals every descendant found in
/proc (the SuperLink starts its SuperExec in a new session of its own).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared import processes
from shared.processes import alive as pid_alive
from shared.processes import descendants, free_port

__all__ = ["REPO_ROOT", "VENV_BIN", "Federation", "Proc", "Processes", "descendants", "flwr",
           "flwr_env", "free_port", "installed_version_env", "make_caches", "make_certs", "pid_alive", "run_log",
           "run_status", "submit_run", "wait_port", "wait_run"]

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def flwr_env(home: Path) -> dict[str, str]:
    """Environment with an isolated FLWR_HOME and this venv's bin first on PATH."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        PATH=os.pathsep.join([str(VENV_BIN), env.get("PATH", "")]),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        PYTHONUNBUFFERED="1",
        # one thread per process: four sites and a server share two cores
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    return env


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return ANSI.sub("", self.log_path.read_text(errors="replace"))
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Processes:
    """Every process a test starts; ``stop_all()`` runs on fixture teardown.

    ``die_with_parent``: each process runs under ``shared.processes``' guard, so that it and its
    tree go when pytest is killed; a test that kills a command's wrapper to check the wrapper's
    own guard turns it off (``Proc.pid`` is then the command itself).
    """

    log_dir: Path
    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)
    die_with_parent: bool = True

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        popen = processes.start(
            argv, cwd=REPO_ROOT, env=env or self.env, log_file=log_path,
            stdin=subprocess.DEVNULL, die_with_parent=self.die_with_parent,
        )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        """Kill ``proc`` and its whole tree at once (a crash, not a clean stop)."""
        processes.signal_tree(proc.pid, sig)
        try:
            os.killpg(proc.pid, sig)  # and anything its group spawned meanwhile
        except (ProcessLookupError, PermissionError):
            pass
        proc.popen.wait(timeout=10)

    def stop(self, proc: Proc, grace: float = 5.0) -> None:
        """SIGTERM the tree, then SIGKILL whatever is left after ``grace`` seconds."""
        processes.stop(proc.popen, grace=grace)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)

    def wait_for(self, proc: Proc, pattern: str, timeout: float) -> re.Match:
        """Wait until ``proc``'s log matches ``pattern``; fail with the log tail if not."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = regex.search(proc.log())
            if match:
                return match
            if not proc.alive():
                match = regex.search(proc.log())
                if match:
                    return match
                raise AssertionError(
                    f"{proc.name} exited ({proc.popen.returncode}) before /{pattern}/:\n"
                    + proc.log()[-3000:]
                )
            time.sleep(0.2)
        raise AssertionError(f"{proc.name}: no /{pattern}/ after {timeout}s:\n{proc.log()[-3000:]}")

    def wait_exit(self, proc: Proc, timeout: float) -> int:
        try:
            return proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"{proc.name} still running after {timeout}s:\n{proc.log()[-3000:]}"
            ) from exc


def wait_port(port: int, timeout: float = 30.0, proc: Proc | None = None) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections (early failure if ``proc`` exits)."""
    processes.wait_port(port, timeout=timeout, proc=proc.popen if proc else None,
                        log=proc.log if proc else None)


# ---------------------------------------------------------------- flwr CLI


def flwr(env: dict[str, str], *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "flwr"), *args], cwd=REPO_ROOT, env=env, capture_output=True,
        text=True, timeout=timeout,
    )


def submit_run(env: dict[str, str], app: Path, connection: str, run_config: str = "") -> int:
    """``flwr run APP CONNECTION --format json``; returns the run id."""
    args = ["run", str(app), connection, "--format", "json"]
    if run_config:
        args += ["--run-config", run_config]
    done = flwr(env, *args, timeout=120)
    text = done.stdout
    try:
        payload = json.loads(text[text.index("{"):])
    except ValueError as exc:
        raise AssertionError(f"flwr run gave no JSON:\n{done.stdout}\n{done.stderr}") from exc
    assert payload.get("success"), f"flwr run failed: {payload}\n{done.stderr}"
    return int(payload["run-id"])


def run_status(env: dict[str, str], connection: str, run_id: int) -> dict:
    done = flwr(env, "ls", connection, "--run-id", str(run_id), "--format", "json")
    text = done.stdout
    payload = json.loads(text[text.index("{"):])
    return payload["runs"][0]


def wait_run(env: dict[str, str], connection: str, run_id: int, timeout: float) -> dict:
    """Wait until the run is finished; return its `flwr ls` record.

    `flwr log --stream` ends when the run does, so it is the wait (polling `flwr ls` would start
    a Python process every few seconds, CPU taken from the run under test); `flwr ls` confirms.
    """
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        try:
            subprocess.run([str(VENV_BIN / "flwr"), "log", str(run_id), connection, "--stream"],
                           cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=max(1.0, min(120.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            pass
        status = run_status(env, connection, run_id)
        if status["status"].startswith("finished"):
            return status
        time.sleep(2.0)
    raise AssertionError(f"run {run_id} not finished after {timeout}s: {status}")


def run_log(env: dict[str, str], connection: str, run_id: int) -> str:
    done = flwr(env, "log", str(run_id), connection, "--show")
    return ANSI.sub("", done.stdout + done.stderr)


# ---------------------------------------------------------------- fixtures' building blocks


def make_caches(base: Path, sites: tuple[str, ...], records: int = 16, seed: int | None = None) -> dict[str, Path]:
    """Small SYNTHETIC caches, one per site (built once per pytest session under ``base``);
    seed 100, 101, ... in site order unless ``seed`` is given."""
    caches = {}
    for index, site in enumerate(sites):
        out = base / site
        if not (out / "manifest.json").is_file():
            subprocess.run(
                [sys.executable, "-m", "shared.data", "prepare", "--site", site, "--source",
                 "synthetic", "--out", str(out), "--records", str(records), "--seed",
                 str(100 + index if seed is None else seed)],
                cwd=REPO_ROOT, check=True, capture_output=True, timeout=300,
            )
        caches[site] = out
    return caches


def make_certs(out: Path, sites: tuple[str, ...]) -> Path:
    """The coordinator's deploy/make-certs.sh into ``out``, and each site's own key pair from
    deploy/make-site-key.sh into ``out/sites`` (as if made at the site; once per session)."""
    if not (out / "superlink.crt").is_file():
        subprocess.run(["bash", str(REPO_ROOT / "deploy" / "make-certs.sh"), "--out", str(out)],
                       check=True, capture_output=True, timeout=60)
    for site in sites:
        if not (out / "sites" / f"{site}.key").is_file():
            subprocess.run(["bash", str(REPO_ROOT / "deploy" / "make-site-key.sh"), site, "--out",
                            str(out / "sites")], check=True, capture_output=True, timeout=60)
    return out


def installed_version_env(base: Path, version: str) -> dict[str, str]:
    """Environment entries that make ``fed-ecg`` look installed at ``version`` to every Python
    process started with them (a distribution's metadata found first on ``PYTHONPATH``), as on a
    site that installed another release: the code is this checkout's, the version it reports is
    not."""
    dist = base / f"fed_ecg-{version}.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fed-ecg\nVersion: {version}\n")
    return {"PYTHONPATH": os.pathsep.join([str(base), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


@dataclass
class Federation:
    """One SuperLink (via `python -m server`) plus sites (via `python -m client`)."""

    processes: Processes
    state_dir: Path
    certs: Path | None
    port: int = 0
    server: Proc | None = None
    connection: str = "fed"

    def start_server(self, *, tls: bool = True, node_auth: bool = True) -> Proc:
        self.port = self.port or free_port()
        argv = [sys.executable, "-m", "server", "--port", str(self.port),
                "--state-dir", str(self.state_dir)]
        if tls:
            argv += ["--certs", str(self.certs)]
            if not node_auth:
                argv.append("--no-node-auth")
        else:
            argv.append("--insecure")
        self.server = self.processes.start(f"superlink-{len(self.processes.procs)}", argv)
        wait_port(self.port, timeout=60, proc=self.server)
        conn = [sys.executable, "-m", "server", "connection", self.connection, "--address",
                f"127.0.0.1:{self.port}"]
        conn += ["--root-certificates", str(self.certs / "ca.crt")] if tls else ["--insecure"]
        subprocess.run(conn, cwd=REPO_ROOT, env=self.processes.env, check=True,
                       capture_output=True, timeout=60)
        return self.server

    def start_site(self, site: str, data: Path, *, tls: bool = True, key: Path | None = None,
                   ca: Path | None = None, extra: tuple[str, ...] = (),
                   name: str | None = None, env: dict[str, str] | None = None) -> Proc:
        argv = [sys.executable, "-m", "client", "--site", site, "--superlink",
                f"127.0.0.1:{self.port}", "--data", str(data), *extra]
        if tls:
            argv += ["--root-certificates", str(ca or self.certs / "ca.crt")]
        else:
            argv.append("--insecure")
        if key is not None:
            argv += ["--auth-key", str(key)]
        return self.processes.start(name or f"site-{site}", argv,
                                    env={**self.processes.env, **env} if env else None)

    def register(self, public_key: Path, name: str | None = None) -> subprocess.CompletedProcess:
        """`flwr supernode register KEY.pub CONNECTION [--name SITE]`: the node's site binding."""
        done = flwr(self.processes.env, "supernode", "register", str(public_key),
                    self.connection, "--format", "json", *(["--name", name] if name else []))
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    def register_all(self, public_keys: list[Path], names: list[str] | None = None) -> None:
        """Several `flwr supernode register` at once (each CLI call costs seconds of start-up);
        ``names``: the site each key is registered under (``--name``)."""
        names = names or [None] * len(public_keys)
        procs = [subprocess.Popen(
            [str(VENV_BIN / "flwr"), "supernode", "register", str(key), self.connection,
             "--format", "json", *(["--name", name] if name else [])],
            cwd=REPO_ROOT, env=self.processes.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True) for key, name in zip(public_keys, names)]
        for key, proc in zip(public_keys, procs):
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0 and '"success": true' in out, f"{key}: {out}"

    def online_nodes(self) -> int:
        done = flwr(self.processes.env, "supernode", "list", self.connection, "--format", "json")
        text = done.stdout
        nodes = json.loads(text[text.index("{"):]).get("nodes", [])
        return sum(1 for n in nodes if n.get("status") == "online")

    def wait_online(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.online_nodes() >= n:
                return
            time.sleep(0.5)
        logs = "\n".join(p.name + ":\n" + p.log()[-1500:] for p in self.processes.procs)
        raise AssertionError(f"fewer than {n} nodes online after {timeout}s\n{logs}")
