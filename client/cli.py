"""`python -m client`: the hospital's command. Validates the site and its data, then runs a
Flower SuperNode for that site (``flower-supernode``) whose node config carries the site name and
the cache location, so the project's ClientApp trains on this site's data.

Only model arrays and metrics leave the machine; the data directory is read by the ClientApp
processes the SuperNode spawns locally.

    python -m client --site mimic --superlink coordinator.example.org:9092 \
        --data /data/mimic-cache --root-certificates ca.crt --auth-key mimic.key
    python -m client --site ptb --superlink 127.0.0.1:9092 --data ./cache/ptb --insecure --dry-run

TLS is the default. Plain text needs an explicit ``--insecure`` (local tests only).
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.fab_guard import interpreter_of, write_shim
from shared import processes
from shared.data.record import SITES

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_CONNECT = 3  # the SuperLink could not be reached or refused this node
EXIT_SUPERNODE = 4  # flower-supernode failed for another reason
PORT_ATTEMPTS = 3  # SuperNode starts, when an automatically chosen runtime port is taken before it binds

# flower-supernode prints this exit code when it gives up connecting (see flwr ref-exit-codes/305).
FLWR_EXIT_CONNECTION_FAILED = 305
# Seconds the SuperNode's processes get between SIGTERM and SIGKILL when they are stopped.
STOP_GRACE = 3.0
# How long a site keeps retrying (with Flower's exponential backoff) while the SuperLink is
# unreachable: a coordinator restart or an overnight outage must not end the site's node.
DEFAULT_MAX_WAIT = 6 * 3600.0


class UsageError(Exception):
    """Bad input from the operator: printed as one line, exit code 2."""


@dataclass(frozen=True)
class SiteData:
    """What the node will serve, read from the prepared cache's manifest."""

    path: Path
    manifest: dict[str, Any]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="Run this hospital's Flower SuperNode for the fed-ecg federation.",
    )
    parser.add_argument("--site", required=True, help=f"this site's name: {', '.join(SITES)}")
    parser.add_argument("--superlink", help="the coordinator's SuperLink as HOST:PORT")
    parser.add_argument(
        "--data", required=True, type=Path,
        help="prepared cache directory of this site (python -m shared.data prepare ...)",
    )
    parser.add_argument(
        "--root-certificates", type=Path, metavar="CA.pem",
        help="CA certificate that signed the SuperLink's certificate (the federation's ca.crt); "
        "without it the system trust store is used",
    )
    parser.add_argument(
        "--auth-key", type=Path, metavar="KEY",
        help="this site's ECDSA private key (OpenSSH format) for SuperNode authentication",
    )
    parser.add_argument(
        "--insecure", action="store_true",
        help="plain-text connection without TLS (local tests only; never across a network)",
    )
    parser.add_argument(
        "--runtime-port", type=int, default=0,
        help="local port of the SuperNode's runtime API (127.0.0.1 only; default: a free port)",
    )
    parser.add_argument(
        "--max-wait", type=float, default=DEFAULT_MAX_WAIT, metavar="SECONDS",
        help="keep retrying with backoff while the SuperLink is unreachable, and give up after "
        f"this long (default {DEFAULT_MAX_WAIT:.0f} = {DEFAULT_MAX_WAIT / 3600:g} h; 0 = never give up)",
    )
    parser.add_argument(
        "--max-retries", type=int, default=None,
        help="give up after this many failed connection attempts (default: no limit)",
    )
    parser.add_argument(
        "--state-dir", type=Path, default=None, metavar="DIR",
        help="this site's own state: its privacy ledger (the epsilon spent on this dataset over every "
        "run), kept across runs and node restarts; back it up (default: $XDG_STATE_HOME or "
        "~/.local/state, then fed-ecg/<site>)",
    )
    policy = parser.add_argument_group("privacy policy of this site (DP runs that break it are refused)")
    policy.add_argument("--dp-required", action="store_true", help="refuse any run without differential privacy")
    policy.add_argument("--dp-max-epsilon", type=float, metavar="EPS",
                        help="lifetime epsilon this dataset may reach over every run (checked against the ledger)")
    policy.add_argument("--dp-min-noise-multiplier", type=float, metavar="SIGMA", help="refuse less DP noise")
    policy.add_argument("--dp-max-delta", type=float, metavar="DELTA", help="refuse a larger DP delta")
    policy.add_argument("--dp-secure-mode", action="store_true",
                        help="DP noise and sampling from Opacus secure_mode (a CSPRNG; needs torchcsprng)")
    policy.add_argument("--dp-unit", choices=("record", "patient", "window"), default="record",
                        help="the smallest privacy unit this site accepts (default record; patient also "
                        "accepted then; window only when set here): a run asking a finer unit is refused")
    policy.add_argument("--dp-no-evaluate", action="store_true",
                        help="under DP, refuse evaluation messages (validation loss/AUROC are not noised)")
    parser.add_argument(
        "--dry-run", action="store_true",
        help="validate, print what this node would serve and the command, and exit",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        site_data = validate(args)
        command = supernode_command(args, site_data)
    except UsageError as exc:
        print(f"python -m client: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.dry_run:
        print(describe(args, site_data, command))
        return EXIT_OK
    for attempt in range(1, PORT_ATTEMPTS + 1):
        code, port_taken = run_supernode(command, args)
        # A free port chosen here can be taken by another process before the SuperNode binds it:
        # choose another (the operator's own --runtime-port is never changed).
        if not (port_taken and not args.runtime_port and attempt < PORT_ATTEMPTS):
            return code
        print("python -m client: the runtime port was taken before the SuperNode could bind it; "
              "starting again on another free port", file=sys.stderr, flush=True)
        command = supernode_command(args, site_data)
    return code


# ---------------------------------------------------------------- validation


def validate(args: argparse.Namespace) -> SiteData:
    """Check everything that can be checked locally; raise ``UsageError`` naming the problem."""
    if args.site not in SITES:
        raise UsageError(f"unknown site '{args.site}'; choose one of: {', '.join(SITES)}")
    if not args.dry_run and not args.superlink:
        raise UsageError("--superlink HOST:PORT is required (the coordinator's address)")
    if args.superlink:
        check_address(args.superlink)
    site_data = load_site_data(args.site, args.data)
    if args.insecure and args.root_certificates:
        raise UsageError("--insecure and --root-certificates contradict each other; drop one")
    if args.insecure and args.auth_key:
        raise UsageError(
            "--auth-key needs TLS: drop --insecure and pass --root-certificates "
            "(Flower refuses node authentication over plain text)"
        )
    if args.root_certificates:
        check_pem_certificate(args.root_certificates)
    if args.auth_key:
        check_auth_key(args.auth_key)
    if args.runtime_port and not 0 < args.runtime_port < 65536:
        raise UsageError(f"--runtime-port {args.runtime_port} is not a TCP port")
    if args.max_wait < 0:
        raise UsageError("--max-wait must be >= 0 seconds")
    if args.max_retries is not None and args.max_retries < 0:
        raise UsageError("--max-retries must be >= 0")
    check_state_dir(args)
    return site_data


def check_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of a ``HOST:PORT`` address (an IPv6 host without its brackets)."""
    match = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-_]+):(\d{1,5})", address)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise UsageError(
            f"--superlink '{address}' is not HOST:PORT (e.g. coordinator.example.org:9092, "
            "no https:// prefix)"
        )
    return match.group(1).strip("[]"), int(match.group(2))


def load_site_data(site: str, data: Path) -> SiteData:
    """Validate the cache at ``data`` for ``site``; explain what to do when it is not one."""
    # Imported here so that `--help` and argument errors stay fast.
    from shared.data.cache import MANIFEST, validate_cache
    from shared.data.errors import CacheError

    if not data.exists():
        raise UsageError(f"--data {data}: no such directory")
    if not data.is_dir():
        raise UsageError(f"--data {data}: not a directory")
    if not os.access(data, os.R_OK | os.X_OK):
        raise UsageError(f"--data {data}: not readable by this user")
    if not (data / MANIFEST).is_file():
        if looks_like_dataset_root(data):
            raise UsageError(
                f"--data {data} is a raw dataset root, not a prepared cache. Prepare it first:\n"
                f"  python -m shared.data prepare --site {site} --source {data} "
                f"--out {data.parent / (data.name + '-cache')}\n"
                "then pass the --out directory as --data"
            )
        raise UsageError(
            f"--data {data}: no {MANIFEST} here, so it is not a prepared cache; build one with "
            f"`python -m shared.data prepare --site {site} --source <dataset root> --out <dir>`"
        )
    try:
        manifest = validate_cache(data)
    except CacheError as exc:
        raise UsageError(f"--data {data}: invalid cache: {exc}") from exc
    cache_site = manifest.get("site")
    if cache_site != site:
        raise UsageError(
            f"--data {data} holds site '{cache_site}', not '{site}': wrong --site or wrong --data"
        )
    return SiteData(path=data.resolve(), manifest=manifest)


def looks_like_dataset_root(path: Path) -> bool:
    """True when ``path`` holds WFDB/Challenge files rather than a cache (a shallow look)."""
    patterns = ("*.hea", "*/*.hea", "*/*/*.hea", "RECORDS", "*.csv", "*/*.mat")
    return any(next(path.glob(p), None) is not None for p in patterns)


def check_pem_certificate(path: Path) -> None:
    if not path.is_file():
        raise UsageError(f"--root-certificates {path}: no such file")
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--root-certificates {path}: unreadable ({exc.strerror})") from exc
    if b"-----BEGIN CERTIFICATE-----" not in text:
        raise UsageError(
            f"--root-certificates {path}: not a PEM certificate (expected the federation's "
            "ca.crt from deploy/make-certs.sh)"
        )


def check_auth_key(path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    if not path.is_file():
        raise UsageError(f"--auth-key {path}: no such file")
    try:
        key = load_ssh_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise UsageError(f"--auth-key {path}: unreadable ({exc.strerror})") from exc
    except (ValueError, TypeError) as exc:
        raise UsageError(
            f"--auth-key {path}: not an unencrypted OpenSSH private key ({exc}); create one with "
            "`ssh-keygen -t ecdsa -b 384 -N '' -f KEY`"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UsageError(
            f"--auth-key {path}: {type(key).__name__} is not accepted by Flower; "
            "use an ECDSA key (`ssh-keygen -t ecdsa -b 384`)"
        )


# ---------------------------------------------------------------- the SuperNode command


def default_state_dir(site: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base).expanduser() / "fed-ecg" / site


def check_state_dir(args: argparse.Namespace) -> None:
    """The state directory must be writable (the privacy ledger goes there); policy values positive."""
    args.state_dir = (args.state_dir or default_state_dir(args.site)).expanduser().resolve()
    if args.dry_run:  # nothing is created by a dry run
        return
    try:
        args.state_dir.mkdir(parents=True, exist_ok=True)
        probe = args.state_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--state-dir {args.state_dir} cannot be written ({exc.strerror or exc}); "
                         "the site's privacy ledger is kept there") from None
    for flag in ("dp_max_epsilon", "dp_min_noise_multiplier", "dp_max_delta"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise UsageError(f"--{flag.replace('_', '-')} {value:g} must be > 0")
    if args.dp_max_delta is not None and not args.dp_max_delta < 1:
        raise UsageError(f"--dp-max-delta {args.dp_max_delta:g} must be < 1")


def node_config(site: str, data: Path, args: argparse.Namespace | None = None) -> str:
    """The ``--node-config`` string: TOML literal strings, so paths need no escaping; the state
    directory and the site's privacy policy from ``args``."""
    text = str(data)
    if "'" in text or "\n" in text:
        raise UsageError(f"--data {data}: a path with a quote or newline cannot be passed on")
    out = f"site='{site}' data='{text}'"
    if args is None:
        return out
    state = str(getattr(args, "state_dir", None) or "")
    if "'" in state or "\n" in state:
        raise UsageError(f"--state-dir {state}: a path with a quote or newline cannot be passed on")
    if state:
        out += f" state-dir='{state}'"
    if getattr(args, "dp_required", False):
        out += " dp-required=true"
    if getattr(args, "dp_secure_mode", False):
        out += " dp-secure-mode=true"
    if getattr(args, "dp_no_evaluate", False):
        out += " dp-evaluate=false"
    if getattr(args, "dp_unit", "record") not in (None, "record"):
        out += f" dp-unit='{args.dp_unit}'"
    for flag in ("dp_max_epsilon", "dp_min_noise_multiplier", "dp_max_delta"):
        if getattr(args, flag, None) is not None:
            out += f" {flag.replace('_', '-')}={float(getattr(args, flag))!r}"
    return out


def supernode_command(args: argparse.Namespace, site_data: SiteData) -> list[str]:
    exe = shutil.which("flower-supernode", path=runtime_path())
    if exe is None:
        raise UsageError("flower-supernode not found: install the project (pip install -e .)")
    command = [exe, "--superlink", args.superlink or "HOST:PORT"]
    if args.insecure:
        command.append("--insecure")
    elif args.root_certificates:
        command += ["--root-certificates", str(args.root_certificates.resolve())]
    if args.auth_key:
        command += ["--auth-supernode-private-key", str(args.auth_key.resolve())]
    port = args.runtime_port or (0 if args.dry_run else processes.free_port())
    command += ["--host", "127.0.0.1", "--port", str(port) if port else "<free port>"]
    if args.max_wait > 0:
        command += ["--max-wait-time", str(args.max_wait)]
    if args.max_retries is not None:
        command += ["--max-retries", str(args.max_retries)]
    command += ["--node-config", node_config(args.site, site_data.path, args)]
    return command


def runtime_path(shim_dir: Path | None = None) -> str:
    """PATH with the FAB guard's ``shim_dir`` first, then this interpreter's bin: the SuperNode
    spawns flower-superexec and flwr-clientapp by bare name, so they come from this environment,
    and ``flwr-clientapp`` resolves to the site's guard (client/fab_guard.py), which refuses a
    coordinator's FAB that would replace the site's code."""
    parts = [str(shim_dir)] if shim_dir is not None else []
    return os.pathsep.join([*parts, str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def describe(args: argparse.Namespace, site_data: SiteData, command: list[str]) -> str:
    manifest = site_data.manifest
    classes = list(manifest.get("classes", []))
    available = list(manifest.get("label_available", []))
    lines = [
        f"site: {args.site}",
        f"data: {site_data.path}"
        + ("  (SYNTHETIC data)" if manifest.get("synthetic") else ""),
        f"dataset: {manifest.get('dataset')} {manifest.get('dataset_version', '')}".rstrip(),
        f"label space: {manifest.get('label_space')}",
        "label availability: "
        + ", ".join(f"{c}={'yes' if a else 'unknown here'}" for c, a in zip(classes, available)),
        "counts per split:",
    ]
    header = f"  {'split':<6} {'records':>8} {'windows':>8} {'patients':>9}  " + " ".join(
        f"{c:>6}" for c in classes
    )
    lines.append(header)
    for split, counts in manifest.get("counts", {}).items():
        positives = counts.get("positives", {})
        lines.append(
            f"  {split:<6} {counts.get('records', 0):>8} {counts.get('windows', 0):>8} "
            f"{counts.get('patients', 0):>9}  "
            + " ".join(f"{positives.get(c, 0):>6}" for c in classes)
        )
    lines.append("  (class columns: positive records; a class unknown at this site counts 0)")
    lines.append(f"node config: {node_config(args.site, site_data.path, args)}")
    lines.append(
        "transport: "
        + ("PLAIN TEXT (--insecure)" if args.insecure else "TLS")
        + (", node authentication with " + str(args.auth_key) if args.auth_key else "")
    )
    lines.append("command: " + " ".join(_quote(c) for c in command))
    return "\n".join(lines)


def _quote(text: str) -> str:
    return f'"{text}"' if re.search(r"[\s'\"]", text) else text


# ---------------------------------------------------------------- running it


def run_supernode(command: list[str], args: argparse.Namespace) -> tuple[int, bool]:
    """Run flower-supernode in the foreground, pass its output through, forward SIGTERM/SIGINT,
    and turn a failure into a message that says what to check. Returns (exit code, whether the
    runtime port was already in use)."""
    # The FAB guard: flwr-clientapp, first on the SuperNode's PATH, validates the coordinator's
    # FAB before Flower installs it (client/fab_guard.py, docs/privacy.md).
    shim_dir = Path(tempfile.mkdtemp(prefix="fed-ecg-fab-guard-"))
    atexit.register(shutil.rmtree, shim_dir, ignore_errors=True)
    write_shim(shim_dir, python=interpreter_of(shutil.which("flwr-clientapp", path=runtime_path())))
    env = dict(os.environ, PATH=runtime_path(shim_dir))
    # Flower telemetry is off unless the operator sets FLWR_TELEMETRY_ENABLED=1 themselves.
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    patience = f"up to {args.max_wait / 3600:g} h (--max-wait)" if args.max_wait > 0 else "without limit"
    print(
        f"python -m client: starting SuperNode for site '{args.site}' -> {args.superlink} "
        f"({'PLAIN TEXT' if args.insecure else 'TLS'}; Flower telemetry "
        f"{'on' if env['FLWR_TELEMETRY_ENABLED'] not in ('0', 'false', 'False') else 'off'}). While the SuperLink "
        f"is unreachable the node retries with backoff ('Connection attempt failed, retrying in ...') {patience}",
        file=sys.stderr, flush=True,
    )
    # Own session, under the guard of shared.processes: the SuperNode, its flower-superexec and
    # the flwr-clientapp processes are stopped when this wrapper dies, even by SIGKILL, and
    # whatever the SuperNode leaves behind when it ends.
    proc = processes.start(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, errors="replace", bufsize=1, grace=STOP_GRACE,
    )

    def forward(signum: int, _frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)

    # Enough lines that flower-superexec's exit tracebacks (it shares the output and dies after the
    # SuperNode) cannot push the SuperNode's own "Exit Code: ..." lines out (seen in CI with 60).
    tail: deque[str] = deque(maxlen=2000)
    pump = threading.Thread(target=_pump, args=(proc.stdout, tail), daemon=True)
    pump.start()
    rc = proc.wait()
    pump.join(timeout=5)
    if rc == 0 or rc < 0:  # clean exit, or stopped by a signal we forwarded
        return (EXIT_OK if rc == 0 else 128 - rc), False
    hint = diagnose(rc, list(tail), args)
    print(f"python -m client: error: {hint}", file=sys.stderr)
    return (EXIT_CONNECT if connection_failed(list(tail)) else EXIT_SUPERNODE), runtime_port_taken(list(tail))


def connection_failed(tail: list[str]) -> bool:
    """Flower's exit code 305, as printed in the log (the process itself exits with status 1)."""
    return any(f"Exit Code: {FLWR_EXIT_CONNECTION_FAILED}" in line for line in tail)


def speaks_tls(address: str, timeout: float = 3.0) -> bool:
    """Whether ``host:port`` completes a TLS handshake (certificate not checked: this only asks
    which protocol the SuperLink speaks, after a plain-text node failed to connect to it). Flower
    prints only its last connection error, which for plain text against TLS depends on timing
    ("Server disconnected without sending a response", a reset, ...), so the port is asked."""
    host, port = check_address(address)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return True
    except OSError:
        return False


def runtime_port_taken(tail: list[str]) -> bool:
    """The SuperNode's runtime HTTP API (uvicorn) could not bind its port."""
    return any("address already in use" in line.lower() for line in tail)


def _pump(stream: Any, tail: deque[str]) -> None:
    """Pass the SuperNode's output through to our stderr, keeping the last lines."""
    for line in stream:
        sys.stderr.write(line)
        sys.stderr.flush()
        tail.append(_strip_ansi(line))


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def diagnose(rc: int, tail: list[str], args: argparse.Namespace) -> str:
    """One message naming the likely cause of a failed SuperNode, from its last output lines."""
    text = "".join(tail)
    where = f"SuperLink {args.superlink}"
    if "Failed to activate SuperNode" in text or "code: 2004" in text:
        return (
            f"{where} refused this node's key: the public key of {args.auth_key} is not "
            "registered. Ask the coordinator to run `flwr supernode register <site>.key.pub "
            "<connection>` (deploy/README.md, 'Register a site')"
        )
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return (
            f"TLS verification of {where} failed: pass the federation's ca.crt with "
            "--root-certificates, and check that the SuperLink certificate lists the host name "
            "you used (deploy/make-certs.sh --host)"
        )
    if args.insecure and connection_failed(tail) and speaks_tls(args.superlink):
        return (
            f"{where} closed the plain-text connection: it speaks TLS. Drop --insecure and pass "
            "--root-certificates ca.crt"
        )
    if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
        return f"{where} does not speak TLS: it was started with --insecure (dev only)"
    if runtime_port_taken(tail):
        return (
            f"the SuperNode's local runtime port ({args.runtime_port or 'chosen automatically'}) on "
            "127.0.0.1 is already in use: pass a free one with --runtime-port, or leave it out"
        )
    if connection_failed(tail):
        return (
            f"could not reach {where} (gave up after the retry limit: --max-wait "
            f"{args.max_wait:g}s). Check that the coordinator's SuperLink is running, the host "
            "name and port are right, and a firewall allows this machine out to that port"
        )
    return f"flower-supernode exited with code {rc}; see its output above"
