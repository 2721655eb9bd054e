"""The version handshake: what the coordinator and a site must agree on before a site answers.

Every message the server sends carries the installed project version (the ``fed-ecg``
distribution's version, as pip installed it) and a fingerprint of the model definition: a hash
of the model's name, preset, and the names, shapes and dtypes of the parameters and buffers of
the model built from the run config (built at run time, so it reflects the code actually
installed, not a list kept by hand). A site whose installed version or model fingerprint differs
refuses the message, and its reason names both sides' values.

Flower-free: ``server/`` puts :func:`handshake` into each message's config, ``client/`` calls
:func:`check_handshake` on what it receives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from omegaconf import DictConfig

DISTRIBUTION = "fed-ecg"
VERSION_KEY = "fed-ecg-version"
FINGERPRINT_KEY = "model-fingerprint"


class VersionMismatch(ValueError):
    """The coordinator and this site do not run the same project version or model definition."""


def project_version() -> str:
    """The installed ``fed-ecg`` version (``0+unknown`` when the project is not installed)."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0+unknown"


@lru_cache(maxsize=8)
def _fingerprint(model: str, preset: str, dp: bool, input_samples: int) -> str:
    from shared.federation.site_training import N_CLASSES, N_LEADS
    from shared.models import build_model

    net = build_model(model, preset, n_leads=N_LEADS, input_samples=input_samples, n_classes=N_CLASSES, dp=dp)
    digest = hashlib.sha256(f"{model}/{preset}/dp={dp}/input={input_samples}".encode())
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(f"|{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
    return digest.hexdigest()[:16]


def model_fingerprint(cfg: DictConfig) -> str:
    """Hash of the model definition the run config selects, from the model built here."""
    from shared.federation.run_config import input_samples

    return _fingerprint(str(cfg.model), str(cfg.preset), bool(cfg.dp), int(input_samples(cfg)))


def handshake(cfg: DictConfig) -> dict[str, str]:
    """The keys every server message carries in its config."""
    return {VERSION_KEY: project_version(), FINGERPRINT_KEY: model_fingerprint(cfg)}


def check_handshake(config: Mapping[str, Any], cfg: DictConfig) -> None:
    """Raise :class:`VersionMismatch` naming both sides' values when ``config`` (a server
    message's config) was written by another project version or model definition."""
    theirs = config.get(VERSION_KEY)
    mine = project_version()
    if theirs is None:
        raise VersionMismatch(
            f"the coordinator's message carries no {VERSION_KEY} (an older coordinator?); "
            f"this site runs fed-ecg {mine}"
        )
    if str(theirs) != mine:
        raise VersionMismatch(
            f"version mismatch: the coordinator runs fed-ecg {theirs}, this site runs fed-ecg {mine}; "
            "install the same release on both sides"
        )
    their_print, my_print = config.get(FINGERPRINT_KEY), model_fingerprint(cfg)
    if str(their_print) != my_print:
        raise VersionMismatch(
            f"model definition mismatch for {cfg.model}/{cfg.preset}: the coordinator's fingerprint is "
            f"{their_print}, this site's is {my_print} (both fed-ecg {mine}); install the same code on both sides"
        )
