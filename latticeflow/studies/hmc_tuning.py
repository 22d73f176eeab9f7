"""HMC tuned as a careful user tunes it: the one tuning procedure of the sampler studies
(:mod:`latticeflow.studies.critical_slowing` for φ⁴, :mod:`latticeflow.studies.freezing` for
U(1)).

Conventions
-----------
* The tuning is steered by one scalar per configuration, ``observe(block)`` → ``(rows, chains)``
  for a block ``(rows, chains, *field_shape)`` (|m| for φ⁴, Q² for U(1)); its name
  (``observable``) appears in the recorded keys (``tau_int_<name>``, ``cost_<name>_s``).
* Trajectory lengths are in molecular-dynamics time; τ_int in trajectories (rows of a chain);
  costs are seconds per independent sample, c = wall × 2τ_int / N
  (:mod:`latticeflow.studies.sampler_race`).

The procedure (:func:`tune_hmc`, everything it measures is recorded):

1. chain count: the count of ``chain_counts`` (capped at ``max_sites`` = chains × V) with the most
   trajectories × chains per second, timed over ``throughput_trajectories`` trajectories at the
   base trajectory length;
2. trajectory length τ ∈ ``tau_factors`` × base length, each with the step size tuned to
   acceptance 0.8 by dual averaging during ``n_tune`` trajectories and a pilot run of
   ``pilot_s`` seconds; the τ with the smallest cost per independent sample wins. The pilots run
   from the longest τ to the shortest, each starting from the previous one's final
   configurations; the first starts from ``start(chains)`` when given (e.g. exact samples: an
   equilibrium start), else from the sampler's random start;
3. if the production run of ``budget_s`` seconds would leave each chain shorter than 50 τ_int of
   the winning pilot, the largest measured chain count that does not is used instead
   (:func:`enough_per_chain`);
4. production (:func:`equilibrium_hmc`) starts from the winning pilot's final configurations
   after another max(10, ⌈``therm_factor`` × τ_int⌉) trajectories at the frozen step size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from latticeflow.base.errors import LatticeflowError
from latticeflow.samplers.hmc import HMCConfig, HMCSampler
from latticeflow.studies.sampler_race import (
    MIN_TAU_LENGTHS,
    HMCBlocks,
    Measure,
    cost_per_independent,
    estimate,
    run_for,
)
from latticeflow.theories import Action

TARGET_ACCEPT = 0.8


class TuningSettings(Protocol):
    """The settings :func:`tune_hmc` reads (the studies' settings dataclasses have them all)."""

    budget_s: float
    chain_counts: tuple[int, ...]
    max_sites: int
    throughput_trajectories: int
    tau_factors: tuple[float, ...]
    pilot_s: float
    n_tune: int
    therm_factor: float
    hmc_dtype: str
    seed: int


@dataclass
class HMCTuning:
    """What :func:`tune_hmc` chose, with its measurements (JSON-ready but ``start``).

    ``tau_int`` is the winning pilot's τ_int of the steering observable ``observable``."""

    observable: str
    throughput: list[dict[str, float]]
    chains: int
    chains_reason: str
    scan: list[dict[str, Any]]
    trajectory_length: float
    step_size: float
    n_steps: int
    tau_int: float
    n_therm: int
    seconds: float = 0.0
    start: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("start", "tau_int")}
        out[f"tau_int_{self.observable}"] = self.tau_int
        return out


def hmc_config(settings: TuningSettings, chains: int, trajectory_length: float,
               step_size: float, tune: bool) -> HMCConfig:
    """The study's HMC configuration; ``tune``: dual-averaged step size over ``n_tune``."""
    return HMCConfig(step_size=step_size, trajectory_length=trajectory_length, n_chains=chains,
                     n_therm=settings.n_tune if tune else 0, dtype=settings.hmc_dtype,
                     target_accept=TARGET_ACCEPT if tune else None)


def with_configs(sampler: HMCSampler, configs: np.ndarray | None) -> HMCSampler:
    """``sampler`` started from ``configs`` through its resume state: the first n_chains of
    them, repeated cyclically when there are fewer (the chains then decorrelate in the
    thermalisation that follows)."""
    if configs is not None:
        state = sampler.state_dict()
        n = sampler.config.n_chains
        state["x"] = np.resize(configs, (n, *configs.shape[1:])).astype(state["x"].dtype)
        sampler.load_state_dict(state)
    return sampler


def measure_throughput(action: Action, lattice: Sequence[int], settings: TuningSettings,
                       base_length: float) -> list[dict[str, float]]:
    """Configurations (trajectories × chains) per second for every allowed chain count."""
    out, volume = [], math.prod(lattice)
    for chains in settings.chain_counts:
        if chains * volume > settings.max_sites:
            continue
        config = hmc_config(settings, chains, base_length, min(0.1, base_length / 2), False)
        sampler = HMCSampler(action, tuple(lattice), config, settings.seed)
        sampler.advance(chains)  # warm-up trajectory
        started = time.perf_counter()
        sampler.advance(settings.throughput_trajectories * chains)
        seconds = time.perf_counter() - started
        out.append({"n_chains": chains,
                    "configs_per_s": settings.throughput_trajectories * chains / seconds})
    if not out:
        raise LatticeflowError(f"lattice {list(lattice)}: no chain count fits max_sites = "
                               f"{settings.max_sites}")
    return out


def tune_hmc(action: Action, lattice: Sequence[int], settings: TuningSettings,
             base_length: float, observe: Measure, observable: str,
             start: Callable[[int], np.ndarray] | None = None, label: str = "") -> HMCTuning:
    """Chain count, trajectory length, step size and equilibrium start (module docstring)."""
    began = time.perf_counter()
    throughput = measure_throughput(action, lattice, settings, base_length)
    chains = int(max(throughput, key=lambda t: t["configs_per_s"])["n_chains"])
    configs = start(chains) if start is not None else None
    scan: list[dict[str, Any]] = []
    winner: tuple[dict[str, Any], np.ndarray] | None = None
    for i, factor in enumerate(sorted(settings.tau_factors, reverse=True)):
        length = factor * base_length
        config = hmc_config(settings, chains, length, min(0.1, length / 2), True)
        sampler = with_configs(HMCSampler(action, tuple(lattice), config, settings.seed + 1 + i),
                               configs)
        sampler.thermalise()
        blocks = HMCBlocks(sampler, sweeps=4)
        series, wall = run_for(settings.pilot_s, blocks, observe, f"HMC {label} τ={length:g}")
        configs = sampler.configs.cpu().numpy()
        pilot = estimate(series)
        cost = cost_per_independent(wall, pilot.tau_int, pilot.n)
        scan.append({"trajectory_length": length, "step_size": sampler.step_size,
                     "n_steps": sampler.n_steps, "acceptance": blocks.acceptance,
                     "rows_per_chain": pilot.rows_per_chain, "wall_s": wall,
                     f"tau_int_{observable}": pilot.tau_int,
                     f"tau_int_{observable}_error": pilot.tau_int_error,
                     "reliable": pilot.reliable, f"cost_{observable}_s": cost})
        if winner is None or cost < winner[0][f"cost_{observable}_s"]:
            winner = (scan[-1], configs)
    chosen, configs = winner
    tau = chosen[f"tau_int_{observable}"]
    per_chain_rate = chosen["rows_per_chain"] / chosen["wall_s"]   # trajectories / s / chain
    chains, reason = enough_per_chain(throughput, chains, per_chain_rate, tau, settings.budget_s,
                                      observable)
    return HMCTuning(observable, throughput, chains, reason, scan, chosen["trajectory_length"],
                     chosen["step_size"], chosen["n_steps"], tau,
                     max(10, math.ceil(settings.therm_factor * tau)),
                     time.perf_counter() - began, configs)


def enough_per_chain(throughput: list[dict[str, float]], chains: int, rate: float, tau: float,
                     budget_s: float, observable: str = "|m|") -> tuple[int, str]:
    """The chain count: the fastest one unless its chains would be < 50 τ_int long in
    ``budget_s``; then the fastest count whose chains would be long enough (else the fewest)."""
    need = MIN_TAU_LENGTHS * tau
    speed = {int(t["n_chains"]): t["configs_per_s"] for t in throughput}
    length = {c: budget_s * rate * (speed[c] / c) / (speed[chains] / chains) for c in speed}
    if length[chains] >= need:
        return chains, "highest throughput"
    enough = [c for c in speed if length[c] >= need]
    if enough:
        pick = max(enough, key=speed.__getitem__)
        return pick, f"fastest count with chains >= {MIN_TAU_LENGTHS:g} τ_int({observable}) long"
    return min(speed), f"no count gives chains of {MIN_TAU_LENGTHS:g} τ_int({observable}): " \
                       f"fewest chains"


def equilibrium_hmc(action: Action, lattice: Sequence[int], tuning: HMCTuning,
                    settings: TuningSettings, seed: int) -> HMCSampler:
    """A tuned sampler started from the tuning's final configurations, after ``n_therm``
    more trajectories at the frozen step size."""
    config = hmc_config(settings, tuning.chains, tuning.trajectory_length, tuning.step_size,
                        tune=False)
    sampler = with_configs(HMCSampler(action, tuple(lattice), config, seed), tuning.start)
    sampler.thermalise()  # n_therm = 0: only marks it thermalised
    with torch.no_grad():
        for _ in range(tuning.n_therm):
            sampler.trajectory(sampler.step_size, sampler.n_steps)
    return sampler


__all__ = ["HMCTuning", "TARGET_ACCEPT", "TuningSettings", "enough_per_chain",
           "equilibrium_hmc", "hmc_config", "measure_throughput", "tune_hmc", "with_configs"]
