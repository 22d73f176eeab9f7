"""Estimator study (issue 8): when do path gradients and the fast path pay off?

Reverse KL
----------
For each theory and seed the three reverse estimators start from the *same* initial flow (one
seeded initialisation, deep-copied) and draw their training noise from generators with the
*same* seed. They train with equal wall-clock budgets, round-robin: the budget is cut into
``n_slices`` slices and every estimator trains for one slice before the next one does, so that
load from other processes on a shared machine hits all of them alike. Only the training steps
themselves are timed (noise, forward, backward, optimiser); measurements happen between slices.
After every slice:

* ESS/N of a fixed batch of base noise (drawn once per seed from its own stream, identical for
  every estimator and every measurement), ``statistics.ess`` of log w = −S − log q.
* every ``variance_every`` slices, the gradient variance (:func:`gradient_variance`) of the
  standard and of the path-gradient estimator *at the run's current parameters*, over
  ``variance_batches`` independent noise batches of the training batch size (the same batches
  for every estimator at a given slice). ``reverse-droppath`` and ``reverse-fastpath`` have the
  same gradient to round-off, so the path variance is measured with the fast path.

Forward KL
----------
Fixed HMC ensembles (one training ensemble, whose first n rows form the training set of size
n, and an independent held-out ensemble) train ``forward-standard`` (maximum likelihood) and
``forward-fastpath`` with minibatches drawn with replacement, round-robin as above. Recorded:

* KL(p‖q) + log Z = E_p[log w] with log w = −S − log q, estimated on (a fixed subset of) the
  training set and on the held-out set: a training value below the held-out one is overfitting.
* Forward ESS on the held-out set. For x_i ~ p the weights w_i = exp(−S − log q) give the
  population ESS Z² / E_q[w²] = 1 / (E_p[w̃] E_p[1/w̃]) (w̃ = w/Z), estimated by
  ESS_fwd = N² / (Σ_i w_i · Σ_i 1/w_i) (Nicoli et al., PRD 108 (2023) 114501). It is the same
  quantity as the usual (reverse) ESS/N = (Σ w)² / (N Σ w²) of flow samples, but measured where
  p has its mass, so it sees modes that q misses.
* The reverse ESS/N on a fixed batch of fresh flow samples.

Gradient variance
-----------------
Var[g] = Σ_i ‖g_i − ḡ‖² / (n − 1) for the flattened parameter gradients g_i of n independent
batches: the trace of the covariance of one batch's gradient (unbiased).

All training is in ``dtype`` (float32 by default) with Adam at a constant learning rate and
global-norm gradient clipping; a step with a non-finite loss or gradient is skipped (and counted).

This module holds the study's configuration and its measurements;
:mod:`~latticeflow.studies.estimator_runs` runs the races (:func:`run_study`) and
:mod:`~latticeflow.studies.estimator_report` writes the tables, figures and JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import logsumexp
from torch import Tensor

from latticeflow.base.errors import LatticeflowError
from latticeflow.estimators import get_estimator
from latticeflow.flows import DEFAULT_ARCHITECTURE, Flow, build_flow
from latticeflow.flows.samples import log_weight
from latticeflow.samplers.hmc import HMCConfig
from latticeflow.theories import Action, load_action_card

REVERSE_ESTIMATORS = ("reverse-standard", "reverse-droppath", "reverse-fastpath")
FORWARD_ESTIMATORS = ("forward-standard", "forward-fastpath")
#: the estimators whose gradient variance is probed (the drop-in path one equals the fast one)
VARIANCE_PROBES = {"standard": "reverse-standard", "path": "reverse-fastpath"}
#: theory → (action card in ``actions/``, gradient-norm clip of its ``runs/*_L8.toml`` recipe)
THEORY_CARDS = {"phi4": ("phi4_m2-4_lam8.toml", 10.0), "u1": ("u1_beta2.toml", 100.0)}
STREAM_INIT, STREAM_TRAIN, STREAM_ESS, STREAM_VARIANCE, STREAM_HMC = range(5)


# ------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class TheorySetup:
    """A theory to train on: action, lattice, flow architecture and gradient clip."""

    name: str
    action: Action
    lattice: tuple[int, ...]
    architecture: dict[str, Any]
    grad_clip: float

    def build(self, seed: int, dtype: torch.dtype) -> Flow:
        """The initial flow of ``seed`` (leaves torch's global generator untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(seed, STREAM_INIT))
            flow = build_flow(self.name, self.lattice, self.architecture, self.action.params())
        return flow.to(dtype=dtype)

    def describe(self) -> dict[str, Any]:
        return {"action": self.action.card(), "lattice": list(self.lattice),
                "architecture": self.architecture, "grad_clip": self.grad_clip}


def theory_setup(name: str, actions_dir: str | Path, lattice: tuple[int, ...] = (8, 8),
                 architecture: dict[str, Any] | None = None) -> TheorySetup:
    """The study's setup of ``name`` ("phi4" or "u1") with its card from ``actions_dir``."""
    card, clip = THEORY_CARDS[name]
    arch = {**DEFAULT_ARCHITECTURE[name], **(architecture or {})}
    return TheorySetup(name, load_action_card(Path(actions_dir) / card), tuple(lattice), arch,
                       clip)


@dataclass(frozen=True)
class ReverseConfig:
    """Reverse-KL race: ``budget_s`` seconds of training per estimator and seed, interleaved in
    ``n_slices`` slices; gradient variance after every ``variance_every``-th slice, ESS after
    every ``ess_every``-th and with each variance measurement (both at the start and the end)."""

    budget_s: float = 50.0
    n_slices: int = 24
    batch_size: int = 64
    lr: float = 1e-3
    ess_batch: int = 2048
    ess_every: int = 3
    variance_every: int = 6
    variance_batches: int = 8
    estimators: tuple[str, ...] = REVERSE_ESTIMATORS


@dataclass(frozen=True)
class HMCSettings:
    """The HMC runs that make the forward-KL data (ε tuned during thermalisation)."""

    n_chains: int = 100
    n_therm: int = 200
    save_every: int = 10
    trajectory_length: float = 1.0
    target_accept: float = 0.8

    def config(self) -> HMCConfig:
        return HMCConfig(step_size=0.1, trajectory_length=self.trajectory_length,
                         n_chains=self.n_chains, n_therm=self.n_therm,
                         save_every=self.save_every, target_accept=self.target_accept)


@dataclass(frozen=True)
class ForwardConfig:
    """Forward-KL training on fixed HMC sets of the sizes ``train_sizes`` (seeds 0 … seeds − 1),
    interleaved in ``n_slices`` slices, measured after every ``eval_every``-th slice."""

    seeds: int = 2
    train_sizes: tuple[int, ...] = (1000, 10000)
    held_out: int = 2000
    budget_s: float = 15.0
    n_slices: int = 12
    eval_every: int = 2
    batch_size: int = 64
    lr: float = 1e-3
    ess_batch: int = 2048
    hmc: HMCSettings = field(default_factory=HMCSettings)
    estimators: tuple[str, ...] = FORWARD_ESTIMATORS


@dataclass(frozen=True)
class StudyConfig:
    """Everything that defines a study run (reverse KL: seeds 0 … seeds − 1)."""

    seeds: int = 3
    reverse: ReverseConfig = field(default_factory=ReverseConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    dtype: str = "float32"


#: ``--quick``: tiny budgets and batches, for smoke tests (about a minute or two in all)
QUICK = StudyConfig(
    seeds=2,
    reverse=ReverseConfig(budget_s=4.0, n_slices=4, batch_size=32, ess_batch=256, ess_every=2,
                          variance_every=4, variance_batches=3),
    forward=ForwardConfig(seeds=2, train_sizes=(100, 400), held_out=200, budget_s=2.0,
                          n_slices=2, eval_every=2, batch_size=32, ess_batch=256,
                          hmc=HMCSettings(n_chains=20, n_therm=50, save_every=2)),
)


def stream_seed(*key: int) -> int:
    """A 64-bit seed for the stream named by ``key``."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0])


def stream_generator(*key: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(stream_seed(*key))
    return generator


def with_budgets(config: StudyConfig, *, seeds: int | None = None,
                 budget_s: float | None = None, forward_seeds: int | None = None,
                 forward_budget_s: float | None = None) -> StudyConfig:
    """``config`` with the given seeds / budgets replaced (None: keep)."""
    reverse, forward = config.reverse, config.forward
    if budget_s is not None:
        reverse = replace(reverse, budget_s=budget_s)
    if forward_seeds is not None:
        forward = replace(forward, seeds=forward_seeds)
    if forward_budget_s is not None:
        forward = replace(forward, budget_s=forward_budget_s)
    return replace(config, seeds=config.seeds if seeds is None else seeds, reverse=reverse,
                   forward=forward)


def study_config(*, quick: bool, dtype: str, theories: Sequence[str], seeds: int | None,
                 budget_s: float | None, forward_seeds: int | None,
                 forward_budget_s: float | None) -> StudyConfig:
    """The configuration asked for on the command line (``--quick`` base, then the options
    given; None: keep); LatticeflowError for impossible values, named by their option."""
    for option, count in (("--seeds", seeds), ("--forward-seeds", forward_seeds)):
        if count is not None and count < 1:
            raise LatticeflowError(f"{option} must be >= 1, got {count}")
    for option, value in (("--budget", budget_s), ("--forward-budget", forward_budget_s)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise LatticeflowError(f"{option} must be a positive number of seconds, got {value}")
    unknown = sorted(set(theories) - set(THEORY_CARDS))
    if unknown:
        raise LatticeflowError(f"unknown theory {', '.join(unknown)}; choose from "
                               f"{', '.join(THEORY_CARDS)}")
    base = replace(QUICK if quick else StudyConfig(), dtype=dtype)
    return with_budgets(base, seeds=seeds, budget_s=budget_s, forward_seeds=forward_seeds,
                        forward_budget_s=forward_budget_s)


# ------------------------------------------------------------------------------ measurements
@dataclass(frozen=True)
class GradientVariance:
    """``variance`` = Σ_i ‖g_i − ḡ‖² / (n − 1) over n batches; ``mean_norm2`` = ‖ḡ‖²."""

    variance: float
    mean_norm2: float


def flat_gradient(flow: Flow, action: Action, estimator: str, batch: Tensor) -> Tensor:
    """The estimator's parameter gradient on ``batch``, flattened (``.grad`` untouched)."""
    params = [p for p in flow.parameters() if p.requires_grad]
    surrogate = get_estimator(estimator)(flow, action, batch).surrogate
    grads = torch.autograd.grad(surrogate, params, allow_unused=True)
    return torch.cat([torch.zeros_like(p).flatten() if g is None else g.flatten()
                      for g, p in zip(grads, params, strict=True)])


def gradient_variance(flow: Flow, action: Action, estimator: str, batches: Sequence[Tensor]
                      ) -> GradientVariance:
    """Total variance of the gradient estimate at the current parameters over ``batches``."""
    if len(batches) < 2:
        raise ValueError(f"the gradient variance needs at least 2 batches, got {len(batches)}")
    grads = torch.stack([flat_gradient(flow, action, estimator, b) for b in batches]).double()
    mean = grads.mean(0)
    variance = (grads - mean).pow(2).sum() / (len(batches) - 1)
    return GradientVariance(float(variance), float(mean @ mean))


@torch.no_grad()
def log_weights_of_samples(flow: Flow, action: Action, z: Tensor) -> np.ndarray:
    """log w = −S(x) − log q(x) of x = T(z), in float64."""
    x, log_q = flow(z)
    return log_weight(action(x), log_q).double().numpy()


@torch.no_grad()
def log_weights_of_data(flow: Flow, action: Action, x: Tensor) -> np.ndarray:
    """log w = −S(x) − log q(x) of given configurations (through the inverse flow)."""
    return log_weight(action(x), flow.log_prob(x)).double().numpy()


def forward_ess(log_w: np.ndarray) -> float:
    """ESS_fwd = N² / (Σ w · Σ 1/w) of log weights of samples of p (shift invariant)."""
    log_w = np.asarray(log_w, dtype=float)
    return float(np.exp(2 * np.log(log_w.size) - logsumexp(log_w) - logsumexp(-log_w)))

__all__ = ["FORWARD_ESTIMATORS", "QUICK", "REVERSE_ESTIMATORS", "THEORY_CARDS", "VARIANCE_PROBES",
           "ForwardConfig", "GradientVariance", "HMCSettings", "ReverseConfig", "StudyConfig",
           "TheorySetup", "flat_gradient", "forward_ess", "gradient_variance",
           "log_weights_of_data", "log_weights_of_samples", "study_config", "theory_setup",
           "with_budgets"]
