"""Result types of an ensemble analysis: one observable (:class:`ObservableResult`), the φ⁴
correlators, the U(1) Wilson-loop table and topology, the exact reference values and the whole
analysis of one ensemble (:class:`AnalysisResult`, with its JSON record
:func:`observables_record`). Definitions of the quantities: :mod:`latticeflow.measure.phi4` and
:mod:`latticeflow.measure.u1`; all are frozen dataclasses of floats and numpy arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latticeflow.statistics import Estimate, GammaResult

#: per-configuration series shown as Monte Carlo histories (name → axis label)
HISTORY_LABELS = {
    "m": "magnetization m", "m2": "m²", "action_density": "S / V",
    "plaquette": "plaquette cos P", "Q": "topological charge Q", "wilson_loop_2x2": "W(2,2)",
}


@dataclass(frozen=True)
class ObservableResult:
    """One observable: value ± error, τ_int ± error, and the full :class:`GammaResult`.

    ``warnings`` holds the messages of any :class:`ShortChainWarning` the Γ-method raised.
    """

    name: str
    value: float
    error: float
    tau_int: float
    tau_int_error: float
    gamma: GammaResult
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, float]:
        """``{"value", "error", "tau_int", "tau_int_error"}`` (the JSON record)."""
        return {"value": self.value, "error": self.error, "tau_int": self.tau_int,
                "tau_int_error": self.tau_int_error}


@dataclass(frozen=True)
class CorrelatorResult:
    """φ⁴ correlators with jackknife errors (see the module docstring for the definitions).

    ``g``/``g_error``: G_c(y), lattice shape; ``c``/``c_error``: C(t), ``(L0,)``;
    ``m_eff``/``m_eff_error``: ``(L0−2,)``, entry k belongs to t = k + 1 (NaN where C does not
    allow a cosh mass); ``xi2``: the Γ-method ξ₂. ``n_bins`` jackknife bins of ``bin_rows``
    rows each.
    """

    g: np.ndarray
    g_error: np.ndarray
    c: np.ndarray
    c_error: np.ndarray
    m_eff: np.ndarray
    m_eff_error: np.ndarray
    xi2: ObservableResult
    n_bins: int
    bin_rows: int


@dataclass(frozen=True)
class WilsonResult:
    """Wilson loops ``w[R−1, T−1]`` = W(R,T) and Creutz ratios ``creutz[R−1, T−1]`` = χ(R,T),
    1 ≤ R ≤ rmax, 1 ≤ T ≤ tmax, with jackknife errors over ``n_bins`` bins of ``bin_rows``."""

    w: np.ndarray
    w_error: np.ndarray
    creutz: np.ndarray
    creutz_error: np.ndarray
    n_bins: int
    bin_rows: int

    @property
    def rmax(self) -> int:
        return self.w.shape[0]

    @property
    def tmax(self) -> int:
        return self.w.shape[1]


@dataclass(frozen=True)
class TopologyResult:
    """Topological charge: per-chain integer histories (thermalization rows included) and the
    histogram of the analysed rows (``charges[i]`` occurs ``counts[i]`` times).
    ``max_non_integrality`` is max |Q_raw − round(Q_raw)| over the analysed rows."""

    histories: list[np.ndarray]
    charges: np.ndarray
    counts: np.ndarray
    max_non_integrality: float


@dataclass(frozen=True)
class ExactReference:
    """Exact values for an ensemble's theory, parameters and lattice, where they are known.

    ``scalars``: observable name → value (the names of the observable set); φ⁴ free field:
    ``g`` (G(y), lattice shape), ``c`` (C(t)), ``m_eff`` (constant cosh mass), ``xi2`` (1/m);
    U(1): ``wilson`` and ``creutz`` tables (same layout as :class:`WilsonResult`).
    ``description`` says what is exact (empty when nothing is).
    """

    description: str = ""
    scalars: dict[str, float] = field(default_factory=dict)
    g: np.ndarray | None = None
    c: np.ndarray | None = None
    m_eff: float | None = None
    xi2: float | None = None
    wilson: np.ndarray | None = None
    creutz: np.ndarray | None = None


@dataclass(frozen=True)
class AnalysisResult:
    """Everything :func:`analyse` computes for one ensemble.

    ``n``: analysed rows (all chains, after thermalization); ``n_total``: rows in the file;
    ``chain_lengths``: rows per chain before thermalization; ``acceptance``: mean of
    ``/accepted`` over the analysed rows. ``histories[name]`` holds one array per chain with all
    of its rows (thermalization included; names in :data:`HISTORY_LABELS`). ``diagnostics``:
    sampler checks (hmc: ``exp_minus_delta_H`` = <e^{−ΔH}>, 1 in equilibrium; nmcmc, from the
    file's proposal attributes (:mod:`latticeflow.samplers.proposals`; none for an in-memory
    ensemble or a file without them): ``proposal_ess``, ``pareto_k`` (when defined) and
    ``nonfinite_proposals`` (when any), errors NaN: properties of all of the sampler's
    proposals, not of the stored rows).
    """

    path: str
    label: str
    theory: str
    sampler: str
    lattice: tuple[int, ...]
    action_params: dict[str, Any]
    n: int
    n_total: int
    thermalization: int
    chain_lengths: tuple[int, ...]
    acceptance: float
    observables: dict[str, ObservableResult]
    histories: dict[str, list[np.ndarray]]
    diagnostics: dict[str, Estimate]
    correlators: CorrelatorResult | None = None
    wilson: WilsonResult | None = None
    topology: TopologyResult | None = None
    exact: ExactReference = field(default_factory=ExactReference)

    @property
    def n_chains(self) -> int:
        return len(self.chain_lengths)

    @property
    def volume(self) -> int:
        return math.prod(self.lattice)


def observables_record(result: AnalysisResult) -> dict[str, Any]:
    """The JSON record of ``analysis/observables.py``: ``{"n", "sampler", "acceptance",
    "observables": {NAME: {"value", "error", "tau_int", "tau_int_error"}}}``."""
    return {"n": result.n, "sampler": result.sampler, "acceptance": result.acceptance,
            "observables": {name: o.as_dict() for name, o in result.observables.items()}}
