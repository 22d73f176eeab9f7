"""Exact reference values for an analysed ensemble, where :mod:`latticeflow.exact` knows them
(the free φ⁴ field and 2D U(1) on the torus), in the layout of the analysis results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from latticeflow import exact as exact_results
from latticeflow import observables as obs
from latticeflow.base.errors import LatticeflowError
from latticeflow.measure.results import ExactReference
from latticeflow.theories import Phi4, Phi4Hopping, U1Wilson, action_from_table


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
