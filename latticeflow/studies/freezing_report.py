"""Tables, JSON records and the figure of the freezing study
(:mod:`latticeflow.studies.freezing`, whose docstring defines every column).

Markers: '≥' before τ_int and the cost marks a lower bound (the row is not ``reliable``); '~'
before a speed-up or N* marks a ratio built on at least one such bound. N* is printed '—' for
row (a) itself and 'never' when the row is not cheaper per independent Q² sample than (a).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from latticeflow.studies.freezing import LABELS, SAMPLERS, BetaPoint, speedup
from latticeflow.studies.sampler_race import format_estimate as fmt


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def records(points: Sequence[BetaPoint]) -> list[dict[str, Any]]:
    """JSON-ready rows: one per β and sampler, with the speed-up over (a) and N* against (a)
    (None for (a) itself; N* None also where it is infinite)."""
    out = []
    for point in points:
        for name, result in point.results.items():
            baseline = name == "hmc"
            out.append({**asdict(result), "label": LABELS[name], "pull": result.pull,
                        "recipe": point.recipe,
                        "training_total_s": result.training_total_s,
                        "speedup_vs_hmc": None if baseline else speedup(point, name),
                        "break_even_independent_q2": None if baseline
                        else _finite(point.break_even(name))})
    return out


def _training(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.3g}"


def markdown_table(points: Sequence[BetaPoint], lattice: tuple[int, int]) -> str:
    """The study's table (markdown), the HMC tuning per β and the notes (module docstring)."""
    lines = [f"Topological freezing, 2D U(1) on {lattice[0]}×{lattice[1]}: every sampler at "
             f"equal sampling wall time per β; N* = t_train / (c_(a) − c_row) independent Q² "
             f"samples, t_train the whole init_from lineage's training seconds.", "",
             "| β | sampler | row | rows | chains | wall s | acceptance | χ_t | exact χ_t | pull "
             "| τ_int(Q²) | cost / indep. Q² [s] | (a) / row | training s (own / lineage) "
             "| N* vs (a) | reliable |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for point in points:
        hmc = point.results["hmc"]
        for name in (s for s in SAMPLERS if s in point.results):
            r = point.results[name]
            bound = "" if r.reliable else "≥ "
            ratio = even = "—"
            if name != "hmc":
                loose = "" if r.reliable and hmc.reliable else "~"
                ratio = f"{loose}{speedup(point, name):.3g}"
                n_star = point.break_even(name)
                even = "never" if math.isinf(n_star) else f"{loose}{n_star:.3g}"
            lines.append(
                f"| {r.beta:g} | {name} | {LABELS[name]} | {r.rows} | {r.chains} | {r.wall_s:.0f} "
                f"| {r.acceptance:.3f} | {fmt(r.chi_t, r.chi_t_error)} | {r.chi_t_exact:.4g} "
                f"| {r.pull:+.1f} | {bound}{fmt(r.tau_int, r.tau_int_error)} "
                f"| {bound}{r.cost_per_independent_s:.3g} | {ratio} "
                f"| {_training(r.training_s)} / {_training(r.training_chain_s)} | {even} "
                f"| {'yes' if r.reliable else 'no'} |")
        t = point.hmc_tuning
        if t:
            notes.append(f"β = {point.beta:g}: HMC (a) {t['chains']} chains ({t['chains_reason']}),"
                         f" τ = {t['trajectory_length']:g}, ε = {t['step_size']:.4g}, "
                         f"tuning {t['seconds']:.0f} s, started from exact samples.")
        notes.extend(point.notes)
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else []))


STYLES = {"hmc": ("C0", "s"), "exact": ("k", "D"), "prior": ("C2", "^"), "nmcmc": ("C3", "o"),
          "haar": ("C1", "v")}


def plot(points: Sequence[BetaPoint], path: str | Path) -> Path:
    """τ_int(Q²) and the cost per independent Q² sample against β for every row (log scale;
    open markers are lower bounds), and at the largest β the Q history of every row against
    sampling time and their Q histograms."""
    from matplotlib.figure import Figure

    last = points[-1]
    present = [s for s in SAMPLERS if any(s in p.results for p in points)]
    shown = [s for s in present if s in last.results]
    figure = Figure(figsize=(10, 8), layout="constrained")
    grid = figure.add_gridspec(2, 2)
    tau_ax, cost_ax = figure.add_subplot(grid[0, 0]), figure.add_subplot(grid[0, 1])
    history = grid[1, 0].subgridspec(len(shown), 1, hspace=0.05)
    history_axes = [figure.add_subplot(history[0])]
    history_axes += [figure.add_subplot(history[i], sharex=history_axes[0])
                     for i in range(1, len(shown))]
    count_ax = figure.add_subplot(grid[1, 1])
    for name in present:
        color, marker = STYLES[name]
        rows = [(p.beta, p.results[name]) for p in points if name in p.results]
        betas = [b for b, _ in rows]
        for ax, values in ((tau_ax, [r.tau_int for _, r in rows]),
                           (cost_ax, [r.cost_per_independent_s for _, r in rows])):
            ax.plot(betas, values, "-", color=color, label=LABELS[name])
            for beta, value, (_, r) in zip(betas, values, rows, strict=True):
                ax.plot(beta, value, marker, color=color,
                        markerfacecolor=color if r.reliable else "none")
    tau_ax.set_ylabel("τ_int(Q²) [rows]")
    cost_ax.set_ylabel("seconds per independent Q² sample")
    for ax in (tau_ax, cost_ax):
        ax.set_yscale("log")
        ax.set_xlabel("β")
        ax.grid(alpha=0.3, which="both")
    tau_ax.legend(title="open marker: lower bound", fontsize=7, title_fontsize=7)
    for ax, name in zip(history_axes, shown, strict=True):
        color = STYLES[name][0]
        q = last.charges[name][:, 0]
        seconds = np.linspace(0, last.results[name].wall_s, len(q))
        ax.plot(seconds, q, lw=0.4, color=color, drawstyle="steps-post")
        ax.set_ylabel("Q", fontsize=7)
        ax.text(0.01, 0.9, f"{LABELS[name]}, chain 0", transform=ax.transAxes, va="top",
                fontsize=7, bbox={"facecolor": "white", "alpha": 0.8, "lw": 0})
        q_all = last.charges[name].ravel()
        edges = np.arange(q_all.min() - 0.5, q_all.max() + 1.5)
        count_ax.hist(q_all, bins=edges, density=True, histtype="step", lw=1.5, color=color,
                      label=LABELS[name])
    for ax in history_axes[:-1]:
        ax.tick_params(labelbottom=False)
    history_axes[-1].set_xlabel(f"sampling wall time [s] at β = {last.beta:g}")
    count_ax.set_xlabel(f"Q at β = {last.beta:g}")
    count_ax.set_ylabel("frequency")
    count_ax.legend(fontsize=7)
    figure.savefig(path, dpi=90)
    return Path(path)


__all__ = ["STYLES", "markdown_table", "plot", "records"]
