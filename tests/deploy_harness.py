"""Real-process harness for the deployment tests: start SuperLinks and SuperNodes on 127.0.0.1,
wait for them, and stop every process by PID (its whole process tree), also when a test fails.

Each process runs in its own session; stopping it signals the session's process group and every
descendant found in /proc (the SuperLink starts its SuperExec in a new session of its own).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces and parentheses
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    tree = _children_map()
    out, todo = [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


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
    """Every process a test starts; ``stop_all()`` runs on fixture teardown."""

    log_dir: Path
    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        handle = log_path.open("ab")
        popen = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env or self.env, stdout=handle, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        handle.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        """Kill ``proc`` and its whole tree at once (a crash, not a clean stop)."""
        for pid in [proc.pid, *descendants(proc.pid)]:
            _signal(pid, sig)
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        proc.popen.wait(timeout=10)

    def stop(self, proc: Proc, grace: float = 5.0) -> None:
        """SIGTERM the tree, then SIGKILL whatever is left after ``grace`` seconds."""
        tree = [proc.pid, *descendants(proc.pid)]
        for pid in tree:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(pid_alive(p) for p in tree):
            if proc.popen.poll() is None:
                time.sleep(0.1)
            else:
                time.sleep(0.1)
                tree = [p for p in tree if pid_alive(p)] + descendants(proc.pid)
        for pid in tree + descendants(proc.pid):
            _signal(pid, signal.SIGKILL)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

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


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


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
    """Poll until the run is finished; return its `flwr ls` record."""
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        status = run_status(env, connection, run_id)
        if status["status"].startswith("finished"):
            return status
        time.sleep(3.0)  # each `flwr ls` is a Python start-up: poll gently
    raise AssertionError(f"run {run_id} not finished after {timeout}s: {status}")


def run_log(env: dict[str, str], connection: str, run_id: int) -> str:
    done = flwr(env, "log", str(run_id), connection, "--show")
    return ANSI.sub("", done.stdout + done.stderr)


# ---------------------------------------------------------------- fixtures' building blocks


def make_caches(base: Path, sites: tuple[str, ...], records: int = 16) -> dict[str, Path]:
    """Small SYNTHETIC caches, one per site (built once per pytest session under ``base``)."""
    caches = {}
    for index, site in enumerate(sites):
        out = base / site
        if not (out / "manifest.json").is_file():
            subprocess.run(
                [sys.executable, "-m", "shared.data", "prepare", "--site", site, "--source",
                 "synthetic", "--out", str(out), "--records", str(records), "--seed",
                 str(100 + index)],
                cwd=REPO_ROOT, check=True, capture_output=True, timeout=300,
            )
        caches[site] = out
    return caches


def make_certs(out: Path, sites: tuple[str, ...]) -> Path:
    """Run deploy/make-certs.sh into ``out`` (once per session)."""
    if not (out / "superlink.crt").is_file():
        subprocess.run(
            ["bash", str(REPO_ROOT / "deploy" / "make-certs.sh"), "--out", str(out), "--sites",
             " ".join(sites)],
            check=True, capture_output=True, timeout=60,
        )
    return out


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
        wait_port(self.port, timeout=60)
        conn = [sys.executable, "-m", "server", "connection", self.connection, "--address",
                f"127.0.0.1:{self.port}"]
        conn += ["--root-certificates", str(self.certs / "ca.crt")] if tls else ["--insecure"]
        subprocess.run(conn, cwd=REPO_ROOT, env=self.processes.env, check=True,
                       capture_output=True, timeout=60)
        return self.server

    def start_site(self, site: str, data: Path, *, tls: bool = True, key: Path | None = None,
                   ca: Path | None = None, extra: tuple[str, ...] = (),
                   name: str | None = None) -> Proc:
        argv = [sys.executable, "-m", "client", "--site", site, "--superlink",
                f"127.0.0.1:{self.port}", "--data", str(data), *extra]
        if tls:
            argv += ["--root-certificates", str(ca or self.certs / "ca.crt")]
        else:
            argv.append("--insecure")
        if key is not None:
            argv += ["--auth-key", str(key)]
        return self.processes.start(name or f"site-{site}", argv)

    def register(self, public_key: Path) -> subprocess.CompletedProcess:
        done = flwr(self.processes.env, "supernode", "register", str(public_key),
                    self.connection, "--format", "json")
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    def register_all(self, public_keys: list[Path]) -> None:
        """Several `flwr supernode register` at once (each CLI call costs seconds of start-up)."""
        procs = [subprocess.Popen(
            [str(VENV_BIN / "flwr"), "supernode", "register", str(key), self.connection,
             "--format", "json"],
            cwd=REPO_ROOT, env=self.processes.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True) for key in public_keys]
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
