"""Neural MCMC with a trained flow into an ensemble file: :func:`sample_run`.

Sharded generation (a :class:`~latticeflow.base.distributed.DistributedContext`, under
``torchrun``): every rank runs its own chains (``chains`` per rank) into its own shard
``FILE.rank<r>.h5`` (:func:`latticeflow.base.distributed.shard_path`) with its own seed
(:func:`latticeflow.base.distributed.rank_seed`; rank 0 keeps ``seed``), the ``n`` rows split
evenly over the ranks. Rows carry global chain indices (chain c of rank r is r·C + c in ``/chain``).
When every rank is done, rank 0 joins the shards into ``FILE.h5`` with HDF5 virtual datasets
(:func:`latticeflow.ensemble.join_shards`); resuming resumes every shard and joins again.

Sampling never uses TF32; ``compile`` compiles the flow's forward with ``torch.compile``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from latticeflow.base.device import select_dtype
from latticeflow.base.distributed import (
    DistributedContext,
    barrier,
    gather_objects,
    rank_seed,
    shard_path,
    split_rows,
)
from latticeflow.base.errors import LatticeflowError
from latticeflow.ensemble import SHARDS_ATTR, join_shards
from latticeflow.flows import Flow
from latticeflow.flows.compile import compile_forward
from latticeflow.samplers.nmcmc import FlowMetropolis, NonFiniteProposals
from latticeflow.samplers.proposals import ProposalStats
from latticeflow.theories.base import Action
from latticeflow.training import LoadedFlow, tf32_mode
from latticeflow.workflows.chainfile import (
    ChainRun,
    check_count,
    check_output,
    open_chain_file,
    run_to_file,
    setting_name,
)

log = logging.getLogger("latticeflow")

#: The header fields a resumed neural-MCMC file must match (then the sampler settings).
NMCMC_RESUME_CHECKS = ("sampler", "checkpoint_sha256", "lattice", "seed")


@dataclass(frozen=True)
class SampleSettings:
    """A neural-MCMC run into ``out``: ``n`` rows in total, ``chunk`` rows per committed
    chunk, ``batch_size`` proposals per device batch, ``chains`` independent chains (per
    process when sharded), ``seed``; None takes the value of the recipe's ``[sampling]``.

    ``resume`` continues ``out``, ``force`` replaces it; a resumed file must match the run in
    the header fields ``resume_checks`` and in batch size, chains and processes. ``report``:
    progress bar and log lines (the command); ``names``: how messages call the settings;
    ``source``: how a message names the flow (None: not at all).
    """

    out: Path
    n: int | None = None
    chunk: int | None = None
    batch_size: int | None = None
    chains: int | None = None
    seed: int | None = None
    store_dtype: str = "float32"
    compile: bool = False
    resume: bool = False
    force: bool = False
    report: bool = True
    resume_checks: tuple[str, ...] = NMCMC_RESUME_CHECKS
    names: Mapping[str, str] = field(default_factory=dict)
    source: str | None = None

    def resolved(self, loaded: LoadedFlow) -> SampleSettings:
        """These settings with the recipe's ``[sampling]`` values for the ones left None."""
        sampling = loaded.recipe.sampling
        return replace(self, **{name: getattr(sampling, name) for name in
                                ("n", "chunk", "batch_size", "chains", "seed")
                                if getattr(self, name) is None})


class ShardMetropolis(FlowMetropolis):
    """:class:`FlowMetropolis` whose rows always carry a ``chain`` index, offset so that chain c
    of this shard is chain ``chain_offset + c`` of the joined ensemble."""

    def __init__(self, flow: Flow, action: Action, *, chain_offset: int, **kwargs: Any
                 ) -> None:
        super().__init__(flow, action, **kwargs)
        self.chain_offset = chain_offset

    def advance(self, k: int) -> dict[str, np.ndarray]:
        rows = super().advance(k)
        local = rows.get("chain", np.zeros(k, dtype=np.int32))
        rows["chain"] = (local + self.chain_offset).astype(np.int32)
        return rows


def _check_joined_target(out: Path, resume: bool, force: bool) -> None:
    """The joined file of a sharded run may be replaced by a resumed or forced run only."""
    if not out.exists() or force:
        return
    if not resume:
        raise LatticeflowError(f"{out}: already exists; use --resume to continue its shards or "
                               "--force to overwrite it")
    try:
        with h5py.File(out, "r") as f:
            joined = SHARDS_ATTR in f.attrs
    except OSError:
        joined = False
    if not joined:
        raise LatticeflowError(f"{out}: not a joined ensemble of shards, so a multi-process "
                               "--resume would replace it; use --force to do that")


def sample_run(loaded: LoadedFlow, settings: SampleSettings,
               context: DistributedContext | None = None) -> ChainRun:
    """Neural MCMC with ``loaded``'s flow until ``settings.out`` holds ``settings.n`` rows (the
    joined file when sharded); see :class:`SampleSettings`."""
    s = settings.resolved(loaded)
    names = s.names
    chains = s.chains
    check_output(names, s.n, s.chunk, s.seed)
    check_count(names, "batch_size", s.batch_size)
    check_count(names, "chains", chains)
    if s.chunk % chains:
        raise LatticeflowError(f"{setting_name(names, 'chunk')} ({s.chunk}) must be a multiple "
                               f"of {setting_name(names, 'chains')} ({chains})")
    rank, world = (0, 1) if context is None else (context.rank, context.world_size)
    rows = split_rows(s.n, world)
    if any(n % chains for n in rows):
        raise LatticeflowError(f"{setting_name(names, 'n')} ({s.n}) must split into {world} "
                               f"shard(s) of a multiple of {setting_name(names, 'chains')} "
                               f"({chains}) rows each; use a multiple of {world * chains}")
    out = s.out
    if context is not None:
        _check_joined_target(out, s.resume, s.force)
    target = out if context is None else shard_path(out, rank)
    my_seed = rank_seed(s.seed, rank)
    params = {"batch_size": s.batch_size, "n_chains": chains, "store_dtype": s.store_dtype,
              "training_step": loaded.step}
    if context is not None:
        params.update(rank=rank, world_size=world)
    header = loaded.nmcmc_header(seed=my_seed, sampler_params=params,
                                 store_dtype=s.store_dtype,
                                 chains=chains > 1 or context is not None)
    options = {"seed": my_seed, "batch_size": s.batch_size, "n_chains": chains,
               "store_dtype": select_dtype(s.store_dtype)}
    writer = open_chain_file(target, header, s.chunk, resume=s.resume, force=s.force,
                             resume_checks=s.resume_checks)
    stored = writer.metadata.sampler_params
    if s.resume and (stored.get("batch_size"), stored.get("n_chains"),
                     stored.get("world_size", 1)) != (s.batch_size, chains, world):
        writer.close()
        raise LatticeflowError(f"{target}: cannot resume: batch size, number of chains or "
                               f"number of processes differ from the file's sampler_params")
    sampler = (FlowMetropolis(loaded.flow, loaded.action, **options) if context is None else
               ShardMetropolis(loaded.flow, loaded.action, chain_offset=rank * chains,
                               **options))
    if s.compile:
        compile_forward(loaded.flow, s.batch_size * chains)

    def summary(_):
        if math.isnan(sampler.acceptance_rate):
            return "no new proposals"
        return (f"acceptance {sampler.acceptance_rate:.3f} this session; "
                f"{sampler.proposals.summary().describe()} (whole file)")

    with tf32_mode(False):
        try:
            run = run_to_file(sampler, writer, rows[rank], s.chunk, report=s.report,
                              summary=summary)
        except NonFiniteProposals as exc:
            if s.source is None:
                raise
            raise LatticeflowError(f"{s.source}: {exc}; {writer.n_complete} rows are "
                                   f"in {target}") from None
    if context is None:
        return run
    barrier()  # every shard is complete and closed
    runs = gather_objects(run)
    proposals = ProposalStats.combined(gather_objects(sampler.proposals))
    n_complete = sum(r.n_complete for r in runs)
    if context.is_main:
        joined = join_shards(
            out, [shard_path(out, r) for r in range(world)], seed=s.seed, force=True,
            sampler_params={**{k: v for k, v in params.items() if k != "rank"},
                            "n_chains": world * chains, "chains_per_shard": chains,
                            "shard_seeds": [rank_seed(s.seed, r) for r in range(world)]})
        with h5py.File(out, "r+") as f:
            f.attrs.update(proposals.summary().attributes())
        log.info("joined %d shards into %s: %d rows, chains 0..%d", world, out,
                 joined.n_complete, world * chains - 1)
    return ChainRun(out, n_complete, sum(r.n_added for r in runs),
                    any(r.interrupted for r in runs))


__all__ = ["NMCMC_RESUME_CHECKS", "SampleSettings", "ShardMetropolis", "sample_run"]
