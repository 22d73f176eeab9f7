"""Analysis of HDF5 ensembles: the standard observables with Γ-method errors, correlators,
topology, Wilson loops, exact reference values and side-by-side comparisons.

Conventions
-----------
* Input: an ensemble file (path) or an in-memory :class:`~latticeflow.ensemble.Ensemble`. With a
  ``/chain`` dataset the rows of chain c (``chain == c``, in file order) form one Markov chain;
  without it the whole file is one chain. ``thermalization = K`` drops the first K rows of
  *every* chain; K must be smaller than the shortest chain. Chains are independent replicas for
  :func:`~latticeflow.statistics.gamma_method` (one global mean, Γ(t) summed over replicas).
* Memory: configurations are read in chunks of about ``chunk_bytes`` and measured with torch on
  the CPU in float64. Per configuration only a few scalars are kept (the Monte Carlo histories);
  the correlator spectrum |φ̃(p)|² and the Wilson-loop table are accumulated into at most
  ``max_micro_bins`` equal *micro-bins* (consecutive kept rows of one chain; the last
  ``n_chain mod b`` rows of a chain are not binned). Jackknife bins are groups of micro-bins.
* φ⁴ (field ``(L0, L1, ...)``, V sites, m = (1/V)Σ_x φ(x); for the hopping form this is the
  hopping field ϕ): ``abs_magnetization`` <|m|>, ``magnetization_squared`` <m²>, ``chi2`` =
  V(<m²> − <m>²), ``binder`` = 1 − <m⁴>/(3<m²>²), ``action_density`` = <S>/V with S taken from the
  file's ``/action``. chi2 and binder are functions of means (``derived`` in gamma_method).
* φ⁴ correlators: G_c(y) = <G_i(y)> − <m>² with G_i(y) = (1/V)Σ_x φ(x)φ(x+y); C(t) = Σ_{y⃗} G_c(t, y⃗)
  (t along axis 0); m_eff(t) = arccosh[(C(t−1) + C(t+1))/(2C(t))] for t = 1 … L0−2; values
  are these functions of the mean over all binned rows, errors by jackknife over bins of at
  least ``6 τ_int,max`` rows (τ_int,max: the largest τ_int of the observable set). The
  second-moment correlation length ξ₂ = sqrt[(G̃(0)/G̃(p) − 1)/p̂²], p = 2π/L0 along axis 0,
  p̂² = 4 sin²(π/L0), is a Γ-method derived quantity of the per-config means m, m² and
  G̃_i(p) = |φ̃(p)|²/V (so its error includes autocorrelations).
* U(1) (links ``(2, L0, L1)``): ``plaquette`` <cos P>, ``topological_charge_squared`` <Q²> with Q
  rounded to the nearest integer, ``topological_susceptibility`` <Q²>/V, ``wilson_loop_1x1`` and
  ``wilson_loop_2x2`` (R along axis 0, T along axis 1; 2x2 needs L0, L1 ≥ 4). Wilson loops
  W(R,T), 1 ≤ R ≤ L0/2, 1 ≤ T ≤ L1/2, are cos of the sum of the enclosed plaquette angles
  (2D Stokes; equal to :func:`latticeflow.observables.wilson_loop`), computed from a periodic
  summed-area table; Creutz ratios χ(R,T) = −log[W(R,T)W(R−1,T−1)/(W(R,T−1)W(R−1,T))] with
  W(0,·) = W(·,0) = 1; errors by jackknife over bins.
* Comparison: deviation of ensemble i from the first, (v_i − v_0)/sqrt(σ_i² + σ_0²).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from latticeflow import exact as exact_results
from latticeflow import observables as obs
from latticeflow.ensemble import Ensemble, EnsembleMetadata, EnsembleReader
from latticeflow.errors import LatticeflowError
from latticeflow.lattice import plaquette
from latticeflow.samplers.proposals import read_proposal_summary
from latticeflow.statistics import (
    Estimate,
    GammaResult,
    ShortChainWarning,
    gamma_method,
    jackknife,
)
from latticeflow.theories import Action, Phi4, Phi4Hopping, U1Wilson, action_from_table

log = logging.getLogger(__name__)

PHI4_OBSERVABLES = ("abs_magnetization", "magnetization_squared", "chi2", "binder",
                    "action_density")
U1_OBSERVABLES = ("plaquette", "topological_charge_squared", "topological_susceptibility",
                  "wilson_loop_1x1", "wilson_loop_2x2")
#: per-configuration series shown as Monte Carlo histories (name → axis label)
HISTORY_LABELS = {
    "m": "magnetization m", "m2": "m²", "action_density": "S / V",
    "plaquette": "plaquette cos P", "Q": "topological charge Q", "wilson_loop_2x2": "W(2,2)",
}
_JACKKNIFE_BIN_TAUS = 6.0   # jackknife bins hold at least this many τ_int,max rows
_MIN_GAMMA_ROWS = 4         # gamma_method needs 4 measurements per replica
_Q_TOLERANCE = 1e-3         # allowed distance of a raw topological charge from an integer
#: Pareto k̂ of the proposal weights above which an NMCMC ensemble is flagged as too
#: heavy-tailed for Γ-method errors (the PSIS threshold of Vehtari et al.)
PARETO_K_HEAVY = 0.7


# --------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Row sources and chain layout
# --------------------------------------------------------------------------------------------


class RowSource(Protocol):
    """What the analysis reads from: an :class:`EnsembleReader` or an in-memory ensemble."""

    metadata: EnsembleMetadata

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray: ...


class _InMemoryRows:
    """:class:`RowSource` over an :class:`Ensemble` already in memory."""

    def __init__(self, ensemble: Ensemble):
        self.metadata = ensemble.metadata
        self._data = ensemble.data

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.metadata.n_complete if stop is None else min(stop, self.metadata.n_complete)
        return self._data[name][start:stop]


@contextmanager
def open_rows(source: str | os.PathLike | Ensemble) -> Iterator[RowSource]:
    """A :class:`RowSource` for a path (opened read-only, closed on exit) or an Ensemble."""
    if isinstance(source, Ensemble):
        yield _InMemoryRows(source)
        return
    with EnsembleReader(source) as reader:
        yield reader


@dataclass(frozen=True)
class ChainLayout:
    """Which file rows belong to which chain. ``rows[c]``: file-row indices of chain c in Markov
    order (all of them); ``kept[c]``: those left after dropping ``thermalization`` rows."""

    rows: list[np.ndarray]
    thermalization: int

    @property
    def kept(self) -> list[np.ndarray]:
        return [r[self.thermalization:] for r in self.rows]

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(len(r) for r in self.rows)

    @property
    def n_kept(self) -> int:
        return sum(len(r) for r in self.kept)


def chain_layout(chain: np.ndarray | None, n_rows: int, thermalization: int,
                 where: str = "ensemble") -> ChainLayout:
    """Split ``n_rows`` file rows into chains by the ``/chain`` column (None: one chain) and
    check ``thermalization``; raises :class:`LatticeflowError` for K < 0, K ≥ the shortest
    chain, or fewer than 4 analysed rows in a chain."""
    if n_rows == 0:
        raise LatticeflowError(f"{where}: the ensemble has no complete rows")
    if thermalization < 0:
        raise LatticeflowError(f"thermalization must be >= 0, got {thermalization}")
    if chain is None:
        rows = [np.arange(n_rows)]
    else:
        chain = np.asarray(chain)
        rows = [np.flatnonzero(chain == c) for c in np.unique(chain)]
    shortest = min(len(r) for r in rows)
    per = "per chain " if len(rows) > 1 else ""
    if thermalization >= shortest:
        what = (f"the shortest of its {len(rows)} chains has {shortest} rows" if len(rows) > 1
                else f"it has {shortest} rows")
        raise LatticeflowError(f"{where}: thermalization K = {thermalization} {per}leaves no "
                               f"data ({what}; need K < N)")
    if shortest - thermalization < _MIN_GAMMA_ROWS:
        raise LatticeflowError(f"{where}: only {shortest - thermalization} rows {per}left after "
                               f"thermalization K = {thermalization}; need at least "
                               f"{_MIN_GAMMA_ROWS}")
    return ChainLayout(rows, thermalization)


def _chunk_ranges(n_rows: int, row_bytes: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    step = max(1, chunk_bytes // max(1, row_bytes))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


class MicroBins:
    """Accumulates per-row vectors into equal micro-bins of ``size`` consecutive kept rows of
    one chain (micro-bins ordered chain by chain); ``means()`` gives ``(n_micro, n_cols)``."""

    def __init__(self, layout: ChainLayout, n_rows: int, n_cols: int, max_bins: int):
        self.size = max(1, math.ceil(layout.n_kept / max(1, max_bins)))
        self.index = np.full(n_rows, -1, dtype=np.int64)
        offset = 0
        for kept in layout.kept:
            n_binned = len(kept) // self.size * self.size
            self.index[kept[:n_binned]] = offset + np.arange(n_binned) // self.size
            offset += n_binned // self.size
        self.n_bins = offset
        self._sums = np.zeros((offset, n_cols))

    def add(self, start: int, values: Tensor) -> None:
        """Add the rows ``values`` (``(B, n_cols)``) that are file rows start … start+B−1."""
        index = self.index[start:start + len(values)]
        keep = index >= 0
        if keep.any():
            # numpy, not torch.index_add_: the latter's thread pool stalls for ~0.1 s per call
            # on an oversubscribed CPU
            np.add.at(self._sums, index[keep], values.numpy()[keep])

    def means(self) -> np.ndarray:
        return self._sums / self.size


# --------------------------------------------------------------------------------------------
# Measurements on batches (torch, float64)
# --------------------------------------------------------------------------------------------


def wilson_loops(links: Tensor, rmax: int, tmax: int) -> Tensor:
    """W(R,T) per configuration for 1 ≤ R ≤ rmax, 1 ≤ T ≤ tmax: ``(B, rmax, tmax)``.

    The loop with corner x encloses the plaquettes x + k0̂ + j1̂ (k < R, j < T); its phase is the
    sum of their (unwrapped) angles (2D Stokes), so it equals
    :func:`latticeflow.observables.wilson_loop` up to round-off. Method, for each R: strip sums
    H(x) = Σ_{k<R} P(x + k0̂), their exclusive running sum C(x0, x1) = Σ_{y<x1} H(x0, y) and the
    strip's total Φ(x0) = Σ_y H(x0, y); the loop phase is C(x1+T) − C(x1) with C continued by
    C(x1 + L1) = C(x1) + Φ. G = exp(i[C − Φ x1/L1]) is periodic in x1, hence
    Σ_{x1} e^{i·phase} = e^{iΦT/L1} Σ_{x1} G(x1+T) G*(x1), an FFT autocorrelation giving every T
    at once (per R: 2V cosines and an FFT, instead of V cosines per (R, T)).
    """
    p = plaquette(links)
    size0, size1 = p.shape[1], p.shape[2]
    if not (1 <= rmax <= size0 and 1 <= tmax <= size1):
        raise ValueError(f"need 1 <= rmax <= L0, 1 <= tmax <= L1, got {rmax}, {tmax}")
    lags = torch.arange(1, tmax + 1, dtype=p.dtype)
    x1 = torch.arange(size1, dtype=p.dtype)
    # Σ_x G(x+T)G*(x) = (1/L1) Σ_k |Ĝ(k)|² e^{2πikT/L1}: real and imaginary parts by one matmul
    k_t = 2 * math.pi * torch.outer(torch.arange(size1, dtype=p.dtype), lags) / size1
    lag_matrix = torch.cat([torch.cos(k_t), torch.sin(k_t)], dim=1) / size1
    out = torch.empty(p.shape[0], rmax, tmax, dtype=p.dtype)
    running = torch.cumsum(p, dim=2) - p                 # Σ_{y<x1} P(x0, y)
    row_total = p.sum(dim=2, keepdim=True)               # Σ_y P(x0, y)
    strip_running = torch.zeros_like(p)                  # C(x0, x1) of the R-strip
    total = torch.zeros_like(row_total)                  # Φ(x0) of the R-strip
    for r in range(1, rmax + 1):
        strip_running = strip_running + torch.roll(running, shifts=-(r - 1), dims=1)
        total = total + torch.roll(row_total, shifts=-(r - 1), dims=1)
        theta = strip_running - total * x1 / size1
        spectrum = torch.fft.fft(torch.complex(torch.cos(theta), torch.sin(theta)), dim=2)
        corr = (spectrum.real**2 + spectrum.imag**2) @ lag_matrix  # (B, L0, 2 tmax)
        twist = total * lags / size1
        loop = torch.cos(twist) * corr[..., :tmax] - torch.sin(twist) * corr[..., tmax:]
        out[:, r - 1] = loop.mean(dim=1) / size1
    return out


def _with_short_chain_warnings(compute: Callable[[], Any]) -> tuple[Any, tuple[str, ...]]:
    """Run ``compute`` and return its result and the messages of ShortChainWarnings it raised
    (other warnings are passed on)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with np.errstate(all="ignore"):
            result = compute()
    messages = []
    for w in caught:
        if issubclass(w.category, ShortChainWarning):
            messages.append(str(w.message))
        elif not issubclass(w.category, RuntimeWarning):
            warnings.warn(w.message, w.category, stacklevel=2)
    return result, tuple(dict.fromkeys(messages))


def gamma_observable(name: str, replicas: list[np.ndarray],
                     derived: Callable[[np.ndarray], float] | None = None) -> ObservableResult:
    """Γ-method estimate of one observable over chains (replicas) ``(N_c,)`` or ``(N_c, k)``.

    ShortChainWarnings are collected into ``warnings`` and logged, not raised.
    """
    result, messages = _with_short_chain_warnings(lambda: gamma_method(replicas, derived))
    for message in messages:
        log.warning("%s: %s", name, message)
    return ObservableResult(name, result.value, result.error, result.tau_int,
                            result.tau_int_error, result, messages)


def _jackknife_errors(f: Callable[[np.ndarray], np.ndarray], micro: np.ndarray, n_bins: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """f of the mean of all micro-bins (no bias correction, like the Γ-method values) and its
    jackknife error over ``n_bins`` bins of micro-bins (NaN with fewer than 2 bins)."""
    with np.errstate(all="ignore"):
        value = np.asarray(f(micro.mean(axis=0)), dtype=float)
        if n_bins < 2:
            return value, np.full_like(value, np.nan)
        _, error = jackknife(f, micro, n_bins)
    return value, np.asarray(error, dtype=float)


class _TheoryAnalysis(Protocol):
    """Per-theory measurement and reduction (see :class:`_Phi4Analysis`)."""

    history_names: tuple[str, ...]
    n_binned_cols: int

    def measure(self, x: Tensor) -> tuple[dict[str, np.ndarray], Tensor]: ...

    def observables(self, kept: Callable[[str], list[np.ndarray]]
                    ) -> dict[str, ObservableResult]: ...


class _Phi4Analysis:
    """φ⁴: per-config m, |m|, m², m⁴, G̃_i(p_min); binned columns [m, |φ̃(p)|²/V (V values)]."""

    history_names = ("m", "abs_m", "m2", "m4", "gp")

    def __init__(self, lattice: tuple[int, ...]):
        self.lattice = lattice
        self.volume = math.prod(lattice)
        self.n_binned_cols = 1 + self.volume

    def measure(self, x: Tensor) -> tuple[dict[str, np.ndarray], Tensor]:
        m = obs.magnetization(x)
        dims = tuple(range(1, x.dim()))
        power = torch.fft.fftn(x, dim=dims).abs().square() / self.volume
        p_min = (slice(None), 1 % self.lattice[0]) + (0,) * (len(self.lattice) - 1)
        series = {"m": m, "abs_m": m.abs(), "m2": m.square(), "m4": m.square().square(),
                  "gp": power[p_min]}
        binned = torch.cat([m[:, None], power.reshape(len(x), -1)], dim=1)
        return _copies(series), binned

    def observables(self, kept: Callable[[str], list[np.ndarray]]) -> dict[str, ObservableResult]:
        volume = self.volume

        def chi2(means: np.ndarray) -> float:
            return float(obs.susceptibility_from_means(torch.as_tensor(means[1]),
                                                       torch.as_tensor(means[0]), volume))

        def binder(means: np.ndarray) -> float:
            return float(obs.binder_cumulant(torch.as_tensor(means[0]), torch.as_tensor(means[1])))

        return {
            "abs_magnetization": gamma_observable("abs_magnetization", kept("abs_m")),
            "magnetization_squared": gamma_observable("magnetization_squared", kept("m2")),
            "chi2": gamma_observable("chi2", _stack(kept("m"), kept("m2")), chi2),
            "binder": gamma_observable("binder", _stack(kept("m2"), kept("m4")), binder),
            "action_density": gamma_observable("action_density", kept("action_density")),
        }

    def correlation_length(self, kept: Callable[[str], list[np.ndarray]]) -> ObservableResult:
        size, volume = self.lattice[0], self.volume

        def xi2(means: np.ndarray) -> float:
            g0 = obs.susceptibility_from_means(torch.as_tensor(means[1]),
                                               torch.as_tensor(means[0]), volume)
            return float(obs.second_moment_correlation_length(g0, torch.as_tensor(means[2]),
                                                              size))

        return gamma_observable("correlation_length",
                                _stack(kept("m"), kept("m2"), kept("gp")), xi2)

    def correlators(self, micro: np.ndarray, n_bins: int, bin_rows: int,
                    xi2: ObservableResult) -> CorrelatorResult:
        lattice, volume, d = self.lattice, self.volume, len(self.lattice)

        def functions(means: np.ndarray) -> np.ndarray:
            spectrum = torch.as_tensor(means[1:].reshape(lattice))
            g = obs.connect(torch.fft.ifftn(spectrum).real, torch.as_tensor(means[0]))
            c = obs.zero_momentum(g, d)
            return torch.cat([g.reshape(-1), c, obs.effective_mass(c)]).numpy()

        value, error = _jackknife_errors(functions, micro, n_bins)
        size = lattice[0]
        cuts = np.cumsum([volume, size])
        g, c, m_eff = np.split(value, cuts)
        g_err, c_err, m_eff_err = np.split(error, cuts)
        return CorrelatorResult(g.reshape(lattice), g_err.reshape(lattice), c, c_err, m_eff,
                                m_eff_err, xi2, n_bins, bin_rows)


class _U1Analysis:
    """U(1): per-config plaquette, raw Q, W(1,1), W(2,2); binned columns: the W(R,T) table."""

    history_names = ("plaquette", "q_raw", "wilson_loop_1x1", "wilson_loop_2x2")

    def __init__(self, lattice: tuple[int, ...], wilson_max: int | None, table: bool):
        self.lattice = lattice
        self.volume = math.prod(lattice)
        cap = wilson_max if wilson_max is not None else max(lattice)
        if cap < 1:
            raise LatticeflowError(f"wilson_max must be >= 1, got {cap}")
        self.has_2x2 = min(lattice[0] // 2, lattice[1] // 2, cap) >= 2
        # without the table only W(1,1) and W(2,2) are measured
        self.rmax = max(1, min(lattice[0] // 2, cap if table else 2))
        self.tmax = max(1, min(lattice[1] // 2, cap if table else 2))
        self.n_binned_cols = self.rmax * self.tmax

    def measure(self, x: Tensor) -> tuple[dict[str, np.ndarray], Tensor]:
        table = wilson_loops(x, self.rmax, self.tmax)
        series = {"plaquette": obs.plaquette_mean(x), "q_raw": obs.topological_charge(x),
                  "wilson_loop_1x1": table[:, 0, 0],
                  "wilson_loop_2x2": table[:, 1, 1] if self.has_2x2 else table[:, 0, 0] * np.nan}
        return _copies(series), table.reshape(len(x), -1)

    def observables(self, kept: Callable[[str], list[np.ndarray]]) -> dict[str, ObservableResult]:
        volume = self.volume
        q2 = [np.round(q) ** 2 for q in kept("q_raw")]
        results = {
            "plaquette": gamma_observable("plaquette", kept("plaquette")),
            "topological_charge_squared": gamma_observable("topological_charge_squared", q2),
            "topological_susceptibility": gamma_observable(
                "topological_susceptibility", [q[:, None] for q in q2],
                lambda means: float(means[0]) / volume),
            "wilson_loop_1x1": gamma_observable("wilson_loop_1x1", kept("wilson_loop_1x1")),
        }
        if self.has_2x2:
            results["wilson_loop_2x2"] = gamma_observable("wilson_loop_2x2",
                                                          kept("wilson_loop_2x2"))
        else:
            log.info("wilson_loop_2x2 needs L0, L1 >= 4 (and wilson_max >= 2); not computed")
        return results

    def wilson(self, micro: np.ndarray, n_bins: int, bin_rows: int) -> WilsonResult:
        shape = (self.rmax, self.tmax)

        def functions(means: np.ndarray) -> np.ndarray:
            w = torch.as_tensor(means.reshape(shape))
            padded = torch.ones(shape[0] + 1, shape[1] + 1, dtype=torch.float64)
            padded[1:, 1:] = w
            return torch.cat([w.reshape(-1), obs.creutz_ratio_table(padded).reshape(-1)]).numpy()

        value, error = _jackknife_errors(functions, micro, n_bins)
        w, creutz = np.split(value, 2)
        w_err, creutz_err = np.split(error, 2)
        return WilsonResult(w.reshape(shape), w_err.reshape(shape), creutz.reshape(shape),
                            creutz_err.reshape(shape), n_bins, bin_rows)

    def topology(self, histories: list[np.ndarray], kept: list[np.ndarray]) -> TopologyResult:
        raw = np.concatenate(kept)
        rounded = np.round(raw)
        deviation = float(np.max(np.abs(raw - rounded)))
        if deviation > _Q_TOLERANCE:
            log.warning("topological charge is not integer: max |Q - round(Q)| = %.3g "
                        "(are these U(1) link angles on a periodic 2D lattice?)", deviation)
        charges, counts = np.unique(rounded.astype(np.int64), return_counts=True)
        return TopologyResult([np.round(h).astype(np.int64) for h in histories], charges, counts,
                              deviation)


def _copies(series: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Own numpy copies: a view (e.g. one momentum of the power spectrum) would keep the whole
    per-chunk tensor alive for the rest of the analysis."""
    return {name: np.array(values.numpy(), copy=True) for name, values in series.items()}


def _stack(*columns: list[np.ndarray]) -> list[np.ndarray]:
    """Per-chain ``(N_c, k)`` arrays from k lists of per-chain series."""
    return [np.column_stack(parts) for parts in zip(*columns, strict=True)]


# --------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------


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


def jackknife_bins(n_kept: int, n_micro: int, tau_max: float, max_bins: int) -> int:
    """Number of jackknife bins (groups of micro-bins) for ``n_kept`` rows in ``n_micro``
    micro-bins: bins of at least 6 τ_int,max rows, at most ``max_bins`` and ``n_micro``; among
    the counts from half that target up to it, the one leaving the fewest micro-bins over
    (ties: more bins). At least 2 (when ``n_micro`` ≥ 2); warns below 10."""
    tau = tau_max if math.isfinite(tau_max) and tau_max > 0 else 0.5
    target = min(max_bins, n_micro, int(n_kept // math.ceil(_JACKKNIFE_BIN_TAUS * tau)))
    if target < 10:
        log.warning("jackknife errors of the correlators use only %d bins (N = %d, "
                    "tau_int,max = %.3g): they are unreliable", max(target, 0), n_kept, tau)
    if target < 2:
        return min(2, n_micro)
    return min(range(max(2, (target + 1) // 2), target + 1),
               key=lambda n: (n_micro % n, -n))


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


# --------------------------------------------------------------------------------------------
# Exact references
# --------------------------------------------------------------------------------------------


def exact_reference(theory: str, action_params: dict[str, Any], lattice: Sequence[int],
                    wilson_max: int | None = None) -> ExactReference:
    """Exact values for the file's theory, parameters and lattice where :mod:`latticeflow.exact`
    has them, else an empty :class:`ExactReference`.

    φ⁴ at λ = 0 with m² > 0 (standard form; hopping form with κ < 1/(2d), mapped by φ = √κ ϕ,
    m² = 1/κ − 2d, so G_hop = G/κ): <m²> = χ₂/V, χ₂ = 1/(2m²), <|m|> = sqrt(2<m²>/π) (m is
    Gaussian), U = 0, <S>/V = 1/2, G(y), C(t), m_eff = arccosh(1 + m²/2), ξ₂ = 1/m.
    U(1) Wilson action in 2D: <cos P>, <Q²>, χ_t, W(R,T) and Creutz ratios on the torus.
    """
    lattice = tuple(int(n) for n in lattice)
    try:
        action = action_from_table(dict(action_params))
    except LatticeflowError:
        return ExactReference()
    if isinstance(action, U1Wilson):
        return _u1_reference(action.beta, lattice, wilson_max)
    if isinstance(action, Phi4) and action.lam == 0.0 and action.m2 > 0.0:
        return _free_reference(action.m2, 1.0, lattice, f"free field, m² = {action.m2:g}")
    if isinstance(action, Phi4Hopping) and action.lam == 0.0:
        m2 = 1.0 / action.kappa - 2 * len(lattice)
        if m2 > 0.0:
            return _free_reference(m2, action.kappa, lattice,
                                   f"free field, κ = {action.kappa:g} (m² = {m2:g})")
    return ExactReference()


def _free_reference(m2: float, kappa: float, lattice: tuple[int, ...], description: str
                    ) -> ExactReference:
    """Free-field values for the field φ/√κ (κ = 1: standard form)."""
    volume = math.prod(lattice)
    chi2 = exact_results.free_susceptibility(lattice, m2) / kappa
    m_squared = chi2 / volume
    scalars = {"abs_magnetization": math.sqrt(2.0 * m_squared / math.pi),
               "magnetization_squared": m_squared, "chi2": chi2, "binder": 0.0,
               "action_density": 0.5}
    return ExactReference(
        description=description, scalars=scalars,
        g=exact_results.free_two_point(lattice, m2) / kappa,
        c=exact_results.free_zero_momentum_correlator(lattice, m2) / kappa,
        m_eff=exact_results.free_mass(m2), xi2=1.0 / math.sqrt(m2))


def _u1_reference(beta: float, lattice: tuple[int, ...], wilson_max: int | None
                  ) -> ExactReference:
    if len(lattice) != 2:
        return ExactReference()
    shape = (lattice[0], lattice[1])
    cap = wilson_max if wilson_max is not None else max(lattice)
    rmax, tmax = max(1, min(shape[0] // 2, cap)), max(1, min(shape[1] // 2, cap))
    wilson = np.array([[exact_results.u1_wilson_loop(beta, shape, r, t)
                        for t in range(1, tmax + 1)] for r in range(1, rmax + 1)])
    padded = np.ones((rmax + 1, tmax + 1))
    padded[1:, 1:] = wilson
    creutz = obs.creutz_ratio_table(torch.as_tensor(padded)).numpy()
    plaq = exact_results.u1_mean_plaquette(beta, shape)
    scalars = {"plaquette": plaq, "wilson_loop_1x1": plaq,
               "topological_charge_squared": exact_results.u1_mean_q2(beta, shape),
               "topological_susceptibility": exact_results.u1_topological_susceptibility(
                   beta, shape)}
    if rmax >= 2 and tmax >= 2:
        scalars["wilson_loop_2x2"] = float(wilson[1, 1])
    return ExactReference(description=f"2D U(1), β = {beta:g}, exact on the "
                                      f"{shape[0]}×{shape[1]} torus",
                          scalars=scalars, wilson=wilson, creutz=creutz)


# --------------------------------------------------------------------------------------------
# Summaries and comparison
# --------------------------------------------------------------------------------------------


def observables_record(result: AnalysisResult) -> dict[str, Any]:
    """The JSON record of ``analysis/observables.py``: ``{"n", "sampler", "acceptance",
    "observables": {NAME: {"value", "error", "tau_int", "tau_int_error"}}}``."""
    return {"n": result.n, "sampler": result.sampler, "acceptance": result.acceptance,
            "observables": {name: o.as_dict() for name, o in result.observables.items()}}


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
