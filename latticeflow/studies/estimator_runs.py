"""The races of the estimator study (:mod:`latticeflow.studies.estimators` describes them):
each estimator's run (:class:`RunRecord`, the timed runner), the round-robin reverse-KL and
forward-KL races, the HMC data of the forward part, and :func:`run_study`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from latticeflow.estimators import get_estimator
from latticeflow.flows import Flow
from latticeflow.samplers.hmc import HMCSampler
from latticeflow.statistics import ess, gamma_method
from latticeflow.studies.estimators import (
    STREAM_ESS,
    STREAM_HMC,
    STREAM_TRAIN,
    STREAM_VARIANCE,
    VARIANCE_PROBES,
    ForwardConfig,
    HMCSettings,
    ReverseConfig,
    StudyConfig,
    TheorySetup,
    forward_ess,
    gradient_variance,
    log_weights_of_data,
    log_weights_of_samples,
    stream_generator,
    stream_seed,
)
from latticeflow.theories import Action

log = logging.getLogger("latticeflow.study")

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ------------------------------------------------------------------------------ one run
@dataclass
class RunRecord:
    """One estimator's run at one seed; the lists are indexed by measurement (0: at step 0).

    ``train_time``/``cpu_time``: seconds spent in training steps (wall clock / process CPU);
    ``step_time_median``: median wall seconds of one step. Reverse runs fill ``ess`` and the
    ``variance_*`` / ``mean_norm2_*`` lists of the :data:`VARIANCE_PROBES` (measured at
    ``variance_steps``, see :class:`~latticeflow.studies.estimators.GradientVariance`); forward
    runs fill ``ess``, ``forward_ess``, ``kl_train`` and ``kl_held_out`` (KL(p‖q) + log Z
    estimates).
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
        self.generator = stream_generator(seed, STREAM_TRAIN)
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
    z_ess = initial.sample_prior(config.ess_batch, generator=stream_generator(seed, STREAM_ESS))
    for k in range(config.n_slices + 1):
        for runner in runners:
            runner.train_until(config.budget_s * k / config.n_slices)
        variance_due = _due(k, config.variance_every, config.n_slices)
        if not (variance_due or _due(k, config.ess_every, config.n_slices)):
            continue
        batches = None
        if variance_due:
            generator = stream_generator(seed, STREAM_VARIANCE, k)
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
    sampler = HMCSampler(setup.action, setup.lattice, settings.config(), stream_seed(STREAM_HMC, 0))
    rows = sampler.advance(n_train)
    held_out = HMCSampler(setup.action, setup.lattice, settings.config(),
                          stream_seed(STREAM_HMC, 1))
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
    z_ess = initial.sample_prior(config.ess_batch, generator=stream_generator(seed, STREAM_ESS))
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



__all__ = ["HMCData", "RunRecord", "StudyResult", "forward_runs", "hmc_data", "reverse_runs",
           "run_study"]
