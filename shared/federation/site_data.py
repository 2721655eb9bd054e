"""Which site a node is and where its cache lives; the synthetic cache built on first use.

Flower-free. A deployed SuperNode names its site and cache in its node config
(``--node-config 'site="mimic" data="/path/to/cache"'``); a simulated node only has a
``partition-id``, mapped to a site through the run config's ``sites`` list. Nothing here assumes
simulation: node-config keys win whenever they are present.
"""

from __future__ import annotations

import fcntl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from shared.federation.run_config import ConfigError, cache_root, site_cache_setting, synthetic_records
from shared.data.cache import open_cache
from shared.data.record import SITES

# The synthetic data's own seed: fixed, so runs with different training seeds see the same data.
SYNTHETIC_DATA_SEED = 0


def resolve_site(node_config: Mapping[str, Any], cfg: DictConfig) -> tuple[str, str]:
    """``(site, cache setting)`` for this node; the setting is a path or '' (synthetic)."""
    if "site" in node_config:
        site = str(node_config["site"])
        if site not in SITES:
            raise ConfigError(f"node config: site = {site!r} is not one of {list(SITES)}")
        data = str(node_config.get("data", "") or "")
        return site, data or site_cache_setting(cfg, site)
    if "partition-id" not in node_config:
        raise ConfigError(
            "node config has neither 'site' (deployment: --node-config 'site=\"mimic\" data=\"/path\"') "
            "nor 'partition-id' (simulation)"
        )
    pid = int(node_config["partition-id"])
    sites = list(cfg.site_list)
    if not 0 <= pid < len(sites):
        raise ConfigError(
            f"simulated node with partition-id {pid} has no site: the run config lists "
            f"{len(sites)} site(s) {sites}; run with num-supernodes = {len(sites)}"
        )
    site = sites[pid]
    return site, site_cache_setting(cfg, site)


def synthetic_cache_dir(site: str, records: int) -> Path:
    return cache_root() / "synthetic" / f"{site}-r{records}-s{SYNTHETIC_DATA_SEED}"


def ensure_cache(site: str, setting: str, cfg: DictConfig) -> Path:
    """The site's cache directory, validated; the synthetic one is generated on first use.

    Concurrent nodes (or the server) asking for the same synthetic cache wait on a file lock,
    and the cache builder writes to a temporary directory renamed into place when complete.
    """
    if setting:
        path = Path(setting).expanduser()
        if not (path / "manifest.json").is_file():
            raise ConfigError(
                f"site {site!r}: {path} is not a prepared cache (no manifest.json); build one with "
                f"`python -m shared.data prepare --site {site} --source DATASET_ROOT --out {path}`"
            )
        open_cache(path)
        return path
    records = synthetic_records(cfg)
    out = synthetic_cache_dir(site, records)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / "manifest.json").is_file():
                from shared.data.prepare import build_reader, prepare_cache

                reader = build_reader(site, "synthetic", synthetic_records=records,
                                      synthetic_seed=SYNTHETIC_DATA_SEED)
                prepare_cache(reader, out, progress=False)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    open_cache(out)
    return out


def is_synthetic_cache(path: Path) -> bool:
    return bool(open_cache(path).synthetic)
