#!/usr/bin/env python3
"""log Z, free energy and variational bounds from a trained flow; reweighting to nearby parameters.

Draws N fresh, independent samples x ~ q from the flow of a checkpoint and prints the
importance-sampling estimate of log Z = log E_q[e^{−S − log q}] (Lebesgue measure; U(1) also
Haar-normalised) with a jackknife error, log Z / V, the free energy per site F/V = −log Z / V,
the ESS, the reverse bound ELBO = E_q[log w] ≤ log Z and, given an ensemble of p (HMC), the
forward bound log Z ≤ EUBO = E_p[−S − log q]; the exact value and the deviation in units of
the error where it is known (free field, 2D U(1)). An estimate with too few effective samples
(ESS · N < 100) or too heavy-tailed weights (Pareto k̂ > 0.7) is flagged as untrustworthy.
--reweight moves expectation values (plaquette, Q², m², |m|) and log Z to a nearby parameter
point with the same draws, refusing when the ESS collapses.

An ensemble file as ENSEMBLE_OR_RUN needs --checkpoint: its rows are Markov-chain states, not
independent draws from q, so log mean w over them would be biased. The flow's fresh draws give
log Z, and the ensemble (a sample of p) gives the forward bound.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from latticeflow import analysis
from latticeflow import script_support as ss
from latticeflow import thermodynamics as thermo
from latticeflow.ensemble import EnsembleReader, read_ensemble
from latticeflow.errors import LatticeflowError
from latticeflow.theories import Action, action_from_table
from latticeflow.training import LoadedFlow, load_checkpoint

log = logging.getLogger("thermodynamics")

EXAMPLES = (
    "python analysis/thermodynamics.py runs/u1_beta2",
    "python analysis/thermodynamics.py runs/u1_beta2 --hmc runs/u1_beta2_hmc.h5 -K 200 "
    "--reweight beta=2.1 --reweight beta=1.9 --json thermo.json",
    "python analysis/thermodynamics.py runs/free_nmcmc.h5 --checkpoint runs/free "
    "--n 50000 --reweight m2=1.1",
)


def build_parser() -> argparse.ArgumentParser:
    parser = ss.script_parser("thermodynamics.py", __doc__, EXAMPLES)
    parser.add_argument("source", metavar="ENSEMBLE_OR_RUN",
                        help="run directory or checkpoint file of a trained flow; or an "
                             "ensemble (.h5) of p, which then needs --checkpoint")
    parser.add_argument("--checkpoint", metavar="RUN",
                        help="the flow (run directory or checkpoint) when ENSEMBLE_OR_RUN is "
                             "an ensemble")
    parser.add_argument("--hmc", metavar="FILE.h5",
                        help="ensemble of p (HMC) for the forward bound EUBO")
    ss.add_thermalization(parser)
    parser.add_argument("--n", type=int, default=20000,
                        help="number of fresh flow samples (default 20000)")
    parser.add_argument("--batch-size", type=int, default=1024,
                        help="flow samples per batch (default 1024)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the flow draws (default 0)")
    parser.add_argument("--device", default="auto",
                        help="auto (default: CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--bins", type=int, default=thermo.DEFAULT_BINS,
                        help=f"jackknife blocks of the log Z error "
                             f"(default {thermo.DEFAULT_BINS})")
    parser.add_argument("--reweight", action="append", default=[],
                        metavar="NAME=VALUE[,NAME=VALUE]",
                        help="reweight to changed action parameters (U(1): beta; φ⁴: m2, lam "
                             "or kappa, lam); repeat for several targets")
    parser.add_argument("--json", metavar="PATH",
                        help='write {"log_z", "log_z_error", "log_z_per_site", "ess", "elbo", '
                             '"eubo", ..., "exact_log_z", "reweighting": [...]} to PATH')
    return parser


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _is_ensemble(path: Path) -> bool:
    return path.is_file() and h5py.is_hdf5(path)


def _flow_and_ensemble(args: argparse.Namespace) -> tuple[LoadedFlow, Path | None]:
    """The flow to draw from, and the ensemble of p for the forward bound (if any)."""
    source = Path(args.source)
    if not _is_ensemble(source):
        if args.checkpoint:
            raise LatticeflowError(f"--checkpoint is for an ensemble input; {source} is "
                                   f"already a run directory or checkpoint")
        return load_checkpoint(source, args.device), Path(args.hmc) if args.hmc else None
    with EnsembleReader(source) as reader:       # a readable ensemble, or a one-line error
        sampler = reader.metadata.sampler
    if not args.checkpoint:
        raise LatticeflowError(
            f"{source}: the rows of this {sampler} ensemble are Markov-chain states, not "
            f"independent draws from the flow, so log mean w over them is biased; give "
            f"--checkpoint RUN to draw fresh samples (the ensemble then gives the forward bound)")
    if args.hmc:
        raise LatticeflowError(f"give the ensemble of p once: {source} already serves as the "
                               f"forward-bound ensemble, drop --hmc {args.hmc}")
    return load_checkpoint(args.checkpoint, args.device), source


def _ensemble_chains(path: Path, thermalization: int, loaded: LoadedFlow) -> list[np.ndarray]:
    """Configurations of each chain of an ensemble of p, after checking it fits the flow."""
    ensemble = read_ensemble(path)
    meta = ensemble.metadata
    card = action_from_table(dict(meta.action_params), f"{path}: action_params").card()
    if meta.lattice != loaded.lattice or card != loaded.action.card():
        raise LatticeflowError(
            f"{path}: ensemble of {card} on {list(meta.lattice)} does not match the flow's "
            f"{loaded.action.card()} on {list(loaded.lattice)}")
    if meta.sampler == "nmcmc" and meta.checkpoint_sha256 not in ("", loaded.sha256):
        log.warning("%s was sampled with another flow (checkpoint sha256 %s…); it is still "
                    "a sample of p for the forward bound", path, meta.checkpoint_sha256[:12])
    layout = analysis.chain_layout(ensemble.data.get("chain"), len(ensemble), thermalization,
                                   str(path))
    return [ensemble["configs"][rows] for rows in layout.kept]


def _parse_target(text: str) -> dict[str, float]:
    """``"beta=2.1"`` or ``"m2=-3.9,lam=8"`` → ``{"beta": 2.1}`` …"""
    try:
        pairs = [(name.strip(), float(value))
                 for name, _, value in (part.partition("=") for part in text.split(","))]
    except ValueError:
        pairs = []
    if not pairs or not all(name for name, _ in pairs):
        raise LatticeflowError(f"--reweight {text!r}: expected NAME=VALUE[,NAME=VALUE] with "
                               f"numeric values")
    return dict(pairs)


def _check_options(args: argparse.Namespace) -> None:
    if args.n < 2 or args.batch_size < 1 or args.bins < 2:
        raise LatticeflowError(f"need --n >= 2, --batch-size >= 1 and --bins >= 2; got "
                               f"{args.n}, {args.batch_size}, {args.bins}")


# --------------------------------------------------------------------------------------------
# Computation
# --------------------------------------------------------------------------------------------


def _reweighting(samples: thermo.FlowSamples, target: Action, key: str,
                 lattice: tuple[int, ...], bins: int) -> dict[str, Any]:
    """Reweighted observables and log Z at ``target``; refuses on ESS collapse."""
    log_w = -samples.measurements[key] - samples.log_q
    names = list(thermo.observables_for(target.theory))
    values = np.column_stack([samples.measurements[name] for name in names])
    label = ", ".join(f"{k} = {v:g}" for k, v in target.params().items()
                      if isinstance(v, float))
    mean = thermo.reweight(values, log_w, target=label)
    exact = analysis.exact_reference(target.theory, target.card(), lattice, wilson_max=1)
    return {
        "target": target.card(), "label": label, "ess": mean.ess,
        "n_effective": mean.ess * len(log_w),
        "log_z": thermo.estimate_log_z(log_w, target, lattice, n_bins=bins).as_dict(),
        "exact_log_z": thermo.exact_log_z(target, lattice),
        "observables": {name: {"value": float(mean.value[i]), "error": float(mean.error[i]),
                               "exact": exact.scalars.get(name)}
                        for i, name in enumerate(names)},
    }


def compute(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the report shows, as the JSON record."""
    _check_options(args)
    targets = [_parse_target(text) for text in args.reweight]
    loaded, ensemble_path = _flow_and_ensemble(args)
    action, lattice = loaded.action, loaded.lattice
    shifted = [thermo.shifted_action(action, changes) for changes in targets]
    chains = (_ensemble_chains(ensemble_path, args.thermalization, loaded)
              if ensemble_path is not None else None)
    measurements = {**thermo.observables_for(action.theory),
                    **{f"action[{i}]": target for i, target in enumerate(shifted)}}
    device = next(loaded.flow.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    samples = thermo.sample_flow(loaded.flow, action, args.n, batch_size=args.batch_size,
                                 generator=generator, measurements=measurements)
    forward = None if chains is None else thermo.forward_bound(
        [thermo.log_weights_on(loaded.flow, action, c, batch_size=args.batch_size)
         for c in chains])
    result = thermo.estimate_log_z(samples.log_weight, action, lattice, forward=forward,
                                   n_bins=args.bins)
    exact_value = thermo.exact_log_z(action, lattice)
    return {
        **result.as_dict(),
        "exact_log_z": exact_value,
        "deviation": (None if exact_value is None
                      else analysis.deviation(result.log_z, result.log_z_error, exact_value)),
        "theory": action.theory, "action": action.card(), "lattice": list(lattice),
        "checkpoint": str(args.checkpoint or args.source), "checkpoint_sha256": loaded.sha256,
        "step": loaded.step, "trained_ess": loaded.last_ess, "seed": args.seed,
        "ensemble": None if ensemble_path is None else str(ensemble_path),
        "ensemble_chains": None if chains is None else [len(c) for c in chains],
        "reweighting": [_reweighting(samples, target, f"action[{i}]", lattice, args.bins)
                        for i, target in enumerate(shifted)],
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _shown(value: float, error: float | None) -> str:
    """value ± error, or the bare value where the error is round-off (exact estimates)."""
    exact_to_roundoff = error is not None and error <= 1e-12 * max(1.0, abs(value))
    return ss.format_value(value, None if exact_to_roundoff else error)


def _per_site_row(name: str, value: float, error: float, volume: int, exact: float | None,
                  with_deviation: bool = True) -> list[str]:
    """[name, value ± error, per site, exact per site, deviation from exact]."""
    dev = (ss.format_deviation(analysis.deviation(value, error, exact))
           if with_deviation and exact is not None else "")
    return [name, _shown(value, error), _shown(value / volume, error / volume),
            "" if exact is None else f"{exact / volume:.6f}", dev]


def _tail(pareto_k: float | None) -> str:
    return "- (degenerate tail)" if pareto_k is None else f"{pareto_k:.2f}"


def _header(record: dict[str, Any]) -> list[str]:
    lattice = "×".join(str(n) for n in record["lattice"])
    params = ", ".join(f"{k} {v:g}" for k, v in record["action"].items()
                       if isinstance(v, float))
    trained = record["trained_ess"]
    lines = [
        f"flow        {record['checkpoint']} (step {record['step']}, sha256 "
        f"{record['checkpoint_sha256'][:12]}…"
        + (f", ESS in training {trained:.3f})" if trained is not None else ")"),
        f"theory      {record['theory']} ({params}) on {lattice}, V = {record['volume']}",
        f"samples     N = {record['n']} fresh flow draws (seed {record['seed']}); ESS "
        f"{record['ess']:.4f} = {record['n_effective']:.0f} effective; Pareto k̂ "
        f"{_tail(record['pareto_k'])}; jackknife {record['n_bins']} blocks",
    ]
    if record["ensemble"] is not None:
        chains = record["ensemble_chains"]
        lines.append(f"forward     {record['ensemble']}: {sum(chains)} configurations in "
                     f"{len(chains)} chain(s) for E_p")
    return lines


def _log_z_table(record: dict[str, Any]) -> str:
    volume, exact = record["volume"], record["exact_log_z"]
    rows = [
        _per_site_row("log Z (IS)", record["log_z"], record["log_z_error"], volume, exact),
        _per_site_row("ELBO = E_q[log w]", record["elbo"], record["elbo_error"], volume, exact,
                      with_deviation=False),
    ]
    if record["eubo"] is not None:
        rows.append(_per_site_row("EUBO = E_p[log w]", record["eubo"], record["eubo_error"],
                                  volume, exact, with_deviation=False))
    if record["log_z_haar"] is not None:
        offset = record["log_z"] - record["log_z_haar"]
        rows.append(_per_site_row("log Z_haar (IS)", record["log_z_haar"],
                                  record["log_z_error"], volume,
                                  None if exact is None else exact - offset))
    rows.append(["F/V = −log Z / V", "", _shown(record["free_energy_per_site"],
                                                record["log_z_per_site_error"]),
                 "" if exact is None else f"{-exact / volume:.6f}", ""])
    return ss.format_table(["quantity", "value", "per site (/V)", "exact /V", "deviation"],
                           rows)


def _value_row(name: str, value: float, error: float, exact: float | None) -> list[str]:
    if exact is None:
        return [name, _shown(value, error), "", ""]
    return [name, _shown(value, error), f"{exact:.6g}",
            ss.format_deviation(analysis.deviation(value, error, exact))]


def _reweighting_table(entry: dict[str, Any], volume: int) -> str:
    log_z, exact = entry["log_z"], entry["exact_log_z"]
    rows = [_value_row("log Z / V", log_z["log_z_per_site"], log_z["log_z_per_site_error"],
                       None if exact is None else exact / volume)]
    rows += [_value_row(name, o["value"], o["error"], o["exact"])
             for name, o in entry["observables"].items()]
    title = (f"reweighted to {entry['label']}: ESS {entry['ess']:.4f} = "
             f"{entry['n_effective']:.0f} effective")
    notes = [f"  warning: {w}" for w in log_z["warnings"]]
    return "\n".join([title, ss.format_table(["quantity", "value", "exact", "deviation"], rows),
                      *notes])


def report(record: dict[str, Any]) -> str:
    """The terminal report of a :func:`compute` record."""
    parts = ["\n".join(_header(record)), "", _log_z_table(record)]
    if record["eubo"] is not None:
        gap = record["eubo"] - record["elbo"]
        parts.append(f"bound gap EUBO − ELBO = {gap:.4g} = KL(q‖p) + KL(p‖q)")
    if record["warnings"]:
        parts += ["", "UNTRUSTWORTHY:"] + [f"  {w}" for w in record["warnings"]]
    for entry in record["reweighting"]:
        parts += ["", _reweighting_table(entry, record["volume"])]
    return "\n".join(parts)


def run(args: argparse.Namespace) -> int:
    record = compute(args)
    print(report(record))
    if args.json:
        ss.write_json(args.json, record)
    return ss.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return ss.run_script(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
