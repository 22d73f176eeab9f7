"""Figures of an ensemble analysis (matplotlib, Agg canvas, no pyplot state): Monte Carlo
histories, autocorrelation ρ(t) and τ_int(W) with the chosen window, topological-charge
histogram, φ⁴ correlators with the effective mass, Wilson loops and Creutz ratios, and the
comparison of several ensembles.

Every ``plot_*`` function takes results of :mod:`latticeflow.measure`, writes one PNG to
``path`` and returns the path. Lattice distances are in lattice units (a = 1); Monte Carlo time
is the row index within a chain.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from latticeflow.measure import (
    HISTORY_LABELS,
    AnalysisResult,
    Comparison,
    ObservableResult,
)

MAX_CHAINS_DRAWN = 6
DPI = 110
_EXACT_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1.2}
#: exact scalar that a history series fluctuates around (history name → observable name)
_HISTORY_EXACT = {"m2": "magnetization_squared", "action_density": "action_density",
                  "plaquette": "plaquette", "wilson_loop_2x2": "wilson_loop_2x2"}


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    figure.savefig(path, dpi=DPI)
    return path


def describe(result: AnalysisResult) -> str:
    """One-line description: label, theory and parameters, lattice, sampler, rows."""
    params = ", ".join(f"{k} = {v:g}" if isinstance(v, int | float) else f"{v}"
                       for k, v in result.action_params.items()
                       if k not in ("theory", "description"))
    theory = {"phi4": "φ⁴", "u1": "U(1)"}.get(result.theory, result.theory)
    lattice = "×".join(str(n) for n in result.lattice)
    chains = f", {result.n_chains} chains" if result.n_chains > 1 else ""
    return (f"{result.label}: {theory} ({params}), {lattice}, {result.sampler}, "
            f"N = {result.n}{chains}")


def _grid(figure: Figure, n: int, columns: int) -> list[Axes]:
    rows = math.ceil(n / columns)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for extra in axes[n:]:
        extra.set_visible(False)
    return list(axes[:n])


# --------------------------------------------------------------------------------------------
# Histories and autocorrelation
# --------------------------------------------------------------------------------------------


def plot_histories(result: AnalysisResult, path: str | os.PathLike) -> Path:
    """Monte Carlo history of every series in ``result.histories`` (one colour per chain, at
    most :data:`MAX_CHAINS_DRAWN`), the thermalization rows shaded, and the distribution of the
    analysed rows beside it; the exact value as a dashed line where known."""
    names = [n for n in HISTORY_LABELS if n in result.histories
             and not all(np.isnan(h).all() for h in result.histories[n])]
    figure = _figure(11, 2.4 * len(names) + 0.6)
    grid = figure.add_gridspec(len(names), 2, width_ratios=(5, 1))
    shown = min(result.n_chains, MAX_CHAINS_DRAWN)
    legend: dict[str, Any] = {}
    for row, name in enumerate(names):
        ax = figure.add_subplot(grid[row, 0])
        side = figure.add_subplot(grid[row, 1], sharey=ax)
        chains = result.histories[name]
        for c in range(shown):
            ax.plot(np.arange(len(chains[c])), chains[c], linewidth=0.6, alpha=0.8,
                    label=f"chain {c}" if result.n_chains > 1 else None)
        if result.thermalization:
            ax.axvspan(0, result.thermalization, color="0.85", zorder=0,
                       label=f"thermalization (K = {result.thermalization})")
        kept = np.concatenate([h[result.thermalization:] for h in chains])
        side.hist(kept, bins=40, orientation="horizontal", density=True, color="tab:blue",
                  alpha=0.7)
        exact = result.exact.scalars.get(_HISTORY_EXACT.get(name, ""))
        if exact is not None:
            ax.axhline(exact, **_EXACT_STYLE, label="exact")
            side.axhline(exact, **_EXACT_STYLE)
        ax.set_ylabel(HISTORY_LABELS[name])
        ax.set_xlabel("Monte Carlo time (row within chain)")
        side.set_xlabel("density (analysed rows)")
        side.tick_params(labelleft=False)
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(text, handle)
    note = f" (first {shown} of {result.n_chains} chains)" if shown < result.n_chains else ""
    figure.suptitle(f"Monte Carlo histories{note}\n{describe(result)}")
    if legend:
        figure.legend(legend.values(), legend.keys(), loc="outside lower center",
                      ncols=min(len(legend), 8), fontsize="small")
    return _save(figure, path)


def _selected(result: AnalysisResult, names: Sequence[str] | None) -> list[ObservableResult]:
    chosen = list(result.observables) if names is None else list(names)
    return [result.observables[n] for n in chosen if n in result.observables]


def _lag_range(o: ObservableResult) -> int:
    """Largest lag / window shown: a few windows, at least 10, within what was computed."""
    return int(min(len(o.gamma.rho) - 1, max(4 * o.gamma.window, 10)))


def _panels(result: AnalysisResult, names: Sequence[str] | None
            ) -> tuple[Figure, list[tuple[Axes, ObservableResult]]]:
    """A figure with one panel per selected observable (three per row) and the pairs
    (panel, observable)."""
    selected = _selected(result, names)
    columns = min(3, len(selected))
    figure = _figure(4.2 * columns, 3.3 * math.ceil(len(selected) / columns) + 0.5)
    return figure, list(zip(_grid(figure, len(selected), columns), selected, strict=True))


def plot_autocorrelation(result: AnalysisResult, path: str | os.PathLike,
                         names: Sequence[str] | None = None) -> Path:
    """Normalised autocorrelation ρ(t) = Γ(t)/Γ(0) per observable, the Γ-method window W
    marked (for derived observables: ρ of the linearised, projected series)."""
    figure, panels = _panels(result, names)
    for ax, o in panels:
        t_max = _lag_range(o)
        lags = np.arange(t_max + 1)
        ax.axhline(0.0, color="0.5", linewidth=0.8)
        ax.plot(lags, o.gamma.rho[: t_max + 1], "o-", markersize=3, label="ρ(t)")
        ax.axvline(o.gamma.window, color="tab:red", linestyle=":",
                   label=f"window W = {o.gamma.window}")
        ax.set_xlabel("lag t (rows)")
        ax.set_ylabel("ρ(t)")
        ax.set_title(f"{o.name}\nτ_int = {o.tau_int:.3g} ± {o.tau_int_error:.2g}",
                     fontsize="medium")
        ax.legend(fontsize="small")
    figure.suptitle(f"Normalised autocorrelation\n{describe(result)}")
    return _save(figure, path)


def plot_tau_int(result: AnalysisResult, path: str | os.PathLike,
                 names: Sequence[str] | None = None) -> Path:
    """τ_int(W) = 1/2 + Σ_{t≤W} ρ(t) per observable with the Madras–Sokal error band
    2τ(W)·sqrt((W + 1/2 − τ(W))/N), the chosen window and its τ_int marked."""
    figure, panels = _panels(result, names)
    for ax, o in panels:
        w_max = _lag_range(o)
        windows = np.arange(w_max + 1)
        curve = o.gamma.tau_int_curve[: w_max + 1]
        band = 2.0 * np.abs(curve) * np.sqrt(np.clip(windows + 0.5 - curve, 0.0, None)
                                             / o.gamma.n)
        ax.fill_between(windows, curve - band, curve + band, alpha=0.3, label="±1σ")
        ax.plot(windows, curve, "-", label="τ_int(W)")
        ax.axvline(o.gamma.window, color="tab:red", linestyle=":",
                   label=f"chosen W = {o.gamma.window}")
        ax.axhline(o.tau_int, color="tab:red", linewidth=0.8, alpha=0.6)
        ax.set_xlabel("summation window W (rows)")
        ax.set_ylabel("τ_int(W) (rows)")
        ax.set_title(f"{o.name}\nτ_int = {o.tau_int:.3g} ± {o.tau_int_error:.2g}",
                     fontsize="medium")
        ax.legend(fontsize="small", loc="lower right")
    figure.suptitle(f"Integrated autocorrelation time\n{describe(result)}")
    return _save(figure, path)


# --------------------------------------------------------------------------------------------
# Topology, correlators, Wilson loops
# --------------------------------------------------------------------------------------------


def plot_charge_histogram(result: AnalysisResult, path: str | os.PathLike) -> Path:
    """Topological charge: history of the first chains and histogram of the analysed rows in
    integer bins (binomial errors, no autocorrelation), with a Gaussian of variance <Q²>
    (exact where known, else measured) for orientation."""
    topology = result.topology
    if topology is None:
        raise ValueError("the result has no topological charge (not a U(1) ensemble?)")
    figure = _figure(11, 3.8)
    history, hist = figure.subplots(1, 2, width_ratios=(3, 2))
    for c, q in enumerate(topology.histories[:MAX_CHAINS_DRAWN]):
        history.step(np.arange(len(q)), q, where="post", linewidth=0.6,
                     label=f"chain {c}" if result.n_chains > 1 else None)
    if result.thermalization:
        history.axvspan(0, result.thermalization, color="0.85", zorder=0,
                        label="thermalization")
    history.set_xlabel("Monte Carlo time (row within chain)")
    history.set_ylabel("Q")
    history.yaxis.get_major_locator().set_params(integer=True)
    if history.get_legend_handles_labels()[0]:
        history.legend(fontsize="small", ncols=4, loc="lower left", bbox_to_anchor=(0.0, 1.0),
                       frameon=False)
    else:
        history.set_title("history")
    total = topology.counts.sum()
    p = topology.counts / total
    hist.bar(topology.charges, p, width=0.8, yerr=np.sqrt(p * (1 - p) / total), capsize=2,
             label=f"N = {total}", alpha=0.8)
    q2 = result.exact.scalars.get("topological_charge_squared")
    which = "exact"
    if q2 is None:
        q2, which = result.observables["topological_charge_squared"].value, "measured"
    if q2 and q2 > 0:
        grid = np.linspace(topology.charges.min() - 1, topology.charges.max() + 1, 200)
        hist.plot(grid, np.exp(-grid**2 / (2 * q2)) / math.sqrt(2 * math.pi * q2),
                  **_EXACT_STYLE, label=f"Gaussian, {which} <Q²> = {q2:.3g}")
    hist.set_xlabel("topological charge Q")
    hist.set_ylabel("probability")
    hist.xaxis.get_major_locator().set_params(integer=True)
    hist.set_title(f"histogram (max |Q − round Q| = {topology.max_non_integrality:.1e})")
    hist.legend(fontsize="small")
    figure.suptitle(f"Topological charge\n{describe(result)}")
    return _save(figure, path)


def _positive(values: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Mask of points drawable on a log axis, and the number left out."""
    keep = np.isfinite(values) & (values > 0)
    return keep, errors, int((~keep).sum())


def _log_panel(ax: Axes, x: np.ndarray, values: np.ndarray, errors: np.ndarray,
               exact: np.ndarray | None, label: str) -> None:
    keep, errors, dropped = _positive(values, errors)
    note = f" ({dropped} values ≤ 0 not shown)" if dropped else ""
    ax.errorbar(x[keep], values[keep], yerr=errors[keep], fmt="o", markersize=4, capsize=2,
                label=f"{label}{note}")
    if exact is not None:
        ax.plot(x, exact, **_EXACT_STYLE, label="exact (free field)")
    ax.set_yscale("log")
    ax.legend(fontsize="small")


def plot_correlators(result: AnalysisResult, path: str | os.PathLike) -> Path:
    """φ⁴: G_c(x, 0⃗) along axis 0 and C(t) on log scales, and the effective mass m_eff(t)
    with ξ₂; exact free-field curves where known. Error bars: jackknife over bins; points that
    cannot be drawn (≤ 0 on a log axis, undefined m_eff or error) are counted in the legend."""
    corr = result.correlators
    if corr is None:
        raise ValueError("the result has no correlators (not a φ⁴ ensemble, or "
                         "correlators=False)")
    exact = result.exact
    figure = _figure(14, 4.2)
    g_ax, c_ax, m_ax = figure.subplots(1, 3)
    origin_line = (slice(None),) + (0,) * (corr.g.ndim - 1)
    x = np.arange(corr.g.shape[0])
    _log_panel(g_ax, x, corr.g[origin_line], corr.g_error[origin_line],
               None if exact.g is None else exact.g[origin_line], "G_c(x, 0)")
    g_ax.set_xlabel("x (lattice units, axis 0)")
    g_ax.set_ylabel("G_c(x, 0)")
    g_ax.set_title("connected two-point function")
    t = np.arange(len(corr.c))
    _log_panel(c_ax, t, corr.c, corr.c_error, exact.c, "C(t)")
    c_ax.set_xlabel("t (lattice units)")
    c_ax.set_ylabel("C(t) = Σ_y G_c(t, y)")
    c_ax.set_title("zero-momentum correlator")
    t_eff = np.arange(1, len(corr.m_eff) + 1)
    finite = np.isfinite(corr.m_eff) & np.isfinite(corr.m_eff_error)
    hidden = int((~finite).sum())
    note = f" ({hidden} undefined, not shown)" if hidden else ""
    m_ax.errorbar(t_eff[finite], corr.m_eff[finite], yerr=corr.m_eff_error[finite], fmt="o",
                  markersize=4, capsize=2, label=f"m_eff(t){note}")
    if exact.m_eff is not None:
        m_ax.axhline(exact.m_eff, **_EXACT_STYLE,
                     label=f"exact arccosh(1 + m²/2) = {exact.m_eff:.4g}")
    xi = corr.xi2
    xi_text = f"ξ₂ = {xi.value:.4g} ± {xi.error:.2g}"
    if exact.xi2 is not None:
        xi_text += f" (exact {exact.xi2:.4g})"
    m_ax.set_xlabel("t (lattice units)")
    m_ax.set_ylabel("m_eff(t) (inverse lattice units)")
    m_ax.set_title(f"effective mass; {xi_text}", fontsize="medium")
    _clip_to_data(m_ax, corr.m_eff[finite], corr.m_eff_error[finite], exact.m_eff)
    m_ax.legend(fontsize="small", loc="best")
    for ax in (g_ax, c_ax, m_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
    figure.suptitle(f"Correlators ({corr.n_bins} jackknife bins of {corr.bin_rows} rows)\n"
                    f"{describe(result)}")
    return _save(figure, path)


def _clip_to_data(ax: Axes, values: np.ndarray, errors: np.ndarray, reference: float | None
                  ) -> None:
    """Keep the y range on the well-measured points: huge error bars of noisy points (large t)
    would otherwise flatten the plateau."""
    if values.size == 0:
        return
    good = np.isfinite(errors) & (errors < 0.2 * np.abs(values))
    if not good.any():
        return          # nothing well measured: show the honest (large) error bars
    pool = np.concatenate([values[good] - errors[good], values[good] + errors[good]])
    if reference is not None:
        pool = np.append(pool, reference)
    low, high = float(np.min(pool)), float(np.max(pool))
    pad = 0.25 * max(high - low, 0.05 * max(abs(high), 1e-12))
    ax.set_ylim(low - pad, high + pad)


def plot_wilson_loops(result: AnalysisResult, path: str | os.PathLike) -> Path:
    """U(1): W(R,T) against the area R·T on a log scale, and Creutz ratios χ(R,T); exact torus
    values as black crosses/line. Error bars: jackknife over bins."""
    wilson = result.wilson
    if wilson is None:
        raise ValueError("the result has no Wilson loops (not a U(1) ensemble, or "
                         "correlators=False)")
    exact = result.exact
    r, t = np.meshgrid(np.arange(1, wilson.rmax + 1), np.arange(1, wilson.tmax + 1),
                       indexing="ij")
    area = (r * t).ravel()
    figure = _figure(12, 4.4)
    w_ax, c_ax = figure.subplots(1, 2)
    _log_panel(w_ax, area, wilson.w.ravel(), wilson.w_error.ravel(), None, "W(R,T), all R, T")
    if exact.wilson is not None:
        positive = exact.wilson.ravel() > 0
        w_ax.plot(area[positive], exact.wilson.ravel()[positive], "x", color="black",
                  label="exact (torus)")
        w_ax.legend(fontsize="small")
    w_ax.set_xlabel("area R·T (lattice units²)")
    w_ax.set_ylabel("<W(R,T)>")
    w_ax.set_title("Wilson loops")
    diag = np.arange(1, min(wilson.rmax, wilson.tmax) + 1)
    values = np.array([wilson.creutz[k - 1, k - 1] for k in diag])
    errors = np.array([wilson.creutz_error[k - 1, k - 1] for k in diag])
    finite = np.isfinite(values) & np.isfinite(errors)
    c_ax.errorbar(diag[finite], values[finite], yerr=errors[finite], fmt="o", capsize=2,
                  markersize=4, label="χ(R,R)")
    if exact.creutz is not None:
        c_ax.plot(diag, [exact.creutz[k - 1, k - 1] for k in diag], **_EXACT_STYLE,
                  label="exact (torus)")
    c_ax.set_xlabel("R = T (lattice units)")
    c_ax.xaxis.get_major_locator().set_params(integer=True)
    c_ax.set_ylabel("Creutz ratio χ(R,R)")
    c_ax.set_title("Creutz ratios (string tension estimate)")
    _clip_to_data(c_ax, values[finite], errors[finite], None)
    if not finite.any():
        c_ax.text(0.5, 0.5, "no finite Creutz ratio:\nW(R,T) compatible with 0", ha="center",
                  va="center", transform=c_ax.transAxes)
    if c_ax.get_legend_handles_labels()[0]:
        c_ax.legend(fontsize="small")
    figure.suptitle(f"Wilson loops ({wilson.n_bins} jackknife bins of {wilson.bin_rows} rows)\n"
                    f"{describe(result)}")
    return _save(figure, path)


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


def plot_comparison(comparison: Comparison, path: str | os.PathLike) -> Path:
    """One panel per observable: value ± error of every ensemble divided by the first
    ensemble's value (raw values when the first is compatible with zero), the first's error
    band shaded, the exact value dashed, and each deviation from the first in σ."""
    n_obs, n_ens = comparison.values.shape
    columns = min(3, n_obs)
    figure = _figure(max(4.0, 1.1 * n_ens + 2.2) * columns,
                     3.3 * math.ceil(n_obs / columns) + 0.9)
    x = np.arange(n_ens)
    for i, ax in enumerate(_grid(figure, n_obs, columns)):
        name = comparison.names[i]
        first, first_error = comparison.values[i, 0], comparison.errors[i, 0]
        relative = math.isfinite(first) and abs(first) > 2 * first_error and first != 0
        scale = abs(first) if relative else 1.0
        values, errors = comparison.values[i] / scale, comparison.errors[i] / scale
        ax.axhspan((first - first_error) / scale, (first + first_error) / scale, color="0.85",
                   zorder=0, label=f"{comparison.labels[0]} ±1σ")
        ax.errorbar(x, values, yerr=errors, fmt="o", capsize=3, markersize=5)
        exact = comparison.exact.get(name)
        if exact is not None:
            ax.axhline(exact / scale, **_EXACT_STYLE, label="exact")
        for j in range(1, n_ens):
            dev = comparison.deviations[i, j]
            if math.isfinite(dev):
                ax.annotate(f"{dev:+.1f}σ", (x[j], values[j]), textcoords="offset points",
                            xytext=(6, 4), fontsize="small")
        ax.set_xticks(x, comparison.labels, rotation=20 if n_ens > 3 else 0, ha="right"
                      if n_ens > 3 else "center")
        ax.set_xlim(-0.5, n_ens - 0.5)
        ax.set_ylabel(f"value / |{comparison.labels[0]}|" if relative else "value")
        ax.set_title(name, fontsize="medium")
        ax.legend(fontsize="small", loc="best")
    figure.suptitle("Comparison with the first ensemble (deviation in units of the combined "
                    "error)")
    return _save(figure, path)


def standard_plots(result: AnalysisResult, directory: str | os.PathLike,
                   autocorrelation: bool = False) -> list[Path]:
    """Write the plots that apply to ``result`` into ``directory``: histories, and correlators
    (φ⁴) or topological charge and Wilson loops (U(1)) when present; with ``autocorrelation``
    also ρ(t) and τ_int(W). Creates ``directory`` if needed; returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = [plot_histories(result, directory / "histories.png")]
    if autocorrelation:
        written.append(plot_autocorrelation(result, directory / "autocorrelation.png"))
        written.append(plot_tau_int(result, directory / "tau_int.png"))
    if result.correlators is not None:
        written.append(plot_correlators(result, directory / "correlators.png"))
    if result.topology is not None:
        written.append(plot_charge_histogram(result, directory / "topological_charge.png"))
    if result.wilson is not None:
        written.append(plot_wilson_loops(result, directory / "wilson_loops.png"))
    return written
