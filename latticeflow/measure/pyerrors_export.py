"""Export an ensemble's observables to pyerrors (https://github.com/fjosw/pyerrors).

One ``pyerrors.Obs`` per observable of :func:`latticeflow.measure.analyse` (same names), built
from the Monte Carlo histories of the analysed rows:

* the chains of the ensemble are the replicas of one pyerrors ensemble: ``NAME|r0``,
  ``NAME|r1``, ... (``NAME``: the file name without suffix, unless given); the samples of
  replica c are the rows of chain c after the first ``thermalization`` rows, with their row
  numbers (1-based, per chain) as pyerrors' configuration indices;
* primary observables are the per-configuration series (φ⁴: |m|, m², S/V; U(1): cos P, Q²
  with Q rounded to the nearest integer, W(2,2); W(1,1) is the plaquette itself); functions of
  means are pyerrors expressions of primary ``Obs``: χ₂ = V(<m²> − <m>²),
  U = 1 − <m⁴>/(3<m²>²) with m⁴ = (m²)², χ_t = <Q²>/V;
* ``Obs.tag`` holds the observable's name. ``gamma_method`` has not been run: call
  ``obs.gamma_method(S=1.5)`` to use latticeflow's window parameter S_τ = 1.5 (pyerrors'
  default is 2.0). The remaining differences between the two Γ-methods are described in
  docs/python-api.md and measured in tests/test_pyerrors.py.

pyerrors is an optional dependency (``pip install "latticeflow[pyerrors]"``); it is imported
only when this module's functions run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import latticeflow
from latticeflow.base.errors import LatticeflowError
from latticeflow.ensemble import Ensemble, EnsembleMetadata, EnsembleReader
from latticeflow.measure import AnalysisResult, analyse

#: fewest samples pyerrors accepts per replica
MIN_REPLICA_ROWS = 5


class PyerrorsMissing(LatticeflowError):
    """pyerrors is not installed."""


def _pyerrors() -> Any:
    try:
        import pyerrors
    except ImportError:
        raise PyerrorsMissing('exporting to pyerrors needs the pyerrors package: '
                              'pip install "latticeflow[pyerrors]"') from None
    return pyerrors


# observable name → (the primary series it needs, its Obs from the primary Obs and the volume)
_Definition = tuple[tuple[str, ...], Callable[[dict[str, Any], int], Any]]
_OBSERVABLES: dict[str, _Definition] = {
    "abs_magnetization": (("abs_m",), lambda o, v: o["abs_m"]),
    "magnetization_squared": (("m2",), lambda o, v: o["m2"]),
    "chi2": (("m", "m2"), lambda o, v: v * (o["m2"] - o["m"] ** 2)),
    "binder": (("m2", "m4"), lambda o, v: 1 - o["m4"] / (3 * o["m2"] ** 2)),
    "action_density": (("action_density",), lambda o, v: o["action_density"]),
    "plaquette": (("plaquette",), lambda o, v: o["plaquette"]),
    "topological_charge_squared": (("Q2",), lambda o, v: o["Q2"]),
    "topological_susceptibility": (("Q2",), lambda o, v: o["Q2"] / v),
    "wilson_loop_1x1": (("plaquette",), lambda o, v: o["plaquette"]),
    "wilson_loop_2x2": (("wilson_loop_2x2",), lambda o, v: o["wilson_loop_2x2"]),
}


def _series(result: AnalysisResult, name: str) -> list[np.ndarray]:
    """Per-chain series of ``name`` over the analysed rows (thermalization dropped)."""
    base = {"abs_m": "m", "m4": "m2", "Q2": "Q"}.get(name, name)
    chains = [h[result.thermalization:] for h in result.histories[base]]
    if name == "abs_m":
        return [np.abs(h) for h in chains]
    if name in ("m4", "Q2"):
        return [np.square(h) for h in chains]
    return chains


def _provenance(result: AnalysisResult, metadata: EnsembleMetadata | None, name: str,
                observables: list[str]) -> dict[str, Any]:
    """The description stored with the Obs: where the numbers come from."""
    record: dict[str, Any] = {
        "ensemble": name, "observables": observables, "source": result.path,
        "theory": result.theory, "action_params": result.action_params,
        "lattice": list(result.lattice), "sampler": result.sampler,
        "thermalization": result.thermalization,
        "replica_rows": [n - result.thermalization for n in result.chain_lengths],
        "exported_by": f"latticeflow {latticeflow.__version__}",
        "latticeflow_gamma_method_S": 1.5,
    }
    if metadata is not None:
        record.update(seed=metadata.seed, sampler_params=metadata.sampler_params,
                      checkpoint_sha256=metadata.checkpoint_sha256, created=metadata.created,
                      latticeflow_version=metadata.latticeflow_version)
    return record


def _analysed(source: str | os.PathLike | Ensemble | AnalysisResult, thermalization: int
              ) -> tuple[AnalysisResult, EnsembleMetadata | None]:
    if isinstance(source, AnalysisResult):
        if thermalization:
            raise LatticeflowError("thermalization is fixed by the AnalysisResult; pass the "
                                   "ensemble to choose it here")
        if not Path(source.path).is_file():
            return source, None
        with EnsembleReader(source.path) as reader:
            return source, reader.metadata
    result = analyse(source, thermalization, correlators=False, exact=False)
    if isinstance(source, Ensemble):
        return result, source.metadata
    with EnsembleReader(source) as reader:
        return result, reader.metadata


def to_pyerrors(source: str | os.PathLike | Ensemble | AnalysisResult, *,
                thermalization: int = 0, name: str | None = None,
                out: str | os.PathLike | None = None, overwrite: bool = False
                ) -> dict[str, Any]:
    """One ``pyerrors.Obs`` per observable of an ensemble, keyed by the observable's name.

    ``source``: an ensemble file, an in-memory :class:`~latticeflow.ensemble.Ensemble`
    (analysed here, dropping ``thermalization`` rows per chain) or an
    :class:`~latticeflow.measure.AnalysisResult` (its thermalization; the provenance lacks
    the seed and sampler parameters when its file is gone). ``name``: the pyerrors ensemble
    name (default: the file name without suffix, ``{theory}_{sampler}`` in memory).

    ``out``: also write the Obs with ``pyerrors.input.json.dump_to_json`` (``*.json`` or
    ``*.json.gz``, gzipped by its suffix) with the provenance (theory, action parameters,
    lattice, sampler, seed, latticeflow version, thermalization, ...) as the description; an
    existing file is replaced only with ``overwrite``. Read it back with
    ``pyerrors.input.json.load_json(out)``.
    """
    pe = _pyerrors()
    result, metadata = _analysed(source, thermalization)
    if name is None:
        name = (Path(result.path).stem if Path(result.path).is_file()
                else f"{result.theory}_{result.sampler}")
    if not name or "|" in name:
        raise LatticeflowError(f"pyerrors ensemble name must be non-empty without '|', "
                               f"got {name!r}")
    kept = [n - result.thermalization for n in result.chain_lengths]
    if min(kept) < MIN_REPLICA_ROWS:
        raise LatticeflowError(f"{result.path}: pyerrors needs at least {MIN_REPLICA_ROWS} rows "
                               f"per chain after thermalization; the shortest chain has "
                               f"{min(kept)}")
    replicas = [f"{name}|r{c}" for c in range(len(kept))]
    indices = [range(result.thermalization + 1, result.thermalization + n + 1) for n in kept]
    exported: dict[str, Any] = {}
    for observable, (needs, build) in _OBSERVABLES.items():
        if observable not in result.observables:
            continue
        # fresh primary Obs for every observable: each exported Obs is its own object
        primary = {series: pe.Obs(_series(result, series), replicas, idl=indices)
                   for series in needs}
        obs = build(primary, result.volume)
        obs.tag = observable
        exported[observable] = obs
    if out is not None:
        _dump(pe, list(exported.values()), Path(out),
              _provenance(result, metadata, name, list(exported)), overwrite)
    return exported


def _dump(pe: Any, obs: list[Any], path: Path, description: dict[str, Any], overwrite: bool
          ) -> None:
    """``dump_to_json`` to exactly ``path`` (it would append suffixes to other names)."""
    if not path.name.endswith((".json", ".json.gz")):
        raise LatticeflowError(f"{path}: a pyerrors file name ends in .json or .json.gz")
    if path.is_dir():
        raise LatticeflowError(f"{path}: is a directory")
    if path.exists() and not overwrite:
        raise LatticeflowError(f"{path}: already exists; refusing to overwrite it")
    if not path.absolute().parent.is_dir():
        raise LatticeflowError(f"{path}: output folder {path.absolute().parent} does not exist")
    # plain JSON types, NaN and ±inf as null (strict JSON)
    clean = json.loads(json.dumps(description, default=str), parse_constant=lambda _: None)
    pe.input.json.dump_to_json(obs, str(path), description=clean, gz=path.name.endswith(".gz"))
