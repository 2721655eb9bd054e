"""Cumulative Opacus privacy accounting that survives between rounds (and processes).

A site's accountant history is a list of ``(noise_multiplier, sample_rate, steps)``. It is kept in
a flat dict of scalars and lists of scalars (``dp_state``), so a Flower ``ConfigRecord`` can hold
it as is, and restored before every round: epsilon is over every round the site trained in, not
per round (a fresh ``PrivacyEngine`` per round would under-report it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # opacus is imported where it is used: nodes that train without DP never load it
    from opacus.accountants import IAccountant

from .config import DPConfig

DP_STATE_VERSION = 1


def history_from_state(dp_state: dict[str, Any] | None) -> list[tuple[float, float, int]]:
    """The accountant history stored in ``dp_state`` (empty for ``None``)."""
    if not dp_state:
        return []
    try:
        sigmas = list(dp_state["noise_multipliers"])
        rates = list(dp_state["sample_rates"])
        steps = list(dp_state["steps"])
    except KeyError as exc:
        raise ValueError(f"dp_state is missing {exc.args[0]!r}: {sorted(dp_state)}") from None
    if not len(sigmas) == len(rates) == len(steps):
        raise ValueError(
            "dp_state lists differ in length: "
            f"noise_multipliers {len(sigmas)}, sample_rates {len(rates)}, steps {len(steps)}"
        )
    return [(float(s), float(q), int(n)) for s, q, n in zip(sigmas, rates, steps)]


def make_accountant(mechanism: str, history: list[tuple[float, float, int]]) -> IAccountant:
    """A fresh Opacus accountant of kind ``mechanism`` holding ``history``."""
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism=mechanism)
    accountant.history = [tuple(h) for h in history]
    return accountant


def epsilon_of(mechanism: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon spent after ``history`` (0 when nothing was trained)."""
    if not history:
        return 0.0
    return float(make_accountant(mechanism, history).get_epsilon(delta=delta))


def append_steps(
    history: list[tuple[float, float, int]], noise_multiplier: float, sample_rate: float, steps: int
) -> list[tuple[float, float, int]]:
    """``history`` with ``steps`` more steps, merged like Opacus merges equal consecutive entries."""
    out = [tuple(h) for h in history]
    if steps <= 0:
        return out
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        sigma, q, n = out.pop()
        out.append((sigma, q, n + steps))
    else:
        out.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return out


def state_from_history(
    dp: DPConfig, history: list[tuple[float, float, int]], rounds_trained: int
) -> dict[str, Any]:
    """The flat, serialisable ``dp_state`` for ``history``."""
    return {
        "version": DP_STATE_VERSION,
        "accountant": dp.accountant,
        "noise_multipliers": [float(h[0]) for h in history],
        "sample_rates": [float(h[1]) for h in history],
        "steps": [int(h[2]) for h in history],
        "total_steps": int(sum(h[2] for h in history)),
        "rounds_trained": int(rounds_trained),
        "epsilon": epsilon_of(dp.accountant, history, dp.delta),
        "delta": float(dp.delta),
    }


def check_state_matches(dp: DPConfig, dp_state: dict[str, Any] | None) -> None:
    """A stored state from another accountant kind cannot be continued silently."""
    if dp_state and dp_state.get("accountant", dp.accountant) != dp.accountant:
        raise ValueError(
            f"dp_state was accounted with {dp_state['accountant']!r} but this round asks for "
            f"{dp.accountant!r}; keep one accountant for the whole run"
        )


def opacus_steps_per_epoch(batches: int) -> int:
    """The optimiser steps Opacus runs per epoch for a loader of ``batches`` batches.

    Opacus's Poisson loader samples at rate ``1 / batches`` but runs ``int(1 / (1 / batches))``
    steps per epoch (``UniformWithReplacementSampler.steps``), and ``make_private`` accounts
    ``1 / len(dp_loader)``: for some ``batches`` (93, 99, 105, ...) the float round trip gives
    ``batches - 1``. The ledger plans exactly what Opacus runs and accounts.
    """
    return int(1 / (1 / batches))


def sample_rate_and_steps(n_units: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """``(q, steps)`` exactly as Opacus accounts them for ``epochs`` epochs over ``n_units`` units.

    ``k = ceil(N / batch_size)`` batches; Opacus runs ``s = int(1 / (1 / k))`` steps per epoch and
    accounts ``q = 1 / s`` (conservative where ``s = k - 1``: the true Poisson rate is ``1 / k``).
    """
    steps_per_epoch = opacus_steps_per_epoch(math.ceil(n_units / batch_size))
    return 1.0 / steps_per_epoch, epochs * steps_per_epoch
