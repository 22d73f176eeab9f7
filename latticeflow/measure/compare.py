"""Side-by-side comparison of analysed ensembles.

Convention: the deviation of ensemble i from the first is (v_i − v_0)/sqrt(σ_i² + σ_0²)
(:func:`deviation`); default labels are the file names, numbered when two coincide.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from latticeflow.base.errors import LatticeflowError
from latticeflow.measure.results import AnalysisResult

log = logging.getLogger(__name__)


def deviation(value: float, error: float, reference: float, reference_error: float = 0.0
              ) -> float:
    """(value − reference) / sqrt(error² + reference_error²); 0 for equal values with zero
    combined error, ±inf for different ones, NaN if anything is NaN."""
    diff = value - reference
    scale = math.hypot(error, reference_error)
    if math.isnan(diff) or math.isnan(scale):
        return math.nan
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    return diff / scale


@dataclass(frozen=True)
class Comparison:
    """Side-by-side values of the observables common to all ensembles.

    ``values``, ``errors``, ``deviations``: ``(n_observables, n_ensembles)``; ``deviations[i, j]``
    = deviation of ensemble j from ensemble 0 in units of the combined error (column 0 is 0).
    ``exact``: exact values (only when all ensembles share theory, parameters and lattice).
    """

    labels: list[str]
    names: list[str]
    values: np.ndarray
    errors: np.ndarray
    deviations: np.ndarray
    exact: dict[str, float]
    results: list[AnalysisResult]

    def as_dict(self) -> dict[str, Any]:
        """JSON form: ``{"ensembles": [{"label", "path", "sampler", "n", "acceptance"}],
        "observables": {NAME: {"exact": float | None, "values": [{"value", "error",
        "deviation"}, ...]}}}`` (one entry per ensemble, in order)."""
        ensembles = [{"label": label, "path": r.path, "sampler": r.sampler, "n": r.n,
                      "acceptance": r.acceptance}
                     for label, r in zip(self.labels, self.results, strict=True)]
        table = {
            name: {"exact": self.exact.get(name),
                   "values": [{"value": float(self.values[i, j]),
                               "error": float(self.errors[i, j]),
                               "deviation": float(self.deviations[i, j])}
                              for j in range(len(self.labels))]}
            for i, name in enumerate(self.names)}
        return {"ensembles": ensembles, "observables": table}


def compare(results: Sequence[AnalysisResult], labels: Sequence[str] | None = None
            ) -> Comparison:
    """Compare analysed ensembles observable by observable against the first one.

    Raises :class:`LatticeflowError` for fewer than one result or no common observables; logs a
    warning when theory, action parameters or lattice differ.
    """
    results = list(results)
    if not results:
        raise LatticeflowError("compare needs at least one ensemble")
    labels = list(labels) if labels is not None else _unique_labels(results)
    if len(labels) != len(results):
        raise LatticeflowError(f"{len(labels)} labels for {len(results)} ensembles")
    first = results[0]
    same = all((r.theory, r.action_params, r.lattice)
               == (first.theory, first.action_params, first.lattice) for r in results[1:])
    if not same:
        log.warning("the ensembles differ in theory, action parameters or lattice; "
                    "deviations compare different physics")
    names = [n for n in first.observables if all(n in r.observables for r in results[1:])]
    if not names:
        raise LatticeflowError("the ensembles have no observables in common")
    values = np.array([[r.observables[n].value for r in results] for n in names])
    errors = np.array([[r.observables[n].error for r in results] for n in names])
    deviations = np.array([[deviation(values[i, j], errors[i, j], values[i, 0], errors[i, 0])
                            for j in range(len(results))] for i in range(len(names))])
    exact = {n: v for n, v in first.exact.scalars.items() if n in names} if same else {}
    return Comparison(labels, names, values, errors, deviations, exact, results)


def _unique_labels(results: Sequence[AnalysisResult]) -> list[str]:
    labels = [r.label for r in results]
    if len(set(labels)) == len(labels):
        return labels
    return [f"{i + 1}:{label}" for i, label in enumerate(labels)]
