"""Translation-equivariant convolutional conditioners with periodic padding.

Besides the forward pass, a conditioner gives the input gradient of its output in closed form
(:func:`recorded` keeps the values between layers, :func:`input_vjp` runs the layers' input
gradients backwards through them): one ATen backward kernel per layer and no parameter
gradients, which is what the fast path's per-coupling score step needs (DESIGN §4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {"leaky_relu": nn.LeakyReLU, "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU,
               "silu": nn.SiLU}


_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# The input gradient of a convolution (no padding) is the transposed convolution of the output
# gradient with the same weight.
_TRANSPOSED_CONVOLUTIONS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _fold_halo(grad: Tensor, p: int, axes: tuple[int, ...]) -> Tensor:
    """The adjoint of periodic padding: add the halo of width ``p`` back onto the interior."""
    for axis in axes:
        n = grad.shape[axis] - 2 * p
        inner = grad.narrow(axis, p, n).clone()
        inner.narrow(axis, n - p, p).add_(grad.narrow(axis, 0, p))
        inner.narrow(axis, 0, p).add_(grad.narrow(axis, n + p, p))
        grad = inner
    return grad


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
        return _fold_halo(grad, ctx.p, ctx.axes), None, None


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

    def _lattice_axes(self, dim: int) -> tuple[int, ...]:
        return tuple(range(dim - self.ndim, dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.pad:
            x = _CircularPad.apply(x, self.pad, self._lattice_axes(x.dim()))
        return self.conv(x)

    def input_vjp(self, grad: Tensor, input_shape: torch.Size) -> Tensor:
        """∂(grad · self(x))/∂x for inputs of ``input_shape`` (the output is linear in x)."""
        grad = _TRANSPOSED_CONVOLUTIONS[self.ndim](grad, self.conv.weight)
        if not self.pad:
            return grad
        return _fold_halo(grad, self.pad, self._lattice_axes(len(input_shape)))

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
        return _CONVOLUTIONS[self.ndim](x, self.conv.weight, self.conv.bias,
                                        stride=self._row_stride(axis, x.dim()))

    def _row_stride(self, axis: int, dim: int) -> list[int]:
        stride = [1] * self.ndim
        stride[axis - (dim - self.ndim)] = self.conv.kernel_size[0]
        return stride

    def at_rows_input_vjp(self, grad: Tensor, input_shape: torch.Size, axis: int,
                          windows: Tensor) -> Tensor:
        """∂(grad · self.at_rows(x, axis, windows))/∂x for inputs of ``input_shape``.

        Each output row reads its own window of k rows, so the window's gradient is a transposed
        convolution along the other axes only, with the k kernel rows as k·c_in output channels
        (a strided transposed convolution computes the same, measured 1.5–2.6× slower on a CPU).
        """
        lattice_axes = self._lattice_axes(len(input_shape))
        others = tuple(a for a in lattice_axes if a != axis)
        k = self.conv.kernel_size[0]
        weight = self.conv.weight.movedim(2 + axis - lattice_axes[0], 2).flatten(1, 2)
        weight = weight.unsqueeze(2 + axis - lattice_axes[0])  # (c_out, c_in·k, 1 along axis)
        grad = _TRANSPOSED_CONVOLUTIONS[self.ndim](grad, weight)
        grad = grad.unflatten(1, (-1, k)).movedim(2, axis + 1).flatten(axis, axis + 1)
        if self.pad:
            grad = _fold_halo(grad, self.pad, others)
        return grad.new_zeros(input_shape).index_add_(axis, windows, grad)


#: Input gradients of the activations, one ATen backward kernel each:
#: ``(module, grad of the output, input, output) → grad of the input``.
_ACTIVATION_INPUT_VJPS = {
    nn.LeakyReLU: lambda m, g, x, y: torch.ops.aten.leaky_relu_backward(g, x, m.negative_slope,
                                                                       False),
    nn.ReLU: lambda m, g, x, y: torch.ops.aten.threshold_backward(g, y, 0),
    nn.Tanh: lambda m, g, x, y: torch.ops.aten.tanh_backward(g, y),
    nn.GELU: lambda m, g, x, y: torch.ops.aten.gelu_backward(g, x, approximate=m.approximate),
    nn.SiLU: lambda m, g, x, y: torch.ops.aten.silu_backward(g, x),
}


def recorded(layers: nn.Sequential, x: Tensor) -> list[Tensor]:
    """``[x, layer₁(x), layer₂(layer₁(x)), …]``: every layer's input, then the output."""
    values = [x]
    for layer in layers:
        values.append(layer(values[-1]))
    return values


def input_vjp(layers: nn.Sequential, values: list[Tensor], grad: Tensor) -> Tensor:
    """∂(grad · layers(x))/∂x from ``values = recorded(layers, x)``, with no parameter
    gradients and no autograd graph (periodic convolutions and :data:`ACTIVATIONS` only)."""
    for layer, x, y in zip(reversed(layers), reversed(values[:-1]), reversed(values[1:]),
                           strict=True):
        if isinstance(layer, PeriodicConv):
            grad = layer.input_vjp(grad, x.shape)
        else:
            grad = _ACTIVATION_INPUT_VJPS[type(layer)](layer, grad, x, y)
    return grad


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
