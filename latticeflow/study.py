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
"""

from __future__ import annotations

import copy
import logging
import math
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from scipy.special import logsumexp
from torch import Tensor

from latticeflow.estimators import get_estimator
from latticeflow.flows import DEFAULT_ARCHITECTURE, Flow, build_flow
from latticeflow.samplers.hmc import HMCConfig, HMCSampler
from latticeflow.script_support import write_json
from latticeflow.statistics import ess, gamma_method
from latticeflow.theories import Action, load_action_card

log = logging.getLogger("latticeflow.study")

REVERSE_ESTIMATORS = ("reverse-standard", "reverse-droppath", "reverse-fastpath")
FORWARD_ESTIMATORS = ("forward-standard", "forward-fastpath")
#: the estimators whose gradient variance is probed (the drop-in path one equals the fast one)
VARIANCE_PROBES = {"standard": "reverse-standard", "path": "reverse-fastpath"}
#: theory → (action card in ``actions/``, gradient-norm clip of its ``runs/*_L8.toml`` recipe)
THEORY_CARDS = {"phi4": ("phi4_m2-4_lam8.toml", 10.0), "u1": ("u1_beta2.toml", 100.0)}
_INIT, _TRAIN, _ESS, _VARIANCE, _HMC = range(5)
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_COLORS = {"reverse-standard": "tab:blue", "reverse-droppath": "tab:orange",
           "reverse-fastpath": "tab:green", "forward-standard": "tab:blue",
           "forward-fastpath": "tab:green"}
_DPI = 110


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
            torch.manual_seed(_seed(seed, _INIT))
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


def _seed(*key: int) -> int:
    """A 64-bit seed for the stream named by ``key``."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0])


def _generator(*key: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(_seed(*key))
    return generator


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
    return (-action(x) - log_q).double().numpy()


@torch.no_grad()
def log_weights_of_data(flow: Flow, action: Action, x: Tensor) -> np.ndarray:
    """log w = −S(x) − log q(x) of given configurations (through the inverse flow)."""
    return (-action(x) - flow.log_prob(x)).double().numpy()


def forward_ess(log_w: np.ndarray) -> float:
    """ESS_fwd = N² / (Σ w · Σ 1/w) of log weights of samples of p (shift invariant)."""
    log_w = np.asarray(log_w, dtype=float)
    return float(np.exp(2 * np.log(log_w.size) - logsumexp(log_w) - logsumexp(-log_w)))


# ------------------------------------------------------------------------------ one run
@dataclass
class RunRecord:
    """One estimator's run at one seed; the lists are indexed by measurement (0: at step 0).

    ``train_time``/``cpu_time``: seconds spent in training steps (wall clock / process CPU);
    ``step_time_median``: median wall seconds of one step. Reverse runs fill ``ess`` and the
    ``variance_*`` / ``mean_norm2_*`` lists of the :data:`VARIANCE_PROBES` (measured at
    ``variance_steps``, see :class:`GradientVariance`); forward runs fill ``ess``,
    ``forward_ess``, ``kl_train`` and ``kl_held_out`` (KL(p‖q) + log Z estimates).
    """

    estimator: str
    seed: int
    steps: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    ess: list[float] = field(default_factory=list)
    variance_steps: list[int] = field(default_factory=list)
    variance_standard: list[float] = field(default_factory=list)
    variance_path: list[float] = field(default_factory=list)
    mean_norm2_standard: list[float] = field(default_factory=list)
    mean_norm2_path: list[float] = field(default_factory=list)
    forward_ess: list[float] = field(default_factory=list)
    kl_train: list[float] = field(default_factory=list)
    kl_held_out: list[float] = field(default_factory=list)
    train_time: float = 0.0
    cpu_time: float = 0.0
    step_time_median: float = math.nan
    skipped_steps: int = 0

    def append(self, values: dict[str, float]) -> None:
        """Append each measured value to the list of the same name."""
        for name, value in values.items():
            getattr(self, name).append(value)


class _Runner:
    """One estimator's training state: flow, optimiser, noise/minibatch stream and clocks."""

    def __init__(self, estimator: str, flow: Flow, action: Action, seed: int, lr: float,
                 grad_clip: float, batch_size: int, data: Tensor | None = None):
        self.estimator, self.flow, self.action = estimator, flow, action
        self.fn = get_estimator(estimator)
        self.optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
        self.grad_clip, self.batch_size, self.data = grad_clip, batch_size, data
        self.generator = _generator(seed, _TRAIN)
        self.record = RunRecord(estimator, seed)
        self.step = 0
        self._step_times: list[float] = []

    def _batch(self) -> Tensor:
        if self.data is None:
            return self.flow.sample_prior(self.batch_size, generator=self.generator)
        index = torch.randint(len(self.data), (self.batch_size,), generator=self.generator)
        return self.data[index]

    def _train_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.fn(self.flow, self.action, self._batch()).surrogate.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.flow.parameters(), self.grad_clip)
        if torch.isfinite(norm):
            self.optimizer.step()
        else:
            self.record.skipped_steps += 1
        self.step += 1

    def train_until(self, seconds: float) -> None:
        """Take timed steps until the training wall time reaches ``seconds``."""
        while self.record.train_time < seconds:
            wall, cpu = time.perf_counter(), time.process_time()
            self._train_step()
            wall = time.perf_counter() - wall
            self.record.train_time += wall
            self.record.cpu_time += time.process_time() - cpu
            self._step_times.append(wall)
        self.record.step_time_median = float(np.median(self._step_times or [math.nan]))



Measure = Callable[[Flow], dict[str, float]]


def _due(k: int, every: int, n_slices: int) -> bool:
    """Whether slice ``k`` (0: before training) ends with a measurement."""
    return k % every == 0 or k == n_slices


def _measure_all(runners: list[_Runner], measure: Measure, at_start: bool) -> None:
    """Record the step, training time and ``measure(flow)`` of every run. At the start all runs
    hold copies of the same flow, so the first run's values are recorded for all."""
    values = measure(runners[0].flow) if at_start else None
    for runner in runners:
        record = runner.record
        record.steps.append(runner.step)
        record.times.append(record.train_time)
        record.append(values if values is not None else measure(runner.flow))


def _reverse_measure(action: Action, z_ess: Tensor, batches: list[Tensor] | None) -> Measure:
    """ESS/N on ``z_ess`` and, given ``batches``, the gradient variance of each probe."""
    def measure(flow: Flow) -> dict[str, float]:
        values = {"ess": ess(log_weights_of_samples(flow, action, z_ess))}
        if batches:
            for label, estimator in VARIANCE_PROBES.items():
                result = gradient_variance(flow, action, estimator, batches)
                values[f"variance_{label}"] = result.variance
                values[f"mean_norm2_{label}"] = result.mean_norm2
        return values
    return measure


def _forward_measure(action: Action, z_ess: Tensor, held_out: Tensor, train_eval: Tensor
                     ) -> Measure:
    """Reverse ESS/N on ``z_ess``; forward ESS and KL + log Z on held-out and training data."""
    def measure(flow: Flow) -> dict[str, float]:
        held = log_weights_of_data(flow, action, held_out)
        return {"ess": ess(log_weights_of_samples(flow, action, z_ess)),
                "forward_ess": forward_ess(held), "kl_held_out": float(held.mean()),
                "kl_train": float(log_weights_of_data(flow, action, train_eval).mean())}
    return measure


# ------------------------------------------------------------------------------ reverse KL
def reverse_runs(setup: TheorySetup, seed: int, config: ReverseConfig, dtype: torch.dtype
                 ) -> list[RunRecord]:
    """The round-robin race of ``config.estimators`` on ``setup`` at ``seed``."""
    initial = setup.build(seed, dtype)
    runners = [_Runner(name, copy.deepcopy(initial), setup.action, seed, config.lr,
                       setup.grad_clip, config.batch_size) for name in config.estimators]
    z_ess = initial.sample_prior(config.ess_batch, generator=_generator(seed, _ESS))
    for k in range(config.n_slices + 1):
        for runner in runners:
            runner.train_until(config.budget_s * k / config.n_slices)
        variance_due = _due(k, config.variance_every, config.n_slices)
        if not (variance_due or _due(k, config.ess_every, config.n_slices)):
            continue
        batches = None
        if variance_due:
            generator = _generator(seed, _VARIANCE, k)
            batches = [initial.sample_prior(config.batch_size, generator=generator)
                       for _ in range(config.variance_batches)]
            for runner in runners:
                runner.record.variance_steps.append(runner.step)
        _measure_all(runners, _reverse_measure(setup.action, z_ess, batches), k == 0)
        log.info("%s seed %d slice %d/%d: ESS %s", setup.name, seed, k, config.n_slices,
                 "  ".join(f"{r.estimator} {r.record.ess[-1]:.3f} ({r.step} steps)"
                           for r in runners))
    return [runner.record for runner in runners]


# ------------------------------------------------------------------------------ forward KL
@dataclass
class HMCData:
    """Training and held-out ensembles of p, with the HMC run's diagnostics."""

    train: Tensor
    held_out: Tensor
    acceptance: float
    step_size: float
    tau_int_action: float
    seconds: float

    def describe(self) -> dict[str, Any]:
        return {"n_train": len(self.train), "n_held_out": len(self.held_out),
                "acceptance": self.acceptance, "step_size": self.step_size,
                "tau_int_action": self.tau_int_action, "seconds": self.seconds}


def hmc_data(setup: TheorySetup, n_train: int, n_held_out: int, settings: HMCSettings,
             dtype: torch.dtype) -> HMCData:
    """Fixed ensembles (independent of the training seeds): ``n_train`` rows from one HMC run,
    ``n_held_out`` from another. ``tau_int_action``: τ_int of S in saved rows, chains as
    replicas (≈ 0.5 when ``save_every`` decorrelates)."""
    started = time.perf_counter()
    sampler = HMCSampler(setup.action, setup.lattice, settings.config(), _seed(_HMC, 0))
    rows = sampler.advance(n_train)
    held_out = HMCSampler(setup.action, setup.lattice, settings.config(), _seed(_HMC, 1))
    held_rows = held_out.advance(n_held_out)
    chains = [rows["action"][rows["chain"] == c] for c in range(settings.n_chains)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tau = gamma_method([c for c in chains if len(c) > 1]).tau_int
    return HMCData(torch.as_tensor(rows["configs"]).to(dtype),
                   torch.as_tensor(held_rows["configs"]).to(dtype),
                   sampler.acceptance_rate, sampler.step_size, float(tau),
                   time.perf_counter() - started)


def forward_runs(setup: TheorySetup, seed: int, data: HMCData, n_train: int,
                 config: ForwardConfig, dtype: torch.dtype) -> list[RunRecord]:
    """The round-robin race of ``config.estimators`` on the first ``n_train`` HMC rows."""
    initial = setup.build(seed, dtype)
    train = data.train[:n_train]
    train_eval = train[:len(data.held_out)]
    runners = [_Runner(name, copy.deepcopy(initial), setup.action, seed, config.lr,
                       setup.grad_clip, config.batch_size, train)
               for name in config.estimators]
    z_ess = initial.sample_prior(config.ess_batch, generator=_generator(seed, _ESS))
    measure = _forward_measure(setup.action, z_ess, data.held_out, train_eval)
    for k in range(config.n_slices + 1):
        for runner in runners:
            runner.train_until(config.budget_s * k / config.n_slices)
        if _due(k, config.eval_every, config.n_slices):
            _measure_all(runners, measure, k == 0)
            log.info(
                "%s N=%d seed %d slice %d/%d: %s", setup.name, n_train, seed, k,
                config.n_slices, "  ".join(
                    f"{r.estimator} KL+logZ train {r.record.kl_train[-1]:.2f} held-out "
                    f"{r.record.kl_held_out[-1]:.2f}" for r in runners))
    return [runner.record for runner in runners]


# ------------------------------------------------------------------------------ the study
Records = dict[str, list[RunRecord]]


@dataclass
class StudyResult:
    """Raw records and HMC diagnostics; ``reverse[theory][estimator]`` lists one record per
    seed, ``forward[theory][n_train][estimator]`` likewise."""

    config: StudyConfig
    setups: dict[str, TheorySetup]
    reverse: dict[str, Records] = field(default_factory=dict)
    forward: dict[str, dict[int, Records]] = field(default_factory=dict)
    hmc: dict[str, HMCData] = field(default_factory=dict)
    runtime_s: float = 0.0


def _group(records: list[RunRecord]) -> Records:
    grouped: Records = {}
    for record in records:
        grouped.setdefault(record.estimator, []).append(record)
    return grouped


def run_study(config: StudyConfig, setups: dict[str, TheorySetup],
              progress: Callable[[str], None] = log.info) -> StudyResult:
    """Run the reverse and forward parts for every theory of ``setups``."""
    dtype = _DTYPES[config.dtype]
    result = StudyResult(config, setups)
    started = time.perf_counter()
    for name, setup in setups.items():
        reverse: list[RunRecord] = []
        for seed in range(config.seeds):
            progress(f"reverse KL: {name}, seed {seed}")
            reverse += reverse_runs(setup, seed, config.reverse, dtype)
        result.reverse[name] = _group(reverse)
    for name, setup in setups.items():
        fwd = config.forward
        progress(f"forward KL: {name}, HMC data")
        data = hmc_data(setup, max(fwd.train_sizes), fwd.held_out, fwd.hmc, dtype)
        result.hmc[name] = data
        result.forward[name] = {}
        for n_train in fwd.train_sizes:
            records: list[RunRecord] = []
            for seed in range(fwd.seeds):
                progress(f"forward KL: {name}, N = {n_train}, seed {seed}")
                records += forward_runs(setup, seed, data, n_train, fwd, dtype)
            result.forward[name][n_train] = _group(records)
    result.runtime_s = time.perf_counter() - started
    return result


# ------------------------------------------------------------------------------ summaries
def _spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (NaN for one value), min and max."""
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else math.nan,
            "min": float(v.min()), "max": float(v.max())}


def _speed(records: list[RunRecord]) -> dict[str, Any]:
    steps = [r.steps[-1] for r in records]
    train = [r.train_time for r in records]
    return {"steps": _spread(steps),
            "ms_per_step": 1e3 * sum(train) / sum(steps),
            "cpu_ms_per_step": 1e3 * sum(r.cpu_time for r in records) / sum(steps),
            "median_ms_per_step": 1e3 * float(np.median([r.step_time_median for r in records])),
            "steps_per_s": sum(steps) / sum(train),
            "skipped_steps": sum(r.skipped_steps for r in records)}


def _at_time(record: RunRecord, values: list[float], t: float) -> float:
    return float(np.interp(t, record.times, values))


def reverse_summary(result: StudyResult) -> list[dict[str, Any]]:
    """One row per theory and reverse estimator: speed, ESS and gradient variance."""
    rows = []
    half = result.config.reverse.budget_s / 2
    for theory, grouped in result.reverse.items():
        for estimator, records in grouped.items():
            rows.append({
                "theory": theory, "estimator": estimator, "seeds": len(records),
                **_speed(records),
                "ess_final": _spread([r.ess[-1] for r in records]),
                "ess_half_budget": _spread([_at_time(r, r.ess, half) for r in records]),
                "ess_best": _spread([max(r.ess) for r in records]),
                **{f"variance_{label}_final": _spread([getattr(r, f"variance_{label}")[-1]
                                                       for r in records])
                   for label in VARIANCE_PROBES},
            })
    return rows


def forward_summary(result: StudyResult) -> list[dict[str, Any]]:
    """One row per theory, training-set size and forward estimator (final values)."""
    rows = []
    for theory, by_size in result.forward.items():
        for n_train, grouped in by_size.items():
            for estimator, records in grouped.items():
                gap = [r.kl_held_out[-1] - r.kl_train[-1] for r in records]
                rows.append({
                    "theory": theory, "n_train": n_train, "estimator": estimator,
                    "seeds": len(records), **_speed(records),
                    "ess_final": _spread([r.ess[-1] for r in records]),
                    "forward_ess_final": _spread([r.forward_ess[-1] for r in records]),
                    "kl_train_final": _spread([r.kl_train[-1] for r in records]),
                    "kl_held_out_final": _spread([r.kl_held_out[-1] for r in records]),
                    "kl_held_out_best": _spread([min(r.kl_held_out) for r in records]),
                    "generalisation_gap": _spread(gap),
                })
    return rows


def _fmt(s: dict[str, float], digits: int = 3) -> str:
    """``mean ± std [min, max]`` (without the spread for a single seed)."""
    if math.isnan(s["std"]):
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} [{s['min']:.{digits}f}, " \
           f"{s['max']:.{digits}f}]"


def _fmt_sci(s: dict[str, float]) -> str:
    return f"{s['mean']:.2e}" if math.isnan(s["std"]) else f"{s['mean']:.2e} ± {s['std']:.1e}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def reverse_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`reverse_summary`."""
    headers = ["theory", "estimator", "steps", "ms/step (wall)", "ms/step (CPU)", "steps/s",
               "ESS at ½ budget", "final ESS", "final Var[g] standard", "final Var[g] path"]
    return _table(headers, [[
        r["theory"], r["estimator"], f"{r['steps']['mean']:.0f}", f"{r['ms_per_step']:.1f}",
        f"{r['cpu_ms_per_step']:.1f}", f"{r['steps_per_s']:.1f}", _fmt(r["ess_half_budget"]),
        _fmt(r["ess_final"]), _fmt_sci(r["variance_standard_final"]),
        _fmt_sci(r["variance_path_final"])] for r in rows])


def forward_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`forward_summary`."""
    headers = ["theory", "N train", "estimator", "steps", "ms/step (wall)", "steps/s",
               "reverse ESS", "forward ESS (held-out)", "KL+logZ train", "KL+logZ held-out",
               "held-out − train"]
    return _table(headers, [[
        r["theory"], str(r["n_train"]), r["estimator"], f"{r['steps']['mean']:.0f}",
        f"{r['ms_per_step']:.1f}", f"{r['steps_per_s']:.1f}", _fmt(r["ess_final"]),
        _fmt(r["forward_ess_final"]), _fmt(r["kl_train_final"], 2),
        _fmt(r["kl_held_out_final"], 2), _fmt(r["generalisation_gap"], 2)] for r in rows])


def markdown_report(result: StudyResult, figures: Sequence[Path]) -> str:
    """``results.md``: setup, both tables, definitions and the figure list."""
    cfg, rev, fwd = result.config, result.config.reverse, result.config.forward
    setups = "\n".join(f"- {name}: {s.action!r} on {'x'.join(map(str, s.lattice))}, flow "
                       f"{s.architecture}, grad clip {s.grad_clip:g}"
                       for name, s in result.setups.items())
    hmc = "\n".join(f"- {name}: {d.describe()}" for name, d in result.hmc.items())
    return "\n".join([
        "# Estimator study", "",
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{platform.processor() or platform.machine()}; {cfg.dtype}; total runtime "
        f"{result.runtime_s:.0f} s.", "", setups, "",
        "## Reverse KL (equal wall-clock budgets, round-robin)", "",
        f"Budget {rev.budget_s:g} s of training per estimator and seed ({cfg.seeds} seeds), "
        f"interleaved in {rev.n_slices} slices; batch {rev.batch_size}, Adam lr {rev.lr:g} "
        f"(constant); ESS/N on a fixed batch of {rev.ess_batch} samples; Var[g] over "
        f"{rev.variance_batches} independent batches at the run's final parameters "
        f"(path = drop-in = fast path gradient). Values: mean ± sample std [min, max] over "
        f"seeds.", "",
        reverse_table(reverse_summary(result)), "",
        "## Forward KL (fixed HMC sets)", "",
        f"Budget {fwd.budget_s:g} s per estimator, set and seed ({fwd.seeds} seeds), "
        f"interleaved in {fwd.n_slices} slices; "
        f"batch {fwd.batch_size} drawn with replacement, Adam lr {fwd.lr:g}; held-out set "
        f"{fwd.held_out} configurations; KL+logZ = E_p[log w], log w = −S − log q, on the "
        f"held-out set and on the first {fwd.held_out} training configurations (a training "
        f"value below the held-out one means overfitting). Forward ESS = N² / (Σw · Σ1/w) on "
        f"the held-out set; reverse ESS = (Σw)² / (N Σw²) on {fwd.ess_batch} fresh flow "
        f"samples.", "", "HMC data:", hmc, "",
        forward_table(forward_summary(result)), "",
        "## Figures", "", *[f"- `{p.name}`" for p in figures], "",
    ])


# ------------------------------------------------------------------------------ figures
def _band(ax: Axes, x: np.ndarray, ys: np.ndarray, color: str, label: str | None,
          linestyle: str = "-") -> None:
    """Mean over seeds (rows of ``ys``) as a line with a dot at its end, min–max as a band."""
    ax.plot(x, ys.mean(0), color=color, linestyle=linestyle, label=label, lw=1.6, marker="o",
            ms=3.5, markevery=[len(x) - 1])
    if len(ys) > 1:
        ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=0.15, lw=0)


def _on_grid(records: list[RunRecord], x_of: Callable[[RunRecord], Sequence[float]],
             y_of: Callable[[RunRecord], Sequence[float]], n: int = 60
             ) -> tuple[np.ndarray, np.ndarray]:
    """Curves of several seeds interpolated onto a common grid (where all are defined)."""
    start = max(x_of(r)[0] for r in records)
    grid = np.linspace(start, max(start, min(x_of(r)[-1] for r in records)), n)
    return grid, np.array([np.interp(grid, x_of(r), y_of(r)) for r in records])


def _figure(n_rows: int, n_cols: int, height: float = 3.6) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(5.4 * n_cols, height * n_rows), layout="constrained")
    return fig, np.array(fig.subplots(n_rows, n_cols, squeeze=False))


def _title(setup: TheorySetup) -> str:
    params = ", ".join(f"{k} = {v:g}" for k, v in setup.action.params().items()
                       if isinstance(v, int | float))
    return f"{setup.name} ({params}), {'x'.join(map(str, setup.lattice))}"


def plot_reverse_ess(result: StudyResult, path: Path, against: str) -> Path:
    """ESS/N (log scale) against training wall time (``against="time"``) or step."""
    fig, axes = _figure(1, len(result.reverse))
    x_of = (lambda r: r.times) if against == "time" else (lambda r: r.steps)
    for ax, (theory, grouped) in zip(axes[0], result.reverse.items(), strict=True):
        for estimator, records in grouped.items():
            grid, ys = _on_grid(records, x_of, lambda r: r.ess)
            _band(ax, grid, ys, _COLORS[estimator], estimator)
        ax.set_yscale("log")
        ax.set(title=_title(result.setups[theory]), ylabel="ESS / N (fixed batch)",
               ylim=(None, 1.0),
               xlabel="training wall time [s]" if against == "time" else "training step")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Reverse KL: ESS/N\n(mean and min–max over {result.config.seeds} seeds)")
    fig.savefig(path, dpi=_DPI)
    return path


def plot_gradient_variance(result: StudyResult, path: Path) -> Path:
    """Var[g] of the standard (dashed) and path (solid) estimators along each run."""
    fig, axes = _figure(1, len(result.reverse), height=4.0)
    styles = {"standard": "--", "path": "-"}
    for ax, (theory, grouped) in zip(axes[0], result.reverse.items(), strict=True):
        for estimator, records in grouped.items():
            for label, style in styles.items():
                grid, ys = _on_grid(records, lambda r: r.variance_steps,
                                    lambda r, k=label: np.log10(getattr(r, f"variance_{k}")))
                _band(ax, grid, ys, _COLORS[estimator],
                      f"{estimator} run" if label == "path" else None, style)
        ax.plot([], [], "k--", label="standard gradient")
        ax.plot([], [], "k-", label="path gradient")
        ax.set(title=_title(result.setups[theory]), xlabel="training step",
               ylabel="log10 Var[g] (trace, one batch)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    rev = result.config.reverse
    fig.suptitle(f"Gradient variance at each run's parameters\n({rev.variance_batches} batches "
                 f"of {rev.batch_size}; mean and min–max over {result.config.seeds} seeds)")
    fig.savefig(path, dpi=_DPI)
    return path


def plot_forward_kl(result: StudyResult, path: Path) -> Path:
    """KL(p‖q) + log Z on training (dashed) and held-out (solid) data against step."""
    sizes = result.config.forward.train_sizes
    fig, axes = _figure(len(result.forward), len(sizes))
    for row, (theory, by_size) in zip(axes, result.forward.items(), strict=True):
        for ax, n_train in zip(row, sizes, strict=True):
            for estimator, records in by_size[n_train].items():
                for label, style, y_of in (("held-out", "-", lambda r: r.kl_held_out[1:]),
                                           ("train", "--", lambda r: r.kl_train[1:])):
                    grid, ys = _on_grid(records, lambda r: r.steps[1:], y_of)
                    _band(ax, grid, ys, _COLORS[estimator], f"{estimator}, {label}", style)
            ax.set(title=f"{_title(result.setups[theory])}, N train = {n_train}",
                   xlabel="training step", ylabel="KL(p‖q) + log Z  (E_p[log w])")
            ax.grid(alpha=0.3)
            ax.legend(loc="upper right", fontsize=7)
    fig.suptitle(f"Forward KL on training (dashed) and held-out (solid) HMC data\n(after the "
                 f"first measurement; mean and min–max over {result.config.forward.seeds} seeds)")
    fig.savefig(path, dpi=_DPI)
    return path


def write_figures(result: StudyResult, out: Path) -> list[Path]:
    """All PNGs of the study into ``out``."""
    figures = [plot_reverse_ess(result, out / "reverse_ess_vs_time.png", "time"),
               plot_reverse_ess(result, out / "reverse_ess_vs_step.png", "step"),
               plot_gradient_variance(result, out / "gradient_variance.png")]
    if result.forward:
        figures.append(plot_forward_kl(result, out / "forward_kl.png"))
    return figures


def result_json(result: StudyResult) -> dict[str, Any]:
    """Everything as JSON-ready data: config, setups, HMC data, summaries, raw records."""
    return {
        "config": asdict(result.config),
        "torch": str(torch.__version__), "threads": torch.get_num_threads(),
        "runtime_s": result.runtime_s,
        "theories": {name: s.describe() for name, s in result.setups.items()},
        "hmc": {name: d.describe() for name, d in result.hmc.items()},
        "summary": {"reverse": reverse_summary(result), "forward": forward_summary(result)},
        "reverse": {t: {e: [asdict(r) for r in rs] for e, rs in g.items()}
                    for t, g in result.reverse.items()},
        "forward": {t: {str(n): {e: [asdict(r) for r in rs] for e, rs in g.items()}
                        for n, g in by.items()} for t, by in result.forward.items()},
    }


def write_outputs(result: StudyResult, out: Path) -> list[Path]:
    """``results.md``, ``results.json`` and the PNGs into ``out``; returns their paths."""
    figures = write_figures(result, out)
    (out / "results.md").write_text(markdown_report(result, figures))
    write_json(out / "results.json", result_json(result))
    return [out / "results.md", out / "results.json", *figures]


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


__all__ = ["FORWARD_ESTIMATORS", "QUICK", "REVERSE_ESTIMATORS", "ForwardConfig",
           "GradientVariance", "HMCData", "HMCSettings", "ReverseConfig", "RunRecord",
           "StudyConfig", "StudyResult", "TheorySetup", "forward_ess", "forward_runs",
           "gradient_variance", "hmc_data", "markdown_report", "reverse_runs",
           "run_study", "theory_setup", "with_budgets", "write_outputs"]
