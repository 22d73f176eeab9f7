"""What a training run works under: float32 precision on CUDA (:func:`tf32_mode`, which sampling
uses too), compiled couplings built before the first step (:func:`warm_up_compiled`), and Ctrl-C
that finishes the current step first (:class:`_DeferredInterrupt`).

Precision: float32 convolutions and matmuls run in full IEEE precision unless the trainer is
built with ``tf32=True`` (``latticeflow train --tf32``); see :func:`tf32_mode`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from latticeflow.training.trainer import Trainer

log = logging.getLogger("latticeflow")


@contextmanager
def tf32_mode(enabled: bool) -> Iterator[None]:
    """Within the block, float32 CUDA matmuls and cuDNN convolutions use TF32 (``enabled``) or
    full IEEE float32 (not ``enabled``); the previous settings are restored afterwards.

    PyTorch's own default lets cuDNN convolutions use TF32, so sampling wraps its work in
    ``tf32_mode(False)``: the log-densities that enter accept/reject are never TF32. No effect on
    the CPU.
    """
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def warm_up_compiled(trainer: Trainer, seed: int) -> float:
    """Run one training step and the ESS sampling of ``trainer`` on throw-away batches (drawn
    from a generator seeded with ``seed``), so that its compiled graphs are built before the
    first step; returns and logs the seconds. Compile time is so never counted in the training
    time, and no training stream is touched: the gradients are discarded and the trainer's
    generator is restored."""
    started = time.perf_counter()
    generator = torch.Generator(device=trainer.device)
    generator.manual_seed(seed)
    config, saved = trainer.config, trainer.generator
    trainer.generator = generator
    try:
        trainer.flow.train()
        trainer.backward(*trainer.draw_batch())
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.flow.eval()
        with torch.no_grad():
            for n in {config.batch_size, config.ess_batch % config.batch_size} - {0}:
                trainer.flow.sample(n, generator=generator)
    finally:
        trainer.generator = saved
    seconds = time.perf_counter() - started
    if trainer.is_main:
        log.info("compiled the couplings in %.1f s (not counted in the training time)", seconds)
    return seconds


class _DeferredInterrupt:
    """Within the context a first SIGINT only sets :attr:`requested` (checked between steps);
    a second one raises KeyboardInterrupt at once. Outside the main thread: no effect."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log.warning("interrupt: finishing the current step and writing a checkpoint "
                    "(Ctrl-C again to abort at once)")

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


__all__ = ["tf32_mode", "warm_up_compiled"]
