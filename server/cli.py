"""`python -m server`: the coordinator's side. Starts a Flower SuperLink (``flower-superlink``)
with TLS and SuperNode authentication on by default and its state in a database file, and
writes the ``flwr`` CLI connection that `flwr run` / `flwr supernode register` use.

    python -m server --certs deploy/certs --host 0.0.0.0 --port 9092 --state-dir ./superlink
    python -m server connection fed-ecg --address coordinator.example.org:9092 \
        --root-certificates deploy/certs/ca.crt
    flwr run simulations/four_sites fed-ecg --stream

``--insecure`` (plain text, no node authentication) is for a local demo on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from shared import processes

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_SUPERLINK = 4

DEFAULT_PORT = 9092
# Seconds the SuperLink's processes get between SIGTERM and SIGKILL when they are stopped.
STOP_GRACE = 5.0
CERT_FILES = {"ca": "ca.crt", "cert": "superlink.crt", "key": "superlink.key"}


class UsageError(Exception):
    """Bad input from the operator: printed as one line, exit code 2."""


def build_start_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Start the fed-ecg SuperLink (TLS and SuperNode authentication by default). "
        "`python -m server connection --help` writes the flwr CLI connection.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1",
        help="address to listen on; 0.0.0.0 to accept sites from the network (default 127.0.0.1)",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT,
        help=f"the one port for sites, `flwr` commands and the ServerApp (default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--certs", type=Path, default=Path("deploy/certs"),
        help="directory with ca.crt, superlink.crt, superlink.key from deploy/make-certs.sh "
        "(default deploy/certs)",
    )
    parser.add_argument(
        "--state-dir", type=Path, default=Path("superlink-state"),
        help="directory of the SuperLink's database (runs, registered nodes, results); "
        "kept across restarts (default ./superlink-state)",
    )
    parser.add_argument(
        "--no-node-auth", action="store_true",
        help="accept any SuperNode that trusts the CA (default: only registered site keys)",
    )
    parser.add_argument(
        "--insecure", action="store_true",
        help="plain text and no node authentication: local demo on 127.0.0.1 only",
    )
    parser.add_argument("--log-file", type=Path, help="also write the SuperLink log to this file")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate and print the command, then exit",
    )
    return parser


def build_connection_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server connection",
        description="Write a SuperLink connection into $FLWR_HOME/config.toml (default "
        "~/.flwr) so that `flwr run <app> NAME` and `flwr supernode register KEY.pub NAME` "
        "reach this federation.",
    )
    parser.add_argument("name", help="connection name, e.g. fed-ecg")
    parser.add_argument("--address", required=True, help="SuperLink HOST:PORT")
    parser.add_argument(
        "--root-certificates", type=Path, help="the federation's ca.crt (TLS, the default)",
    )
    parser.add_argument("--insecure", action="store_true", help="plain text (dev only)")
    parser.add_argument("--default", action="store_true", help="make it the default connection")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "connection":
            return write_connection(build_connection_parser().parse_args(argv[1:]))
        args = build_start_parser().parse_args(argv)
        command = superlink_command(args)
    except UsageError as exc:
        print(f"python -m server: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.dry_run:
        print(" ".join(command))
        return EXIT_OK
    return run_superlink(command, args)


# ---------------------------------------------------------------- the SuperLink command


def check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise UsageError(f"--port {port} is not a TCP port")


def cert_paths(certs: Path) -> dict[str, Path]:
    """The three TLS files, checked: a clear message naming the missing one."""
    paths = {role: certs / name for role, name in CERT_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise UsageError(
            f"TLS files missing: {', '.join(missing)}. Create them with "
            f"`deploy/make-certs.sh --out {certs} --host <this machine's name or IP>` "
            "(or pass --insecure for a local demo)"
        )
    for role in ("ca", "cert"):
        if b"-----BEGIN CERTIFICATE-----" not in paths[role].read_bytes():
            raise UsageError(f"{paths[role]}: not a PEM certificate")
    if b"PRIVATE KEY-----" not in paths["key"].read_bytes():
        raise UsageError(f"{paths['key']}: not a PEM private key")
    return paths


def superlink_command(args: argparse.Namespace) -> list[str]:
    check_port(args.port)
    exe = shutil.which("flower-superlink", path=runtime_path())
    if exe is None:
        raise UsageError("flower-superlink not found: install the project (pip install -e .)")
    command = [exe, "--host", args.host, "--port", str(args.port)]
    if args.insecure:
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(
                f"python -m server: WARNING: plain text on {args.host}: anyone on the network "
                "can read model updates and join as a site",
                file=sys.stderr,
            )
        command.append("--insecure")
    else:
        paths = cert_paths(args.certs)
        command += [
            "--ssl-ca-certfile", str(paths["ca"].resolve()),
            "--ssl-certfile", str(paths["cert"].resolve()),
            "--ssl-keyfile", str(paths["key"].resolve()),
        ]
        if not args.no_node_auth:
            command.append("--enable-supernode-auth")
    state_dir: Path = args.state_dir
    if state_dir.exists() and not state_dir.is_dir():
        raise UsageError(f"--state-dir {state_dir}: exists and is not a directory")
    command += ["--database", str((state_dir / "superlink.db").resolve())]
    # Dependencies are baked into the environment (pip install -e . / the Docker image): the
    # SuperLink must not `uv sync` app dependencies per run (it would fail offline).
    command.append("--disable-runtime-dependency-installation")
    if args.log_file:
        command += ["--log-file", str(args.log_file.resolve())]
    return command


def runtime_path() -> str:
    """PATH with this interpreter's bin first: the SuperLink spawns flower-superexec and
    flwr-serverapp by bare name, and they must come from the same environment."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def run_superlink(command: list[str], args: argparse.Namespace) -> int:
    args.state_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PATH=runtime_path(), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    # Flower telemetry is off unless the operator sets FLWR_TELEMETRY_ENABLED=1 themselves.
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    mode = (
        "PLAIN TEXT, no node authentication (--insecure)"
        if args.insecure
        else "TLS" + ("" if args.no_node_auth else " + SuperNode authentication")
    )
    print(
        f"python -m server: SuperLink on {args.host}:{args.port} ({mode}); "
        f"state in {args.state_dir}/superlink.db",
        file=sys.stderr, flush=True,
    )
    # Own session, under the guard of shared.processes: the SuperLink and what it spawns
    # (flower-superexec, flwr-serverapp, flwr-simulation) are stopped when this wrapper dies,
    # even by SIGKILL, and whatever the SuperLink leaves behind when it ends.
    proc = processes.start(command, env=env, grace=STOP_GRACE)

    def forward(signum: int, _frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    rc = proc.wait()
    if rc > 0:
        print(
            f"python -m server: error: flower-superlink exited with code {rc}; see its output "
            f"above (port {args.port} already in use? certificate files readable?)",
            file=sys.stderr,
        )
        return EXIT_SUPERLINK
    return EXIT_OK


# ---------------------------------------------------------------- the flwr CLI connection


def write_connection(args: argparse.Namespace) -> int:
    """Add or replace ``[superlink.NAME]`` in $FLWR_HOME/config.toml with Flower's own writer."""
    from flwr.cli.flower_config import (
        read_flower_config,
        set_default_superlink_connection,
        write_superlink_connection,
    )
    from flwr.cli.typing import SuperLinkConnection

    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.name):
        raise UsageError(f"connection name '{args.name}': use letters, digits, '-' and '_'")
    if not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-_]+):\d{1,5}", args.address):
        raise UsageError(f"--address '{args.address}' is not HOST:PORT")
    if args.insecure == bool(args.root_certificates):
        raise UsageError("pass exactly one of --root-certificates CA.crt (TLS) or --insecure")
    root = None
    if args.root_certificates:
        if not args.root_certificates.is_file():
            raise UsageError(f"--root-certificates {args.root_certificates}: no such file")
        root = str(args.root_certificates.resolve())
    connection = SuperLinkConnection(
        name=args.name, address=args.address, root_certificates=root,
        insecure=True if args.insecure else None,
    )
    write_superlink_connection(connection)
    if args.default:
        set_default_superlink_connection(args.name)
    _, path = read_flower_config()
    print(f"wrote connection '{args.name}' -> {args.address} to {path}")
    return EXIT_OK
