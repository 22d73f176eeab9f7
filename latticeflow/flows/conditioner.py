"""Translation-equivariant convolutional conditioners with periodic padding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {"leaky_relu": nn.LeakyReLU, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU,
               "silu": nn.SiLU}


_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _CircularPad(torch.autograd.Function):
    """Periodic padding of the tensor axes ``axes`` by ``p`` sites on each side.

    The backward folds the halo back onto the interior with a few slice additions (autograd's
    generic slice backward would zero-fill a full-size tensor for every slice).
    """

    @staticmethod
    def forward(ctx, x: Tensor, p: int, axes: tuple[int, ...]) -> Tensor:
        ctx.p, ctx.axes = p, axes
        for axis in axes:
            n = x.shape[axis]
            x = torch.cat([x.narrow(axis, n - p, p), x, x.narrow(axis, 0, p)], dim=axis)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        p = ctx.p
        for axis in ctx.axes:
            n = grad.shape[axis] - 2 * p
            inner = grad.narrow(axis, p, n).clone()
            inner.narrow(axis, n - p, p).add_(grad.narrow(axis, 0, p))
            inner.narrow(axis, 0, p).add_(grad.narrow(axis, n + p, p))
            grad = inner
        return grad, None, None


class PeriodicConv(nn.Module):
    """A convolution over a periodic ``ndim``-dimensional lattice (odd kernel, same size out).

    :meth:`at_rows` evaluates it only on chosen rows of one axis (the same numbers as the full
    output's rows, at a fraction of the cost).
    """

    def __init__(self, ndim: int, c_in: int, c_out: int, kernel_size: int):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.ndim, self.pad = ndim, kernel_size // 2
        self.conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[ndim](c_in, c_out, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        if self.pad:
            x = _CircularPad.apply(x, self.pad, tuple(range(x.dim() - self.ndim, x.dim())))
        return self.conv(x)

    def windows(self, rows: Tensor, extent: int) -> Tensor:
        """The input rows that output ``rows`` (of an axis of length ``extent``) read: for each
        row r, r − p … r + p (mod extent), concatenated; the argument of :meth:`at_rows`."""
        reach = torch.arange(-self.pad, self.pad + 1, device=rows.device)
        return ((rows[:, None] + reach) % extent).flatten()

    def at_rows(self, x: Tensor, axis: int, windows: Tensor) -> Tensor:
        """``self(x).index_select(axis, rows)`` for ``windows = self.windows(rows, ...)``: the
        input windows are gathered and convolved with stride k along ``axis``, so only the
        wanted rows are computed."""
        x = x.index_select(axis, windows)
        others = tuple(a for a in range(x.dim() - self.ndim, x.dim()) if a != axis)
        if self.pad:
            x = _CircularPad.apply(x, self.pad, others)
        stride = [1] * self.ndim
        stride[axis - (x.dim() - self.ndim)] = self.conv.kernel_size[0]
        return _CONVOLUTIONS[self.ndim](x, self.conv.weight, self.conv.bias, stride=stride)


def conv_net(
    ndim: int, in_channels: int, out_channels: int, hidden: list[int], kernel_size: int,
    activation: str, zero_init: bool = True,
) -> nn.Sequential:
    """Periodic convolutions over a ``ndim``-dimensional lattice.

    Input ``(batch, in_channels, L0, L1, ...)`` → ``(batch, out_channels, L0, L1, ...)``; no
    weight depends on the lattice extent. With ``zero_init`` the last layer starts at zero, so a
    fresh coupling is the identity map.
    """
    widths = [in_channels, *hidden, out_channels]
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(PeriodicConv(ndim, c_in, c_out, kernel_size))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    if zero_init:
        nn.init.zeros_(layers[-1].conv.weight)
        nn.init.zeros_(layers[-1].conv.bias)
    return nn.Sequential(*layers)
