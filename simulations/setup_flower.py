"""One-time setup: make `flwr run simulations/four_sites` simulate four nodes (one per site).

Flower 1.41 simulates 2 nodes unless told otherwise, and an app directory cannot change that.
This writes, into the user's Flower config (``$FLWR_HOME/config.toml``, default
``~/.flwr/config.toml``), simulation options on the default ``local`` connection:
``num-supernodes`` (4), the CPUs per node (1: on a 2-core machine two sites train at once) and
the GPU share per node (0, or e.g. 0.25 to put four nodes on one GPU). Other content of the
file is kept. Flower prints a deprecation note for ``options.`` on each run; the non-deprecated
``flwr federation simulation-config`` only lasts while that local SuperLink process runs.

    python -m simulations.setup_flower [--num-supernodes 4] [--cpus-per-node 1] [--gpus-per-node 0]

Per run, ``flwr run simulations/four_sites --federation-config "num-supernodes=4
client-resources-num-cpus=1 client-resources-num-gpus=0.25"`` overrides these.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import tomli
import tomli_w

DEFAULT_CONFIG = {
    "superlink": {
        "default": "local",
        "supergrid": {"address": "api.flower.ai"},
        "local": {"address": ":local:"},
    }
}


def flower_config_path() -> Path:
    home = os.environ.get("FLWR_HOME") or str(Path.home() / ".flwr")
    return Path(home).expanduser() / "config.toml"


def configure(num_supernodes: int = 4, cpus_per_node: int = 1, gpus_per_node: float = 0.0,
              path: Path | None = None) -> Path:
    path = path or flower_config_path()
    config = tomli.loads(path.read_text()) if path.is_file() else DEFAULT_CONFIG
    superlink = config.setdefault("superlink", {})
    superlink.setdefault("default", "local")
    local = superlink.setdefault("local", {"address": ":local:"})
    local.setdefault("address", ":local:")
    local["options"] = {
        "num-supernodes": int(num_supernodes),
        "backend": {"client-resources": {"num-cpus": int(cpus_per_node), "num-gpus": float(gpus_per_node)}},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(tomli_w.dumps(config))
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.setup_flower", description=__doc__.splitlines()[0])
    parser.add_argument("--num-supernodes", type=int, default=4)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.num_supernodes < 1 or args.cpus_per_node < 1 or args.gpus_per_node < 0:
        print("error: --num-supernodes and --cpus-per-node must be >= 1, --gpus-per-node >= 0", file=sys.stderr)
        return 2
    try:
        path = configure(args.num_supernodes, args.cpus_per_node, args.gpus_per_node)
    except (OSError, tomli.TOMLDecodeError) as exc:
        print(f"error: cannot update the Flower config: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: local simulation = {args.num_supernodes} nodes, {args.cpus_per_node} CPU(s) and "
          f"{args.gpus_per_node:g} GPU per node")
    return 0


if __name__ == "__main__":
    sys.exit(main())
