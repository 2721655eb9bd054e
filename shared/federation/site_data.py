"""Which sites a node may play, where each site's cache lives; the synthetic cache built on first use.

Flower-free. The server names the site in every message it sends (``config["site"]``); the
node checks that it may play it:

* a deployed SuperNode is bound to its one site by its node config
  (``--node-config 'site="mimic" data="/path/to/cache"'``) and refuses a message for any other;
* a simulated node (its node config holds only ``partition-id``) may play any site of the run
  config's ``sites`` list, so Flower's default of two simulated nodes serves four sites. The
  site's cache then comes from the run config (``cache-<site>``, '' = the embedded synthetic data).
"""

from __future__ import annotations

import fcntl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from shared.data.cache import open_cache
from shared.data.record import SITES
from shared.federation.run_config import ConfigError, cache_root, site_cache_setting, synthetic_records

# The synthetic data's own seed: fixed, so runs with different training seeds see the same data.
SYNTHETIC_DATA_SEED = 0
# What a node answers when it may play any site of the run (simulation).
ANY_SITE = "*"


class SiteRefused(ConfigError):
    """This node must not play the site a message names; the message says why."""


def bound_site(node_config: Mapping[str, Any]) -> str | None:
    """The site a deployed node is bound to (None for a simulated node)."""
    if "site" in node_config:
        site = str(node_config["site"])
        if site not in SITES:
            raise ConfigError(f"node config: site = {site!r} is not one of {list(SITES)}")
        return site
    if "partition-id" not in node_config:
        raise ConfigError(
            "node config has neither 'site' (deployment: --node-config 'site=\"mimic\" data=\"/path\"') "
            "nor 'partition-id' (simulation)"
        )
    return None


def playable_sites(node_config: Mapping[str, Any]) -> str:
    """What a node answers the server's query: its bound site, or :data:`ANY_SITE`."""
    return bound_site(node_config) or ANY_SITE


def resolve_site(node_config: Mapping[str, Any], cfg: DictConfig, site: str) -> tuple[str, str]:
    """``(site, cache setting)`` for a message naming ``site``; the setting is a path or '' (synthetic).

    Raises :class:`SiteRefused` when this node may not play ``site``.
    """
    bound = bound_site(node_config)
    if bound is not None:
        if site != bound:
            raise SiteRefused(f"this node is bound to site {bound!r} and refuses a message for site {site!r}")
        data = str(node_config.get("data", "") or "")
        return site, data or site_cache_setting(cfg, site)
    if site not in cfg.site_list:
        raise SiteRefused(f"site {site!r} is not in this run's sites {list(cfg.site_list)}")
    return site, site_cache_setting(cfg, site)


def site_policy(node_config: Mapping[str, Any], cfg: DictConfig, site: str):
    """The site's privacy policy: a deployed node's own node config (the coordinator's run config
    cannot set it); a simulated site's from the run config's ``site-policy``."""
    from shared.privacy.policy import SitePolicy, parse_site_policies

    if bound_site(node_config) is not None:
        return SitePolicy.from_mapping(node_config, "node config")
    policies = parse_site_policies(str(cfg.site_policy))
    return SitePolicy.from_mapping(policies.get(site, {}), f"run config site-policy for {site!r}")


def site_state_dir(node_config: Mapping[str, Any], cfg: DictConfig, site: str) -> Path | None:
    """Where the site keeps its privacy ledger: a deployed node's ``state-dir`` node config (None
    if unset); a simulated site's ``<out-dir>/sites/<site>`` (``$FED_ECG_CACHE/site-state/<site>``
    when the run config leaves ``out-dir`` to the server)."""
    if bound_site(node_config) is not None:
        value = str(node_config.get("state-dir", "") or "")
        return Path(value).expanduser() if value else None
    if cfg.out_dir:
        return Path(str(cfg.out_dir)).expanduser().resolve() / "sites" / site
    return cache_root() / "site-state" / site


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
