"""``latticeflow sample``: neural MCMC with a trained flow into an HDF5 ensemble.

Sharded generation: under ``torchrun --nproc_per_node=K -m latticeflow.cli sample RUN --rows N
--out FILE.h5`` (``--rows``: torchrun's parser takes ``--n`` for an abbreviation of its own
options) every rank runs its own chains (``--chains`` per rank) into its own shard
``FILE.rank<r>.h5`` (:func:`latticeflow.distributed.shard_path`) with its own seed
(:func:`latticeflow.distributed.rank_seed`; rank 0 keeps ``--seed``), the N rows split evenly
over the ranks. Rows carry global chain indices (chain c of rank r is r·C + c in ``/chain``).
When every rank is done, rank 0 joins the shards into ``FILE.h5`` with HDF5 virtual datasets
(:func:`latticeflow.ensemble.join_shards`). ``--resume`` resumes every shard and joins again.

Sampling never uses TF32, and ``--compile`` compiles the flow's forward with ``torch.compile``.
"""

from __future__ import annotations

import argparse
import logging
import math
import textwrap
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from latticeflow.commands._chainfile import (
    add_output_options,
    check_counts,
    run_to_file,
)
from latticeflow.commands.hmc import parse_lattice
from latticeflow.device import select_dtype
from latticeflow.distributed import (
    DistributedContext,
    barrier,
    distributed_session,
    gather_objects,
    label_logs,
    rank_seed,
    shard_path,
    split_rows,
)
from latticeflow.ensemble import SHARDS_ATTR, join_shards
from latticeflow.ensemble.output import check_seed, open_output
from latticeflow.errors import LatticeflowError
from latticeflow.flows import Flow
from latticeflow.flows.compile import compile_forward
from latticeflow.samplers.nmcmc import FlowMetropolis, NonFiniteProposals
from latticeflow.samplers.proposals import ProposalStats
from latticeflow.theories.base import Action
from latticeflow.training import checkpoint_path, load_checkpoint, tf32_mode
from latticeflow.workflows import ENSEMBLE_NAME

log = logging.getLogger("latticeflow")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "sample", help="neural MCMC ensemble from a trained flow",
        description="Independent Metropolis-Hastings with proposals from a trained flow; writes "
                    "an HDF5 ensemble (schema in docs/ensemble-format.md). Defaults for --n, "
                    "--batch-size, --chunk, --chains and --seed come from the recipe's "
                    "[sampling] section.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              latticeflow sample runs/quickstart --n 10000
              latticeflow sample runs/u1_beta2_L8/checkpoint.pt --n 50000 --out u1_nmcmc.h5
              latticeflow sample runs/phi4_L8 --lattice 16x16 --n 2000 --out phi4_L16.h5
              latticeflow sample runs/quickstart --n 20000 --resume
              torchrun --nproc_per_node=4 -m latticeflow.cli sample runs/phi4_L16 \\
                  --rows 400000 --out phi4_L16.h5  # shards phi4_L16.rank<r>.h5, joined"""),
    )
    parser.add_argument("checkpoint", type=Path, help="run directory or checkpoint file")
    parser.add_argument("--out", type=Path,
                        help=f"output HDF5 file (default: RUN_DIR/{ENSEMBLE_NAME})")
    add_output_options(parser, defaults_from="the recipe's [sampling] section")
    parser.add_argument("--batch-size", type=int, help="proposals per batch on the device")
    parser.add_argument("--chains", type=int,
                        help="independent chains (rows round-robin; per process under torchrun)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--lattice", type=parse_lattice,
                        help="sample on another lattice than the training one, e.g. 16x16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--store-dtype", choices=("float32", "float64"), default="float32",
                        help="storage type of the configurations")
    parser.add_argument("--compile", action="store_true",
                        help="compile the flow's forward with torch.compile (pays off for long "
                             "runs on a GPU; compiling takes a while)")
    parser.set_defaults(handler=run)


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


def run(args: argparse.Namespace) -> int:
    with distributed_session(args.device) as context:
        if context is not None:
            label_logs(context)
        return _sample(args, context)


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


def _sample(args: argparse.Namespace, context: DistributedContext | None) -> int:
    loaded = load_checkpoint(args.checkpoint, device=args.device if context is None
                             else context.device, lattice=args.lattice)
    sampling = loaded.recipe.sampling
    args.n = sampling.n if args.n is None else args.n
    args.chunk = sampling.chunk if args.chunk is None else args.chunk
    batch_size = sampling.batch_size if args.batch_size is None else args.batch_size
    chains = sampling.chains if args.chains is None else args.chains
    seed = sampling.seed if args.seed is None else args.seed
    check_counts(args)
    check_seed(seed, "--seed")
    if batch_size < 1:
        raise LatticeflowError(f"--batch-size must be a positive integer, got {batch_size}")
    if chains < 1:
        raise LatticeflowError(f"--chains must be a positive integer, got {chains}")
    if args.chunk % chains:
        raise LatticeflowError(f"--chunk ({args.chunk}) must be a multiple of --chains ({chains})")
    rank, world = (0, 1) if context is None else (context.rank, context.world_size)
    rows = split_rows(args.n, world)
    if any(n % chains for n in rows):
        raise LatticeflowError(f"--n ({args.n}) must split into {world} shard(s) of a multiple of "
                               f"--chains ({chains}) rows each; use a multiple of "
                               f"{world * chains}")
    out = args.out or checkpoint_path(args.checkpoint).parent / ENSEMBLE_NAME
    if context is not None:
        _check_joined_target(out, args.resume, args.force)
    target = out if context is None else shard_path(out, rank)
    my_seed = rank_seed(seed, rank)
    params = {"batch_size": batch_size, "n_chains": chains, "store_dtype": args.store_dtype,
              "training_step": loaded.step}
    if context is not None:
        params.update(rank=rank, world_size=world)
    header = loaded.nmcmc_header(seed=my_seed, sampler_params=params,
                                 store_dtype=args.store_dtype,
                                 chains=chains > 1 or context is not None)
    writer = open_output(target, args.resume, args.force, header, args.chunk, expected={
        "sampler": "nmcmc", "checkpoint_sha256": loaded.sha256, "lattice": loaded.lattice,
        "seed": my_seed})
    stored = writer.metadata.sampler_params
    if args.resume and (stored.get("batch_size"), stored.get("n_chains"),
                        stored.get("world_size", 1)) != (batch_size, chains, world):
        writer.close()
        raise LatticeflowError(f"{target}: cannot resume: batch size, number of chains or "
                               f"number of processes differ from the file's sampler_params")
    options = {"seed": my_seed, "batch_size": batch_size, "n_chains": chains,
               "store_dtype": select_dtype(args.store_dtype)}
    sampler = (FlowMetropolis(loaded.flow, loaded.action, **options) if context is None else
               ShardMetropolis(loaded.flow, loaded.action, chain_offset=rank * chains,
                               **options))
    # `latticeflow run` calls this command with a namespace that predates --compile.
    if getattr(args, "compile", False):
        compile_forward(loaded.flow, batch_size * chains)

    def summary(_):
        if math.isnan(sampler.acceptance_rate):
            return "no new proposals"
        return (f"acceptance {sampler.acceptance_rate:.3f} this session; "
                f"{sampler.proposals.summary().describe()} (whole file)")

    with tf32_mode(False):
        try:
            code = run_to_file(sampler, writer, rows[rank], args.chunk, summary)
        except NonFiniteProposals as exc:
            raise LatticeflowError(f"{args.checkpoint}: {exc}; {writer.n_complete} rows are "
                                   f"in {target}") from None
    if context is None:
        return code
    barrier()  # every shard is complete and closed
    codes = gather_objects(code)
    proposals = ProposalStats.combined(gather_objects(sampler.proposals))
    if context.is_main:
        joined = join_shards(
            out, [shard_path(out, r) for r in range(world)], seed=seed, force=True,
            sampler_params={**{k: v for k, v in params.items() if k != "rank"},
                            "n_chains": world * chains, "chains_per_shard": chains,
                            "shard_seeds": [rank_seed(seed, r) for r in range(world)]})
        with h5py.File(out, "r+") as f:
            f.attrs.update(proposals.summary().attributes())
        log.info("joined %d shards into %s: %d rows, chains 0..%d", world, out,
                 joined.n_complete, world * chains - 1)
    return max(codes)
