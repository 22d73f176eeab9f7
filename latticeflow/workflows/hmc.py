"""Hybrid Monte Carlo with the analytic force into an ensemble file: :func:`hmc_run`."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from latticeflow.base.device import select_device
from latticeflow.base.errors import LatticeflowError
from latticeflow.samplers.hmc import HMCConfig, HMCSampler
from latticeflow.theories import Action, load_action_card
from latticeflow.workflows.chainfile import (
    ChainRun,
    check_output,
    open_chain_file,
    run_to_file,
    setting_name,
)

log = logging.getLogger("latticeflow")

#: The header fields a resumed HMC file must match.
HMC_RESUME_CHECKS = ("sampler", "theory", "action_params", "lattice", "seed", "sampler_params")


@dataclass(frozen=True)
class HMCRunSettings:
    """An HMC run into ``out``: ``n`` rows in total, ``chunk`` rows per committed chunk.

    ``step_size`` ε (the start value when tuned), ``trajectory_length`` τ = n_steps·ε,
    ``target_accept``: tune ε to this acceptance during the ``therm`` thermalisation
    trajectories (None or 0: no tuning), ``save_every``: store every k-th trajectory, ``chains``
    independent chains (vectorised). ``resume`` continues ``out``, ``force`` replaces it; a
    resumed file must match the run in the header fields ``resume_checks``. ``report``:
    progress bar and log lines (the command); ``names``: how messages call the settings.
    """

    out: Path
    n: int
    chunk: int = 100
    step_size: float = 0.1
    trajectory_length: float = 1.0
    integrator: str = "omelyan"
    target_accept: float | None = 0.8
    therm: int = 200
    save_every: int = 1
    chains: int = 1
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float64"
    resume: bool = False
    force: bool = False
    report: bool = True
    resume_checks: tuple[str, ...] = HMC_RESUME_CHECKS
    names: Mapping[str, str] = field(default_factory=dict)

    def config(self) -> HMCConfig:
        """The sampler's parameters (validated by :class:`HMCConfig`)."""
        return HMCConfig(step_size=self.step_size, trajectory_length=self.trajectory_length,
                         integrator=self.integrator, n_chains=self.chains, n_therm=self.therm,
                         save_every=self.save_every, target_accept=self.target_accept or None,
                         dtype=self.dtype, device=self.device)


def hmc_run(action: Action | str | os.PathLike, lattice: tuple[int, ...],
            settings: HMCRunSettings) -> ChainRun:
    """HMC for ``action`` (or an action card, read after the settings are checked) on
    ``lattice`` until ``settings.out`` holds ``settings.n`` rows."""
    s = settings
    check_output(s.names, s.n, s.chunk, s.seed)
    select_device(s.device)  # rejects an unknown or absent device
    if not isinstance(action, Action):
        action = load_action_card(action)
    try:
        action.field_shape(lattice)  # rejects a lattice the theory cannot take
    except ValueError as exc:
        raise LatticeflowError(f"{setting_name(s.names, 'lattice')} "
                               f"{'x'.join(map(str, lattice))}: {exc}") from None
    sampler = HMCSampler(action, lattice, s.config(), s.seed)
    header = sampler.header()
    log.debug("hmc: %r on lattice %s, %s", action, lattice, header["sampler_params"])
    writer = open_chain_file(s.out, header, s.chunk, resume=s.resume, force=s.force,
                             resume_checks=s.resume_checks)

    def summary(_):
        return (f"acceptance {sampler.acceptance_rate:.3f}, ε = {sampler.step_size:.4g}, "
                f"{sampler.n_steps} steps per trajectory")

    return run_to_file(sampler, writer, s.n, s.chunk, report=s.report, summary=summary)


__all__ = ["HMC_RESUME_CHECKS", "HMCRunSettings", "hmc_run"]
