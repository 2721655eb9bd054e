"""A site's privacy policy: what the hospital accepts, whatever the coordinator's run config says.

Deployment: the hospital's node config (``python -m client --dp-required --dp-max-epsilon 8``
or ``--node-config 'dp-required=true dp-max-epsilon=8.0'``). Simulation: the run config's
``site-policy`` string, per site, e.g. ``"mimic: dp-required=true dp-max-epsilon=8; ptb:
dp-min-noise-multiplier=1.2"``. Keys:

* ``dp-required`` (bool): refuse any run without DP;
* ``dp-max-epsilon`` (float): the lifetime epsilon the site's dataset may reach, over every run
  (checked against the site's ledger before training); implies ``dp-required``;
* ``dp-min-noise-multiplier`` (float): refuse less noise;
* ``dp-max-delta`` (float): refuse a larger delta;
* ``dp-secure-mode`` (bool): noise and sampling from Opacus ``secure_mode`` (a CSPRNG; needs
  ``torchcsprng``) instead of generators seeded from the site's own secret;
* ``dp-unit`` (``record`` default, ``patient``, ``window``): the smallest privacy unit the site
  accepts. A run's ``dp-unit`` must cover at least this unit (window < record < patient: a
  patient-level guarantee covers each of the patient's records); ``window`` only when the site
  sets it explicitly. The coordinator cannot lower it;
* ``dp-evaluate`` (bool, default true): false = under DP the site refuses evaluation messages
  (their loss and AUROC on the validation split are not noised).

A ``dp-*`` key that is none of these is refused (a misspelt limit must not vanish silently).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.federation.run_config import ConfigError

POLICY_KEYS = ("dp-required", "dp-max-epsilon", "dp-min-noise-multiplier", "dp-max-delta", "dp-secure-mode",
               "dp-unit", "dp-evaluate")
# Privacy units from the finest to the coarsest: a guarantee for a coarser unit covers the finer ones.
UNIT_ORDER = ("window", "record", "patient")


class PrivacyRefused(ConfigError):
    """The site will not train this run (its policy, its ledger or a bad DP value); the message says why."""


@dataclass(frozen=True)
class SitePolicy:
    dp_required: bool = False
    max_epsilon: float | None = None
    min_noise_multiplier: float | None = None
    max_delta: float | None = None
    secure_mode: bool = False
    unit: str = "record"
    evaluate: bool = True

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str) -> SitePolicy:
        """Policy keys out of ``values`` (keys not starting with ``dp-`` ignored; an unknown ``dp-*``
        key is refused, so a misspelt policy is not silently dropped); ``where`` names the source."""
        unknown = sorted(str(k) for k in values if str(k).startswith("dp-") and k not in POLICY_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown privacy policy key(s) {unknown}: the keys are {list(POLICY_KEYS)}")

        def flag(key: str, default: bool = False) -> bool:
            v = values.get(key, default)
            if isinstance(v, str) and v.lower() in ("true", "false"):
                return v.lower() == "true"
            if not isinstance(v, bool):
                raise ConfigError(f"{where}: {key} = {v!r} is invalid: must be true or false")
            return v

        def positive(key: str, upper: float | None = None) -> float | None:
            if key not in values or values[key] in ("", None):
                return None
            v = values[key]
            try:
                x = float(v)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: {key} = {v!r} is invalid: must be a number") from None
            if isinstance(v, bool) or not x > 0 or (upper is not None and not x < upper):
                rng = f"in (0, {upper:g})" if upper is not None else "> 0"
                raise ConfigError(f"{where}: {key} = {v!r} is invalid: must be {rng}")
            return x

        unit = str(values.get("dp-unit", "") or "record")
        if unit not in UNIT_ORDER:
            raise ConfigError(f"{where}: dp-unit = {unit!r} is invalid: must be one of {list(UNIT_ORDER)}")
        return cls(dp_required=flag("dp-required"), max_epsilon=positive("dp-max-epsilon"),
                   min_noise_multiplier=positive("dp-min-noise-multiplier"),
                   max_delta=positive("dp-max-delta", 1.0), secure_mode=flag("dp-secure-mode"), unit=unit,
                   evaluate=flag("dp-evaluate", True))

    def check_run(self, *, dp: bool, noise_multiplier: float, delta: float, unit: str = "record") -> None:
        """Refuse a run whose DP settings break this policy (before anything is trained)."""
        if self.dp_required and not dp:
            raise PrivacyRefused("site policy dp-required = true, but this run has dp = false")
        if self.max_epsilon is not None and not dp:  # an unnoised update would bypass the lifetime cap
            raise PrivacyRefused(f"site policy dp-max-epsilon = {self.max_epsilon:g} implies dp-required, "
                                 "but this run has dp = false")
        if not dp:
            return
        if unit not in UNIT_ORDER or UNIT_ORDER.index(unit) < UNIT_ORDER.index(self.unit):
            raise PrivacyRefused(f"site policy dp-unit = {self.unit!r}, but this run asks for dp-unit = {unit!r} "
                                 f"(the site accepts {[u for u in UNIT_ORDER if UNIT_ORDER.index(u) >= UNIT_ORDER.index(self.unit)]})")
        if self.min_noise_multiplier is not None and noise_multiplier < self.min_noise_multiplier:
            raise PrivacyRefused(f"site policy dp-min-noise-multiplier = {self.min_noise_multiplier:g}, "
                                 f"but this run asks for dp-noise-multiplier = {noise_multiplier:g}")
        if self.max_delta is not None and delta > self.max_delta:
            raise PrivacyRefused(f"site policy dp-max-delta = {self.max_delta:g}, but this run's delta is {delta:g}")

    def check_spend(self, *, spent: float, after: float, ledger: str) -> None:
        """Refuse a round that would take the dataset's lifetime epsilon past ``max_epsilon``."""
        if self.max_epsilon is None:
            return
        if spent >= self.max_epsilon:
            raise PrivacyRefused(f"the dataset's privacy budget is already spent: epsilon {spent:.3f} >= "
                                 f"site policy dp-max-epsilon = {self.max_epsilon:g} (ledger {ledger})")
        if after > self.max_epsilon:
            raise PrivacyRefused(f"this round would bring the dataset's lifetime epsilon from {spent:.3f} to "
                                 f"{after:.3f} > site policy dp-max-epsilon = {self.max_epsilon:g} (ledger {ledger})")


def parse_site_policies(text: str) -> dict[str, dict[str, str]]:
    """``"mimic: dp-required=true dp-max-epsilon=8; ptb: ..."`` -> ``{"mimic": {...}, "ptb": {...}}``."""
    out: dict[str, dict[str, str]] = {}
    for part in (p.strip() for p in str(text).split(";")):
        if not part:
            continue
        site, sep, rest = part.partition(":")
        if not sep or not site.strip():
            raise ConfigError(f"run config: site-policy part {part!r} is invalid: write 'SITE: key=value ...'")
        values = {}
        for item in rest.split():
            key, eq, value = item.partition("=")
            if not eq or key not in POLICY_KEYS:
                raise ConfigError(f"run config: site-policy item {item!r} for {site.strip()!r} is invalid: "
                                  f"write key=value with a key from {list(POLICY_KEYS)}")
            values[key] = value
        out[site.strip()] = values
    return out
