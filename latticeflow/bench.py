"""Benchmarks of training steps: seconds per step and memory, measured in one process.

Times are medians over repeats after warm-up; the estimators are interleaved within every
repeat so that slow drifts of a shared machine affect them alike. Memory is the peak device
allocation on CUDA; on the CPU it is the size of the tensors autograd saves for the backward pass
(activation memory, deduplicated by storage), which is what grows with lattice and batch size.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from latticeflow.estimators import ESTIMATORS, direction, get_estimator
from latticeflow.flows import Flow, build_flow
from latticeflow.theories import Phi4, U1Wilson
from latticeflow.theories.base import Action

#: The architecture of the classic U(1) tutorial flow.
CLASSIC_U1 = {"n_couplings": 24, "n_mixture": 6, "hidden": [8, 8], "kernel_size": 3}

BENCH_ACTIONS: dict[str, Action] = {"phi4": Phi4(-4.0, 8.0), "u1": U1Wilson(2.0)}


@dataclass
class StepTiming:
    theory: str
    lattice: int
    batch: int
    estimator: str
    seconds: float
    ratio: float
    memory_bytes: int


def perturbed_flow(theory: str, lattice: int, arch: dict, device, dtype, seed: int = 0) -> Flow:
    """A flow with small random weights (a fresh zero-initialised flow is the identity map, which
    would make numerical inversion artificially cheap)."""
    torch.manual_seed(seed)
    flow = build_flow(theory, (lattice, lattice), arch).to(device=device, dtype=dtype)
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


def bench_estimators(theory: str, lattice: int, batch: int, arch: dict, *, estimators=ESTIMATORS,
                     repeats: int = 10, warmup: int = 2, device=None, dtype=torch.float32
                     ) -> list[StepTiming]:
    """Seconds per training step (median) and memory of each estimator, one setting."""
    device = torch.device(device or "cpu")
    flow = perturbed_flow(theory, lattice, arch, device, dtype)
    action = BENCH_ACTIONS[theory]
    with torch.no_grad():
        data = flow.sample(batch)[0]
    steps = {name: _training_step(flow, action, name, data) for name in estimators}
    times: dict[str, list[float]] = {name: [] for name in estimators}
    for repeat in range(warmup + repeats):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            if repeat >= warmup:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    results = []
    for name in estimators:
        reference = medians.get(f"{direction(name)}-standard", float("nan"))
        results.append(StepTiming(theory, lattice, batch, name, medians[name],
                                  medians[name] / reference, measure_memory(steps[name], device)))
    return results


def format_table(rows: list[StepTiming]) -> str:
    """A fixed-width table of the timings, ratios relative to the same direction's standard."""
    header = (f"{'theory':6} {'L':>3} {'B':>5} {'estimator':18} {'s/step':>9} "
              f"{'ratio':>6} {'memory MiB':>11}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.theory:6} {r.lattice:3d} {r.batch:5d} {r.estimator:18} "
                     f"{r.seconds:9.4f} {r.ratio:6.2f} {r.memory_bytes / 2**20:11.2f}")
    return "\n".join(lines)


def as_records(rows: list[StepTiming]) -> list[dict]:
    return [asdict(r) for r in rows]


@dataclass
class SamplingThroughput:
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
    from pathlib import Path

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
