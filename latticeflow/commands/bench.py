"""``latticeflow bench``: performance benchmarks (estimator step costs)."""

from __future__ import annotations

import argparse
import json
import logging
import textwrap
from pathlib import Path

import torch

from latticeflow.bench import CLASSIC_U1, as_records, bench_estimators, format_table
from latticeflow.device import select_device, select_dtype
from latticeflow.errors import LatticeflowError
from latticeflow.estimators import ESTIMATORS
from latticeflow.flows import DEFAULT_ARCHITECTURE

log = logging.getLogger("latticeflow")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench", help="benchmarks of training-step cost",
        description="Benchmarks measured in one process; ratios compare estimators of the same "
                    "direction (reverse or forward) against the standard estimator.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              latticeflow bench estimators
              latticeflow bench estimators --theory u1 --arch classic --lattice 16 --batch 64 \\
                  --threads 1 --json bench.json"""),
    )
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    est = kinds.add_parser("estimators", help="seconds per training step of each estimator",
                           description="Median seconds per training step (loss + backward) of "
                                       "each estimator after warm-up, and memory.")
    est.add_argument("--theory", nargs="+", choices=("phi4", "u1"), default=["phi4", "u1"])
    est.add_argument("--lattice", nargs="+", type=int, default=[8, 16], metavar="L")
    est.add_argument("--batch", nargs="+", type=int, default=[64, 256], metavar="B")
    est.add_argument("--estimator", nargs="+", choices=ESTIMATORS, default=list(ESTIMATORS))
    est.add_argument("--arch", choices=("default", "classic"), default="default",
                     help="'classic': the published U(1) architecture (24 couplings, 6 mixture "
                          "components, hidden [8, 8], kernel 3); φ⁴ always uses the default")
    est.add_argument("--couplings", type=int, help="number of couplings")
    est.add_argument("--mixture", type=int, help="NCP mixture components (U(1))")
    est.add_argument("--hidden", type=int, nargs="+", help="hidden channels")
    est.add_argument("--kernel", type=int, help="kernel size (odd)")
    est.add_argument("--repeats", type=int, default=10)
    est.add_argument("--warmup", type=int, default=2)
    est.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    est.add_argument("--device", default="auto")
    est.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    est.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers as JSON")
    est.set_defaults(handler=run_estimators)


def _architecture(theory: str, args: argparse.Namespace) -> dict:
    arch = dict(DEFAULT_ARCHITECTURE[theory])
    if theory == "u1" and args.arch == "classic":
        arch.update(CLASSIC_U1)
    overrides = {"n_couplings": args.couplings, "hidden": args.hidden,
                 "kernel_size": args.kernel}
    if theory == "u1":
        overrides["n_mixture"] = args.mixture
    arch.update({k: v for k, v in overrides.items() if v is not None})
    return arch


def run_estimators(args: argparse.Namespace) -> int:
    if min(args.repeats, *args.lattice, *args.batch) < 1 or args.warmup < 0:
        raise LatticeflowError("--repeats, --lattice and --batch must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = select_device(args.device), select_dtype(args.dtype)
    rows = []
    for theory in args.theory:
        arch = _architecture(theory, args)
        for lattice in args.lattice:
            if lattice % (4 if theory == "u1" else 2):
                raise LatticeflowError(f"lattice {lattice} does not fit the {theory} flow masks")
            for batch in args.batch:
                log.info("%s L=%d B=%d %s", theory, lattice, batch, arch)
                rows += bench_estimators(theory, lattice, batch, arch,
                                         estimators=args.estimator, repeats=args.repeats,
                                         warmup=args.warmup, device=device, dtype=dtype)
    print(format_table(rows))
    if args.json:
        meta = {"device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
                "torch": torch.__version__, "arch": args.arch}
        args.json.write_text(json.dumps({"meta": meta, "rows": as_records(rows)}, indent=2))
        log.info("wrote %s", args.json)
    return 0
