"""Benchmarks of training steps and sampling: seconds, memory and their scaling with L.

Times are medians over repeats after warm-up, with their inter-quartile range; the estimators
(and, with ``compile``, the eager and compiled variants) are interleaved within every repeat so
that slow drifts of a shared machine affect them alike, and every ratio is one of medians
measured in the same run. Compile time is measured on its own, before the repeats. Memory is the
peak device allocation on CUDA; on the CPU it is the size of the tensors autograd saves for the
backward pass (activation memory, deduplicated by storage), which is what grows with lattice and
batch size.

:func:`bench_scaling` repeats these measurements over lattice sizes L (L×L lattices) and batch
sizes, adds neural-MCMC throughput per L, and :func:`fit_slope` fits the exponent a of
cost per sample ∝ L^a on a log-log scale (a = 2 is cost proportional to the volume).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from latticeflow.estimators import ESTIMATORS, direction, get_estimator
from latticeflow.flows import Flow, build_flow
from latticeflow.flows.compile import compile_couplings
from latticeflow.theories import Phi4, U1Wilson
from latticeflow.theories.base import Action

#: The architecture of the classic U(1) tutorial flow.
CLASSIC_U1 = {"n_couplings": 24, "n_mixture": 6, "hidden": [8, 8], "kernel_size": 3}

BENCH_ACTIONS: dict[str, Action] = {"phi4": Phi4(-4.0, 8.0), "u1": U1Wilson(2.0)}


@dataclass
class StepTiming:
    """One estimator's training step on one setting.

    ``seconds``: median over the repeats; ``iqr``: their inter-quartile range; ``ratio``: median
    over the median of the same direction's standard estimator, eager to eager and compiled to
    compiled. Compiled rows (``compiled``) also carry ``compile_seconds``, the first call's
    time minus the median step (graph capture and code generation), and ``speedup``, the eager
    row's median over this one. ``memory_bytes``: see the module docstring (``-1`` where it is
    not measured: saved-tensor hooks do not see inside compiled graphs).
    """

    theory: str
    lattice: int
    batch: int
    estimator: str
    seconds: float
    ratio: float
    memory_bytes: int
    iqr: float = 0.0
    compiled: bool = False
    compile_seconds: float | None = None
    speedup: float | None = None

    @property
    def seconds_per_sample(self) -> float:
        return self.seconds / self.batch


def perturbed_flow(theory: str, lattice: int, arch: dict, device, dtype, seed: int = 0) -> Flow:
    """A flow with small random weights (a fresh zero-initialised flow is the identity map, which
    would make numerical inversion artificially cheap)."""
    torch.manual_seed(seed)
    flow = build_flow(theory, (lattice, lattice), arch, BENCH_ACTIONS[theory].params()
                      ).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return flow


def _saved_tensor_bytes(step) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(backward=False)
    return sum(storages.values())


def measure_memory(step, device: torch.device) -> int:
    """Peak bytes of one training step (see module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(backward=True)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return _saved_tensor_bytes(step)


def _training_step(flow: Flow, action: Action, name: str, data: torch.Tensor):
    estimator = get_estimator(name)

    def step(backward: bool = True) -> None:
        batch = flow.sample_prior(data.shape[0]) if direction(name) == "reverse" else data
        flow.zero_grad(set_to_none=True)
        out = estimator(flow, action, batch)
        if backward:
            out.surrogate.backward()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quartiles(values: list[float]) -> tuple[float, float]:
    """(median, inter-quartile range)."""
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return float(median), float(q3 - q1)


def bench_estimators(theory: str, lattice: int, batch: int, arch: dict, *, estimators=ESTIMATORS,
                     repeats: int = 10, warmup: int = 2, device=None, dtype=torch.float32,
                     compile: bool = False, backend: str = "inductor") -> list[StepTiming]:
    """Seconds per training step (median and IQR) and memory of each estimator, one setting.

    With ``compile`` a second flow with the same weights has its couplings compiled
    (:func:`~latticeflow.flows.compile.compile_couplings`); its steps are timed first once
    alone (compile time), then interleaved with the eager ones in every repeat.
    """
    device = torch.device(device or "cpu")
    variants = {False: perturbed_flow(theory, lattice, arch, device, dtype)}
    if compile:
        variants[True] = compile_couplings(perturbed_flow(theory, lattice, arch, device, dtype),
                                           backend=backend)
    action = BENCH_ACTIONS[theory]
    with torch.no_grad():
        data = variants[False].sample(batch)[0]
    steps = {(name, compiled): _training_step(flow, action, name, data)
             for compiled, flow in variants.items() for name in estimators}
    first_call: dict[tuple[str, bool], float] = {}
    for key, step in steps.items():
        if key[1]:
            first_call[key] = _timed(step, device)
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in steps}
    for repeat in range(warmup + repeats):
        for key, step in steps.items():
            elapsed = _timed(step, device)
            if repeat >= warmup:
                times[key].append(elapsed)
    stats = {key: _quartiles(t) for key, t in times.items()}
    results = []
    for (name, compiled), (median, iqr) in stats.items():
        reference = stats.get((f"{direction(name)}-standard", compiled), (math.nan,))[0]
        memory = -1 if compiled else measure_memory(steps[name, compiled], device)
        row = StepTiming(theory, lattice, batch, name, median, median / reference, memory, iqr,
                         compiled)
        if compiled:
            row.compile_seconds = max(first_call[name, True] - median, 0.0)
            row.speedup = stats[name, False][0] / median
        results.append(row)
    return results


def _timed(step, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def format_table(rows: list[StepTiming]) -> str:
    """A fixed-width table: median and IQR in ms, the ratio to the same direction's standard
    estimator (medians of one run), and for compiled rows the speed-up over eager and the
    compile time."""
    header = (f"{'theory':6} {'L':>3} {'B':>5} {'estimator':18} {'mode':8} {'median ms':>10} "
              f"{'IQR ms':>8} {'ratio':>6} {'vs eager':>9} {'compile s':>10} "
              f"{'memory MiB':>11}")
    lines = [header, "-" * len(header)]
    for r in rows:
        speedup = f"{r.speedup:9.2f}" if r.speedup is not None else f"{'':9}"
        compile_s = (f"{r.compile_seconds:10.1f}" if r.compile_seconds is not None
                     else f"{'':10}")
        memory = f"{r.memory_bytes / 2**20:11.2f}" if r.memory_bytes >= 0 else f"{'-':>11}"
        lines.append(f"{r.theory:6} {r.lattice:3d} {r.batch:5d} {r.estimator:18} "
                     f"{'compiled' if r.compiled else 'eager':8} {1e3 * r.seconds:10.2f} "
                     f"{1e3 * r.iqr:8.2f} {r.ratio:6.2f} {speedup} {compile_s} {memory}")
    return "\n".join(lines)


def as_records(rows: list[StepTiming]) -> list[dict]:
    return [asdict(r) for r in rows]


@dataclass
class SamplingThroughput:
    """Configurations per second of raw flow sampling and of the full neural-MCMC chain."""

    theory: str
    lattice: int
    batch: int
    n: int
    raw_per_second: float
    written_per_second: float

    @property
    def overhead(self) -> float:
        """Extra time of accept/reject + HDF5 writing relative to raw flow sampling."""
        return self.raw_per_second / self.written_per_second - 1


def bench_sampling(theory: str, lattice: int, batch: int, n: int, arch: dict, *, device=None,
                   dtype=torch.float32, directory=None) -> SamplingThroughput:
    """Configurations per second: raw flow sampling (proposals, log q, S) versus the full
    neural-MCMC chain written to an HDF5 ensemble (accept/reject, gather, transfer, write)."""
    import tempfile

    from latticeflow.ensemble import EnsembleWriter
    from latticeflow.samplers.chain import run_chain
    from latticeflow.samplers.nmcmc import FlowMetropolis

    device = torch.device(device or "cpu")
    flow = perturbed_flow(theory, lattice, arch, device, dtype)
    action = BENCH_ACTIONS[theory]
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        flow.sample(batch, generator=generator)  # warm-up
        _sync(device)
        start = time.perf_counter()
        for _ in range(n // batch):
            x, _ = flow.sample(batch, generator=generator)
            action(x)
        _sync(device)
        raw = (n // batch) * batch / (time.perf_counter() - start)
    sampler = FlowMetropolis(flow, action, seed=0, batch_size=batch)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        writer = EnsembleWriter.create(
            Path(tmp) / "bench.h5", theory=theory, action_card=action.card(),
            lattice=(lattice, lattice), field_shape=flow.field_shape, sampler="nmcmc", seed=0,
            sampler_params={}, dtype=np.float32, chunk_rows=batch)
        with writer:
            start = time.perf_counter()
            run_chain(sampler, writer, (n // batch) * batch, batch, progress=False)
            written = (n // batch) * batch / (time.perf_counter() - start)
    return SamplingThroughput(theory, lattice, batch, (n // batch) * batch, raw, written)


# ------------------------------------------------------------------------------------------
# Scaling with the lattice size
# ------------------------------------------------------------------------------------------

#: Standard versus fast-path estimator in each direction.
SCALING_ESTIMATORS = ("reverse-standard", "reverse-fastpath", "forward-standard",
                      "forward-fastpath")


@dataclass
class ScalingResult:
    """Training-step timings over (L, batch, estimator) and sampling throughput over L."""

    steps: list[StepTiming] = field(default_factory=list)
    sampling: list[SamplingThroughput] = field(default_factory=list)


def bench_scaling(theory: str, lattices: Sequence[int], batches: Sequence[int], arch: dict, *,
                  estimators: Sequence[str] = SCALING_ESTIMATORS, repeats: int = 3,
                  warmup: int = 1, sampling_batch: int = 64, sampling_n: int = 256,
                  device=None, dtype=torch.float32, progress=None) -> ScalingResult:
    """:func:`bench_estimators` for every L and batch, and :func:`bench_sampling` (batches of
    ``sampling_batch``, ``sampling_n`` configurations) for every L. ``progress(text)`` is called
    before each measurement."""
    result = ScalingResult()
    for lattice in lattices:
        for batch in batches:
            if progress:
                progress(f"{theory} L={lattice} B={batch}: training steps")
            result.steps += bench_estimators(theory, lattice, batch, arch,
                                             estimators=tuple(estimators), repeats=repeats,
                                             warmup=warmup, device=device, dtype=dtype)
        if sampling_n > 0:
            if progress:
                progress(f"{theory} L={lattice}: neural MCMC, {sampling_n} configurations")
            result.sampling.append(bench_sampling(theory, lattice, sampling_batch, sampling_n,
                                                  arch, device=device, dtype=dtype))
    return result


def fit_slope(lattices: Sequence[int], values: Sequence[float], low: int = 16,
              high: int = 64) -> float:
    """Least-squares slope of log(value) against log(L) over low <= L <= high (NaN with fewer
    than two such points)."""
    points = [(math.log(n), math.log(v)) for n, v in zip(lattices, values, strict=True)
              if low <= n <= high and v > 0]
    if len(points) < 2:
        return math.nan
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0])


def _step_series(result: ScalingResult) -> dict[tuple[str, int], list[StepTiming]]:
    series: dict[tuple[str, int], list[StepTiming]] = {}
    for row in result.steps:
        series.setdefault((row.estimator, row.batch), []).append(row)
    return series


def scaling_slopes(result: ScalingResult, low: int = 16, high: int = 64) -> dict[str, float]:
    """Fitted exponents of cost per sample against L: ``"<estimator> B=<batch>"`` for training
    steps (seconds per sample), ``"<estimator> B=<batch> memory"`` for memory per sample and
    ``"nmcmc"`` for seconds per neural-MCMC configuration written."""
    slopes = {}
    for (name, batch), rows in _step_series(result).items():
        lattices = [r.lattice for r in rows]
        slopes[f"{name} B={batch}"] = fit_slope(lattices, [r.seconds_per_sample for r in rows],
                                                low, high)
        slopes[f"{name} B={batch} memory"] = fit_slope(
            lattices, [r.memory_bytes / r.batch for r in rows], low, high)
    if result.sampling:
        slopes["nmcmc"] = fit_slope([s.lattice for s in result.sampling],
                                    [1 / s.written_per_second for s in result.sampling],
                                    low, high)
    return slopes


def format_scaling(result: ScalingResult, low: int = 16, high: int = 64) -> str:
    """The scaling tables and the fitted exponents, as text."""
    header = (f"{'theory':6} {'L':>3} {'B':>4} {'estimator':17} {'s/step':>9} "
              f"{'ms/sample':>10} {'ratio':>6} {'MiB':>9} {'KiB/sample':>11}")
    lines = ["training step (ratio: to the standard estimator of the same direction)", header,
             "-" * len(header)]
    for r in result.steps:
        lines.append(f"{r.theory:6} {r.lattice:3d} {r.batch:4d} {r.estimator:17} "
                     f"{r.seconds:9.4f} {1e3 * r.seconds_per_sample:10.3f} {r.ratio:6.2f} "
                     f"{r.memory_bytes / 2**20:9.2f} {r.memory_bytes / r.batch / 2**10:11.1f}")
    if result.sampling:
        head = (f"{'theory':6} {'L':>3} {'B':>4} {'raw conf/s':>11} {'nMCMC conf/s':>13} "
                f"{'ms/conf':>8}")
        lines += ["", "neural MCMC (raw: flow samples + action; nMCMC: chain written to HDF5)",
                  head, "-" * len(head)]
        for s in result.sampling:
            lines.append(f"{s.theory:6} {s.lattice:3d} {s.batch:4d} {s.raw_per_second:11.1f} "
                         f"{s.written_per_second:13.1f} {1e3 / s.written_per_second:8.3f}")
    slopes = scaling_slopes(result, low, high)
    lines += ["", f"cost per sample ∝ L^a, a fitted over L = {low}..{high} "
                  f"(a = 2: proportional to the volume L²):"]
    width = max(len(k) for k in slopes) if slopes else 0
    for key, value in slopes.items():
        lines.append(f"  {key:{width}}  a = {value:5.2f}")
    return "\n".join(lines)


def plot_scaling(result: ScalingResult, path: str | Path, low: int = 16, high: int = 64
                 ) -> None:
    """Log-log PNG: seconds and memory per sample against L, with an L² reference line."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    time_ax, memory_ax = fig.subplots(1, 2)
    for (name, batch), rows in _step_series(result).items():
        lattices = [r.lattice for r in rows]
        style = "-" if name.endswith("standard") else "--"
        marker = "o" if name.startswith("reverse") else "s"
        label = f"{name} B={batch}"
        time_ax.plot(lattices, [r.seconds_per_sample for r in rows], style, marker=marker,
                     label=label)
        memory_ax.plot(lattices, [r.memory_bytes / r.batch for r in rows], style,
                       marker=marker, label=label)
    if result.sampling:
        time_ax.plot([s.lattice for s in result.sampling],
                     [1 / s.written_per_second for s in result.sampling], ":", color="black",
                     marker="^", label="neural MCMC (per configuration)")
    for ax, unit in ((time_ax, "seconds per sample"), (memory_ax, "bytes per sample")):
        lines = [line for line in ax.get_lines() if len(line.get_xdata())]
        if lines:
            xs = np.array(sorted({x for line in lines for x in line.get_xdata()}), dtype=float)
            ys = np.concatenate([line.get_ydata() for line in lines])
            anchor = float(np.exp(np.log(ys[ys > 0]).mean()))
            centre = float(np.exp(np.log(xs).mean()))
            ax.plot(xs, anchor * (xs / centre) ** 2, color="grey", lw=3, alpha=0.4,
                    label="∝ L² (reference)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(int(x)) for x in xs])
        ax.set_yscale("log")
        ax.set_xlabel("L (lattice L×L)")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3, which="both")
    time_ax.legend(fontsize=7)
    theory = result.steps[0].theory if result.steps else ""
    fig.suptitle(f"{theory}: cost per sample against lattice size (slopes fitted over "
                 f"L = {low}..{high} in the text output)")
    fig.savefig(path, dpi=110)


def scaling_records(result: ScalingResult, low: int = 16, high: int = 64) -> dict:
    """JSON-ready numbers: steps, sampling and the fitted slopes."""
    return {"steps": as_records(result.steps),
            "sampling": [{**asdict(s), "overhead": s.overhead} for s in result.sampling],
            "fit_range": [low, high], "slopes": scaling_slopes(result, low, high)}
