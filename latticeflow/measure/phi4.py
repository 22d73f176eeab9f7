"""What is measured on a φ⁴ ensemble, and how it is reduced to observables and correlators.

Conventions
-----------
* Field ``(L0, L1, ...)``, V sites, m = (1/V)Σ_x φ(x); for the hopping form this is the
  hopping field ϕ: ``abs_magnetization`` <|m|>, ``magnetization_squared`` <m²>, ``chi2`` =
  V(<m²> − <m>²), ``binder`` = 1 − <m⁴>/(3<m²>²), ``action_density`` = <S>/V with S taken from
  the file's ``/action`` (by the driver). chi2 and binder are functions of means (``derived``
  in gamma_method).
* Correlators: G_c(y) = <G_i(y)> − <m>² with G_i(y) = (1/V)Σ_x φ(x)φ(x+y); C(t) = Σ_{y⃗} G_c(t, y⃗)
  (t along axis 0); m_eff(t) = arccosh[(C(t−1) + C(t+1))/(2C(t))] for t = 1 … L0−2; values
  are these functions of the mean over all binned rows, errors by jackknife over bins of at
  least ``6 τ_int,max`` rows (τ_int,max: the largest τ_int of the observable set). The
  second-moment correlation length ξ₂ = sqrt[(G̃(0)/G̃(p) − 1)/p̂²], p = 2π/L0 along axis 0,
  p̂² = 4 sin²(π/L0), is a Γ-method derived quantity of the per-config means m, m² and
  G̃_i(p) = |φ̃(p)|²/V (so its error includes autocorrelations).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from latticeflow import observables as obs
from latticeflow.measure.estimates import _copies, _jackknife_errors, _stack, gamma_observable
from latticeflow.measure.results import CorrelatorResult, ObservableResult

PHI4_OBSERVABLES = ("abs_magnetization", "magnetization_squared", "chi2", "binder",
                    "action_density")


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
