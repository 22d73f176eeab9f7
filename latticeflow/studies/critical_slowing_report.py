"""Reporting the critical-slowing study (:mod:`latticeflow.studies.critical_slowing`): the fit
of the dynamic exponent, the markdown table, the JSON records and the figure.

Dynamic exponent: τ_int ∝ L^z, fitted by weighted least squares of log τ_int = a + z log L
with σ(log τ_int) = σ(τ_int)/τ_int; the error of z is the fit's (covariance) error, scaled by
sqrt(χ²/dof) when that exceeds 1 (three or more sizes). For HMC it is fitted to τ_int in
trajectories (as plotted) and, in the JSON, in molecular-dynamics time (τ_int × trajectory
length, the usual definition of z for HMC).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latticeflow.studies.critical_slowing import SAMPLERS, SizePoint, SlowingSettings
from latticeflow.studies.sampler_race import format_estimate as fmt


@dataclass(frozen=True)
class ExponentFit:
    """τ ≈ amplitude · L^z, with the error of z; ``n`` sizes."""

    z: float
    z_error: float
    amplitude: float
    n: int


def fit_exponent(sizes: Sequence[float], tau: Sequence[float], tau_error: Sequence[float]
                 ) -> ExponentFit | None:
    """Weighted least squares on log–log axes (module docstring); None with < 2 sizes.
    Non-finite or non-positive errors count as 10 % relative errors."""
    x, y = np.log(np.asarray(sizes, float)), np.asarray(tau, float)
    if len(x) < 2 or len(set(x)) < 2 or not np.all(y > 0):
        return None
    err = np.asarray(tau_error, float)
    sigma = np.where(np.isfinite(err) & (err > 0), err / y, 0.1)
    design = np.stack([np.ones_like(x), x], axis=1) / sigma[:, None]
    covariance = np.linalg.inv(design.T @ design)
    a, z = covariance @ design.T @ (np.log(y) / sigma)
    dof = len(x) - 2
    scale = 1.0
    if dof > 0:
        chi2 = float(np.sum(((np.log(y) - a - z * x) / sigma) ** 2))
        scale = max(1.0, math.sqrt(chi2 / dof))
    return ExponentFit(float(z), float(math.sqrt(covariance[1, 1]) * scale), float(math.exp(a)),
                       len(x))


def exponent_fits(points: Sequence[SizePoint]) -> dict[str, ExponentFit | None]:
    """z of every sampler's τ_int(m²) in rows, and HMC's in molecular-dynamics time."""
    sizes = [p.L for p in points]
    fits: dict[str, ExponentFit | None] = {}
    for name in SAMPLERS:
        m2 = [p.results[name].m2 for p in points]
        fits[name] = fit_exponent(sizes, [e.tau_int for e in m2], [e.tau_int_error for e in m2])
    hmc = [(p.results["hmc"].m2, p.tuning.trajectory_length) for p in points]
    fits["hmc_md_time"] = fit_exponent(sizes, [e.tau_int * t for e, t in hmc],
                                       [e.tau_int_error * t for e, t in hmc])
    return fits


def records(points: Sequence[SizePoint], settings: SlowingSettings) -> dict[str, Any]:
    """Everything the study measured, JSON-ready."""
    fits = exponent_fits(points)
    out = []
    for p in points:
        t = p.trained
        out.append({
            "L": p.L, "recipe": str(t.path), "action": t.recipe.action().params(),
            "checkpoint": str(t.checkpoint), "training_s": t.training_s,
            "training_chain_s": t.training_chain_s, "hmc_tuning": p.tuning.to_dict(),
            "reference": p.reference,
            "results": {name: r.to_dict() | {"pull_abs_m": p.pull(name, "abs_m"),
                                             "pull_chi2": p.pull(name, "chi2")}
                        for name, r in p.results.items()},
            "speedup_chi2": p.speedup, "break_even_independent_chi2": p.break_even})
    return {"settings": vars(settings),
            "fits": {k: (vars(v) if v else None) for k, v in fits.items()}, "points": out}


def _z(fit: ExponentFit | None) -> str:
    return "—" if fit is None else f"{fit.z:.2f} ± {fit.z_error:.2f}"


def markdown_table(points: Sequence[SizePoint]) -> str:
    """The study's table; '≥' marks τ_int and costs that are lower bounds (not reliable)."""
    fits = exponent_fits(points)
    lines = ["Critical slowing down, 2D φ⁴ on the line m² = −4, m_p·L = 4: tuned HMC against "
             "neural MCMC at equal sampling wall time per L. τ_int in rows (HMC: trajectories;"
             " NMCMC: proposals); pull against the long HMC reference.", "",
             "| L | sampler | chains | rows | wall s | acc. | ⟨\\|m\\|⟩ | pull | χ₂ | pull "
             "| τ_int(\\|m\\|) | τ_int(m²) | cost/indep. χ₂ [s] | HMC/NMCMC | training s "
             "| break-even N* |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        for name in SAMPLERS:
            r = p.results[name]
            b1 = "" if r.abs_m.reliable else "≥ "
            b2 = "" if r.m2.reliable else "≥ "
            nm = name == "nmcmc"
            ratio = (("" if p.results["hmc"].m2.reliable else "≥ ") + f"{p.speedup:.3g}"
                     if nm else "")
            train = f"{p.trained.training_total_s:.0f}" if nm else ""
            even = ("never" if math.isinf(p.break_even) else f"{p.break_even:.3g}") if nm else ""
            lines.append(
                f"| {p.L} | {name} | {r.chains} | {r.rows} | {r.wall_s:.3g} "
                f"| {r.acceptance:.3f} | {fmt(r.abs_m.value, r.abs_m.error)} "
                f"| {p.pull(name, 'abs_m'):+.1f} | {fmt(r.chi2.value, r.chi2.error)} "
                f"| {p.pull(name, 'chi2'):+.1f} "
                f"| {b1}{fmt(r.abs_m.tau_int, r.abs_m.tau_int_error)} "
                f"| {b2}{fmt(r.m2.tau_int, r.m2.tau_int_error)} | {b2}{r.cost_chi2:.3g} "
                f"| {ratio} | {train} | {even} |")
    lines += ["", f"Dynamic exponent of HMC, τ_int(m²) ∝ L^z: z = {_z(fits['hmc'])} in "
              f"trajectories, {_z(fits['hmc_md_time'])} in molecular-dynamics time. HMC "
              "settings per L (chains, τ, ε) are in the JSON, with the throughput and pilot "
              "scans."]
    return "\n".join(lines)


def plot(points: Sequence[SizePoint], path: str | Path) -> Path:
    """τ_int(m²) and the cost per independent χ₂ sample against L (log–log, both samplers;
    open markers: lower bounds), with HMC's fitted L^z line."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    figure = Figure(figsize=(9, 4), layout="constrained")
    tau_ax, cost_ax = figure.subplots(1, 2)
    styles = {"hmc": ("C0", "s", "HMC"), "nmcmc": ("C3", "o", "neural MCMC")}
    sizes = np.array([p.L for p in points], float)
    fits = exponent_fits(points)
    for name, (color, marker, label) in styles.items():
        runs = [p.results[name] for p in points]
        fit = fits[name]
        tau_label = label if fit is None or name != "hmc" else f"{label}, z = {_z(fit)}"
        for ax, values, errors, text in (
                (tau_ax, [r.m2.tau_int for r in runs], [r.m2.tau_int_error for r in runs],
                 tau_label),
                (cost_ax, [r.cost_chi2 for r in runs], None, label)):
            ax.plot(sizes, values, "-", color=color, label=text, alpha=0.6)
            for i, (L, value, r) in enumerate(zip(sizes, values, runs, strict=True)):
                err = errors[i] if errors is not None and math.isfinite(errors[i]) else None
                ax.errorbar(L, value, yerr=err, fmt=marker, color=color,
                            markerfacecolor=color if r.m2.reliable else "none")
        if name == "hmc" and fit is not None:
            grid = np.geomspace(sizes.min(), sizes.max(), 50)
            tau_ax.plot(grid, fit.amplitude * grid**fit.z, ":", color=color)
    tau_ax.set_ylabel("τ_int(m²) [rows]")
    cost_ax.set_ylabel("seconds per independent χ₂ sample")
    for ax in (tau_ax, cost_ax):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes, [f"{L:g}" for L in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("L")
        ax.grid(alpha=0.3, which="both")
        ax.legend(title="open marker: lower bound", fontsize=8, title_fontsize=8)
    figure.savefig(path, dpi=90)
    return Path(path)


__all__ = ["ExponentFit", "exponent_fits", "fit_exponent", "markdown_table", "plot", "records"]
