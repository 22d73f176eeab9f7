"""``latticeflow sample``: neural MCMC with a trained flow into an HDF5 ensemble."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from latticeflow.commands._chainfile import (
    add_output_options,
    check_counts,
    metadata_mismatch,
    open_output,
    run_to_file,
)
from latticeflow.commands.hmc import parse_lattice
from latticeflow.device import select_dtype
from latticeflow.errors import LatticeflowError
from latticeflow.samplers.nmcmc import FlowMetropolis
from latticeflow.statistics import ess
from latticeflow.training import checkpoint_path, load_checkpoint

DEFAULT_NAME = "nmcmc.h5"


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
              latticeflow sample runs/quickstart --n 20000 --resume"""),
    )
    parser.add_argument("checkpoint", type=Path, help="run directory or checkpoint file")
    parser.add_argument("--out", type=Path,
                        help=f"output HDF5 file (default: RUN_DIR/{DEFAULT_NAME})")
    add_output_options(parser, defaults_from="the recipe's [sampling] section")
    parser.add_argument("--batch-size", type=int, help="proposals per batch on the device")
    parser.add_argument("--chains", type=int, help="independent chains (rows round-robin)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--lattice", type=parse_lattice,
                        help="sample on another lattice than the training one, e.g. 16x16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--store-dtype", choices=("float32", "float64"), default="float32",
                        help="storage type of the configurations")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    loaded = load_checkpoint(args.checkpoint, device=args.device, lattice=args.lattice)
    sampling = loaded.recipe.sampling
    args.n = sampling.n if args.n is None else args.n
    args.chunk = sampling.chunk if args.chunk is None else args.chunk
    batch_size = args.batch_size or sampling.batch_size
    chains = args.chains or sampling.chains
    seed = sampling.seed if args.seed is None else args.seed
    check_counts(args)
    if min(batch_size, chains) < 1 or seed < 0:
        raise LatticeflowError("--batch-size and --chains must be positive, --seed >= 0")
    if args.chunk % chains:
        raise LatticeflowError(f"--chunk ({args.chunk}) must be a multiple of --chains ({chains})")
    out = args.out or checkpoint_path(args.checkpoint).parent / DEFAULT_NAME
    params = {"batch_size": batch_size, "n_chains": chains, "store_dtype": args.store_dtype,
              "training_step": loaded.step}
    header = {"theory": loaded.action.theory, "action_card": loaded.action.card(),
              "lattice": loaded.lattice, "field_shape": loaded.flow.field_shape,
              "sampler": "nmcmc", "seed": seed, "sampler_params": params,
              "checkpoint_sha256": loaded.sha256, "dtype": args.store_dtype,
              "chains": chains > 1}
    writer = open_output(out, args.resume, args.force, header, args.chunk)
    if args.resume:
        stored = writer.metadata.sampler_params
        problem = metadata_mismatch(writer.metadata, {
            "sampler": "nmcmc", "checkpoint_sha256": loaded.sha256,
            "lattice": loaded.lattice, "seed": seed})
        if problem is None and (stored.get("batch_size"), stored.get("n_chains")) != (
                batch_size, chains):
            problem = "batch size or number of chains differ from the file's sampler_params"
        if problem:
            writer.close()
            raise LatticeflowError(f"{out}: cannot resume: {problem}")
    sampler = FlowMetropolis(loaded.flow, loaded.action, seed=seed, batch_size=batch_size,
                             n_chains=chains, store_dtype=select_dtype(args.store_dtype))

    def summary(_):
        lw = sampler.proposal_log_weights()
        if len(lw) == 0:
            return "no new proposals"
        return (f"acceptance {sampler.acceptance_rate:.3f}, proposal ESS {ess(lw):.3f} "
                f"({len(lw)} proposals this session)")

    return run_to_file(sampler, writer, args.n, args.chunk, summary)


