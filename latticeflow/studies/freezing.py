"""The topological-freezing study: HMC against neural MCMC across β for 2D U(1).

For every β of a ladder the study draws an HMC ensemble and a neural-MCMC ensemble of equal
wall-clock cost (each sampler runs until ``budget_s`` seconds of sampling are spent; HMC
thermalisation and flow training are not counted, and are reported apart), measures the
topological charge Q on every row and reports, per sampler:

* χ_t = ⟨Q²⟩/V with its Γ-method error (chains as replicas) and the exact finite-volume value;
* τ_int(Q²) with its error, in rows of the stored chain (one HMC trajectory per row and chain,
  one proposal per row for neural MCMC);
* the acceptance rate;
* the cost per independent Q² sample, wall seconds × 2τ_int / N.

A frozen chain has almost no information on its own autocorrelation: when the Γ-method finds no
window, or N or any chain is shorter than 50 τ_int, the τ_int it returns is an underestimate,
and the row is flagged ``reliable = false``; its cost per independent sample is then a lower
bound. When Q² never changes in any chain τ_int is unknown; it is reported as the chain length,
a lower bound. The sampling loop and these estimates are those of
:mod:`latticeflow.studies.sampler_race`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latticeflow import exact
from latticeflow.config import Recipe, load_recipe
from latticeflow.errors import LatticeflowError
from latticeflow.observables import topological_charge
from latticeflow.samplers.hmc import HMCConfig, HMCSampler
from latticeflow.samplers.nmcmc import FlowMetropolis
from latticeflow.studies.sampler_race import (
    HMCBlocks,
    NMCMCBlocks,
    cost_per_independent,
    estimate,
    run_for,
)
from latticeflow.training import CHECKPOINT_NAME, load_checkpoint

log = logging.getLogger("latticeflow")

SAMPLERS = ("hmc", "nmcmc")


@dataclass(frozen=True)
class FreezingSettings:
    """What every β gets: the sampling budget and the samplers' settings.

    HMC: ``hmc_chains`` vectorised chains, leapfrog with trajectory length 1 and the step size
    tuned to acceptance 0.8 during ``hmc_therm`` thermalisation trajectories (hot start).
    Neural MCMC: one chain, proposals drawn in batches of ``nmcmc_batch``.
    """

    budget_s: float = 60.0
    hmc_chains: int = 16
    hmc_therm: int = 200
    nmcmc_batch: int = 1024
    seed: int = 0


@dataclass
class SamplerResult:
    """One sampler at one β (see the module docstring for the meanings)."""

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

    @property
    def pull(self) -> float:
        """(χ_t − exact) / error; NaN without an error."""
        if not self.chi_t_error > 0:
            return float("nan")
        return (self.chi_t - self.chi_t_exact) / self.chi_t_error


@dataclass
class BetaPoint:
    """Both samplers at one β, with the Q histories (``(rows per chain, chains)``)."""

    beta: float
    recipe: str
    results: dict[str, SamplerResult]
    charges: dict[str, np.ndarray]


def ladder_recipes(runs_dir: str | Path, betas: Sequence[float], lattice: int) -> list[Path]:
    """The recipe of every β, ``<runs_dir>/u1_beta<β>_L<lattice>.toml``; refuses a missing one."""
    paths = []
    for beta in betas:
        name = f"u1_beta{beta:g}_L{lattice}.toml"
        path = Path(runs_dir) / name
        if not path.is_file():
            raise LatticeflowError(f"β = {beta:g}: no recipe {path} (a β needs a recipe and an "
                                   f"action card)")
        paths.append(path)
    return paths


def _check_trained(recipe: Recipe, path: Path) -> Path:
    if recipe.theory != "u1":
        raise LatticeflowError(f"{path}: a {recipe.theory} recipe; the freezing study needs U(1)")
    checkpoint = recipe.default_run_dir() / CHECKPOINT_NAME
    if not checkpoint.is_file():
        raise LatticeflowError(f"{path}: no trained flow at {checkpoint}; train it with "
                               f"`latticeflow run {path}`")
    return checkpoint


def _charges(recipe: Recipe) -> Callable[[np.ndarray], np.ndarray]:
    """Block ``(rows, chains, *field)`` → rounded charges ``(rows, chains)``."""
    shape = recipe.action().field_shape(recipe.lattice)

    def charges(configs: np.ndarray) -> np.ndarray:
        rows, chains = configs.shape[:2]
        links = torch.from_numpy(configs.reshape(rows * chains, *shape))
        return np.rint(topological_charge(links).numpy()).reshape(rows, chains)

    return charges


def draw_hmc(recipe: Recipe, settings: FreezingSettings) -> tuple[np.ndarray, float, float, float]:
    """HMC Q history ``(rows per chain, chains)``, sampling seconds, setup seconds, acceptance."""
    config = HMCConfig(n_chains=settings.hmc_chains, n_therm=settings.hmc_therm,
                       target_accept=0.8, trajectory_length=1.0)
    sampler = HMCSampler(recipe.action(), recipe.lattice, config, seed=settings.seed)
    started = time.perf_counter()
    sampler.thermalise()
    setup = time.perf_counter() - started
    blocks = HMCBlocks(sampler)
    charges, spent = run_for(settings.budget_s, blocks, _charges(recipe), f"HMC β={_b(recipe)}")
    return charges, spent, setup, blocks.acceptance


def draw_nmcmc(recipe: Recipe, settings: FreezingSettings, device: torch.device
               ) -> tuple[np.ndarray, float, float, float]:
    """Neural-MCMC Q history ``(rows, 1)``, sampling seconds, setup seconds, acceptance."""
    started = time.perf_counter()
    loaded = load_checkpoint(recipe.default_run_dir(), device=device)
    if loaded.action.params() != recipe.action().params():
        raise LatticeflowError(f"{recipe.default_run_dir()}: the checkpoint was trained for "
                               f"{loaded.action.params()}, the recipe has "
                               f"{recipe.action().params()}")
    sampler = FlowMetropolis(loaded.flow, loaded.action, seed=settings.seed,
                             batch_size=settings.nmcmc_batch)
    setup = time.perf_counter() - started
    blocks = NMCMCBlocks(sampler, settings.nmcmc_batch)
    charges, spent = run_for(settings.budget_s, blocks, _charges(recipe), f"NMCMC β={_b(recipe)}")
    return charges, spent, setup, blocks.acceptance


def _b(recipe: Recipe) -> str:
    return f"{recipe.action().params()['beta']:g}"


def measure(sampler: str, beta: float, lattice: tuple[int, int], charges: np.ndarray,
            wall_s: float, setup_s: float, acceptance: float) -> SamplerResult:
    """χ_t, τ_int(Q²) and the cost per independent sample from a Q history (module docstring)."""
    volume = lattice[0] * lattice[1]
    rows, chains = charges.shape
    n = rows * chains
    q2 = estimate(charges**2 / volume)
    cost = cost_per_independent(wall_s, q2.tau_int, n)
    return SamplerResult(sampler, beta, n, chains, wall_s, setup_s, acceptance, q2.value,
                         q2.error, exact.u1_topological_susceptibility(beta, lattice),
                         q2.tau_int, q2.tau_int_error, cost, q2.reliable)


def run_freezing_study(recipes: Sequence[Path], settings: FreezingSettings,
                       device: torch.device | None = None) -> list[BetaPoint]:
    """Both samplers at every recipe's β, in order. Checks every input before sampling."""
    device = device or torch.device("cpu")
    loaded = [(path, load_recipe(path)) for path in recipes]
    for path, recipe in loaded:
        _check_trained(recipe, path)
    points = []
    for path, recipe in loaded:
        beta = float(recipe.action().params()["beta"])
        lattice = tuple(recipe.lattice)
        draws = {"hmc": draw_hmc(recipe, settings),
                 "nmcmc": draw_nmcmc(recipe, settings, device)}
        results = {name: measure(name, beta, lattice, q, wall, setup, acc)
                   for name, (q, wall, setup, acc) in draws.items()}
        for r in results.values():
            log.info("β = %g %-5s: %6d rows in %.0f s, acc %.3f, χ_t %.5f ± %.5f (exact %.5f), "
                     "τ_int %.3g, cost/indep %.3g s", beta, r.sampler, r.rows, r.wall_s,
                     r.acceptance, r.chi_t, r.chi_t_error, r.chi_t_exact, r.tau_int,
                     r.cost_per_independent_s)
        points.append(BetaPoint(beta, str(path), results,
                                {name: draw[0] for name, draw in draws.items()}))
    return points


def speedup(point: BetaPoint) -> float:
    """HMC cost per independent Q² sample over the neural-MCMC one."""
    return (point.results["hmc"].cost_per_independent_s
            / point.results["nmcmc"].cost_per_independent_s)


def records(points: Sequence[BetaPoint]) -> list[dict[str, Any]]:
    """JSON-ready rows: one per β and sampler, plus the speed-up per β."""
    out = []
    for point in points:
        for result in point.results.values():
            out.append({**asdict(result), "pull": result.pull, "recipe": point.recipe,
                        "speedup_vs_hmc": speedup(point) if result.sampler == "nmcmc" else None})
    return out


def _fmt(value: float, error: float | None = None) -> str:
    if not math.isfinite(value):
        return "—"
    if error is None or not math.isfinite(error) or error <= 0:
        return f"{value:.4g}"
    return f"{value:.4g} ± {error:.2g}"


def markdown_table(points: Sequence[BetaPoint], lattice: tuple[int, int]) -> str:
    """The study's table (markdown); '≥' marks τ_int and cost that are lower bounds."""
    lines = [f"Topological freezing, 2D U(1) on {lattice[0]}×{lattice[1]}: HMC against neural "
             f"MCMC at equal sampling wall time per β.", "",
             "| β | sampler | rows | wall s | acceptance | χ_t | exact χ_t | pull | τ_int(Q²) "
             "| cost / indep. Q² [s] | HMC / NMCMC |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for point in points:
        for name in SAMPLERS:
            r = point.results[name]
            bound = "" if r.reliable else "≥ "
            ratio = f"{speedup(point):.3g}" if name == "nmcmc" else ""
            if name == "nmcmc" and not point.results["hmc"].reliable:
                ratio = "≥ " + ratio
            lines.append(
                f"| {r.beta:g} | {name} | {r.rows} | {r.wall_s:.0f} | {r.acceptance:.3f} "
                f"| {_fmt(r.chi_t, r.chi_t_error)} | {r.chi_t_exact:.4g} "
                f"| {r.pull:+.1f} | {bound}{_fmt(r.tau_int, r.tau_int_error)} "
                f"| {bound}{r.cost_per_independent_s:.3g} | {ratio} |")
    return "\n".join(lines)


def plot(points: Sequence[BetaPoint], path: str | Path) -> Path:
    """τ_int(Q²) and the cost per independent Q² sample against β (log scale, both samplers;
    open markers are lower bounds), and at the largest β the Q history of each sampler against
    sampling time and their Q histograms."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 7), layout="constrained")
    grid = figure.add_gridspec(2, 2)
    tau_ax, cost_ax = figure.add_subplot(grid[0, 0]), figure.add_subplot(grid[0, 1])
    history = grid[1, 0].subgridspec(2, 1, hspace=0.05)
    history_axes = [figure.add_subplot(history[0])]
    history_axes.append(figure.add_subplot(history[1], sharex=history_axes[0]))
    count_ax = figure.add_subplot(grid[1, 1])
    styles = {"hmc": ("C0", "s", "HMC"), "nmcmc": ("C3", "o", "neural MCMC")}
    betas = [p.beta for p in points]
    for name, (color, marker, label) in styles.items():
        results = [p.results[name] for p in points]
        for ax, values in ((tau_ax, [r.tau_int for r in results]),
                           (cost_ax, [r.cost_per_independent_s for r in results])):
            ax.plot(betas, values, "-", color=color, label=label)
            for beta, value, r in zip(betas, values, results, strict=True):
                ax.plot(beta, value, marker, color=color,
                        markerfacecolor=color if r.reliable else "none")
    tau_ax.set_ylabel("τ_int(Q²) [rows]")
    cost_ax.set_ylabel("seconds per independent Q² sample")
    for ax in (tau_ax, cost_ax):
        ax.set_yscale("log")
        ax.set_xlabel("β")
        ax.grid(alpha=0.3, which="both")
    tau_ax.legend(title="open marker: lower bound", fontsize=8, title_fontsize=8)
    last = points[-1]
    for ax, (name, (color, _, label)) in zip(history_axes, styles.items(), strict=True):
        q = last.charges[name][:, 0]
        seconds = np.linspace(0, last.results[name].wall_s, len(q))
        ax.plot(seconds, q, lw=0.4, color=color, drawstyle="steps-post")
        ax.set_ylabel("Q")
        ax.text(0.01, 0.95, f"{label}, chain 0, β = {last.beta:g}", transform=ax.transAxes,
                va="top", fontsize=8, bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
        q_all = last.charges[name].ravel()
        edges = np.arange(q_all.min() - 0.5, q_all.max() + 1.5)
        count_ax.hist(q_all, bins=edges, density=True, histtype="step", lw=1.5, color=color,
                      label=label)
    history_axes[0].tick_params(labelbottom=False)
    history_axes[1].set_xlabel("sampling wall time [s]")
    count_ax.set_xlabel(f"Q at β = {last.beta:g}")
    count_ax.set_ylabel("frequency")
    count_ax.legend(fontsize=8)
    figure.savefig(path, dpi=90)
    return Path(path)


__all__ = ["BetaPoint", "FreezingSettings", "SAMPLERS", "SamplerResult", "draw_hmc",
           "draw_nmcmc", "ladder_recipes", "markdown_table", "measure", "plot", "records",
           "run_freezing_study", "speedup"]
