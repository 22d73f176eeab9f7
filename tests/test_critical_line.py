"""The line of constant physics (studies/critical_line.py): pole mass and the λ solve."""

import math

import numpy as np
import pytest

from latticeflow.exact import free_mass, free_zero_momentum_correlator
from latticeflow.studies.critical_line import (
    PoleMass,
    measure_pole_mass,
    pole_mass_from_series,
    solve_line,
)


def test_pole_mass_of_an_exact_cosh_correlator():
    # Rows [m, C_full(t)] whose mean is the exact free correlator: the estimate is its mass.
    L, m2 = 16, 0.3
    c = free_zero_momentum_correlator((L, L), m2)
    rng = np.random.default_rng(0)
    rows = np.concatenate([np.zeros((40, 1)), c + 1e-9 * rng.standard_normal((40, L))], axis=1)
    value, error = pole_mass_from_series(rows, L)
    assert value == pytest.approx(free_mass(m2), rel=1e-6)
    assert error < 1e-6


def test_hmc_pole_mass_of_the_free_field():
    # An independent exact result: the free field's C(t) is a pure cosh of mass arccosh(1 + m²/2).
    L, m2 = 8, 0.5
    result = measure_pole_mass(m2, 0.0, L, trajectories=400, n_chains=32, n_therm=50, seed=3)
    exact = free_mass(m2)
    assert abs(result.m_p - exact) < 4 * result.error, (result.m_p, result.error, exact)
    assert result.error < 0.05 * exact
    assert 0.6 < result.acceptance <= 1


def _point(lam, mpl, error):
    return PoleMass(-4.0, lam, 8, mpl / 8, error / 8, 1.0, 0.8, 100, 4, 1.0)


def test_solve_line_inverts_a_linear_relation():
    points = [_point(lam, 4 + 2 * (lam - 6), 0.05) for lam in (5.8, 6.0, 6.2)]
    lam, error = solve_line(points)
    assert lam == pytest.approx(6.0, abs=1e-12)
    # Three points of error 0.05 at spacing 0.2 with slope 2: σ(λ*) = σ(intercept at 6)/2.
    assert error == pytest.approx(0.05 / math.sqrt(3) / 2, rel=1e-6)
