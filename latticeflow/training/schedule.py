"""The learning-rate schedule: linear warm-up, then constant or cosine decay to 0."""

from __future__ import annotations

import math

from latticeflow.config import TrainingConfig


def lr_factor(index: int, config: TrainingConfig) -> float:
    """Learning-rate multiplier of optimiser step ``index`` (0-based).

    Linear warm-up (index + 1)/warmup_steps for index < warmup_steps; then 1 (constant) or
    ½(1 + cos(π t)) with t = (index − warmup)/(steps − warmup) going from 0 to 1 (cosine).
    """
    warmup = config.warmup_steps
    if index < warmup:
        return (index + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    progress = min((index - warmup) / max(config.steps - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


__all__ = ["lr_factor"]
