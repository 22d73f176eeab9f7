"""Critical slowing down of φ⁴ on the line m_p·L = 4: tuned HMC against neural MCMC per L.

For every lattice size L the recipe ``<runs>/phi4_critical_L<L>.toml`` (a φ⁴ recipe on L×L whose
action card lies on the critical line) and its trained flow give one point. Both samplers run
for the same sampling wall time ``budget_s`` (setup, HMC tuning and thermalisation, flow loading
and training are not counted; training is reported in a column of its own). Per sampler:

* ⟨|m|⟩ with m = (1/V)Σ_x φ(x), and χ₂ = V(⟨m²⟩ − ⟨m⟩²) (the convention of
  :mod:`latticeflow.observables`; a Γ-method derived quantity of the per-config m and m²), with
  Γ-method errors (chains as replicas), against a long HMC reference run;
* τ_int of |m| and of χ₂'s per-configuration estimator m², in rows of a chain (HMC: trajectories;
  neural MCMC: proposals), the acceptance, and the cost per independent sample
  c = wall × 2τ_int / N of both (:mod:`latticeflow.studies.sampler_race`, which also defines the
  ``reliable`` flag: every chain ≥ 50 τ_int long, DESIGN §10);
* the break-even number of independent χ₂ samples N* = t_train / (c_HMC − c_NMCMC) (infinite when
  the flow is not cheaper); t_train is the whole ``init_from`` chain's training seconds when every
  link's checkpoint is there, else the flow's own.

HMC is tuned per L as a careful user would (:func:`tune_hmc`, all of it recorded; the procedure
is :mod:`latticeflow.studies.hmc_tuning`, shared with the U(1) freezing study, steered by |m|
from a random start, base trajectory length max(1, L/8)):

1. chain count: the count of ``chain_counts`` (capped at ``max_sites`` = chains × V) with the
   most trajectories × chains per second, timed over a few trajectories at τ = max(1, L/8);
2. trajectory length τ ∈ ``tau_factors`` × max(1, L/8), each with the step size tuned to
   acceptance 0.8 by dual averaging during ``n_tune`` trajectories and a pilot run of
   ``pilot_s`` seconds; the τ with the smallest cost per independent |m| sample wins. The pilots
   run from the longest τ to the shortest, each starting from the previous one's final
   configurations (the first, from a random start, thermalises over the most MD time);
3. if the production run would leave each chain shorter than 50 τ_int(|m|) of the winning pilot,
   the largest measured chain count that does not is used instead;
4. production starts from the winning pilot's final (equilibrated) configurations after another
   ``therm_factor`` × τ_int(|m|) trajectories at the frozen step size.

The reference values come from the same tuned HMC, another seed, for ``reference_factor`` ×
``budget_s`` seconds; they are cached per L and action in a JSON file and reused while the
action matches and the cached budget is at least the one asked for.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latticeflow.base.errors import LatticeflowError
from latticeflow.config import Recipe, load_recipe
from latticeflow.samplers.hmc import HMCSampler
from latticeflow.samplers.nmcmc import FlowMetropolis
from latticeflow.studies import hmc_tuning
from latticeflow.studies.hmc_tuning import HMCTuning, enough_per_chain
from latticeflow.studies.sampler_race import (
    Estimate,
    HMCBlocks,
    NMCMCBlocks,
    break_even,
    cost_per_independent,
    estimate,
    run_for,
)
from latticeflow.theories import Action, action_from_table
from latticeflow.training import CHECKPOINT_NAME, load_checkpoint, read_checkpoint
from latticeflow.training.lineage import lineage_training_seconds

log = logging.getLogger("latticeflow")

SAMPLERS = ("hmc", "nmcmc")
RECIPE_NAME = "phi4_critical_L{L}.toml"


@dataclass(frozen=True)
class SlowingSettings:
    """Budgets and HMC tuning choices (module docstring); seconds are sampling wall time."""

    budget_s: float = 60.0
    reference_factor: float = 10.0
    chain_counts: tuple[int, ...] = (1, 4, 16, 64, 256)
    max_sites: int = 1 << 22
    throughput_trajectories: int = 4
    tau_factors: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    pilot_s: float = 10.0
    n_tune: int = 200
    therm_factor: float = 20.0
    nmcmc_batch: int = 1024
    hmc_dtype: str = "float64"
    seed: int = 0


@dataclass(frozen=True)
class TrainedFlow:
    """A checked input: the recipe of one L and its trained flow's training seconds (own, and
    of the whole ``init_from`` chain, None when a link's checkpoint is missing)."""

    L: int
    path: Path
    recipe: Recipe
    checkpoint: Path
    training_s: float
    training_chain_s: float | None

    @property
    def training_total_s(self) -> float:
        return self.training_chain_s if self.training_chain_s is not None else self.training_s


def critical_recipes(runs_dir: str | Path, sizes: Sequence[int],
                     name: str = RECIPE_NAME) -> list[Path]:
    """``<runs_dir>/<name>`` with ``{L}`` in ``name`` replaced by each L (default
    ``phi4_critical_L<L>.toml``); refuses a missing one."""
    if "{L}" not in name:
        raise LatticeflowError(f"recipe name {name!r} has no {{L}} to fill in")
    paths = []
    for L in sizes:
        path = Path(runs_dir) / name.replace("{L}", str(L))
        if not path.is_file():
            raise LatticeflowError(f"L = {L}: no recipe {path} (an L needs a recipe and an "
                                   f"action card on the critical line)")
        paths.append(path)
    return paths


def check_trained(path: Path, L: int) -> TrainedFlow:
    """Load the recipe of ``L`` and check it and its checkpoint (one-line errors)."""
    recipe = load_recipe(path)
    if recipe.theory != "phi4":
        raise LatticeflowError(f"{path}: a {recipe.theory} recipe; the critical-slowing study "
                               f"needs φ⁴")
    if tuple(recipe.lattice) != (L, L):
        raise LatticeflowError(f"{path}: lattice {list(recipe.lattice)}, expected [{L}, {L}]")
    checkpoint = recipe.default_run_dir() / CHECKPOINT_NAME
    if not checkpoint.is_file():
        raise LatticeflowError(f"{path}: no trained flow at {checkpoint}; train it with "
                               f"`latticeflow run {path}`")
    state, _ = read_checkpoint(checkpoint)
    params = recipe.action().params()
    if state["theory"] != "phi4" or action_from_table(dict(state["action"])).params() != params:
        raise LatticeflowError(f"{checkpoint}: a flow trained for the {state['theory']} action "
                               f"{dict(state['action'])}, the recipe has φ⁴ {params}")
    own, chain = lineage_training_seconds(recipe, state)
    return TrainedFlow(L, path, recipe, checkpoint, own, chain)


# ------------------------------------------------------------------------------ measurements
def per_config(configs: np.ndarray) -> np.ndarray:
    """Block ``(rows, chains, L, L)`` → ``(rows, chains, 3)``: m, |m|, m² per configuration."""
    m = configs.mean(axis=tuple(range(2, configs.ndim)))
    return np.stack([m, np.abs(m), m * m], axis=-1)


@dataclass
class SamplerRun:
    """One sampler at one L: ⟨|m|⟩, χ₂ and m² estimates (module docstring)."""

    sampler: str
    L: int
    rows: int
    chains: int
    wall_s: float
    acceptance: float
    abs_m: Estimate
    chi2: Estimate
    m2: Estimate

    @property
    def cost_abs_m(self) -> float:
        return cost_per_independent(self.wall_s, self.abs_m.tau_int, self.rows)

    @property
    def cost_chi2(self) -> float:
        return cost_per_independent(self.wall_s, self.m2.tau_int, self.rows)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"cost_abs_m_s": self.cost_abs_m, "cost_chi2_s": self.cost_chi2}


def analyse(sampler: str, L: int, series: np.ndarray, wall_s: float, acceptance: float
            ) -> SamplerRun:
    """Estimates from a per-config history ``(rows, chains, 3)`` (:func:`per_config`)."""
    volume = L * L

    def chi2(means: np.ndarray) -> float:
        return volume * (means[1] - means[0] ** 2)

    rows, chains = series.shape[:2]
    return SamplerRun(sampler, L, rows * chains, chains, wall_s, acceptance,
                      estimate(series[..., 1]), estimate(series[..., [0, 2]], chi2),
                      estimate(series[..., 2]))


# ------------------------------------------------------------------------------ HMC tuning
def base_trajectory(L: int) -> float:
    """τ = max(1, L/8): a fraction of the slowest mode's period on the line (2π/(√2 m_p))."""
    return max(1.0, L / 8)


def _abs_m(configs: np.ndarray) -> np.ndarray:
    """Block ``(rows, chains, L, L)`` → |m| ``(rows, chains)``: the tuning's steering scalar."""
    return per_config(configs)[..., 1]


def tune_hmc(action: Action, L: int, settings: SlowingSettings) -> HMCTuning:
    """Chain count, trajectory length, step size and equilibrium start (module docstring),
    steered by |m|: :func:`latticeflow.studies.hmc_tuning.tune_hmc` from a random start."""
    return hmc_tuning.tune_hmc(action, (L, L), settings, base_trajectory(L), _abs_m, "abs_m",
                               label=f"L={L}")


def measure_throughput(action: Action, L: int, settings: SlowingSettings
                       ) -> list[dict[str, float]]:
    """Configurations (trajectories × chains) per second for every allowed chain count."""
    return hmc_tuning.measure_throughput(action, (L, L), settings, base_trajectory(L))


_enough_per_chain = enough_per_chain


def equilibrium_hmc(action: Action, L: int, tuning: HMCTuning, settings: SlowingSettings,
                    seed: int) -> HMCSampler:
    """A tuned sampler in equilibrium (:func:`latticeflow.studies.hmc_tuning.equilibrium_hmc`)."""
    return hmc_tuning.equilibrium_hmc(action, (L, L), tuning, settings, seed)


def run_hmc(action: Action, L: int, tuning: HMCTuning, settings: SlowingSettings,
            budget_s: float, seed: int) -> SamplerRun:
    """Tuned HMC for ``budget_s`` seconds of sampling."""
    blocks = HMCBlocks(equilibrium_hmc(action, L, tuning, settings, seed))
    series, wall = run_for(budget_s, blocks, per_config, f"HMC L={L}")
    return analyse("hmc", L, series, wall, blocks.acceptance)


def run_nmcmc(trained: TrainedFlow, settings: SlowingSettings, device: torch.device
              ) -> SamplerRun:
    """Neural MCMC (one chain) with the trained flow for ``budget_s`` seconds of sampling."""
    loaded = load_checkpoint(trained.checkpoint, device=device)
    sampler = FlowMetropolis(loaded.flow, loaded.action, seed=settings.seed,
                             batch_size=settings.nmcmc_batch)
    blocks = NMCMCBlocks(sampler, settings.nmcmc_batch)
    series, wall = run_for(settings.budget_s, blocks, per_config, f"NMCMC L={trained.L}")
    return analyse("nmcmc", trained.L, series, wall, blocks.acceptance)


# ------------------------------------------------------------------------------ the study
def reference(action: Action, L: int, tuning: HMCTuning, settings: SlowingSettings,
              cache: dict[str, Any]) -> dict[str, Any]:
    """The high-statistics HMC values at L, from ``cache`` (key ``L<L>``) when it holds this
    action with at least the budget asked for; else a new run, stored into ``cache``."""
    budget = settings.reference_factor * settings.budget_s
    cached = cache.get(f"L{L}")
    if cached and cached["action"] == action.params() and cached["budget_s"] >= budget:
        return cached
    run = run_hmc(action, L, tuning, settings, budget, settings.seed + 7919)
    entry = {"action": action.params(), "budget_s": budget, "run": run.to_dict(),
             "abs_m": run.abs_m.value, "abs_m_error": run.abs_m.error,
             "chi2": run.chi2.value, "chi2_error": run.chi2.error,
             "reliable": run.abs_m.reliable and run.m2.reliable}
    cache[f"L{L}"] = entry
    return entry


def _number(value: Any) -> float:
    """A JSON number (None stands for NaN in the cache) as a float."""
    return float("nan") if value is None else float(value)


@dataclass
class SizePoint:
    """Both samplers at one L with the HMC tuning and the reference values."""

    trained: TrainedFlow
    tuning: HMCTuning
    reference: dict[str, Any]
    results: dict[str, SamplerRun]

    @property
    def L(self) -> int:
        return self.trained.L

    def pull(self, sampler: str, observable: str) -> float:
        """(value − reference) / combined error; NaN without an error."""
        est: Estimate = getattr(self.results[sampler], observable)
        ref, ref_error = (_number(self.reference.get(k))
                          for k in (observable, f"{observable}_error"))
        scale = math.hypot(est.error, ref_error)
        return (est.value - ref) / scale if scale > 0 else float("nan")

    @property
    def speedup(self) -> float:
        """HMC cost per independent χ₂ sample over the neural-MCMC one."""
        return self.results["hmc"].cost_chi2 / self.results["nmcmc"].cost_chi2

    @property
    def break_even(self) -> float:
        """N* = t_train / (c_HMC − c_NMCMC) in independent χ₂ samples (inf: never)."""
        return break_even(self.trained.training_total_s, self.results["hmc"].cost_chi2,
                          self.results["nmcmc"].cost_chi2)


def run_critical_slowing(inputs: Sequence[TrainedFlow], settings: SlowingSettings,
                         cache: dict[str, Any], device: torch.device | None = None,
                         on_reference: Any = None) -> list[SizePoint]:
    """Every L in order (inputs from :func:`check_trained`); ``on_reference(cache)`` is called
    after each new reference run (to save the cache)."""
    device = device or torch.device("cpu")
    points = []
    for trained in inputs:
        action, L = trained.recipe.action(), trained.L
        tuning = tune_hmc(action, L, settings)
        log.info("L = %d: HMC %d chains, τ = %g, ε = %.4g, τ_int(|m|) ≈ %.3g (%s)", L,
                 tuning.chains, tuning.trajectory_length, tuning.step_size,
                 tuning.tau_int, tuning.chains_reason)
        before = cache.get(f"L{L}")
        ref = reference(action, L, tuning, settings, cache)
        if on_reference is not None and ref is not before:
            on_reference(cache)
        results = {"hmc": run_hmc(action, L, tuning, settings, settings.budget_s, settings.seed),
                   "nmcmc": run_nmcmc(trained, settings, device)}
        point = SizePoint(trained, tuning, ref, results)
        for r in results.values():
            log.info("L = %d %-5s: %d rows in %.0f s, acc %.3f, <|m|> %.5f ± %.5f, χ₂ %.4g ± %.2g,"
                     " τ_int(m²) %.3g, cost/indep χ₂ %.3g s", L, r.sampler, r.rows, r.wall_s,
                     r.acceptance, r.abs_m.value, r.abs_m.error, r.chi2.value, r.chi2.error,
                     r.m2.tau_int, r.cost_chi2)
        points.append(point)
    return points


__all__ = ["HMCTuning", "SAMPLERS", "SamplerRun", "SizePoint", "SlowingSettings", "TrainedFlow",
           "analyse", "check_trained", "critical_recipes", "equilibrium_hmc",
           "measure_throughput", "per_config", "reference", "run_critical_slowing", "run_hmc",
           "run_nmcmc", "tune_hmc"]
