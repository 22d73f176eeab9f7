"""The interface every lattice action implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor


class Action(ABC):
    """A lattice action S(x); the target density is p(x) ∝ exp(−S(x)).

    Subclasses act on batches: ``x`` has shape ``(batch, *field_shape(lattice))`` and
    ``action(x)`` returns ``(batch,)``. The same object works for every lattice size.
    """

    theory: ClassVar[str]

    @abstractmethod
    def __call__(self, x: Tensor) -> Tensor:
        """S(x) per configuration, shape ``(batch,)``."""

    @abstractmethod
    def force(self, x: Tensor) -> Tensor:
        """The analytic force −∂S/∂x, same shape as ``x``."""

    @abstractmethod
    def field_shape(self, lattice: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of one configuration on ``lattice`` (without the batch axis)."""

    @abstractmethod
    def params(self) -> dict[str, float | str]:
        """The parameters that define the action, as written in an action card."""

    def card(self) -> dict[str, float | str]:
        """The full action-card table (``theory`` plus parameters); round-trips through
        :func:`latticeflow.theories.action_from_table`."""
        return {"theory": self.theory, **self.params()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"
