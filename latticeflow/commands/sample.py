"""``latticeflow sample``: neural MCMC with a trained flow into an HDF5 ensemble
(:func:`latticeflow.workflows.sample.sample_run`, which also describes sharded generation).

Under ``torchrun --nproc_per_node=K -m latticeflow.cli sample RUN --rows N --out FILE.h5``
(``--rows``: torchrun's parser takes ``--n`` for an abbreviation of its own options) every rank
samples its own shard and rank 0 joins them into ``FILE.h5``. Sampling never uses TF32, and
``--compile`` compiles the flow's forward with ``torch.compile``.
"""

from __future__ import annotations

import argparse
import logging
import textwrap
from pathlib import Path

from latticeflow.base.distributed import distributed_session, label_logs
from latticeflow.base.errors import EXIT_INTERRUPTED, EXIT_OK
from latticeflow.commands._chainfile import add_output_options
from latticeflow.commands.hmc import parse_lattice
from latticeflow.training import checkpoint_path, load_checkpoint
from latticeflow.workflows import ENSEMBLE_NAME
from latticeflow.workflows.chainfile import OPTION_NAMES
from latticeflow.workflows.sample import SampleSettings, sample_run

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


def run(args: argparse.Namespace) -> int:
    with distributed_session(args.device) as context:
        if context is not None:
            label_logs(context)
        loaded = load_checkpoint(args.checkpoint, device=args.device if context is None
                                 else context.device, lattice=args.lattice)
        settings = SampleSettings(
            out=args.out or checkpoint_path(args.checkpoint).parent / ENSEMBLE_NAME, n=args.n,
            chunk=args.chunk, batch_size=args.batch_size, chains=args.chains, seed=args.seed,
            store_dtype=args.store_dtype, compile=args.compile, resume=args.resume,
            force=args.force, names=OPTION_NAMES, source=str(args.checkpoint))
        result = sample_run(loaded, settings, context)
    return EXIT_INTERRUPTED if result.interrupted else EXIT_OK
