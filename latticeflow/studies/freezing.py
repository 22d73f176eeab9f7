"""The topological-freezing study of 2D U(1): five samplers per β, and where each gain comes from.

For every β of a ladder each sampler runs until ``budget_s`` seconds of sampling are spent (HMC
tuning, flow loading and training are not counted; tuning is reported as ``setup_s``, training
in columns of its own). The rows (DESIGN §10, "attributing a gain"):

* ``hmc`` (a): HMC as a careful user runs it, tuned by :mod:`latticeflow.studies.hmc_tuning`
  steered by Q² (chain count with the best measured throughput, trajectory length from
  ``tau_factors`` × 1 with a dual-averaged step size) and started in equilibrium from exact
  samples (:func:`latticeflow.samplers.exact_u1.sample_exact_u1`);
* ``exact`` (b): independent exact samples (rejection from von Mises plaquettes), the reference
  limit; one chain, τ_int = 1/2 by construction but measured like the others; its acceptance
  is the rejection sampler's (:func:`~latticeflow.samplers.exact_u1.expected_acceptance`);
* ``prior`` (c): independent Metropolis with the plaquette prior alone
  (:class:`~latticeflow.flows.plaquette_prior.PlaquettePrior`, κ = β: the flow's base density,
  no couplings, no training);
* ``nmcmc`` (d): neural MCMC with the trained plaquette-prior flow of ``u1_flow_beta<β>_L<L>.toml``;
* ``haar`` (e): neural MCMC with the trained Haar-prior flow of ``u1_haar_beta<β>_L<L>.toml``
  (``[flow] prior = "uniform"``), the general method; optional: without that recipe the row is
  left out and a note says so.

Per row: χ_t = ⟨Q²⟩/V with its Γ-method error (chains as replicas) against the exact
finite-volume value; τ_int(Q²) in rows of a chain (HMC: trajectories; the others: draws or
proposals); the acceptance; the cost per independent Q² sample c = wall × 2τ_int / N; the
training seconds, the link's own and the whole ``init_from`` lineage's (checkpoints'
``wall_time``; 0 for the rows without training; lineage None when an ancestor's checkpoint is
missing); the break-even number of independent Q² samples against (a),
N* = t_train / (c_hmc − c_row) with t_train the lineage's seconds (the own ones when the lineage
is incomplete; infinite when the row is not cheaper than HMC). A row is ``reliable`` only when
every chain is at least 50 τ_int long and the Γ-method found a window; otherwise τ_int and c are
lower bounds (:mod:`latticeflow.studies.sampler_race`). Tables and figure:
:mod:`latticeflow.studies.freezing_report`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latticeflow import exact
from latticeflow.base.errors import LatticeflowError
from latticeflow.config import Recipe, load_recipe
from latticeflow.flows.flow import Flow
from latticeflow.flows.plaquette_prior import PlaquettePrior
from latticeflow.flows.priors import UniformAnglePrior
from latticeflow.observables import topological_charge
from latticeflow.samplers.exact_u1 import expected_acceptance, sample_exact_u1
from latticeflow.samplers.nmcmc import FlowMetropolis
from latticeflow.studies import hmc_tuning
from latticeflow.studies.sampler_race import (
    HMCBlocks,
    NMCMCBlocks,
    break_even,
    cost_per_independent,
    estimate,
    run_for,
)
from latticeflow.theories import action_from_table
from latticeflow.training import CHECKPOINT_NAME, load_checkpoint, read_checkpoint
from latticeflow.training.lineage import lineage_training_seconds

log = logging.getLogger("latticeflow")

SAMPLERS = ("hmc", "exact", "prior", "nmcmc", "haar")
LABELS = {"hmc": "(a) tuned HMC", "exact": "(b) exact sampler", "prior": "(c) plaquette prior",
          "nmcmc": "(d) plaquette-prior flow", "haar": "(e) Haar-prior flow"}
RECIPE_NAMES = {"nmcmc": "u1_flow_beta{beta:g}_L{L}.toml", "haar": "u1_haar_beta{beta:g}_L{L}.toml"}


@dataclass(frozen=True)
class FreezingSettings:
    """Budgets and HMC tuning choices (module docstring; the tuning fields are those of
    :class:`latticeflow.studies.hmc_tuning.TuningSettings`). ``batch``: draws per block of the
    exact sampler and proposals per block of the independent-Metropolis rows."""

    budget_s: float = 60.0
    chain_counts: tuple[int, ...] = (1, 4, 16, 64, 256, 1024)
    max_sites: int = 1 << 22
    throughput_trajectories: int = 4
    tau_factors: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    pilot_s: float = 10.0
    n_tune: int = 200
    therm_factor: float = 1.0
    batch: int = 1024
    hmc_dtype: str = "float64"
    seed: int = 0


@dataclass
class SamplerResult:
    """One row at one β (see the module docstring for the meanings)."""

    sampler: str
    beta: float
    rows: int
    chains: int
    wall_s: float
    setup_s: float
    acceptance: float
    chi_t: float
    chi_t_error: float
    chi_t_exact: float
    tau_int: float
    tau_int_error: float
    cost_per_independent_s: float
    reliable: bool
    training_s: float = 0.0
    training_chain_s: float | None = 0.0

    @property
    def pull(self) -> float:
        """(χ_t − exact) / error; NaN without an error."""
        if not self.chi_t_error > 0:
            return float("nan")
        return (self.chi_t - self.chi_t_exact) / self.chi_t_error

    @property
    def training_total_s(self) -> float:
        """The lineage's training seconds, or the own ones when the lineage is incomplete."""
        return self.training_chain_s if self.training_chain_s is not None else self.training_s


@dataclass(frozen=True)
class TrainedFlow:
    """A checked recipe with its trained flow and training seconds (own, lineage or None)."""

    path: Path
    recipe: Recipe
    checkpoint: Path
    training_s: float
    training_chain_s: float | None


@dataclass(frozen=True)
class LadderInput:
    """One β: its checked flows (``nmcmc``, and ``haar`` when its recipe exists) and notes."""

    beta: float
    lattice: tuple[int, int]
    flows: dict[str, TrainedFlow]
    notes: tuple[str, ...] = ()


@dataclass
class BetaPoint:
    """Every row at one β, with the Q histories (``(rows per chain, chains)``), the HMC tuning
    record and the notes (e.g. a row left out)."""

    beta: float
    recipe: str
    results: dict[str, SamplerResult]
    charges: dict[str, np.ndarray]
    hmc_tuning: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def break_even(self, sampler: str) -> float:
        """N* of ``sampler`` against (a) in independent Q² samples (module docstring)."""
        r, hmc = self.results[sampler], self.results["hmc"]
        return break_even(r.training_total_s, hmc.cost_per_independent_s,
                          r.cost_per_independent_s)


# ------------------------------------------------------------------------------ inputs
def ladder_recipes(runs_dir: str | Path, betas: Sequence[float], lattice: int) -> list[Path]:
    """The plaquette-prior flow recipe of every β, ``<runs_dir>/u1_flow_beta<β>_L<lattice>.toml``;
    refuses a missing one."""
    paths = []
    for beta in betas:
        path = Path(runs_dir) / RECIPE_NAMES["nmcmc"].format(beta=beta, L=lattice)
        if not path.is_file():
            raise LatticeflowError(f"β = {beta:g}: no recipe {path} (a β needs a recipe and an "
                                   f"action card)")
        paths.append(path)
    return paths


def check_trained(path: Path, prior: str | None = None) -> TrainedFlow:
    """Load a U(1) recipe and check it and its checkpoint (one-line errors); ``prior``: the
    ``[flow] prior`` the recipe must have (None: any)."""
    recipe = load_recipe(path)
    if recipe.theory != "u1":
        raise LatticeflowError(f"{path}: a {recipe.theory} recipe; the freezing study needs U(1)")
    if prior is not None and recipe.architecture.get("prior") != prior:
        raise LatticeflowError(f"{path}: [flow] prior = {recipe.architecture.get('prior')!r}, "
                               f"this row needs {prior!r}")
    checkpoint = recipe.default_run_dir() / CHECKPOINT_NAME
    if not checkpoint.is_file():
        raise LatticeflowError(f"{path}: no trained flow at {checkpoint}; train it with "
                               f"`latticeflow run {path}`")
    state, _ = read_checkpoint(checkpoint)
    params = recipe.action().params()
    if state["theory"] != "u1" or action_from_table(dict(state["action"])).params() != params:
        raise LatticeflowError(f"{checkpoint}: the checkpoint was trained for the "
                               f"{state['theory']} action {dict(state['action'])}, the recipe "
                               f"has {params}")
    own, chain = lineage_training_seconds(recipe, state)
    return TrainedFlow(path, recipe, checkpoint, own, chain)


def ladder_inputs(runs_dir: str | Path, betas: Sequence[float], lattice: int
                  ) -> list[LadderInput]:
    """Every β's checked flows; a missing Haar recipe leaves row (e) out with a note."""
    out = []
    for name_beta, path in zip(betas, ladder_recipes(runs_dir, betas, lattice), strict=True):
        flows = {"nmcmc": check_trained(path)}
        beta = float(flows["nmcmc"].recipe.action().params()["beta"])
        shape = tuple(flows["nmcmc"].recipe.lattice)
        haar = Path(runs_dir) / RECIPE_NAMES["haar"].format(beta=name_beta, L=lattice)
        notes: tuple[str, ...] = ()
        if haar.is_file():
            flows["haar"] = check_trained(haar, prior="uniform")
            if flows["haar"].recipe.action().params() != flows["nmcmc"].recipe.action().params():
                raise LatticeflowError(f"{haar}: another action than {path}")
            if tuple(flows["haar"].recipe.lattice) != shape:
                raise LatticeflowError(f"{haar}: another lattice than {path}")
        else:
            notes = (f"β = {beta:g}: no Haar-prior recipe {haar.name}; row (e) left out",)
        out.append(LadderInput(beta, shape, flows, notes))
    return out


# ------------------------------------------------------------------------------ samplers
Draw = tuple[np.ndarray, float, float, float]   # Q history, sampling s, setup s, acceptance


def charges_of(lattice: tuple[int, int]) -> Callable[[np.ndarray], np.ndarray]:
    """Block ``(rows, chains, 2, L0, L1)`` → rounded charges ``(rows, chains)``."""
    def charges(configs: np.ndarray) -> np.ndarray:
        rows, chains = configs.shape[:2]
        links = torch.from_numpy(configs.reshape(rows * chains, 2, *lattice))
        return np.rint(topological_charge(links).numpy()).reshape(rows, chains)

    return charges


def draw_hmc(point: LadderInput, settings: FreezingSettings) -> tuple[Draw, dict[str, Any]]:
    """(a): tuned HMC from exact samples; the draw and the tuning record."""
    action, lattice = point.flows["nmcmc"].recipe.action(), point.lattice
    charges = charges_of(lattice)
    volume = math.prod(lattice)
    generator = torch.Generator().manual_seed(settings.seed + 104729)

    def start(n: int) -> np.ndarray:
        return sample_exact_u1(point.beta, lattice, n, generator=generator).numpy()

    started = time.perf_counter()
    tuning = hmc_tuning.tune_hmc(action, lattice, settings, 1.0,
                                 lambda configs: charges(configs) ** 2 / volume, "q2",
                                 start=start, label=f"β={point.beta:g}")
    sampler = hmc_tuning.equilibrium_hmc(action, lattice, tuning, settings, settings.seed)
    setup = time.perf_counter() - started
    blocks = HMCBlocks(sampler)
    q, spent = run_for(settings.budget_s, blocks, charges, f"HMC β={point.beta:g}")
    return (q, spent, setup, blocks.acceptance), tuning.to_dict()


def draw_exact(point: LadderInput, settings: FreezingSettings) -> Draw:
    """(b): independent exact samples in blocks of ``batch`` (one chain)."""
    generator = torch.Generator().manual_seed(settings.seed + 7)

    def advance() -> np.ndarray:
        links = sample_exact_u1(point.beta, point.lattice, settings.batch, generator=generator)
        return links.numpy()[:, None]

    q, spent = run_for(settings.budget_s, advance, charges_of(point.lattice),
                       f"exact β={point.beta:g}")
    return q, spent, 0.0, expected_acceptance(point.beta, point.lattice)


def _metropolis(flow: Flow, point: LadderInput, settings: FreezingSettings, label: str) -> Draw:
    started = time.perf_counter()
    sampler = FlowMetropolis(flow, point.flows["nmcmc"].recipe.action(), seed=settings.seed,
                             batch_size=settings.batch)
    setup = time.perf_counter() - started
    blocks = NMCMCBlocks(sampler, settings.batch)
    q, spent = run_for(settings.budget_s, blocks, charges_of(point.lattice),
                       f"{label} β={point.beta:g}")
    return q, spent, setup, blocks.acceptance


def draw_prior(point: LadderInput, settings: FreezingSettings) -> Draw:
    """(c): independent Metropolis with the plaquette prior of κ = β alone (uniform at β = 0,
    its κ → 0 limit)."""
    shape = (2, *point.lattice)
    prior = (PlaquettePrior(point.lattice, point.beta) if point.beta > 0
             else UniformAnglePrior(shape))
    return _metropolis(Flow(prior, []), point, settings, "prior")


def draw_flow(trained: TrainedFlow, point: LadderInput, settings: FreezingSettings,
              device: torch.device, label: str) -> Draw:
    """(d), (e): neural MCMC (one chain) with a trained flow; loading counts as setup."""
    started = time.perf_counter()
    flow = load_checkpoint(trained.checkpoint, device=device).flow
    q, spent, setup, acceptance = _metropolis(flow, point, settings, label)
    return q, spent, setup + time.perf_counter() - started, acceptance


# ------------------------------------------------------------------------------ the study
def measure(sampler: str, beta: float, lattice: tuple[int, int], charges: np.ndarray,
            wall_s: float, setup_s: float, acceptance: float, training_s: float = 0.0,
            training_chain_s: float | None = 0.0) -> SamplerResult:
    """χ_t, τ_int(Q²) and the cost per independent sample from a Q history (module docstring)."""
    volume = lattice[0] * lattice[1]
    rows, chains = charges.shape
    n = rows * chains
    q2 = estimate(charges**2 / volume)
    cost = cost_per_independent(wall_s, q2.tau_int, n)
    return SamplerResult(sampler, beta, n, chains, wall_s, setup_s, acceptance, q2.value,
                         q2.error, exact.u1_topological_susceptibility(beta, lattice),
                         q2.tau_int, q2.tau_int_error, cost, q2.reliable, training_s,
                         training_chain_s)


def run_point(point: LadderInput, settings: FreezingSettings, device: torch.device
              ) -> BetaPoint:
    """Every row at one β, in the order of :data:`SAMPLERS`."""
    hmc, tuning = draw_hmc(point, settings)
    draws: dict[str, Draw] = {"hmc": hmc, "exact": draw_exact(point, settings),
                              "prior": draw_prior(point, settings)}
    for name, trained in point.flows.items():
        draws[name] = draw_flow(trained, point, settings, device, name)
    results = {}
    for name in (s for s in SAMPLERS if s in draws):
        q, wall, setup, acc = draws[name]
        trained = point.flows.get(name)
        results[name] = measure(name, point.beta, point.lattice, q, wall, setup, acc,
                                trained.training_s if trained else 0.0,
                                trained.training_chain_s if trained else 0.0)
        r = results[name]
        log.info("β = %g %-5s: %6d rows in %.0f s, acc %.3f, χ_t %.5f ± %.5f (exact %.5f), "
                 "τ_int %.3g, cost/indep %.3g s", point.beta, name, r.rows, r.wall_s,
                 r.acceptance, r.chi_t, r.chi_t_error, r.chi_t_exact, r.tau_int,
                 r.cost_per_independent_s)
    return BetaPoint(point.beta, str(point.flows["nmcmc"].path), results,
                     {name: draw[0] for name, draw in draws.items()}, tuning, list(point.notes))


def run_freezing_study(inputs: Sequence[LadderInput], settings: FreezingSettings,
                       device: torch.device | None = None) -> list[BetaPoint]:
    """Every row at every β, in order; ``inputs`` from :func:`ladder_inputs` (checked before
    anything is sampled)."""
    device = device or torch.device("cpu")
    return [run_point(point, settings, device) for point in inputs]


def speedup(point: BetaPoint, sampler: str = "nmcmc") -> float:
    """HMC cost per independent Q² sample over that of ``sampler``."""
    return (point.results["hmc"].cost_per_independent_s
            / point.results[sampler].cost_per_independent_s)


__all__ = ["BetaPoint", "FreezingSettings", "LABELS", "LadderInput", "SAMPLERS",
           "SamplerResult", "TrainedFlow", "charges_of", "check_trained", "draw_exact",
           "draw_flow", "draw_hmc", "draw_prior", "ladder_inputs", "ladder_recipes", "measure",
           "run_freezing_study", "run_point", "speedup"]
