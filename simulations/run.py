"""`python -m simulations.run`: run the four-site federation and exit non-zero if it failed.

``flwr run`` exits 0 even when the run fails; this wrapper validates the run config first (a bad
value exits 2 with one line), runs the app in an isolated Flower home on a free port
(:func:`simulations.federation.run_federation`: its own SuperLink, stopped by PID afterwards),
streams the run's log, and exits 0 only when ``flwr ls`` reports ``finished:completed``.

    python -m simulations.run                                   # the default four-site run
    python -m simulations.run --run-config 'model="cardioformer" num-server-rounds=5'
    python -m simulations.run --client-gpus 0.25                # four nodes sharing one GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import tomli

from shared.federation.run_config import ConfigError, load_run_config
from simulations.federation import DEFAULT_APP_DIR, FederationError, run_federation


def app_defaults(app_dir: Path) -> dict:
    with open(app_dir / "pyproject.toml", "rb") as fh:
        return dict(tomli.load(fh)["tool"]["flwr"]["app"]["config"])


def parse_overrides(text: list[str]) -> dict:
    from flwr.common.config import parse_config_args

    return dict(parse_config_args(text)) if text else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.run", description=__doc__.splitlines()[0])
    parser.add_argument("app_dir", nargs="?", default=str(DEFAULT_APP_DIR), help="Flower app dir (default: simulations/four_sites)")
    parser.add_argument("--run-config", "-c", action="append", default=[], help='overrides, e.g. \'lr=0.01 model="cardioformer"\'')
    parser.add_argument("--num-supernodes", type=int, default=None,
                        help="simulated nodes (default: Flower's, 2; the server deals the sites over them)")
    parser.add_argument("--client-cpus", type=int, default=None, help="CPUs per simulated node (default: Flower's, 2)")
    parser.add_argument("--client-gpus", type=float, default=None, help="GPU share per simulated node (e.g. 0.25; default: Flower's, 0)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run counts as failed")
    args = parser.parse_args(argv)

    app_dir = Path(args.app_dir)
    try:
        overrides = parse_overrides(args.run_config)
        load_run_config({**app_defaults(app_dir), **overrides})  # a bad value exits 2 here
    except (ConfigError, ValueError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = run_federation(app_dir, overrides, num_supernodes=args.num_supernodes, client_cpus=args.client_cpus,
                                client_gpus=args.client_gpus, timeout=args.timeout, echo=sys.stdout)
    except FederationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.flush()
    if not result.ok:
        print(f"error: run {result.run_id} ended with status {result.status}: {result.details}", file=sys.stderr)
        return 1
    print(f"run {result.run_id}: {result.status} in {result.wall_s:.0f} s; outputs in {result.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
