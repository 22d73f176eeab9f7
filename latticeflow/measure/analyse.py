"""The analysis of one ensemble (:func:`analyse`): reads the rows chunk by chunk, has the
theory's measurement (:mod:`~latticeflow.measure.phi4`, :mod:`~latticeflow.measure.u1`) turn
them into Monte Carlo series and micro-bins, reduces them to Γ-method and jackknife estimates,
checks the file against its action card and adds the sampler diagnostics and exact references.
Conventions (chains, thermalization, memory): :mod:`latticeflow.measure.rows`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from latticeflow.base.errors import LatticeflowError
from latticeflow.ensemble import Ensemble, EnsembleMetadata
from latticeflow.ensemble.proposals import read_proposal_summary
from latticeflow.measure.estimates import gamma_observable
from latticeflow.measure.exact_reference import exact_reference
from latticeflow.measure.phi4 import _Phi4Analysis
from latticeflow.measure.results import (
    HISTORY_LABELS,
    AnalysisResult,
    ExactReference,
    ObservableResult,
)
from latticeflow.measure.rows import (
    _MIN_GAMMA_ROWS,
    MicroBins,
    RowSource,
    _chunk_ranges,
    chain_layout,
    jackknife_bins,
    open_rows,
)
from latticeflow.measure.u1 import _U1Analysis
from latticeflow.statistics import Estimate
from latticeflow.theories import Action, U1Wilson, action_from_table

log = logging.getLogger(__name__)

#: Pareto k̂ of the proposal weights above which an NMCMC ensemble is flagged as too
#: heavy-tailed for Γ-method errors (the PSIS threshold of Vehtari et al.)
PARETO_K_HEAVY = 0.7


class _TheoryAnalysis(Protocol):
    """Per-theory measurement and reduction (see
    :class:`~latticeflow.measure.phi4._Phi4Analysis`)."""

    history_names: tuple[str, ...]
    n_binned_cols: int

    def measure(self, x: Tensor) -> tuple[dict[str, np.ndarray], Tensor]: ...

    def observables(self, kept: Callable[[str], list[np.ndarray]]
                    ) -> dict[str, ObservableResult]: ...


def _check_field_shape(metadata: EnsembleMetadata, action: Action) -> None:
    expected = tuple(action.field_shape(metadata.lattice))
    if metadata.field_shape != expected:
        raise LatticeflowError(f"{metadata.path}: corrupt ensemble: /configs rows have shape "
                               f"{metadata.field_shape}, but a {metadata.theory} field on "
                               f"lattice {metadata.lattice} has shape {expected}")


def _check_stored_action(action: Action, x: Tensor, stored: np.ndarray, where: str) -> None:
    """Warn when S recomputed from the file's action_params disagrees with ``/action``."""
    recomputed = action(x).numpy()
    tolerance = 1e-4 * math.prod(x.shape[1:]) + 1e-6 * np.abs(stored)
    if np.any(np.abs(recomputed - stored) > tolerance):
        log.warning("%s: the stored /action differs from S recomputed with the file's "
                    "action_params (max |ΔS| = %.3g); exact references may not apply", where,
                    float(np.max(np.abs(recomputed - stored))))


def _diagnostics(sampler: str, rows: RowSource, kept: list[np.ndarray]) -> dict[str, Estimate]:
    """The HMC check of :class:`AnalysisResult` (the NMCMC ones: :func:`_proposal_diagnostics`,
    read from the file's attributes once the file is closed)."""
    result: dict[str, Estimate] = {}
    if sampler == "hmc" and "delta_H" in rows.metadata.datasets:
        delta_h = rows.read("delta_H")
        with np.errstate(all="ignore"):
            series = [np.exp(-delta_h[k]) for k in kept]
        series = [s[np.isfinite(s)] for s in series]
        if all(len(s) >= _MIN_GAMMA_ROWS for s in series):
            gamma = gamma_observable("exp_minus_delta_H", series).gamma
            result["exp_minus_delta_H"] = Estimate(gamma.value, gamma.error)
    return result


def _proposal_diagnostics(path: str) -> dict[str, Estimate]:
    """The proposal ESS, Pareto k̂ and non-finite count recorded by the sampler (over all of
    its proposals: the stored rows are states of p, not draws of q); warns when k̂ says the
    weights are too heavy-tailed for the Γ-method errors to be trusted."""
    summary = read_proposal_summary(path)
    if summary is None:
        return {}
    result = {"proposal_ess": Estimate(summary.ess, math.nan)}
    if summary.pareto_k is not None:
        result["pareto_k"] = Estimate(summary.pareto_k, math.nan)
        if summary.pareto_k > PARETO_K_HEAVY:
            log.warning("%s: the proposal weights are heavy-tailed (Pareto k̂ = %.2f > %.1f): "
                        "long rejection streaks make the Γ-method errors unreliable (likely too "
                        "small); train the flow further", path, summary.pareto_k, PARETO_K_HEAVY)
    if summary.nonfinite:
        result["nonfinite_proposals"] = Estimate(float(summary.nonfinite), math.nan)
    return result


def analyse(
    source: str | os.PathLike | Ensemble,
    thermalization: int = 0,
    *,
    correlators: bool = True,
    exact: bool = True,
    wilson_max: int | None = None,
    label: str | None = None,
    chunk_bytes: int = 32 << 20,
    max_micro_bins: int = 2000,
    max_jackknife_bins: int = 100,
) -> AnalysisResult:
    """Analyse an ensemble: the observable set of its theory with Γ-method errors (chains as
    replicas), acceptance, Monte Carlo histories and, with ``correlators``, the φ⁴ correlators or
    the U(1) Wilson-loop table (jackknife) and topological-charge histogram.

    ``thermalization``: rows dropped at the start of every chain. ``exact``: attach
    :func:`exact_reference`. ``wilson_max``: cap on R and T of the Wilson table (default L/2).
    ``label``: name in tables (default: the file name without suffix). Raises
    :class:`LatticeflowError` for unreadable files and impossible thermalization.
    """
    with open_rows(source) as rows:
        meta = rows.metadata
        where = meta.path
        action = action_from_table(meta.action_params, where)
        _check_field_shape(meta, action)
        chain = rows.read("chain") if "chain" in meta.datasets else None
        layout = chain_layout(chain, meta.n_complete, thermalization, where)
        theory: _TheoryAnalysis
        if isinstance(action, U1Wilson):
            theory = _U1Analysis(meta.lattice, wilson_max, correlators)
        else:
            theory = _Phi4Analysis(meta.lattice)
        micro = (MicroBins(layout, meta.n_complete, theory.n_binned_cols, max_micro_bins)
                 if correlators else None)
        per_row: dict[str, list[np.ndarray]] = {name: [] for name in theory.history_names}
        row_bytes = 8 * math.prod(meta.field_shape) * (3 if correlators else 2)
        stored_action = rows.read("action").astype(np.float64)
        for start, stop in _chunk_ranges(meta.n_complete, row_bytes, chunk_bytes):
            x = torch.from_numpy(np.asarray(rows.read("configs", start, stop))).to(torch.float64)
            if start == 0:
                _check_stored_action(action, x[:16], stored_action[:min(16, stop)], where)
            series, binned = theory.measure(x)
            for name, values in series.items():
                per_row[name].append(values)
            if micro is not None:
                micro.add(start, binned)
        accepted = rows.read("accepted").astype(bool)
        diagnostics = _diagnostics(meta.sampler, rows, layout.kept)
    if meta.sampler == "nmcmc" and not isinstance(source, Ensemble):
        diagnostics.update(_proposal_diagnostics(where))

    columns = {name: np.concatenate(parts) for name, parts in per_row.items()}
    columns["action_density"] = stored_action / math.prod(meta.lattice)

    def kept(name: str) -> list[np.ndarray]:
        return [columns[name][k] for k in layout.kept]

    observables = theory.observables(kept)
    kept_rows = np.concatenate(layout.kept)
    tau_max = max((o.tau_int for o in observables.values() if math.isfinite(o.tau_int)),
                  default=0.5)
    correlator_result = wilson_result = topology = None
    if isinstance(theory, _Phi4Analysis):
        xi2 = theory.correlation_length(kept)
        if micro is not None:
            n_bins = jackknife_bins(layout.n_kept, micro.n_bins, tau_max, max_jackknife_bins)
            bin_rows = micro.size * (micro.n_bins // max(n_bins, 1))
            correlator_result = theory.correlators(micro.means(), n_bins, bin_rows, xi2)
    else:
        topology = theory.topology([columns["q_raw"][r] for r in layout.rows], kept("q_raw"))
        columns["Q"] = np.round(columns["q_raw"])
        if micro is not None:
            n_bins = jackknife_bins(layout.n_kept, micro.n_bins, tau_max, max_jackknife_bins)
            bin_rows = micro.size * (micro.n_bins // max(n_bins, 1))
            wilson_result = theory.wilson(micro.means(), n_bins, bin_rows)
    histories = {name: [columns[name][r] for r in layout.rows]
                 for name in HISTORY_LABELS if name in columns}
    reference = exact_reference(meta.theory, meta.action_params, meta.lattice, wilson_max) \
        if exact else ExactReference()
    return AnalysisResult(
        path=where, label=label or Path(where).stem, theory=meta.theory, sampler=meta.sampler,
        lattice=meta.lattice, action_params=dict(meta.action_params), n=layout.n_kept,
        n_total=meta.n_complete, thermalization=thermalization, chain_lengths=layout.lengths,
        acceptance=float(accepted[kept_rows].mean()), observables=observables,
        histories=histories, diagnostics=diagnostics, correlators=correlator_result,
        wilson=wilson_result, topology=topology, exact=reference,
    )
