"""Process control for the project's commands, benchmarks and tests (standard library only).

One place for what ``python -m server``, ``python -m client``, ``simulations/federation.py`` and
the deployment tests need: start a process in a session of its own, wait for its port or health
check, stop it together with everything it spawned, and make sure that nothing it spawned
outlives the Python process that started it, even when that process is killed with SIGKILL.

API
---
``start(argv, *, env, cwd, stdin, stdout, stderr, log_file, new_session, die_with_parent,
grace, **popen_kwargs) -> Process``
    A :class:`subprocess.Popen` (subclass :class:`Process`) in its own session (or process
    group). With ``die_with_parent`` (the default) the command runs under a *guard*, see below.
``wait_port(port, host, *, timeout, proc, log)`` / ``wait_until(check, *, timeout, what, proc, log)``
    Wait for a TCP port to accept connections, or for ``check()`` to return true. Raises
    :class:`WaitError` naming what was awaited and for how long; early, when ``proc`` exits
    first; both messages end with the last lines of the process's log.
``stop(proc_or_pid, grace=5.0)``
    SIGTERM the process and every descendant (collected from ``/proc`` *before* signalling:
    Flower's helpers start sessions of their own, so a process-group kill misses them), then
    SIGKILL whatever is left after ``grace`` seconds. Safe to call twice, and on a dead process.
``signal_tree(pid, sig)``: one signal to a process and all its descendants at once (a crash).
``free_port()``, ``descendants(pid)``, ``alive(pid)`` (zombies count as dead), ``tree_rss_mb(pid)``.

Dying with the parent
---------------------
``PR_SET_PDEATHSIG`` alone is not enough. It reaches only the direct child: measured with
Flower 1.42, a ``flower-supernode`` / ``flower-superlink`` that gets SIGTERM or SIGKILL takes its
``flower-superexec`` with it (Flower's own parent monitor, a 0.2 s poll that raises SIGINT), but
after a SIGKILLed ``flower-superlink`` an ``flwr-serverapp`` in the middle of a run kept running
for 5 s in one try and for more than 15 s in another (its exit handler retries the dead
SuperLink), re-parented to init where nobody can find it any more. So with ``die_with_parent``
the direct child is a small guard, this file run as a script
(``python -I shared/processes.py --parent PID --grace S [--pdeathsig] -- COMMAND...``), which

* makes itself a *child subreaper* (``PR_SET_CHILD_SUBREAPER``, Linux): every process below it
  whose parent dies is re-parented to the guard instead of init, so the whole tree stays findable
  under it, whatever sessions its members start;
* notices the death of its parent through ``PR_SET_PDEATHSIG`` (SIGTERM, Linux; requested only
  when ``start`` runs in the main thread, because the kernel fires it when the *thread* that
  forked exits) and through polling ``getppid()`` every 0.1 s (every POSIX system, any thread);
  then it stops the whole tree (SIGTERM, SIGKILL after ``grace``) and exits;
* starts the real command with ``PR_SET_PDEATHSIG(SIGTERM)`` of its own (should the guard itself
  be SIGKILLed), forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to it, reaps every adopted orphan (Flower's
  helpers poll their parent's PID with ``kill(pid, 0)``, which a zombie would pass), stops what the
  command leaves behind when it ends, and exits with the command's status (re-raising the signal
  that killed it, so ``Popen.returncode`` is negative as without the guard).

On systems without ``prctl`` (macOS) the guard still stops the command's tree when its parent
dies (``getppid()`` polling), but a process orphaned *before* that moment (re-parented to
launchd) is out of reach. On Windows ``die_with_parent`` is ignored (a plain ``Popen``).
The guard costs one small Python process (about 15 MB RSS, under 0.2 s to start).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = [
    "Process", "WaitError", "start", "wait_port", "wait_until", "stop", "signal_tree",
    "free_port", "descendants", "alive", "tree_rss_mb", "log_tail",
]

GUARD_SCRIPT = str(Path(__file__).resolve())
POSIX = os.name == "posix"
LINUX = sys.platform.startswith("linux")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
PR_SET_CHILD_SUBREAPER = 36
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT) if POSIX else ()
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_POLL = 0.1


class WaitError(RuntimeError):
    """A port, health check or log line did not come in time, or the process died first."""


class Process(subprocess.Popen):
    """``subprocess.Popen`` that also remembers the real command, its log file and its guard.

    ``pid`` is the direct child: the guard when ``guarded`` (the command then runs below it).
    """

    command: list[str]
    log_file: Path | None
    guarded: bool

    @property
    def name(self) -> str:
        return Path(self.command[0]).name if self.command else "process"


# ---------------------------------------------------------------- /proc helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (bind to port 0 and ask the OS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name: [state, ppid, pgrp, session, ...]."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode(errors="replace")
    except OSError:
        return None
    # pid (comm) state ppid ...: comm may hold spaces and parentheses
    return text.rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as dead."""
    if Path("/proc/self/stat").exists():
        fields = _stat(pid)
        return fields is not None and fields[0] not in ("Z", "X", "x")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # no /proc: ask ps whether it is a zombie
        state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True,
                               text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return True
    return bool(state) and not state.startswith("Z")


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): tells a PID's reuse apart."""
    fields = _stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if (proc / "self" / "stat").exists():
        for entry in os.listdir(proc):
            if entry.isdigit():
                fields = _stat(int(entry))
                if fields is not None:
                    children.setdefault(int(fields[1]), []).append(int(entry))
        return children
    try:
        out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return children
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            children.setdefault(int(parts[1]), []).append(int(parts[0]))
    return children


def _below(roots: Iterable[int], children: Mapping[int, list[int]]) -> list[int]:
    found: list[int] = []
    seen = set(roots)
    todo = list(seen)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in seen:
                seen.add(child)
                found.append(child)
                todo.append(child)
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...), whatever their session."""
    return _below([pid], _children_map())


def tree_rss_mb(pid: int) -> float:
    """Summed resident memory of ``pid`` and its descendants, in MiB (0 when gone)."""
    total_kb = 0
    for p in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total_kb += int(line.split()[1])
                        break
        except (OSError, ValueError):
            continue
    return total_kb / 1024.0


def log_tail(log: str | Path | Callable[[], str] | None, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file (or of the text a callable returns), ANSI-free."""
    if log is None:
        return ""
    if callable(log):
        try:
            text = log()
        except Exception as exc:  # noqa: BLE001 - a diagnostic must not hide the real error
            return f"(log unavailable: {exc})"
    else:
        try:
            with open(log, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 16384))
                text = fh.read().decode(errors="replace")
        except OSError as exc:
            return f"(log {log} unreadable: {exc.strerror})"
    return "\n".join(_ANSI.sub("", text).rstrip().splitlines()[-lines:])


# ---------------------------------------------------------------- signalling and stopping


def _signal(pid: int, sig: int, started: str | None = None) -> None:
    """``kill(pid, sig)``, ignoring gone processes, and never a PID reused since ``started``."""
    if started is not None and _start_time(pid) != started:
        return
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def signal_tree(pid: int, sig: int) -> list[int]:
    """Send ``sig`` to ``pid`` and every descendant at once (collected first); returns the PIDs."""
    tree = [pid, *descendants(pid)]
    for p in tree:
        _signal(p, sig)
    return tree


def stop(target: subprocess.Popen | int, grace: float = 5.0) -> list[int]:
    """Stop a process and its whole tree: SIGTERM all, then SIGKILL what is left after ``grace``.

    The tree is collected from ``/proc`` before anything is signalled, and processes that
    appear below it meanwhile are added. ``target`` is a ``Popen`` (reaped at the end) or a
    PID. Safe to call twice and on a dead process (a reaped ``Popen`` is left alone: its PID
    may belong to someone else by now). Returns the PIDs that needed SIGKILL.
    """
    popen = target if isinstance(target, subprocess.Popen) else None
    pid = popen.pid if popen is not None else int(target)
    if popen is not None and popen.returncode is not None:
        return []
    if not alive(pid):
        if popen is not None:
            popen.poll()
        return []
    killed = _stop_tree(pid, grace, include_root=True, reap=popen.poll if popen is not None else None)
    if popen is not None:
        try:
            popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    return killed


def _stop_tree(root: int, grace: float, *, include_root: bool,
               reap: Callable[[], Any] | None = None) -> list[int]:
    """SIGTERM ``root``'s tree (``root`` itself only if ``include_root``), SIGKILL after ``grace``.

    ``reap`` runs at every poll: the guard reaps its adopted orphans there, since Flower's
    helpers watch their parent with ``kill(pid, 0)``, which a zombie passes.
    """
    tracked: dict[int, str | None] = {}

    def track(pids: Iterable[int], sig: int) -> None:
        for p in pids:
            if p not in tracked and (include_root or p != root):
                tracked[p] = _start_time(p)
                _signal(p, sig, tracked[p])

    track([root, *descendants(root)], signal.SIGTERM)
    deadline = time.monotonic() + max(0.0, grace)
    while True:
        if reap is not None:
            reap()
        live = [p for p in tracked if alive(p)]
        if not live or time.monotonic() >= deadline:
            break
        # spawned since, or re-parented to root (a subreaper) when their parent died
        track(_below([root, *live], _children_map()), signal.SIGTERM)
        time.sleep(_POLL)
    killed: list[int] = []
    if live:
        track(_below([root, *live], _children_map()), signal.SIGKILL)
        for p, started in tracked.items():
            if alive(p):
                _signal(p, signal.SIGKILL, started)
                killed.append(p)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(alive(p) for p in killed):
            if reap is not None:
                reap()
            time.sleep(_POLL / 2)
    return killed


# ---------------------------------------------------------------- waiting


def wait_until(check: Callable[[], bool], *, timeout: float, what: str,
               proc: subprocess.Popen | None = None,
               log: str | Path | Callable[[], str] | None = None,
               interval: float = 0.2) -> None:
    """Poll ``check()`` until it returns true; :class:`WaitError` after ``timeout`` seconds, or
    as soon as ``proc`` exits. ``what`` names the awaited thing in the message; ``log`` (a file
    or a callable returning text; default: ``proc.log_file``) gives the message's last lines."""
    if log is None and proc is not None:
        log = getattr(proc, "log_file", None)
    label = ""
    if proc is not None:
        label = f"{getattr(proc, 'name', None) or Path(str(proc.args[0])).name} (pid {proc.pid})"
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            if check():
                return
            raise WaitError(_with_tail(
                f"{label} exited with code {proc.returncode} after "
                f"{time.monotonic() - t0:.1f} s while waiting for {what}", log))
        if time.monotonic() >= deadline:
            still = f"; {label} is still running" if proc is not None else ""
            raise WaitError(_with_tail(f"timed out after {timeout:g} s waiting for {what}{still}", log))
        time.sleep(interval)


def _with_tail(message: str, log: str | Path | Callable[[], str] | None) -> str:
    tail = log_tail(log)
    if not tail:
        return message
    where = f" ({log})" if isinstance(log, (str, Path)) else ""
    return f"{message}; last lines of its log{where}:\n{tail}"


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_port(port: int, host: str = "127.0.0.1", *, timeout: float = 30.0,
              proc: subprocess.Popen | None = None,
              log: str | Path | Callable[[], str] | None = None) -> None:
    """Wait until ``host:port`` accepts TCP connections (see :func:`wait_until`)."""
    wait_until(lambda: port_open(port, host), timeout=timeout,
               what=f"{host}:{port} to accept connections", proc=proc, log=log)


# ---------------------------------------------------------------- starting


def start(argv: list[str], *, env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
          stdin: Any = None, stdout: Any = None, stderr: Any = None,
          log_file: str | Path | None = None, new_session: bool = True,
          die_with_parent: bool = True, grace: float = 5.0, **popen_kwargs: Any) -> Process:
    """Start ``argv`` in a session of its own (``new_session=False``: a process group of its own
    in the caller's session).

    ``log_file``: stdout and stderr appended to this file (unless ``stdout``/``stderr`` say
    otherwise). ``die_with_parent``: run it under the guard described in the module docstring,
    so that it and everything it spawns is stopped (SIGTERM, SIGKILL after ``grace`` seconds)
    when the calling process dies, however it dies. Other keywords go to ``Popen`` (``text``,
    ``bufsize``, ``pass_fds``, ...). The executable is resolved here, on ``env``'s PATH: a missing one raises
    ``FileNotFoundError`` in the caller, as a plain ``Popen`` would.
    """
    command = [str(a) for a in argv]
    env = dict(os.environ if env is None else env)
    guarded = die_with_parent and POSIX
    if guarded:
        exe = _resolve(command[0], env, cwd)
        if threading.current_thread() is not threading.main_thread():
            pdeathsig = []  # the kernel would fire it when this thread ends: rely on polling
        else:
            pdeathsig = ["--pdeathsig"]
        fds = [str(int(fd)) for fd in popen_kwargs.get("pass_fds", ())]
        pass_fds = ["--pass-fds", ",".join(fds)] if fds else []
        real = [sys.executable, "-I", GUARD_SCRIPT, "--parent", str(os.getpid()),
                "--grace", f"{grace:g}", *pdeathsig, *pass_fds, "--", exe, *command[1:]]
    else:
        real = command
    if POSIX:
        if new_session:
            popen_kwargs["start_new_session"] = True
        else:
            popen_kwargs["process_group"] = 0
    handle: IO[bytes] | None = None
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handle = open(log_file, "ab")  # noqa: SIM115 - closed below, the child keeps its copy
        stdout = handle if stdout is None else stdout
        stderr = subprocess.STDOUT if stderr is None else stderr
    try:
        proc = Process(real, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr,
                       **popen_kwargs)
    finally:
        if handle is not None:
            handle.close()
    proc.command = command
    proc.log_file = Path(log_file) if log_file is not None else None
    proc.guarded = guarded
    return proc


def _resolve(exe: str, env: Mapping[str, str], cwd: str | Path | None) -> str:
    if os.sep in exe or (os.altsep and os.altsep in exe):
        path = Path(exe) if Path(exe).is_absolute() or cwd is None else Path(cwd) / exe
        if not path.is_file():
            raise FileNotFoundError(2, "No such file or directory", exe)
        return str(path.resolve()) if cwd is not None else exe
    import shutil

    found = shutil.which(exe, path=env.get("PATH", os.defpath))
    if found is None:
        raise FileNotFoundError(2, f"not found on PATH ({env.get('PATH', '')})", exe)
    return found


# ---------------------------------------------------------------- the guard (runs as a script)


_LIBC: Any = None


def _prctl(option: int, value: int) -> bool:
    """``prctl(option, value)`` through libc; False where there is no prctl (not Linux)."""
    global _LIBC
    if not LINUX:
        return False
    import ctypes

    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        return _LIBC.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                           ctypes.c_ulong(0)) == 0
    except (OSError, AttributeError):
        return False


def _guard(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m shared.processes",
                                     description="Run COMMAND; stop its whole tree when this "
                                     "process's parent dies (see shared/processes.py).")
    parser.add_argument("--parent", type=int, default=os.getppid(),
                        help="the PID whose death stops COMMAND's tree (default: our parent)")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="seconds between SIGTERM and SIGKILL when the tree is stopped")
    parser.add_argument("--pdeathsig", action="store_true",
                        help="also ask the kernel for SIGTERM when the parent dies (Linux)")
    parser.add_argument("--pass-fds", default="", help="file descriptors COMMAND inherits (1,2,...)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")

    pending: list[int] = []

    def remember(signum: int, _frame: Any) -> None:
        pending.append(signum)

    for signum in FORWARDED:
        signal.signal(signum, remember)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    if args.pdeathsig:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != args.parent:
        return 1  # the parent died before we could watch it: start nothing

    guard = os.getpid()

    def child_setup() -> None:  # the guard is single-threaded: safe between fork and exec
        if _prctl(PR_SET_PDEATHSIG, signal.SIGTERM) and os.getppid() != guard:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        child = subprocess.Popen(command, preexec_fn=child_setup if LINUX else None,
                                 pass_fds=[int(fd) for fd in args.pass_fds.split(",") if fd])
    except OSError as exc:
        print(f"python -m shared.processes: cannot start {command[0]}: {exc}", file=sys.stderr)
        return 126 if isinstance(exc, PermissionError) else 127
    status: int | None = None

    def reap() -> None:
        """Reap every exited child (the command and any adopted orphan)."""
        nonlocal status
        while True:
            try:
                pid, raw = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == child.pid:
                status = os.waitstatus_to_exitcode(raw)
                child.returncode = status

    orphaned = False
    while status is None:
        reap()
        if status is not None:
            break
        if os.getppid() != args.parent:
            orphaned = True
            break
        while pending:
            sig = pending.pop(0)
            _signal(child.pid, sig)
        time.sleep(_POLL)
    if orphaned:  # our parent is gone: the command and everything below us go too
        _stop_tree(guard, args.grace, include_root=False, reap=reap)
        reap()
        return 128 + signal.SIGTERM
    # The command ended: stop what it left behind (adopted orphans, helpers still running).
    if descendants(guard):
        _stop_tree(guard, args.grace, include_root=False, reap=reap)
    reap()
    assert status is not None
    if status < 0:
        _die_by(-status)
    return status


def _die_by(signum: int) -> None:
    """Exit the way the command did: killed by ``signum`` (no core file)."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass
    try:
        signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
        time.sleep(1.0)
    except (OSError, ValueError):
        pass
    os._exit(128 + signum)


if __name__ == "__main__":
    sys.exit(_guard(sys.argv[1:]))
