"""shared.processes with real processes: stopping whole trees, waiting for ports, and the guard
that makes a command's tree die with the process that started it, even when that one is killed
with SIGKILL; then the real case, `python -m client` / `python -m server` SIGKILLed alone.

Every test stops what it started, also when it fails (fixtures with ``finally``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from deploy_harness import REPO_ROOT, Federation, Processes, flwr_env, make_caches
from shared import processes
from shared.processes import WaitError, alive, descendants, free_port

# A process tree: this child spawns a grandchild in a session of its own (as Flower's helpers
# do) which ignores SIGTERM when asked to ("stubborn"), and a daemon by double fork (re-parented
# away from the child at once); it writes their PIDs to OUT and sleeps.
TREE = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    out, mode = sys.argv[1], sys.argv[2]
    body = "import signal, time\\n"
    if mode == "stubborn":
        body += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
    body += "time.sleep(300)\\n"
    grandchild = subprocess.Popen([sys.executable, "-c", body], start_new_session=True)
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(w, str(os.getpid()).encode())
            time.sleep(300)
        os._exit(0)
    os.waitpid(middle, 0)
    os.close(w)
    daemon = int(os.read(r, 32))
    with open(out + ".tmp", "w") as fh:
        fh.write(f"{grandchild.pid} {daemon}")
    os.replace(out + ".tmp", out)
    time.sleep(300)
""")


def python(*code: str) -> list[str]:
    return [sys.executable, "-c", *code]


def read_pids(path: Path, timeout: float = 20.0) -> list[int]:
    processes.wait_until(path.is_file, timeout=timeout, what=f"{path} to be written")
    return [int(p) for p in path.read_text().split()]


def session(pid: int) -> int:
    return os.getsid(pid)


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The PIDs still alive after ``timeout`` seconds (empty: all gone in time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def describe(pids: list[int]) -> str:
    lines = []
    for p in pids:
        try:
            lines.append(f"{p}: " + Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")
                         .decode(errors="replace")[:160])
        except OSError:
            lines.append(f"{p}: gone")
    return "\n".join(lines)


@pytest.fixture
def started():
    """Processes a test starts: every one of them is stopped, trees included, at teardown."""
    procs: list[subprocess.Popen] = []
    extra: list[int] = []
    try:
        yield procs, extra
    finally:
        for proc in reversed(procs):
            processes.stop(proc, grace=1.0)
        for pid in extra:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- stop


@pytest.mark.parametrize("mode", ["cooperative", "stubborn"])
def test_stop_ends_the_whole_tree_within_the_grace_period_and_twice_is_fine(tmp_path, started, mode):
    procs, extra = started
    proc = processes.start([sys.executable, "-c", TREE, str(tmp_path / "pids"), mode],
                           die_with_parent=False)
    procs.append(proc)
    grandchild, daemon = read_pids(tmp_path / "pids")
    extra += [grandchild, daemon]  # the daemon is not below the child: stop() cannot see it
    tree = [proc.pid, *descendants(proc.pid)]
    assert grandchild in tree and session(grandchild) != session(proc.pid)

    grace = 1.5
    t0 = time.monotonic()
    killed = processes.stop(proc, grace=grace)
    elapsed = time.monotonic() - t0
    assert not [p for p in tree if alive(p)], describe(tree)
    assert proc.returncode is not None
    if mode == "stubborn":  # SIGTERM ignored: SIGKILL once the grace period is over
        assert killed == [grandchild] and grace <= elapsed < grace + 3.0, (killed, elapsed)
    else:  # everyone left at SIGTERM: no waiting for the grace period
        assert killed == [] and elapsed < grace, (killed, elapsed)
    assert processes.stop(proc, grace=grace) == []  # again: nothing to do, no error
    assert processes.stop(proc.pid, grace=grace) == []  # a dead PID too
    os.kill(daemon, signal.SIGKILL)


def test_signal_tree_kills_a_tree_at_once(tmp_path, started):
    procs, extra = started
    proc = processes.start([sys.executable, "-c", TREE, str(tmp_path / "pids"), "stubborn"],
                           die_with_parent=False)
    procs.append(proc)
    grandchild, daemon = read_pids(tmp_path / "pids")
    extra.append(daemon)
    tree = processes.signal_tree(proc.pid, signal.SIGKILL)
    assert grandchild in tree
    assert wait_gone(tree, 5.0) == []


# ---------------------------------------------------------------- waiting


def test_wait_port_returns_when_the_port_opens(started):
    procs, _ = started
    port = free_port()
    proc = processes.start(python(
        "import socket, time; time.sleep(0.5); s = socket.socket(); "
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(60)"), die_with_parent=False)
    procs.append(proc)
    t0 = time.monotonic()
    processes.wait_port(port, timeout=30, proc=proc)
    assert time.monotonic() - t0 < 30


def test_wait_fails_at_the_deadline_naming_what_and_how_long(tmp_path, started):
    procs, _ = started
    port = free_port()
    log = tmp_path / "server.log"
    proc = processes.start(python("print('listening soon, promise', flush=True); "
                                  "import time; time.sleep(60)"),
                           log_file=log, die_with_parent=False)
    procs.append(proc)
    processes.wait_until(lambda: log.stat().st_size > 0, timeout=20, what="the first log line")
    t0 = time.monotonic()
    with pytest.raises(WaitError) as err:
        processes.wait_port(port, timeout=0.8, proc=proc)
    assert 0.8 <= time.monotonic() - t0 < 5.0
    message = str(err.value)
    assert f"timed out after 0.8 s waiting for 127.0.0.1:{port} to accept connections" in message
    assert "still running" in message and "listening soon, promise" in message
    # a health check (any callable) the same way, without a process
    with pytest.raises(WaitError, match=r"timed out after 0.3 s waiting for the health check"):
        processes.wait_until(lambda: False, timeout=0.3, what="the health check")


def test_wait_fails_early_with_the_log_tail_when_the_process_exits(tmp_path, started):
    procs, _ = started
    port = free_port()
    proc = processes.start(python("import sys; print('line one'); "
                                  "print('error: port already in use', flush=True); sys.exit(3)"),
                           log_file=tmp_path / "dies.log")
    procs.append(proc)
    t0 = time.monotonic()
    with pytest.raises(WaitError) as err:
        processes.wait_port(port, timeout=60, proc=proc)
    assert time.monotonic() - t0 < 20  # long before the deadline
    message = str(err.value)
    assert f"(pid {proc.pid}) exited with code 3" in message, message
    assert f"while waiting for 127.0.0.1:{port}" in message
    assert message.rstrip().endswith("line one\nerror: port already in use"), message


# ---------------------------------------------------------------- the guard


def test_the_guard_passes_exit_codes_and_signals_through(started):
    assert processes.start(["sh", "-c", "exit 3"]).wait(timeout=20) == 3
    assert processes.start(["sh", "-c", "kill -TERM $$"]).wait(timeout=20) == -signal.SIGTERM
    with pytest.raises(FileNotFoundError):
        processes.start(["no-such-command-fed-ecg"])
    # SIGTERM to the guard reaches the command, whose status comes back
    procs, _ = started
    proc = processes.start(python("import time; time.sleep(60)"))
    procs.append(proc)
    processes.wait_until(lambda: len(descendants(proc.pid)) == 1, timeout=20, what="the command")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == -signal.SIGTERM


def test_started_from_a_thread_that_ends_the_command_keeps_running(started):
    """PDEATHSIG fires when the forking *thread* exits: the guard must not take it for death."""
    procs, _ = started
    box: list[subprocess.Popen] = []
    worker = threading.Thread(target=lambda: box.append(processes.start(python("import time; time.sleep(60)"))))
    worker.start()
    worker.join()
    procs.extend(box)
    time.sleep(1.0)
    assert box[0].poll() is None and len(descendants(box[0].pid)) == 1


PARENT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from shared import processes
    proc = processes.start([sys.executable, "-c", sys.argv[2], sys.argv[3], "stubborn"], grace=1.0)
    print(proc.pid, flush=True)
    time.sleep(300)
""")


def test_a_tree_dies_with_its_sigkilled_parent(tmp_path, started):
    procs, extra = started
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(REPO_ROOT), TREE,
                               str(tmp_path / "pids")], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    procs.append(parent)
    grandchild, daemon = read_pids(tmp_path / "pids")
    extra += [grandchild, daemon]
    tree = descendants(parent.pid)
    # guard, command, the SIGTERM-ignoring grandchild in its own session, and the double-forked
    # daemon, which the guard (a subreaper) adopted
    assert {grandchild, daemon} <= set(tree) and len(tree) == 4, describe(tree)
    os.kill(parent.pid, signal.SIGKILL)
    t0 = time.monotonic()
    parent.wait(timeout=10)
    left = wait_gone(tree, 8.0)
    assert left == [], f"still alive {time.monotonic() - t0:.1f} s after the parent's SIGKILL:\n" + describe(left)


# ---------------------------------------------------------------- the real case


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_caches(tmp_path_factory.getbasetemp() / "deploy-caches", ("ptb",), records=12)["ptb"]


@pytest.fixture
def federation(tmp_path):
    """A plain-text local SuperLink and sites, started WITHOUT the harness's guard: the tests
    kill `python -m client` / `python -m server` themselves and check what their own guard does."""
    procs = Processes(log_dir=tmp_path, env=flwr_env(tmp_path / "flwr-home"), die_with_parent=False)
    fed = Federation(procs, state_dir=tmp_path / "state", certs=None)
    recorded: list[int] = []
    try:
        yield fed, recorded
    finally:
        procs.stop_all()
        for pid in recorded:  # whatever a failed test left behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def names(pids: list[int]) -> list[str]:
    found = []
    for p in pids:
        try:
            argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        found += [Path(a.decode()).name for a in argv[:3] if a]
    return found


def online_site(federation, cache):
    """A SuperLink and one `python -m client` site, online; the site and its process tree."""
    fed, recorded = federation
    fed.start_server(tls=False)
    site = fed.start_site("ptb", cache, tls=False)
    fed.wait_online(1, timeout=90)
    tree = descendants(site.pid)
    recorded += tree
    return site, tree


@pytest.mark.slow
def test_sigkilled_client_wrapper_leaves_nothing_behind(federation, cache):
    site, tree = online_site(federation, cache)
    assert {"flower-supernode", "flower-superexec"} <= set(names(tree)), describe(tree)
    os.kill(site.pid, signal.SIGKILL)  # the wrapper alone, not its group
    t0 = time.monotonic()
    left = wait_gone(tree, 10.0)
    assert left == [], f"alive {time.monotonic() - t0:.1f} s after SIGKILL of python -m client:\n" + describe(left)


@pytest.mark.slow
def test_sigterm_to_the_client_wrapper_still_stops_everything(federation, cache):
    site, tree = online_site(federation, cache)
    os.kill(site.pid, signal.SIGTERM)
    rc = site.popen.wait(timeout=30)
    assert rc in (0, 128 + signal.SIGTERM), (rc, site.log()[-2000:])
    assert wait_gone(tree, 10.0) == [], describe(tree)


@pytest.mark.slow
def test_sigkilled_server_wrapper_leaves_nothing_behind(federation):
    fed, recorded = federation
    server = fed.start_server(tls=False)
    processes.wait_until(lambda: "flower-superexec" in names(descendants(server.pid)), timeout=60,
                         what="the SuperLink's flower-superexec", proc=server.popen, log=server.log)
    tree = descendants(server.pid)
    recorded += tree
    assert {"flower-superlink", "flower-superexec"} <= set(names(tree)), describe(tree)
    os.kill(server.pid, signal.SIGKILL)
    t0 = time.monotonic()
    left = wait_gone(tree, 10.0)
    assert left == [], f"alive {time.monotonic() - t0:.1f} s after SIGKILL of python -m server:\n" + describe(left)
    with socket.socket() as sock:  # and the port is free again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", fed.port))
