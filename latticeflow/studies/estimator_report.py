"""The outputs of the estimator study: summaries over seeds, the markdown tables of
``results.md``, the figures, ``results.json`` and :func:`write_outputs`, which writes them all.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from latticeflow.script_support import write_json
from latticeflow.studies.estimator_runs import RunRecord, StudyResult
from latticeflow.studies.estimators import VARIANCE_PROBES, TheorySetup

_COLORS = {"reverse-standard": "tab:blue", "reverse-droppath": "tab:orange",
           "reverse-fastpath": "tab:green", "forward-standard": "tab:blue",
           "forward-fastpath": "tab:green"}
_DPI = 110


# ------------------------------------------------------------------------------ summaries
def _spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (NaN for one value), min and max."""
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else math.nan,
            "min": float(v.min()), "max": float(v.max())}


def _speed(records: list[RunRecord]) -> dict[str, Any]:
    steps = [r.steps[-1] for r in records]
    train = [r.train_time for r in records]
    return {"steps": _spread(steps),
            "ms_per_step": 1e3 * sum(train) / sum(steps),
            "cpu_ms_per_step": 1e3 * sum(r.cpu_time for r in records) / sum(steps),
            "median_ms_per_step": 1e3 * float(np.median([r.step_time_median for r in records])),
            "steps_per_s": sum(steps) / sum(train),
            "skipped_steps": sum(r.skipped_steps for r in records)}


def _at_time(record: RunRecord, values: list[float], t: float) -> float:
    return float(np.interp(t, record.times, values))


def reverse_summary(result: StudyResult) -> list[dict[str, Any]]:
    """One row per theory and reverse estimator: speed, ESS and gradient variance."""
    rows = []
    half = result.config.reverse.budget_s / 2
    for theory, grouped in result.reverse.items():
        for estimator, records in grouped.items():
            rows.append({
                "theory": theory, "estimator": estimator, "seeds": len(records),
                **_speed(records),
                "ess_final": _spread([r.ess[-1] for r in records]),
                "ess_half_budget": _spread([_at_time(r, r.ess, half) for r in records]),
                "ess_best": _spread([max(r.ess) for r in records]),
                **{f"variance_{label}_final": _spread([getattr(r, f"variance_{label}")[-1]
                                                       for r in records])
                   for label in VARIANCE_PROBES},
            })
    return rows


def forward_summary(result: StudyResult) -> list[dict[str, Any]]:
    """One row per theory, training-set size and forward estimator (final values)."""
    rows = []
    for theory, by_size in result.forward.items():
        for n_train, grouped in by_size.items():
            for estimator, records in grouped.items():
                gap = [r.kl_held_out[-1] - r.kl_train[-1] for r in records]
                rows.append({
                    "theory": theory, "n_train": n_train, "estimator": estimator,
                    "seeds": len(records), **_speed(records),
                    "ess_final": _spread([r.ess[-1] for r in records]),
                    "forward_ess_final": _spread([r.forward_ess[-1] for r in records]),
                    "kl_train_final": _spread([r.kl_train[-1] for r in records]),
                    "kl_held_out_final": _spread([r.kl_held_out[-1] for r in records]),
                    "kl_held_out_best": _spread([min(r.kl_held_out) for r in records]),
                    "generalisation_gap": _spread(gap),
                })
    return rows


def _fmt(s: dict[str, float], digits: int = 3) -> str:
    """``mean ± std [min, max]`` (without the spread for a single seed)."""
    if math.isnan(s["std"]):
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} [{s['min']:.{digits}f}, " \
           f"{s['max']:.{digits}f}]"


def _fmt_sci(s: dict[str, float]) -> str:
    return f"{s['mean']:.2e}" if math.isnan(s["std"]) else f"{s['mean']:.2e} ± {s['std']:.1e}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def reverse_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`reverse_summary`."""
    headers = ["theory", "estimator", "steps", "ms/step (wall)", "ms/step (CPU)", "steps/s",
               "ESS at ½ budget", "final ESS", "final Var[g] standard", "final Var[g] path"]
    return _table(headers, [[
        r["theory"], r["estimator"], f"{r['steps']['mean']:.0f}", f"{r['ms_per_step']:.1f}",
        f"{r['cpu_ms_per_step']:.1f}", f"{r['steps_per_s']:.1f}", _fmt(r["ess_half_budget"]),
        _fmt(r["ess_final"]), _fmt_sci(r["variance_standard_final"]),
        _fmt_sci(r["variance_path_final"])] for r in rows])


def forward_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`forward_summary`."""
    headers = ["theory", "N train", "estimator", "steps", "ms/step (wall)", "steps/s",
               "reverse ESS", "forward ESS (held-out)", "KL+logZ train", "KL+logZ held-out",
               "held-out − train"]
    return _table(headers, [[
        r["theory"], str(r["n_train"]), r["estimator"], f"{r['steps']['mean']:.0f}",
        f"{r['ms_per_step']:.1f}", f"{r['steps_per_s']:.1f}", _fmt(r["ess_final"]),
        _fmt(r["forward_ess_final"]), _fmt(r["kl_train_final"], 2),
        _fmt(r["kl_held_out_final"], 2), _fmt(r["generalisation_gap"], 2)] for r in rows])


def markdown_report(result: StudyResult, figures: Sequence[Path]) -> str:
    """``results.md``: setup, both tables, definitions and the figure list."""
    cfg, rev, fwd = result.config, result.config.reverse, result.config.forward
    setups = "\n".join(f"- {name}: {s.action!r} on {'x'.join(map(str, s.lattice))}, flow "
                       f"{s.architecture}, grad clip {s.grad_clip:g}"
                       for name, s in result.setups.items())
    hmc = "\n".join(f"- {name}: {d.describe()}" for name, d in result.hmc.items())
    return "\n".join([
        "# Estimator study", "",
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{platform.processor() or platform.machine()}; {cfg.dtype}; total runtime "
        f"{result.runtime_s:.0f} s.", "", setups, "",
        "## Reverse KL (equal wall-clock budgets, round-robin)", "",
        f"Budget {rev.budget_s:g} s of training per estimator and seed ({cfg.seeds} seeds), "
        f"interleaved in {rev.n_slices} slices; batch {rev.batch_size}, Adam lr {rev.lr:g} "
        f"(constant); ESS/N on a fixed batch of {rev.ess_batch} samples; Var[g] over "
        f"{rev.variance_batches} independent batches at the run's final parameters "
        f"(path = drop-in = fast path gradient). Values: mean ± sample std [min, max] over "
        f"seeds.", "",
        reverse_table(reverse_summary(result)), "",
        "## Forward KL (fixed HMC sets)", "",
        f"Budget {fwd.budget_s:g} s per estimator, set and seed ({fwd.seeds} seeds), "
        f"interleaved in {fwd.n_slices} slices; "
        f"batch {fwd.batch_size} drawn with replacement, Adam lr {fwd.lr:g}; held-out set "
        f"{fwd.held_out} configurations; KL+logZ = E_p[log w], log w = −S − log q, on the "
        f"held-out set and on the first {fwd.held_out} training configurations (a training "
        f"value below the held-out one means overfitting). Forward ESS = N² / (Σw · Σ1/w) on "
        f"the held-out set; reverse ESS = (Σw)² / (N Σw²) on {fwd.ess_batch} fresh flow "
        f"samples.", "", "HMC data:", hmc, "",
        forward_table(forward_summary(result)), "",
        "## Figures", "", *[f"- `{p.name}`" for p in figures], "",
    ])


# ------------------------------------------------------------------------------ figures
def _band(ax: Axes, x: np.ndarray, ys: np.ndarray, color: str, label: str | None,
          linestyle: str = "-") -> None:
    """Mean over seeds (rows of ``ys``) as a line with a dot at its end, min–max as a band."""
    ax.plot(x, ys.mean(0), color=color, linestyle=linestyle, label=label, lw=1.6, marker="o",
            ms=3.5, markevery=[len(x) - 1])
    if len(ys) > 1:
        ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=0.15, lw=0)


def _on_grid(records: list[RunRecord], x_of: Callable[[RunRecord], Sequence[float]],
             y_of: Callable[[RunRecord], Sequence[float]], n: int = 60
             ) -> tuple[np.ndarray, np.ndarray]:
    """Curves of several seeds interpolated onto a common grid (where all are defined)."""
    start = max(x_of(r)[0] for r in records)
    grid = np.linspace(start, max(start, min(x_of(r)[-1] for r in records)), n)
    return grid, np.array([np.interp(grid, x_of(r), y_of(r)) for r in records])


def _figure(n_rows: int, n_cols: int, height: float = 3.6) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(5.4 * n_cols, height * n_rows), layout="constrained")
    return fig, np.array(fig.subplots(n_rows, n_cols, squeeze=False))


def _title(setup: TheorySetup) -> str:
    params = ", ".join(f"{k} = {v:g}" for k, v in setup.action.params().items()
                       if isinstance(v, int | float))
    return f"{setup.name} ({params}), {'x'.join(map(str, setup.lattice))}"


def plot_reverse_ess(result: StudyResult, path: Path, against: str) -> Path:
    """ESS/N (log scale) against training wall time (``against="time"``) or step."""
    fig, axes = _figure(1, len(result.reverse))
    x_of = (lambda r: r.times) if against == "time" else (lambda r: r.steps)
    for ax, (theory, grouped) in zip(axes[0], result.reverse.items(), strict=True):
        for estimator, records in grouped.items():
            grid, ys = _on_grid(records, x_of, lambda r: r.ess)
            _band(ax, grid, ys, _COLORS[estimator], estimator)
        ax.set_yscale("log")
        ax.set(title=_title(result.setups[theory]), ylabel="ESS / N (fixed batch)",
               ylim=(None, 1.0),
               xlabel="training wall time [s]" if against == "time" else "training step")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Reverse KL: ESS/N\n(mean and min–max over {result.config.seeds} seeds)")
    fig.savefig(path, dpi=_DPI)
    return path


def plot_gradient_variance(result: StudyResult, path: Path) -> Path:
    """Var[g] of the standard (dashed) and path (solid) estimators along each run."""
    fig, axes = _figure(1, len(result.reverse), height=4.0)
    styles = {"standard": "--", "path": "-"}
    for ax, (theory, grouped) in zip(axes[0], result.reverse.items(), strict=True):
        for estimator, records in grouped.items():
            for label, style in styles.items():
                grid, ys = _on_grid(records, lambda r: r.variance_steps,
                                    lambda r, k=label: np.log10(getattr(r, f"variance_{k}")))
                _band(ax, grid, ys, _COLORS[estimator],
                      f"{estimator} run" if label == "path" else None, style)
        ax.plot([], [], "k--", label="standard gradient")
        ax.plot([], [], "k-", label="path gradient")
        ax.set(title=_title(result.setups[theory]), xlabel="training step",
               ylabel="log10 Var[g] (trace, one batch)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    rev = result.config.reverse
    fig.suptitle(f"Gradient variance at each run's parameters\n({rev.variance_batches} batches "
                 f"of {rev.batch_size}; mean and min–max over {result.config.seeds} seeds)")
    fig.savefig(path, dpi=_DPI)
    return path


def plot_forward_kl(result: StudyResult, path: Path) -> Path:
    """KL(p‖q) + log Z on training (dashed) and held-out (solid) data against step."""
    sizes = result.config.forward.train_sizes
    fig, axes = _figure(len(result.forward), len(sizes))
    for row, (theory, by_size) in zip(axes, result.forward.items(), strict=True):
        for ax, n_train in zip(row, sizes, strict=True):
            for estimator, records in by_size[n_train].items():
                for label, style, y_of in (("held-out", "-", lambda r: r.kl_held_out[1:]),
                                           ("train", "--", lambda r: r.kl_train[1:])):
                    grid, ys = _on_grid(records, lambda r: r.steps[1:], y_of)
                    _band(ax, grid, ys, _COLORS[estimator], f"{estimator}, {label}", style)
            ax.set(title=f"{_title(result.setups[theory])}, N train = {n_train}",
                   xlabel="training step", ylabel="KL(p‖q) + log Z  (E_p[log w])")
            ax.grid(alpha=0.3)
            ax.legend(loc="upper right", fontsize=7)
    fig.suptitle(f"Forward KL on training (dashed) and held-out (solid) HMC data\n(after the "
                 f"first measurement; mean and min–max over {result.config.forward.seeds} seeds)")
    fig.savefig(path, dpi=_DPI)
    return path


def write_figures(result: StudyResult, out: Path) -> list[Path]:
    """All PNGs of the study into ``out``."""
    figures = [plot_reverse_ess(result, out / "reverse_ess_vs_time.png", "time"),
               plot_reverse_ess(result, out / "reverse_ess_vs_step.png", "step"),
               plot_gradient_variance(result, out / "gradient_variance.png")]
    if result.forward:
        figures.append(plot_forward_kl(result, out / "forward_kl.png"))
    return figures


def result_json(result: StudyResult) -> dict[str, Any]:
    """Everything as JSON-ready data: config, setups, HMC data, summaries, raw records."""
    return {
        "config": asdict(result.config),
        "torch": str(torch.__version__), "threads": torch.get_num_threads(),
        "runtime_s": result.runtime_s,
        "theories": {name: s.describe() for name, s in result.setups.items()},
        "hmc": {name: d.describe() for name, d in result.hmc.items()},
        "summary": {"reverse": reverse_summary(result), "forward": forward_summary(result)},
        "reverse": {t: {e: [asdict(r) for r in rs] for e, rs in g.items()}
                    for t, g in result.reverse.items()},
        "forward": {t: {str(n): {e: [asdict(r) for r in rs] for e, rs in g.items()}
                        for n, g in by.items()} for t, by in result.forward.items()},
    }


def write_outputs(result: StudyResult, out: Path) -> list[Path]:
    """``results.md``, ``results.json`` and the PNGs into ``out``; returns their paths."""
    figures = write_figures(result, out)
    (out / "results.md").write_text(markdown_report(result, figures))
    write_json(out / "results.json", result_json(result))
    return [out / "results.md", out / "results.json", *figures]


__all__ = ["forward_summary", "forward_table", "markdown_report", "plot_forward_kl",
           "plot_gradient_variance", "plot_reverse_ess", "result_json", "reverse_summary",
           "reverse_table", "write_figures", "write_outputs"]
