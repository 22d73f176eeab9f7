"""What is measured on a 2D U(1) ensemble: plaquette, topology and Wilson loops.

Conventions
-----------
* Links ``(2, L0, L1)``: ``plaquette`` <cos P>, ``topological_charge_squared`` <Q²> with Q
  rounded to the nearest integer, ``topological_susceptibility`` <Q²>/V, ``wilson_loop_1x1``
  and ``wilson_loop_2x2`` (R along axis 0, T along axis 1; 2x2 needs L0, L1 ≥ 4).
* Wilson loops W(R,T), 1 ≤ R ≤ L0/2, 1 ≤ T ≤ L1/2, are cos of the sum of the enclosed
  plaquette angles (2D Stokes; equal to :func:`latticeflow.observables.wilson_loop`), computed
  from a periodic summed-area table (:func:`wilson_loops`); Creutz ratios
  χ(R,T) = −log[W(R,T)W(R−1,T−1)/(W(R,T−1)W(R−1,T))] with W(0,·) = W(·,0) = 1; errors by
  jackknife over bins.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from latticeflow import observables as obs
from latticeflow.base.errors import LatticeflowError
from latticeflow.lattice import plaquette
from latticeflow.measure.estimates import _copies, _jackknife_errors, gamma_observable
from latticeflow.measure.results import ObservableResult, TopologyResult, WilsonResult

log = logging.getLogger(__name__)

U1_OBSERVABLES = ("plaquette", "topological_charge_squared", "topological_susceptibility",
                  "wilson_loop_1x1", "wilson_loop_2x2")
_Q_TOLERANCE = 1e-3         # allowed distance of a raw topological charge from an integer


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
