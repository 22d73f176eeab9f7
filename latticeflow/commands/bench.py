"""``latticeflow bench``: performance benchmarks (estimator step costs, scaling with L)."""

from __future__ import annotations

import argparse
import json
import logging
import textwrap
from pathlib import Path

import torch

from latticeflow.base.device import select_device, select_dtype
from latticeflow.base.errors import LatticeflowError
from latticeflow.ensemble.output import check_output_folder
from latticeflow.estimators import ESTIMATORS
from latticeflow.flows import DEFAULT_ARCHITECTURE, MASK_PERIOD
from latticeflow.studies.bench import (
    CLASSIC_U1,
    SCALING_ESTIMATORS,
    as_records,
    bench_estimators,
    bench_scaling,
    format_scaling,
    format_table,
    plot_scaling,
    scaling_records,
)

log = logging.getLogger("latticeflow")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench", help="benchmarks of training-step cost and its scaling",
        description="Benchmarks measured in one process; ratios compare estimators of the same "
                    "direction (reverse or forward) against the standard estimator.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              latticeflow bench estimators
              latticeflow bench estimators --theory u1 --arch classic --lattice 16 --batch 64 \\
                  --threads 1 --json bench.json
              latticeflow bench scaling --threads 1 --plot scaling.png --json scaling.json"""),
    )
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    est = kinds.add_parser(
        "estimators", help="seconds per training step of each estimator",
        description="Median and inter-quartile range of the seconds per training step "
                    "(loss + backward) of each estimator after warm-up, estimators interleaved "
                    "within every repeat, and memory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              latticeflow bench estimators --theory phi4 --lattice 8 16 --batch 64
              latticeflow bench estimators --theory u1 --lattice 8 --batch 256 --compile
              latticeflow bench estimators --theory u1 --arch classic --lattice 16 \\
                  --estimator reverse-standard reverse-fastpath --threads 1 --json est.json"""))
    est.add_argument("--theory", nargs="+", choices=("phi4", "u1"), default=["phi4", "u1"])
    est.add_argument("--lattice", nargs="+", type=int, default=[8, 16], metavar="L")
    est.add_argument("--batch", nargs="+", type=int, default=[64, 256], metavar="B")
    est.add_argument("--estimator", nargs="+", choices=ESTIMATORS, default=list(ESTIMATORS))
    est.add_argument("--compile", action="store_true",
                     help="add rows for couplings compiled with torch.compile, interleaved with "
                          "the eager ones (compile time reported separately)")
    _common_options(est, repeats=10, warmup=2)
    est.set_defaults(handler=run_estimators)

    scaling = kinds.add_parser(
        "scaling", help="cost per sample against lattice size and batch size",
        description="Seconds and memory per training step against the lattice size L (L×L) "
                    "and the batch size, for the standard and fast-path estimators of both "
                    "directions, and neural-MCMC configurations per second against L. Prints "
                    "tables and the exponent a of cost per sample ∝ L^a, fitted on a log-log "
                    "scale over --fit-range.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              latticeflow bench scaling --threads 1 --plot scaling.png
              latticeflow bench scaling --theory u1 --lattice 8 16 32 --batch 16 \\
                  --json u1_scaling.json --device cuda"""))
    scaling.add_argument("--theory", choices=("phi4", "u1"), default="phi4")
    scaling.add_argument("--lattice", nargs="+", type=int, default=[8, 16, 32, 64],
                         metavar="L")
    scaling.add_argument("--batch", nargs="+", type=int, default=[16, 64], metavar="B")
    scaling.add_argument("--estimator", nargs="+", choices=ESTIMATORS,
                         default=list(SCALING_ESTIMATORS))
    scaling.add_argument("--sampling-n", type=int, default=256, metavar="N",
                         help="configurations per neural-MCMC throughput measurement (0: skip)")
    scaling.add_argument("--sampling-batch", type=int, default=64, metavar="B",
                         help="proposal batch of the neural-MCMC measurement")
    scaling.add_argument("--fit-range", nargs=2, type=int, default=[16, 64],
                         metavar=("LOW", "HIGH"), help="lattice sizes the slope is fitted over")
    scaling.add_argument("--plot", type=Path, metavar="PATH", help="save a log-log plot (PNG)")
    _common_options(scaling, repeats=3, warmup=1)
    scaling.set_defaults(handler=run_scaling)


def _common_options(parser: argparse.ArgumentParser, repeats: int, warmup: int) -> None:
    parser.add_argument("--arch", choices=("default", "classic"), default="default",
                        help="'classic': the published U(1) architecture (24 couplings, 6 "
                             "mixture components, hidden [8, 8], kernel 3); φ⁴ always uses the "
                             "default")
    parser.add_argument("--couplings", type=int, help="number of couplings")
    parser.add_argument("--mixture", type=int, help="NCP mixture components (U(1))")
    parser.add_argument("--hidden", type=int, nargs="+", help="hidden channels")
    parser.add_argument("--kernel", type=int, help="kernel size (odd)")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers as JSON")
    parser.add_argument("--force", action="store_true",
                        help="overwrite existing --json (and --plot) files")


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


def _check(args: argparse.Namespace, theories: list[str], outputs: list[Path | None]
           ) -> tuple[torch.device, torch.dtype]:
    """Validate everything before any measurement; returns (device, dtype)."""
    if min(args.lattice) < 1 or min(args.batch) < 1:
        raise LatticeflowError("--lattice and --batch must be positive integers")
    if args.repeats < 1 or args.warmup < 0:
        raise LatticeflowError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} "
                               f"and {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise LatticeflowError(f"--threads must be >= 1, got {args.threads}")
    for option, value in (("--couplings", args.couplings), ("--mixture", args.mixture)):
        if value is not None and value < 1:
            raise LatticeflowError(f"{option} must be >= 1, got {value}")
    if args.hidden is not None and min(args.hidden, default=1) < 1:
        raise LatticeflowError(f"--hidden channels must be >= 1, got {args.hidden}")
    if args.kernel is not None and (args.kernel < 1 or args.kernel % 2 == 0
                                    or args.kernel > min(args.lattice)):
        raise LatticeflowError(f"--kernel must be odd, >= 1 and at most the smallest lattice "
                               f"size {min(args.lattice)}; got {args.kernel}")
    for theory in theories:
        period = MASK_PERIOD if theory == "u1" else 2
        bad = [n for n in args.lattice if n % period]
        if bad:
            raise LatticeflowError(f"lattice {bad[0]} does not fit the {theory} flow masks "
                                   f"(sizes must be multiples of {period})")
    for path in outputs:
        if path is None:
            continue
        check_output_folder(path)
        if path.exists() and not args.force:
            raise LatticeflowError(f"{path}: already exists; use --force to overwrite it")
    device, dtype = select_device(args.device), select_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    return device, dtype


def _meta(args: argparse.Namespace, device: torch.device) -> dict:
    return {"device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "arch": args.arch}


def run_estimators(args: argparse.Namespace) -> int:
    device, dtype = _check(args, args.theory, [args.json])
    rows = []
    for theory in args.theory:
        arch = _architecture(theory, args)
        for lattice in args.lattice:
            for batch in args.batch:
                log.info("%s L=%d B=%d %s", theory, lattice, batch, arch)
                rows += bench_estimators(theory, lattice, batch, arch,
                                         estimators=args.estimator, repeats=args.repeats,
                                         warmup=args.warmup, device=device, dtype=dtype,
                                         compile=args.compile)
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"meta": _meta(args, device), "rows": as_records(rows)},
                                        indent=2))
        log.info("wrote %s", args.json)
    return 0


def run_scaling(args: argparse.Namespace) -> int:
    low, high = args.fit_range
    if args.sampling_n < 0 or args.sampling_batch < 1:
        raise LatticeflowError("--sampling-n must be >= 0 and --sampling-batch >= 1")
    if 0 < args.sampling_n < args.sampling_batch:
        raise LatticeflowError(f"--sampling-n ({args.sampling_n}) must be at least "
                               f"--sampling-batch ({args.sampling_batch})")
    device, dtype = _check(args, [args.theory], [args.json, args.plot])
    arch = _architecture(args.theory, args)
    log.info("%s %s, lattices %s, batches %s", args.theory, arch, args.lattice, args.batch)
    result = bench_scaling(args.theory, args.lattice, args.batch, arch,
                           estimators=args.estimator, repeats=args.repeats, warmup=args.warmup,
                           sampling_batch=args.sampling_batch, sampling_n=args.sampling_n,
                           device=device, dtype=dtype, progress=log.info)
    print(format_scaling(result, low, high))
    if args.plot:
        plot_scaling(result, args.plot, low, high)
        log.info("wrote %s", args.plot)
    if args.json:
        args.json.write_text(json.dumps({"meta": _meta(args, device),
                                         **scaling_records(result, low, high)}, indent=2))
        log.info("wrote %s", args.json)
    return 0
