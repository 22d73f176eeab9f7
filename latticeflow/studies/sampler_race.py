"""Racing samplers at equal wall time: the machinery shared by the sampler studies
(:mod:`latticeflow.studies.freezing`, :mod:`latticeflow.studies.critical_slowing`).

Conventions
-----------
* A sampler is driven through an *advance* callable that returns one block of configurations,
  ``(rows, chains, *field_shape)``: row i of chain c is that chain's i-th stored state (one HMC
  trajectory per row and chain; one proposal per row for neural MCMC).
* :func:`run_for` calls it until ``budget_s`` seconds have been spent *inside* it; the
  observables are measured on each block outside the timed region, so only sampling counts as
  cost. It returns the measurements ``(rows, chains, ...)`` and the seconds spent.
* τ_int is in rows of a chain (Γ-method, chains as replicas, :func:`estimate`). An estimate is
  ``reliable`` only when the Γ-method found a window, N ≥ 50 τ_int overall and every chain is at
  least 50 τ_int long (DESIGN §10): many short chains cannot reveal a long autocorrelation.
  A series that never changes has no autocorrelation information: τ_int is then reported as
  the chain length (a lower bound), and the estimate is unreliable.
* Cost per independent sample: c = wall × 2τ_int / N with N all rows of all chains
  (:func:`cost_per_independent`); when ``reliable`` is false it is a lower bound.
* Training enters only through the break-even number of independent samples,
  N* = t_train / (c_baseline − c_flow) (:func:`break_even`; infinite when the flow is not
  cheaper per sample), with t_train the checkpoints' ``wall_time`` over the lineage
  (:func:`latticeflow.training.lineage.lineage_training_seconds`).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from latticeflow.samplers.hmc import HMCSampler
from latticeflow.samplers.nmcmc import FlowMetropolis
from latticeflow.statistics import ShortChainWarning, gamma_method

log = logging.getLogger("latticeflow")

#: Per-chain run length, in units of τ_int, below which an estimate is flagged unreliable.
MIN_TAU_LENGTHS = 50.0

Advance = Callable[[], np.ndarray]
Measure = Callable[[np.ndarray], np.ndarray]


def run_for(budget_s: float, advance: Advance, measure: Measure, label: str = ""
            ) -> tuple[np.ndarray, float]:
    """Call ``advance`` until ``budget_s`` seconds are spent in it (at least once); returns
    ``measure`` of every block, concatenated along rows, and the sampling seconds."""
    blocks, spent = [], 0.0
    with tqdm(total=budget_s, desc=label, leave=False, bar_format="{desc}: {percentage:3.0f}%"
              "|{bar}| {elapsed} of sampling", disable=not log.isEnabledFor(logging.INFO)) as bar:
        while spent < budget_s or not blocks:
            started = time.perf_counter()
            configs = advance()
            step = time.perf_counter() - started
            spent += step
            blocks.append(measure(configs))
            bar.update(min(step, max(budget_s - bar.n, 0)))
    return np.concatenate(blocks), spent


class HMCBlocks:
    """Advance callable for an :class:`HMCSampler`: ``sweeps`` trajectories of every chain per
    block, ``(sweeps, chains, *field_shape)``. :attr:`acceptance` counts the trajectories
    produced since this object was made."""

    def __init__(self, sampler: HMCSampler, sweeps: int = 8):
        self.sampler, self.sweeps = sampler, sweeps
        self._start = (sampler.n_accepted, sampler.n_trajectories)

    def __call__(self) -> np.ndarray:
        chains = self.sampler.config.n_chains
        rows = self.sampler.advance(self.sweeps * chains)  # round-robin: row i is chain i % C
        configs = np.asarray(rows["configs"], dtype=np.float64)
        return configs.reshape(self.sweeps, chains, *self.sampler.field_shape)

    @property
    def acceptance(self) -> float:
        accepted = self.sampler.n_accepted - self._start[0]
        total = (self.sampler.n_trajectories - self._start[1]) * self.sampler.config.n_chains
        return accepted / total if total else float("nan")


class NMCMCBlocks:
    """Advance callable for a one-chain :class:`FlowMetropolis`: ``batch`` proposals per block,
    ``(batch, 1, *field_shape)``. :attr:`acceptance` leaves out the chain's first row (its
    starting state, not a Metropolis decision)."""

    def __init__(self, sampler: FlowMetropolis, batch: int):
        self.sampler, self.batch = sampler, batch
        self._accepted: list[np.ndarray] = []

    def __call__(self) -> np.ndarray:
        fresh = self.sampler.rows_emitted == 0
        rows = self.sampler.advance(self.batch)
        self._accepted.append(rows["accepted"][1:] if fresh else rows["accepted"])
        return np.asarray(rows["configs"], dtype=np.float64)[:, None]

    @property
    def acceptance(self) -> float:
        flags = np.concatenate(self._accepted) if self._accepted else np.zeros(0)
        return float(flags.mean()) if flags.size else float("nan")


@dataclass(frozen=True)
class Estimate:
    """A Γ-method mean (or function of means) with τ_int and the reliability flag (module
    docstring); ``rows_per_chain`` and ``n`` (all rows) are the data it came from."""

    value: float
    error: float
    tau_int: float
    tau_int_error: float
    reliable: bool
    rows_per_chain: int
    n: int


def is_reliable(short_chain_warning: bool, tau_int: float, rows_per_chain: int) -> bool:
    """No Γ-method warning, and every chain ≥ :data:`MIN_TAU_LENGTHS` τ_int long."""
    return not short_chain_warning and rows_per_chain >= MIN_TAU_LENGTHS * tau_int


def estimate(series: np.ndarray, derived: Callable[[np.ndarray], float] | None = None
             ) -> Estimate:
    """Γ-method estimate from ``series`` ``(rows, chains)`` (one observable) or
    ``(rows, chains, k)`` (k primary observables, combined by ``derived(means)``)."""
    rows, chains = series.shape[:2]
    replicas = [series[:, c] for c in range(chains)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ShortChainWarning)
        g = gamma_method(replicas if chains > 1 else replicas[0], derived)
    warned = any(issubclass(w.category, ShortChainWarning) for w in caught)
    tau, tau_error = g.tau_int, g.tau_int_error
    if g.error == 0.0:   # the series never changed: no autocorrelation information
        return Estimate(g.value, 0.0, float(rows), float("nan"), False, rows, g.n)
    return Estimate(g.value, g.error, tau, tau_error, is_reliable(warned, tau, rows), rows, g.n)


def cost_per_independent(wall_s: float, tau_int: float, n: int) -> float:
    """Seconds per independent sample, wall × 2τ_int / N."""
    return wall_s * 2.0 * tau_int / n


def break_even(training_s: float, cost_baseline_s: float, cost_flow_s: float) -> float:
    """N* = t_train / (c_baseline − c_flow), independent samples after which the training has
    paid; ``inf`` when the flow is not cheaper per sample, 0 when it needs no training."""
    gain = cost_baseline_s - cost_flow_s
    if not gain > 0:
        return math.inf
    return training_s / gain


def format_estimate(value: float, error: float | None = None) -> str:
    """``value ± error`` (4 and 2 significant digits), ``value`` without a positive finite
    error, "—" for a non-finite value: the studies' table cells."""
    if not math.isfinite(value):
        return "—"
    if error is None or not math.isfinite(error) or error <= 0:
        return f"{value:.4g}"
    return f"{value:.4g} ± {error:.2g}"


__all__ = ["Estimate", "HMCBlocks", "MIN_TAU_LENGTHS", "Measure", "NMCMCBlocks", "break_even",
           "cost_per_independent", "estimate", "format_estimate", "is_reliable", "run_for"]
