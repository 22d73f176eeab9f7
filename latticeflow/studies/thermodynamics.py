"""The thermodynamics study of a trained flow: log Z, free energy and variational bounds, and
reweighting to nearby parameter points (``analysis/thermodynamics.py`` prints its report).

:func:`compute` draws ``n`` fresh, independent samples x ~ q from the flow of a checkpoint and
returns, as one JSON record, the importance-sampling estimate of log Z = log E_q[e^{−S − log q}]
(Lebesgue measure; U(1) also Haar-normalised) with a jackknife error, log Z / V, the free
energy per site F/V = −log Z / V, the ESS, the reverse bound ELBO = E_q[log w] ≤ log Z and,
given an ensemble of p (HMC), the forward bound log Z ≤ EUBO = E_p[−S − log q]; the exact value
and the deviation in units of the error where it is known (free field, 2D U(1)). An estimate
with too few effective samples (ESS · N < 100) or too heavy-tailed weights (Pareto k̂ > 0.7) is
flagged as untrustworthy. ``reweight`` targets move expectation values (plaquette, Q², m², |m|)
and log Z to a nearby parameter point with the same draws, refusing when the ESS collapses.
:func:`report` renders the record as the terminal report. Conventions and estimators:
:mod:`latticeflow.thermodynamics`.

An ensemble file as ``source`` needs ``checkpoint``: its rows are Markov-chain states, not
independent draws from q, so log mean w over them would be biased. The flow's fresh draws give
log Z, and the ensemble (a sample of p) gives the forward bound. Errors name the options of
``analysis/thermodynamics.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from latticeflow import measure
from latticeflow import script_support as ss
from latticeflow import thermodynamics as thermo
from latticeflow.base.errors import LatticeflowError
from latticeflow.ensemble import EnsembleReader, read_ensemble
from latticeflow.theories import Action, action_from_table
from latticeflow.training import LoadedFlow, load_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThermodynamicsSettings:
    """What :func:`compute` draws and estimates. ``source``: run directory or checkpoint of a
    trained flow, or an ensemble of p (then ``checkpoint`` names the flow); ``hmc``: ensemble
    of p for the forward bound; ``thermalization``: rows dropped at the start of every chain of
    that ensemble; ``n`` fresh flow draws in batches of ``batch_size`` from ``seed`` on
    ``device``; ``bins``: jackknife blocks of the log Z error; ``reweight``: targets
    ``"NAME=VALUE[,NAME=VALUE]"``."""

    source: str
    checkpoint: str | None = None
    hmc: str | None = None
    thermalization: int = 0
    n: int = 20000
    batch_size: int = 1024
    seed: int = 0
    device: str = "auto"
    bins: int = thermo.DEFAULT_BINS
    reweight: Sequence[str] = ()


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _is_ensemble(path: Path) -> bool:
    return path.is_file() and h5py.is_hdf5(path)


def _flow_and_ensemble(settings: ThermodynamicsSettings) -> tuple[LoadedFlow, Path | None]:
    """The flow to draw from, and the ensemble of p for the forward bound (if any)."""
    source = Path(settings.source)
    if not _is_ensemble(source):
        if settings.checkpoint:
            raise LatticeflowError(f"--checkpoint is for an ensemble input; {source} is "
                                   f"already a run directory or checkpoint")
        return (load_checkpoint(source, settings.device),
                Path(settings.hmc) if settings.hmc else None)
    with EnsembleReader(source) as reader:       # a readable ensemble, or a one-line error
        sampler = reader.metadata.sampler
    if not settings.checkpoint:
        raise LatticeflowError(
            f"{source}: the rows of this {sampler} ensemble are Markov-chain states, not "
            f"independent draws from the flow, so log mean w over them is biased; give "
            f"--checkpoint RUN to draw fresh samples (the ensemble then gives the forward bound)")
    if settings.hmc:
        raise LatticeflowError(f"give the ensemble of p once: {source} already serves as the "
                               f"forward-bound ensemble, drop --hmc {settings.hmc}")
    return load_checkpoint(settings.checkpoint, settings.device), source


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
    layout = measure.chain_layout(ensemble.data.get("chain"), len(ensemble), thermalization,
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


def _check_options(settings: ThermodynamicsSettings) -> None:
    if settings.n < 2 or settings.batch_size < 1 or settings.bins < 2:
        raise LatticeflowError(f"need --n >= 2, --batch-size >= 1 and --bins >= 2; got "
                               f"{settings.n}, {settings.batch_size}, {settings.bins}")


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
    exact = measure.exact_reference(target.theory, target.card(), lattice, wilson_max=1)
    return {
        "target": target.card(), "label": label, "ess": mean.ess,
        "n_effective": mean.ess * len(log_w),
        "log_z": thermo.estimate_log_z(log_w, target, lattice, n_bins=bins).as_dict(),
        "exact_log_z": thermo.exact_log_z(target, lattice),
        "observables": {name: {"value": float(mean.value[i]), "error": float(mean.error[i]),
                               "exact": exact.scalars.get(name)}
                        for i, name in enumerate(names)},
    }


def compute(settings: ThermodynamicsSettings) -> dict[str, Any]:
    """Everything the report shows, as the JSON record."""
    _check_options(settings)
    targets = [_parse_target(text) for text in settings.reweight]
    loaded, ensemble_path = _flow_and_ensemble(settings)
    action, lattice = loaded.action, loaded.lattice
    shifted = [thermo.shifted_action(action, changes) for changes in targets]
    chains = (_ensemble_chains(ensemble_path, settings.thermalization, loaded)
              if ensemble_path is not None else None)
    measurements = {**thermo.observables_for(action.theory),
                    **{f"action[{i}]": target for i, target in enumerate(shifted)}}
    device = loaded.flow.device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    samples = thermo.sample_flow(loaded.flow, action, settings.n, batch_size=settings.batch_size,
                                 generator=generator, measurements=measurements)
    forward = None if chains is None else thermo.forward_bound(
        [thermo.log_weights_on(loaded.flow, action, c, batch_size=settings.batch_size)
         for c in chains])
    result = thermo.estimate_log_z(samples.log_weight, action, lattice, forward=forward,
                                   n_bins=settings.bins)
    exact_value = thermo.exact_log_z(action, lattice)
    return {
        **result.as_dict(),
        "exact_log_z": exact_value,
        "deviation": (None if exact_value is None
                      else measure.deviation(result.log_z, result.log_z_error, exact_value)),
        "theory": action.theory, "action": action.card(), "lattice": list(lattice),
        "checkpoint": str(settings.checkpoint or settings.source),
        "checkpoint_sha256": loaded.sha256,
        "step": loaded.step, "trained_ess": loaded.last_ess, "seed": settings.seed,
        "ensemble": None if ensemble_path is None else str(ensemble_path),
        "ensemble_chains": None if chains is None else [len(c) for c in chains],
        "reweighting": [_reweighting(samples, target, f"action[{i}]", lattice, settings.bins)
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
    dev = (ss.format_deviation(measure.deviation(value, error, exact))
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
            ss.format_deviation(measure.deviation(value, error, exact))]


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
